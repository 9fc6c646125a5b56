"""The thresholds file: per-layer CHESS/CATS/attention thresholds plus metadata.

One safetensors file holds, for L layers, S calibrated sparsities, FFN width F:

    sparsities [S]        the calibration targets
    up_stat    [L, F]     m_i, the per-channel statistic of |a_up|
    chess      [L, S, F]  per-channel gate thresholds tau_i = tau_imp / m_i
    cats       [L, S]     one gate threshold per layer (CATS)
    q_proj     [L, S]     one threshold per layer on the q_proj input
    o_proj     [L, S]     one threshold per layer on the o_proj input

Metadata (strings) says which model it belongs to and how it was made.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ChessError

FORMAT = "chess_mlx.thresholds/1"
ARRAYS = ("sparsities", "up_stat", "chess", "cats", "q_proj", "o_proj")
GATE_KEY = {"cats": "cats", "chess": "chess", "chess+": "chess"}


def linear_dims(module: nn.Module) -> tuple:
    """(input, output) features of a float or quantized linear layer."""
    out_dims = module.weight.shape[0]
    if isinstance(module, nn.QuantizedLinear):
        return module.scales.shape[-1] * module.group_size, out_dims
    return module.weight.shape[1], out_dims


def model_identity(model: nn.Module) -> Dict[str, object]:
    """Shapes and a weight fingerprint that tell models apart.

    The fingerprint is the mean of each layer's input norm weight: norms stay
    unquantized in every format, so the same model loaded from GGUF, float or
    4-bit folders matches while a different model does not.
    """
    layers = model.layers
    hidden, ffn = linear_dims(layers[0].mlp.gate_proj)
    attn_width, _ = linear_dims(layers[0].self_attn.o_proj)
    fingerprint = [
        round(layer.input_layernorm.weight.astype(mx.float32).mean().item(), 5)
        for layer in layers
    ]
    return {
        "model_type": model.model_type,
        "num_layers": len(layers),
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "attention_width": attn_width,
        "fingerprint": fingerprint,
    }


@dataclass
class Thresholds:
    sparsities: np.ndarray
    up_stat: np.ndarray
    chess: np.ndarray
    cats: np.ndarray
    q_proj: np.ndarray
    o_proj: np.ndarray
    metadata: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name in ARRAYS:
            values = np.asarray(getattr(self, name), dtype=np.float32)
            if not np.all(np.isfinite(values)):
                raise ChessError(f"thresholds '{name}' contain NaN or inf")
            setattr(self, name, values)

    @property
    def identity(self) -> Dict[str, object]:
        return json.loads(self.metadata["identity"])

    def validate(self, model: nn.Module):
        """Raise a one-line error unless these thresholds belong to ``model``."""
        ours, theirs = self.identity, model_identity(model)
        for key in ("model_type", "num_layers", "hidden_size", "intermediate_size", "attention_width"):
            if ours[key] != theirs[key]:
                raise ChessError(
                    f"thresholds were calibrated for another model: {key} is "
                    f"{ours[key]} in the file but {theirs[key]} in the model "
                    f"(file made for '{self.metadata.get('model', '?')}')"
                )
        if not np.allclose(ours["fingerprint"], theirs["fingerprint"], rtol=1e-2, atol=1e-3):
            raise ChessError(
                "thresholds were calibrated for another model with the same shapes "
                f"(file made for '{self.metadata.get('model', '?')}'; norm weights differ)"
            )

    def sparsity_index(self, sparsity: float) -> int:
        if not 0 <= sparsity < 1:
            raise ChessError(f"sparsity must be in [0, 1), got {sparsity}")
        matches = np.flatnonzero(np.isclose(self.sparsities, sparsity, atol=1e-6))
        if len(matches) == 0:
            available = ", ".join(f"{s:g}" for s in self.sparsities)
            raise ChessError(f"sparsity {sparsity:g} was not calibrated (available: 0, {available})")
        return int(matches[0])

    def select(self, method: str, sparsity: float) -> Dict[str, List[mx.array]]:
        """Per-layer thresholds for ``method`` at ``sparsity`` (0 keeps everything)."""
        num_layers = self.up_stat.shape[0]
        if sparsity == 0:
            zero = [mx.zeros((1,)) for _ in range(num_layers)]
            return {"gate": zero, "q_proj": zero, "o_proj": zero}
        s = self.sparsity_index(sparsity)
        gate = getattr(self, GATE_KEY[method])
        return {
            "gate": [mx.array(np.atleast_1d(g[s])) for g in gate],
            "q_proj": [mx.array(q[s : s + 1]) for q in self.q_proj],
            "o_proj": [mx.array(o[s : s + 1]) for o in self.o_proj],
        }

    def save(self, path: str):
        """Write atomically: a failed save never leaves a partial file."""
        path = check_destination(path)
        arrays = {name: mx.array(getattr(self, name)) for name in ARRAYS}
        metadata = {"format": FORMAT, **self.metadata}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors")
        os.close(fd)
        try:
            mx.save_safetensors(tmp, arrays, metadata=metadata)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates it private
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def check_destination(path: str) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise ChessError(f"cannot write '{path}': folder '{path.parent}' does not exist")
    return path


def load_thresholds(path: str) -> Thresholds:
    """Read a thresholds file, checking its format and contents."""
    if not Path(path).is_file():
        raise ChessError(f"thresholds file '{path}' not found")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ChessError(f"'{path}' is not a readable safetensors file ({e})") from None
    if metadata.get("format") != FORMAT or set(ARRAYS) - set(arrays):
        raise ChessError(f"'{path}' is not a chess_mlx thresholds file")
    values = {name: np.array(arrays[name]) for name in ARRAYS}
    try:
        return Thresholds(**values, metadata=metadata)
    except ChessError as e:
        raise ChessError(f"'{path}': {e}") from None
