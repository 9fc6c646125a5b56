"""Patch an mlx-lm model so that it thresholds activations (the reference path).

The masks computed here are the ground truth: the sparse kernels must match
them, calibration measures the activations they act on, and evaluation runs
through them. Everything is plain MLX, so it works on every backend.
"""

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import ChessError

METHODS = ("dense", "cats", "chess", "chess+")

# The activation applied to gate_proj's output in each supported family.
ACTIVATIONS: Dict[str, Callable[[mx.array], mx.array]] = {
    "llama": nn.silu,
    "mistral": nn.silu,
    "qwen2": nn.silu,
    "qwen3": nn.silu,
    "gemma": nn.gelu,
    "gemma2": nn.gelu_approx,
    "gemma3": nn.gelu_approx,
    "gemma3_text": nn.gelu_approx,
}


def keep_mask(x: mx.array, tau: mx.array) -> mx.array:
    """True where an entry survives: ``|x| >= tau`` (entries below are dropped)."""
    return mx.abs(x) >= tau


class SparsityTracker:
    """Counts kept and total entries per (layer, projection) without syncing."""

    def __init__(self):
        self.kept: Dict[str, mx.array] = {}
        self.total: Dict[str, int] = {}

    def add(self, name: str, keep: mx.array):
        kept = keep.sum()
        self.kept[name] = self.kept[name] + kept if name in self.kept else kept
        self.total[name] = self.total.get(name, 0) + keep.size

    def sparsity(self) -> Dict[str, float]:
        """Fraction of entries dropped, per 'layers.N.projection' name."""
        mx.eval(list(self.kept.values()))
        return {k: 1.0 - self.kept[k].item() / self.total[k] for k in self.kept}

    def summary(self) -> Dict[str, float]:
        """Fraction dropped per projection kind, pooled over layers."""
        kept, total = {}, {}
        mx.eval(list(self.kept.values()))
        for name, count in self.kept.items():
            kind = name.rsplit(".", 1)[-1]
            kept[kind] = kept.get(kind, 0) + count.item()
            total[kind] = total.get(kind, 0) + self.total[name]
        return {k: 1.0 - kept[k] / total[k] for k in kept}


class SparseMLP(nn.Module):
    """Gated MLP whose activated gate is thresholded (CATS scalar or CHESS per channel).

    ``a_gate`` entries with ``|a_gate| < tau`` are zeroed, so the matching rows
    of up_proj and columns of down_proj contribute nothing.
    """

    def __init__(self, dense: nn.Module, activation: Callable, tau: mx.array, name: str):
        super().__init__()
        self.dense = dense
        self.tau = tau
        self._activation = activation
        self._name = name
        self._tracker: Optional[SparsityTracker] = None

    def __call__(self, x: mx.array) -> mx.array:
        gate = self._activation(self.dense.gate_proj(x))
        keep = keep_mask(gate, self.tau)
        if self._tracker is not None:
            self._tracker.add(self._name, keep)
        gate = mx.where(keep, gate, 0)
        return self.dense.down_proj(gate * self.dense.up_proj(x))


class InputSparseLinear(nn.Module):
    """A linear layer whose input entries below a scalar threshold are dropped."""

    def __init__(self, dense: nn.Module, tau: mx.array, name: str):
        super().__init__()
        self.dense = dense
        self.tau = tau
        self._name = name
        self._tracker: Optional[SparsityTracker] = None

    def __call__(self, x: mx.array) -> mx.array:
        keep = keep_mask(x, self.tau)
        if self._tracker is not None:
            self._tracker.add(self._name, keep)
        return self.dense(mx.where(keep, x, 0))


SPARSE_MODULES = (SparseMLP, InputSparseLinear)


def model_layers(model: nn.Module) -> list:
    """The transformer blocks of a supported mlx-lm model, or a clear error."""
    model_type = getattr(model, "model_type", None)
    if model_type not in ACTIVATIONS:
        raise ChessError(
            f"unsupported model type '{model_type}' "
            f"(supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    layers = model.layers
    for layer in layers:
        mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
        mlp = mlp.dense if isinstance(mlp, SparseMLP) else mlp
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise ChessError(f"model type '{model_type}': a layer has no gated MLP")
        if not all(hasattr(attn, p) for p in ("q_proj", "o_proj")):
            raise ChessError(f"model type '{model_type}': a layer has no q_proj/o_proj")
    return layers


def unsparsify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify` in place; the model computes densely again."""
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMLP):
            layer.mlp = layer.mlp.dense
        attn = layer.self_attn
        for proj in ("q_proj", "o_proj"):
            module = getattr(attn, proj)
            if isinstance(module, InputSparseLinear):
                setattr(attn, proj, module.dense)
    return model


def sparsify(
    model: nn.Module,
    thresholds: "Thresholds",
    method: str = "chess",
    sparsity: float = 0.5,
) -> nn.Module:
    """Patch ``model`` in place to threshold activations; returns it.

    Methods: ``dense`` (no change), ``cats`` (one gate threshold per layer),
    ``chess`` (a gate threshold per FFN channel) and ``chess+`` (chess plus
    scalar thresholds on the inputs of q_proj and o_proj; k_proj and v_proj
    keep reading the dense hidden state). ``sparsity`` must be one of the
    calibrated targets, or 0 (no entry is dropped).
    """
    if method not in METHODS:
        raise ChessError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    layers = model_layers(model)
    unsparsify(model)
    thresholds.validate(model)
    if method == "dense":
        return model
    activation = ACTIVATIONS[model.model_type]
    taus = thresholds.select(method, sparsity)
    for i, layer in enumerate(layers):
        layer.mlp = SparseMLP(layer.mlp, activation, taus["gate"][i], f"layers.{i}.gate")
        if method == "chess+":
            attn = layer.self_attn
            attn.q_proj = InputSparseLinear(attn.q_proj, taus["q_proj"][i], f"layers.{i}.q_proj")
            attn.o_proj = InputSparseLinear(attn.o_proj, taus["o_proj"][i], f"layers.{i}.o_proj")
    return model


def sparse_modules(model: nn.Module) -> Iterator[nn.Module]:
    for _, module in model.named_modules():
        if isinstance(module, SPARSE_MODULES):
            yield module


@contextmanager
def track_sparsity(model: nn.Module) -> Iterator[SparsityTracker]:
    """Measure realized sparsity of a patched model inside a ``with`` block.

    Off by default: outside the block the patched modules do no extra work.
    """
    tracker = SparsityTracker()
    modules = list(sparse_modules(model))
    for module in modules:
        module._tracker = tracker
    try:
        yield tracker
    finally:
        for module in modules:
            module._tracker = None
