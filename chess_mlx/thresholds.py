"""The thresholds file: per-layer CHESS/CATS/attention thresholds plus metadata.

One safetensors file holds, for L layers, S calibrated sparsities, FFN width F:

    sparsities [S]        the calibration targets
    up_stat    [L, F]     m_i, the per-channel statistic of |a_up|
    chess      [L, S, F]  per-channel gate thresholds tau_i = tau_imp / m_i
    cats       [L, S]     one gate threshold per layer (CATS)
    q_proj     [L, S]     one threshold per layer on the attention input (q/k/v)
    o_proj     [L, S]     one threshold per layer on the o_proj input
    mlp_in     [L, S]     one threshold per layer on the MLP input (gate/up)
    down_in    [L, S]     one threshold per layer on the down_proj input
    head_in    [S, H]     per-channel thresholds on the LM head's input (the final
                          norm's output, width H), weighted by each channel's effect
                          on the logits (see chess_mlx.calibrate); older files: [S]

and, when calibration searched allocations (see chess_mlx.allocation), for A
target ideal speed-ups and the C components of ALLOCATED:

    allocation_speedups   [A]        the targets
    allocation_predicted  [A]        the ideal speed-up each allocation buys
    allocations           [A, L, C]  the sparsity of each component (0 or one of ``sparsities``)
    allocation_head       [A]        the LM head input's sparsity (0 when dense)

Files from before mlp_in/down_in existed still load; the methods that need
the missing arrays then ask for a recalibration. Files without head_in or
allocation_head keep the LM head dense.

Metadata (strings) says which model it belongs to and how it was made.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ChessError

FORMAT = "chess_mlx.thresholds/1"
ARRAYS = ("sparsities", "up_stat", "chess", "cats", "q_proj", "o_proj")
OPTIONAL = ("mlp_in", "down_in", "head_in", "allocation_speedups", "allocation_predicted", "allocations",
            "allocation_head")
GATE_KEY = {"cats": "cats", "chess": "chess", "chess+": "chess"}
# What an allocation sets per layer: the attention input (q/k/v), the o_proj
# input, the MLP input (gate/up), CHESS's per-channel gate mask, the down_proj input.
ALLOCATED = ("attn_in", "o_in", "mlp_in", "gate", "down_in")


@dataclass
class LayerThresholds:
    """What one layer thresholds; None leaves that input dense.

    ``up_from_mask``: up_proj computes only the rows the gate mask keeps, on
    its dense input (output-sparse); otherwise it reads the thresholded MLP
    input (input-sparse). A GEMV can skip rows or columns of a weight, not
    both, so the sparser of the two serves it.
    """

    gate: Optional[mx.array] = None
    q_in: Optional[mx.array] = None
    kv_in: Optional[mx.array] = None
    o_in: Optional[mx.array] = None
    mlp_in: Optional[mx.array] = None
    down_in: Optional[mx.array] = None
    up_from_mask: bool = True

    @property
    def mlp(self) -> bool:
        return any(t is not None for t in (self.gate, self.mlp_in, self.down_in))


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
    mlp_in: Optional[np.ndarray] = None
    down_in: Optional[np.ndarray] = None
    head_in: Optional[np.ndarray] = None
    allocation_speedups: Optional[np.ndarray] = None
    allocation_predicted: Optional[np.ndarray] = None
    allocations: Optional[np.ndarray] = None
    allocation_head: Optional[np.ndarray] = None

    def __post_init__(self):
        for name in ARRAYS + OPTIONAL:
            if getattr(self, name) is None:
                continue
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
        if sparsity == 0:
            zero = [mx.zeros((1,)) for _ in range(self.num_layers)]
            return {"gate": zero, "q_proj": zero, "o_proj": zero}
        s = self.sparsity_index(sparsity)
        gate = getattr(self, GATE_KEY[method])
        return {
            "gate": [mx.array(np.atleast_1d(g[s])) for g in gate],
            "q_proj": [mx.array(q[s : s + 1]) for q in self.q_proj],
            "o_proj": [mx.array(o[s : s + 1]) for o in self.o_proj],
        }

    def layer_thresholds(self, method: str, setting: float) -> List[LayerThresholds]:
        """What each layer thresholds for ``method``: ``setting`` is the target
        sparsity, or for ``alloc`` the target ideal speed-up of a searched
        allocation."""
        if method == "alloc":
            rows = self.allocation(setting)
            return [self.layer_plan(i, dict(zip(ALLOCATED, row))) for i, row in enumerate(rows)]
        if method == "teal":
            self.require("mlp_in", "down_in")
            levels = {"attn_in": setting, "o_in": setting, "mlp_in": setting, "down_in": setting}
            return [self.layer_plan(i, levels) for i in range(self.num_layers)]
        taus = self.select(method, setting)
        plans = []
        for i in range(self.num_layers):
            plan = LayerThresholds(gate=taus["gate"][i])
            if method == "chess+":
                plan.q_in, plan.o_in = taus["q_proj"][i], taus["o_proj"][i]
            plans.append(plan)
        return plans

    @property
    def num_layers(self) -> int:
        return self.up_stat.shape[0]

    def require(self, *names: str):
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ChessError(
                f"this thresholds file has no {', '.join(missing)} (made by an older chess_mlx "
                "or without --speedup): recalibrate with `python -m chess_mlx.calibrate`"
            )

    def allocation(self, speedup: float) -> np.ndarray:
        """The searched per-layer sparsities ``[L, len(ALLOCATED)]`` for a target speed-up."""
        return self.allocations[self.allocation_index(speedup)]

    def allocation_index(self, speedup: float) -> int:
        self.require("mlp_in", "down_in", "allocations")
        matches = np.flatnonzero(np.isclose(self.allocation_speedups, speedup, atol=1e-6))
        if len(matches) == 0:
            available = ", ".join(f"{a:g}" for a in self.allocation_speedups)
            raise ChessError(f"no allocation was searched for speed-up {speedup:g} (available: {available})")
        return int(matches[0])

    def head_sparsity(self, method: str, setting: float) -> float:
        """The LM head input's targeted sparsity: only searched allocations set one."""
        if method != "alloc" or self.allocation_head is None:
            return 0.0
        return float(self.allocation_head[self.allocation_index(setting)])

    def head_threshold(self, method: str, setting: float) -> Optional[mx.array]:
        """The threshold on the LM head's input, or None to keep it dense."""
        level = self.head_sparsity(method, setting)
        if level == 0:
            return None
        self.require("head_in")
        return mx.array(np.atleast_1d(self.head_in[self.sparsity_index(level)]))

    def layer_plan(self, layer: int, levels: Dict[str, float]) -> LayerThresholds:
        """A layer's thresholds from the sparsity of each ALLOCATED component
        (0 or missing leaves that input dense)."""
        chosen = {name: float(levels.get(name, 0.0)) for name in ALLOCATED}

        def tau(array, name):
            if chosen[name] == 0:
                return None
            s = self.sparsity_index(chosen[name])
            return mx.array(np.atleast_1d(array[layer][s]))

        attn_in = tau(self.q_proj, "attn_in")
        return LayerThresholds(
            gate=tau(self.chess, "gate"),
            q_in=attn_in,
            kv_in=attn_in,
            o_in=tau(self.o_proj, "o_in"),
            mlp_in=tau(self.mlp_in, "mlp_in"),
            down_in=tau(self.down_in, "down_in"),
            up_from_mask=chosen["gate"] > 0 and chosen["gate"] >= chosen["mlp_in"],
        )

    def save(self, path: str):
        """Write atomically: a failed save never leaves a partial file."""
        path = check_destination(path)
        arrays = {name: mx.array(getattr(self, name)) for name in ARRAYS + OPTIONAL if getattr(self, name) is not None}
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
    values = {name: np.array(arrays[name]) for name in ARRAYS + OPTIONAL if name in arrays}
    try:
        return Thresholds(**values, metadata=metadata)
    except ChessError as e:
        raise ChessError(f"'{path}': {e}") from None
