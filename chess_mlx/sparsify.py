"""Patch an mlx-lm model so that it thresholds activations (the reference path).

The masks computed here are the ground truth: the sparse kernels must match
them, calibration measures the activations they act on, and evaluation runs
through them. Everything is plain MLX, so it works on every backend.
"""

import functools
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import decode_ops
from .decode_ops import is_decode
from .errors import ChessError
from .quantized import QuantizedInputMajorLinear, kernel_quantization, relayout_ready
from .thresholds import LayerThresholds, linear_dims

if TYPE_CHECKING:
    from .thresholds import Thresholds

METHODS = ("dense", "cats", "chess", "chess+", "teal", "alloc")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

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


# Dropped gate channels leave exact zeros in down_proj's input; this threshold
# drops exactly those (and float32 subnormals, whose products are negligible).
NONZERO = float(np.finfo(np.float32).tiny)
# An input-sparse GEMV threshold that keeps every channel (|x| >= 0; a NaN
# input is dropped, as on the sparse paths, not propagated).
KEEP_ALL = 0.0


class DecodeKernels(Protocol):
    """The two sparse GEMVs a decode step uses (see chess_mlx.kernels)."""

    def sparse_in_gemv(self, x: mx.array, wt: mx.array, threshold) -> mx.array: ...

    def sparse_out_gate_gemv(self, x: mx.array, w: mx.array, gate: mx.array, threshold) -> mx.array: ...


def default_kernels() -> Optional[DecodeKernels]:
    """Decode kernels for the default device: Metal on the GPU, the compiled
    extension on the CPU, or None (the reference path) when neither is there."""
    if mx.default_device() == mx.gpu:
        from . import kernels

        return kernels if kernels.metal_available() else None
    from . import cpu_kernels

    return cpu_kernels if cpu_kernels.available() else None


def kernel_backend(model: nn.Module) -> str:
    """Which decode path a patched model takes, in words."""
    used = {
        getattr(m._kernels, "__name__", type(m._kernels).__name__)
        for m in sparse_modules(model)
        if m._kernels is not None
    }
    if not used:
        return "reference path (plain MLX ops)"
    names = {"chess_mlx.kernels": "Metal kernels", "chess_mlx.cpu_kernels": "CPU extension kernels"}
    return ", ".join(sorted(names.get(u, u) for u in used))


class InputMajorLinear(nn.Module):
    """nn.Linear with its weight stored input-major, ``wt = W.T`` ([in, out]).

    Input-sparse GEMVs read one contiguous row of ``wt`` per active input
    channel; multi-token calls use a plain matmul on the same array, so the
    weight is stored once.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.wt = mx.contiguous(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        return add_bias(x @ self.wt, self)

    def sparse_gemv(self, kernels: "DecodeKernels", x: mx.array, threshold) -> mx.array:
        return kernels.sparse_in_gemv(x, self.wt, threshold)

    def to_linear(self) -> nn.Linear:
        out_dims, in_dims = self.wt.shape[1], self.wt.shape[0]
        linear = nn.Linear(in_dims, out_dims, bias="bias" in self)
        linear.weight = mx.contiguous(self.wt.T)
        if "bias" in self:
            linear.bias = self.bias
        return linear


def kernel_ready(linear: nn.Module, kernels: Optional["DecodeKernels"] = None) -> bool:
    """Whether ``kernels`` can run ``linear`` input-major: float nn.Linear
    layers always, affine 4/8-bit QuantizedLinear layers where the kernels
    have quantized variants (the CPU extension and the Metal kernels do)."""
    if type(linear) is nn.Linear:
        return True
    return relayout_ready(linear) and hasattr(kernels, "sparse_in_qgemv")


# ("relayout" or "huge_pages", source array id) -> (source array, its
# re-layout or copy), inside shared_relayouts().
_shared_relayouts: Optional[Dict[Tuple[str, int], tuple]] = None


@contextmanager
def shared_relayouts() -> Iterator[None]:
    """Inside the block, re-laying a weight that was re-laid before returns
    the first re-layout, so models sharing their weights (the benchmark's
    copies, one per configuration) share the re-laid arrays too."""
    global _shared_relayouts
    outer, _shared_relayouts = _shared_relayouts, {} if _shared_relayouts is None else _shared_relayouts
    try:
        yield
    finally:
        _shared_relayouts = outer


def relayout(source: mx.array, make: Callable[[], object]):
    """``make()``, or inside :func:`shared_relayouts` the one made for ``source`` before."""
    if _shared_relayouts is None:
        return make()
    key = ("relayout", id(source))
    if key not in _shared_relayouts:
        # Holding the source keeps its id from being reused by another array.
        _shared_relayouts[key] = (source, make())
    return _shared_relayouts[key][1]


def input_major(linear: nn.Module) -> nn.Module:
    """The input-major re-layout of a :func:`kernel_ready` linear (one copy)."""
    if type(linear) is nn.Linear:
        return relayout(linear.weight, lambda: InputMajorLinear(linear))
    return relayout(linear.weight, lambda: QuantizedInputMajorLinear(linear))


def quantized_ready(linear: nn.Module, kernels: Optional["DecodeKernels"]) -> bool:
    """An affine 4/8-bit quantized layer the kernels' output GEMV can read as stored."""
    return kernel_quantization(linear) and hasattr(kernels, "sparse_out_gate_qgemv")


def out_gemv_ready(linear: nn.Module, kernels: Optional["DecodeKernels"]) -> bool:
    """Whether ``kernels.sparse_out_gate_*gemv`` can run ``linear`` on its own layout."""
    return type(linear) in (nn.Linear, nn.Embedding) or quantized_ready(linear, kernels)


def out_gemv(kernels: "DecodeKernels", x: mx.array, layer: nn.Module, gate: mx.array, threshold) -> mx.array:
    """The output-sparse gated GEMV on ``layer``'s stock ``[out, in]`` weight."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return kernels.sparse_out_gate_qgemv(
            x, layer.weight, layer.scales, layer.biases, gate, threshold, layer.group_size, layer.bits
        )
    return kernels.sparse_out_gate_gemv(x, layer.weight, gate, threshold)


def add_bias(y: mx.array, linear: nn.Module) -> mx.array:
    return y + linear.bias if "bias" in linear else y


def rows_like(y: mx.array, x: mx.array) -> mx.array:
    """``y`` shaped ``(*x.shape[:-1], -1)``. Kernel outputs mostly are
    already, and MLX adds a graph node even for a reshape to the same shape
    (they were 181 of the 970 nodes of a default-model decode step)."""
    return y if y.shape[:-1] == x.shape[:-1] else y.reshape(*x.shape[:-1], -1)


def dense_gemv(kernels: "DecodeKernels", x: mx.array, layer: nn.Module) -> mx.array:
    """``layer`` applied to one token on its stock ``[out, in]`` layout: the
    output GEMV with a gate of ones and nothing dropped (exact: 1 * dot)."""
    gate = ones(layer.weight.shape[0], x.dtype)
    return rows_like(out_gemv(kernels, x, layer, gate, 0.0), x)


@functools.lru_cache(maxsize=8)
def ones(n: int, dtype: mx.Dtype) -> mx.array:
    """Built once per size, not on every decoded token."""
    return mx.ones((n,), dtype=dtype)


class KernelHeadEmbedding(nn.Module):
    """A tied embedding (float or quantized) whose ``as_linear`` (the LM head)
    decodes through the kernels; lookups and prompts go to the embedding
    itself. Same arrays, no copy."""

    def __init__(self, embedding: nn.Module, kernels: "DecodeKernels"):
        super().__init__()
        self.embedding = embedding
        self._kernels = kernels

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding(x)

    def as_linear(self, x: mx.array) -> mx.array:
        if is_decode(x):
            return dense_gemv(self._kernels, x, self.embedding)
        return self.embedding.as_linear(x)

    def restore(self) -> nn.Module:
        return self.embedding


class KernelLinear(nn.Module):
    """A linear layer (float or quantized) that is not sparsified, decoding
    one token through the kernels with nothing dropped. Mostly it keeps its
    stock ``[out, in]`` layout and runs the output GEMV; quantized layers
    with short rows (see :func:`dense_input_major`) are re-laid input-major
    and run the input-sparse GEMV keeping every channel. Prompts go to the
    layer."""

    def __init__(self, linear: nn.Module, kernels: "DecodeKernels"):
        super().__init__()
        self.dense = linear
        self._kernels = kernels

    def __call__(self, x: mx.array) -> mx.array:
        if not is_decode(x):
            return self.dense(x)
        if isinstance(self.dense, INPUT_MAJOR):
            y = rows_like(self.dense.sparse_gemv(self._kernels, x, KEEP_ALL), x)
        else:
            y = dense_gemv(self._kernels, x, self.dense)
        return add_bias(y, self.dense)

    def restore(self) -> nn.Module:
        return stock_layout(self.dense)


def dense_input_major(linear: nn.Module, kernels: "DecodeKernels") -> bool:
    """Whether ``kernels`` read an unsparsified ``linear`` faster re-laid
    input-major: quantized, with at most ``kernels.DENSE_INPUT_MAJOR_MAX_IN``
    inputs (the CPU extension's measured bound; other kernels: never)."""
    max_in = getattr(kernels, "DENSE_INPUT_MAJOR_MAX_IN", 0)
    return (
        relayout_ready(linear)
        and kernel_ready(linear, kernels)
        and linear_dims(linear)[0] <= max_in
    )


def kernel_linear(linear: nn.Module, kernels: "DecodeKernels") -> nn.Module:
    """``linear`` decoding through :class:`KernelLinear` where the kernels read
    its layout; otherwise (e.g. 2-bit) unchanged, on MLX's own matmul."""
    if dense_input_major(linear, kernels):
        return KernelLinear(input_major(linear), kernels)
    if type(linear) in (nn.Linear, nn.QuantizedLinear) and out_gemv_ready(linear, kernels):
        return KernelLinear(linear, kernels)
    return linear


def patch_lm_head(model: nn.Module, kernels: "DecodeKernels"):
    body = getattr(model, "model", None)
    embedding = getattr(body, "embed_tokens", None)
    if isinstance(embedding, (nn.Embedding, nn.QuantizedEmbedding)) and out_gemv_ready(embedding, kernels):
        body.embed_tokens = KernelHeadEmbedding(embedding, kernels)
    if "lm_head" in model:
        model.lm_head = kernel_linear(model.lm_head, kernels)


def unpatch_lm_head(model: nn.Module):
    body = getattr(model, "model", None)
    if isinstance(getattr(body, "embed_tokens", None), (KernelHeadEmbedding, SparseHeadEmbedding)):
        body.embed_tokens = body.embed_tokens.restore()
    if "lm_head" in model and isinstance(model.lm_head, (KernelLinear, InputSparseLinear)):
        model.lm_head = model.lm_head.restore()


class SparseHeadEmbedding(nn.Module):
    """A tied embedding whose LM head (``as_linear``) drops the inputs below ``tau``.

    With kernels, a float table is re-laid input-major once (``[hidden,
    vocab]``, not duplicated): decode reads only the rows of kept inputs and
    lookups take columns. A quantized table keeps its layout: its decode
    masks the input and runs the dense output GEMV, so nothing is skipped.
    """

    def __init__(self, embedding: nn.Module, tau: mx.array, kernels: Optional[DecodeKernels] = None):
        super().__init__()
        self.tau = tau
        self._name = "lm_head"
        self._tracker: Optional[SparsityTracker] = None
        self._kernels = kernels if kernels is not None and out_gemv_ready(embedding, kernels) else None
        if self._kernels is not None and type(embedding) is nn.Embedding:
            self.wt = relayout(embedding.weight, lambda: mx.contiguous(embedding.weight.T))
        else:
            self.embedding = embedding

    def __call__(self, ids: mx.array) -> mx.array:
        if "wt" in self:
            return mx.moveaxis(mx.take(self.wt, ids, axis=1), 0, -1)
        return self.embedding(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        if self._tracker is not None:
            self._tracker.add(self._name, keep_mask(x, self.tau))
        if "wt" in self and is_decode(x):
            return rows_like(self._kernels.sparse_in_gemv(x, self.wt, self.tau), x)
        x = mx.where(keep_mask(x, self.tau), x, 0)
        if "wt" in self:
            return x @ self.wt
        if self._kernels is not None and is_decode(x):
            return dense_gemv(self._kernels, x, self.embedding)
        return self.embedding.as_linear(x)

    def restore(self) -> nn.Module:
        if "wt" not in self:
            return self.embedding
        hidden, vocab = self.wt.shape
        embedding = nn.Embedding(vocab, hidden)
        embedding.weight = mx.contiguous(self.wt.T)
        return embedding


def sparsify_lm_head(model: nn.Module, tau: mx.array, kernels: Optional[DecodeKernels]):
    """Threshold the LM head's input (tied or not) at ``tau``."""
    body = getattr(model, "model", None)
    if "lm_head" in model:
        model.lm_head = InputSparseLinear(model.lm_head, tau, "lm_head", kernels)
    else:
        body.embed_tokens = SparseHeadEmbedding(body.embed_tokens, tau, kernels)


def format_sparsity(summary: Dict[str, float]) -> str:
    """'gate 0.501, q_proj 0.498' (or '-' when nothing was thresholded)."""
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(summary.items())) or "-"


class SparseMLP(nn.Module):
    """Gated MLP with thresholded activations (see LayerThresholds).

    ``plan.gate`` zeroes activated-gate entries with ``|a_gate| < tau`` (CATS
    scalar or CHESS per channel), so the matching rows of up_proj and columns
    of down_proj contribute nothing; ``plan.mlp_in`` thresholds the input of
    gate_proj (and of up_proj unless the gate mask serves it), ``plan.down_in``
    the input of down_proj.
    """

    def __init__(
        self,
        dense: nn.Module,
        activation: Callable,
        plan: "LayerThresholds",
        name: str,
        kernels: Optional[DecodeKernels] = None,
    ):
        super().__init__()
        self.dense = dense
        self.tau = plan.gate if plan.gate is not None else mx.zeros((1,))
        self.tau_in = plan.mlp_in
        self.tau_down = plan.down_in
        # The kernel also skips the exact zeros the gate mask leaves.
        self._tau_down_kernel = NONZERO if plan.down_in is None else mx.maximum(plan.down_in, NONZERO)
        self._has_gate = plan.gate is not None
        self._up_from_mask = self._has_gate and plan.up_from_mask
        self._activation = activation
        self._name = name
        self._tracker: Optional[SparsityTracker] = None
        self._kernels = None
        self._decode_activation = activation
        if kernels is not None and self._kernel_ready(kernels):
            dense.down_proj = input_major(dense.down_proj)
            # Projections whose input is not thresholded keep their stock layout.
            read_input = input_major if self.tau_in is not None else functools.partial(kernel_linear, kernels=kernels)
            dense.gate_proj = read_input(dense.gate_proj)
            if not self._up_from_mask:
                dense.up_proj = read_input(dense.up_proj)
            self._kernels = kernels
            if activation is nn.silu and hasattr(kernels, "silu"):
                self._decode_activation = kernels.silu  # one op, not MLX's scalar loop

    def _kernel_ready(self, kernels: DecodeKernels) -> bool:
        up = self.dense.up_proj
        if self._up_from_mask:
            # vmmsp has no bias term: an up_proj bias (rare) keeps the reference path.
            up_ready = (type(up) is nn.Linear or quantized_ready(up, kernels)) and "bias" not in up
        else:
            up_ready = kernel_ready(up, kernels)
        # A thresholded MLP input decodes gate_proj through the input-sparse GEMV.
        gate_ready = self.tau_in is None or kernel_ready(self.dense.gate_proj, kernels)
        return up_ready and gate_ready and kernel_ready(self.dense.down_proj, kernels)

    def _track(self, kind: str, keep: mx.array):
        if self._tracker is not None:
            self._tracker.add(f"{self._name}.{kind}", keep)  # e.g. layers.3.gate

    def _track_decode(self, kind: str, x: mx.array, tau: mx.array):
        """The kernels threshold internally; the mask is built only to be counted."""
        if self._tracker is not None:
            self._tracker.add(f"{self._name}.{kind}", keep_mask(x, tau))

    def __call__(self, x: mx.array) -> mx.array:
        if self._kernels is not None and is_decode(x):
            return self._decode(x)
        x_in = x
        if self.tau_in is not None:
            keep_in = keep_mask(x, self.tau_in)
            self._track("mlp_in", keep_in)
            x_in = mx.where(keep_in, x, 0)
        gate = self._masked_gate(self._activation(self.dense.gate_proj(x_in)))
        hidden = gate * self.dense.up_proj(x if self._up_from_mask else x_in)
        return self.dense.down_proj(self._threshold_down(hidden))

    def _masked_gate(self, gate: mx.array) -> mx.array:
        if self._has_gate:
            keep = keep_mask(gate, self.tau)
            self._track("gate", keep)
            gate = mx.where(keep, gate, 0)
        return gate

    def _threshold_down(self, hidden: mx.array) -> mx.array:
        if self.tau_down is None:
            return hidden
        keep = keep_mask(hidden, self.tau_down)
        self._track("down_in", keep)
        return mx.where(keep, hidden, 0)

    def _decode(self, x: mx.array) -> mx.array:
        gate_proj, up, down = self.dense.gate_proj, self.dense.up_proj, self.dense.down_proj
        if self.tau_in is None:
            gate = self._decode_activation(gate_proj(x))
        else:
            self._track_decode("mlp_in", x, self.tau_in)
            gate = self._decode_activation(add_bias(gate_proj.sparse_gemv(self._kernels, x, self.tau_in), gate_proj))
        if self._up_from_mask:
            self._track_decode("gate", gate, self.tau)
            hidden = out_gemv(self._kernels, x, up, gate, self.tau)
        else:
            up_out = up(x) if self.tau_in is None else add_bias(up.sparse_gemv(self._kernels, x, self.tau_in), up)
            hidden = self._masked_gate(rows_like(gate, x)) * rows_like(up_out, x)
        if self.tau_down is not None:
            self._track_decode("down_in", hidden, self.tau_down)
        y = down.sparse_gemv(self._kernels, hidden, self._tau_down_kernel)
        return rows_like(add_bias(y, down), x)

    def restore(self) -> nn.Module:
        for name in ("gate_proj", "up_proj", "down_proj"):
            module = getattr(self.dense, name)
            setattr(self.dense, name, module.restore() if isinstance(module, KernelLinear) else stock_layout(module))
        return self.dense


class InputSparseLinear(nn.Module):
    """A linear layer whose input entries below a scalar threshold are dropped."""

    def __init__(self, dense: nn.Module, tau: mx.array, name: str, kernels: Optional[DecodeKernels] = None):
        super().__init__()
        ready = kernels is not None and kernel_ready(dense, kernels)
        self.dense = input_major(dense) if ready else dense
        self.tau = tau
        self._name = name
        self._tracker: Optional[SparsityTracker] = None
        self._kernels = kernels if ready else None

    def __call__(self, x: mx.array) -> mx.array:
        if self._tracker is not None:
            self._tracker.add(self._name, keep_mask(x, self.tau))
        if self._kernels is not None and is_decode(x):
            y = self.dense.sparse_gemv(self._kernels, x, self.tau)
            return rows_like(add_bias(y, self.dense), x)
        return self.dense(mx.where(keep_mask(x, self.tau), x, 0))

    def restore(self) -> nn.Module:
        return stock_layout(self.dense)


SPARSE_MODULES = (SparseMLP, InputSparseLinear, SparseHeadEmbedding)
INPUT_MAJOR = (InputMajorLinear, QuantizedInputMajorLinear)


def stock_layout(linear: nn.Module) -> nn.Module:
    """``linear`` back on its stock layout if it was re-laid input-major."""
    return linear.to_linear() if isinstance(linear, INPUT_MAJOR) else linear


def parse_methods(text: str) -> List[str]:
    """Comma-separated method names, checked, duplicates dropped."""
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    for m in methods:
        if m not in METHODS:
            raise ChessError(f"unknown method '{m}' (choose from {', '.join(METHODS)})")
    if not methods:
        raise ChessError("--methods is empty")
    return methods


def configurations(methods: Sequence[str], sparsities: Sequence[float],
                   speedups: Sequence[float] = ()) -> List[Tuple[str, float]]:
    """(method, setting) pairs: dense once, ``alloc`` at each target speed-up,
    the others at each sparsity."""
    settings = {"dense": [0.0], "alloc": list(speedups)}
    return [(m, s) for m in methods for s in settings.get(m, sparsities)]


def target_label(method: str, setting: float) -> str:
    """'0.50' (a sparsity) or '1.35x' (an allocation's target speed-up)."""
    return f"{setting:.2f}x" if method == "alloc" else f"{setting:.2f}"


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


def lm_head(model: nn.Module) -> nn.Module:
    """The module whose weight is the LM head: ``lm_head``, or the tied embedding."""
    return model.lm_head if "lm_head" in model else getattr(model, "model", model).embed_tokens


def unsparsify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify` in place; the model computes densely again."""
    unpatch_lm_head(model)
    decode_ops.unpatch(model)
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMLP):
            layer.mlp = layer.mlp.restore()
        attn = layer.self_attn
        for proj in ATTENTION_PROJECTIONS:
            module = getattr(attn, proj)
            if isinstance(module, (InputSparseLinear, KernelLinear)):
                setattr(attn, proj, module.restore())
    return model


def sparsify(
    model: nn.Module,
    thresholds: "Thresholds",
    method: str = "chess",
    sparsity: float = 0.5,
    kernels: Optional[DecodeKernels] = "auto",
) -> nn.Module:
    """Patch ``model`` in place to threshold activations; returns it.

    Methods: ``dense`` (no change), ``cats`` (one gate threshold per layer),
    ``chess`` (a gate threshold per FFN channel) and ``chess+`` (chess plus
    scalar thresholds on the inputs of q_proj and o_proj; k_proj and v_proj
    keep reading the dense hidden state), ``teal`` (scalar thresholds on the
    inputs of all seven projections, as TEAL) and ``alloc`` (the per-layer,
    per-projection allocation calibration searched, with the LM head's input
    where the search thresholded it; ``sparsity`` is then its target ideal
    speed-up). ``sparsity`` must be one of the calibrated
    targets, or 0 (no entry is dropped).

    ``kernels`` runs one-token calls (decode) of float layers through sparse
    GEMVs: ``"auto"`` picks them for the default device at patch time (Metal
    on the GPU, the compiled extension on the CPU), ``None`` keeps the
    reference path everywhere. Prompts (several tokens) always take the
    reference path. With kernels, the projections whose input is thresholded
    (and down_proj) are re-laid input-major once (not duplicated) for the
    input-sparse GEMV; every other projection, up_proj under a gate mask and
    the LM head (tied or not) decode through the output GEMV on their own
    layout, except quantized projections with short rows, which the CPU
    extension reads faster re-laid (:func:`dense_input_major`). Kernels that
    have them (the CPU extension's) also run the RMS norms, RoPE and
    attention of a decode step as single ops
    (:mod:`chess_mlx.decode_ops`), and the model's weights move onto
    transparent huge pages (:func:`weights_to_huge_pages`).
    """
    if method not in METHODS:
        raise ChessError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    layers = model_layers(model)
    unsparsify(model)
    thresholds.validate(model)
    if method == "dense":
        return model
    if kernels == "auto":
        kernels = default_kernels()
    plans = thresholds.layer_thresholds(method, sparsity)
    return patch_layers(model, layers, plans, thresholds.head_threshold(method, sparsity), kernels)


def decode_dense(model: nn.Module, kernels: Optional[DecodeKernels] = "auto") -> nn.Module:
    """Patch ``model`` in place to decode through ``kernels`` with nothing
    dropped (every threshold 0, as the benchmark's dense path); returns it.
    Needs no thresholds. Without kernels, or for an architecture
    :func:`sparsify` does not support, the model stays as loaded, on MLX's
    own ops (on a CPU many times slower for quantized models)."""
    try:
        layers = model_layers(model)
    except ChessError:
        return model
    unsparsify(model)
    if kernels == "auto":
        kernels = default_kernels()
    if kernels is None:
        return model
    plans = [LayerThresholds(gate=mx.zeros((1,))) for _ in layers]
    return patch_layers(model, layers, plans, None, kernels)


def patch_layers(
    model: nn.Module,
    layers: list,
    plans: Sequence["LayerThresholds"],
    head_tau: Optional[mx.array],
    kernels: Optional[DecodeKernels],
) -> nn.Module:
    """:func:`sparsify`'s patching, one plan per layer."""
    activation = ACTIVATIONS[model.model_type]
    for i, (layer, plan) in enumerate(zip(layers, plans)):
        if plan.mlp:
            layer.mlp = SparseMLP(layer.mlp, activation, plan, f"layers.{i}", kernels)
        attn = layer.self_attn
        inputs = {"q_proj": plan.q_in, "k_proj": plan.kv_in, "v_proj": plan.kv_in, "o_proj": plan.o_in}
        for proj, tau in inputs.items():
            if tau is not None:
                setattr(attn, proj, InputSparseLinear(getattr(attn, proj), tau, f"layers.{i}.{proj}", kernels))
        if kernels is not None:
            for proj in ATTENTION_PROJECTIONS:
                module = getattr(attn, proj)
                if not isinstance(module, InputSparseLinear):
                    setattr(attn, proj, kernel_linear(module, kernels))
    if kernels is not None and decode_ops.ready(kernels):
        decode_ops.patch(model, layers, kernels)
    if head_tau is not None:
        sparsify_lm_head(model, head_tau, kernels)
    elif kernels is not None:
        patch_lm_head(model, kernels)
    if kernels is not None:
        weights_to_huge_pages(model, kernels)
    return model


# Copies packed per huge-page region: bounds the extra memory while moving.
HUGE_PAGE_BATCH_BYTES = 64 << 20


def weights_to_huge_pages(model: nn.Module, kernels: DecodeKernels) -> int:
    """Move the weights of ``model`` to copies on transparent huge pages where
    ``kernels`` can (the CPU extension, on Linux with THP not "never") and
    ``CHESS_MLX_HUGE_PAGES`` is not ``0``; returns the bytes moved. A sparse
    GEMV reads scattered rows, and on 4 KiB pages a decode step pays a page
    walk every few kept rows (README: the chess+ GEMVs of the 4-bit 1B model
    ran about 6% faster on huge pages, dense ones the same). The old arrays
    are freed unless something else holds them."""
    if not huge_pages_enabled(kernels):
        return 0
    moved = 0
    # By name, a batch at a time: holding every old array until the end
    # would keep the whole model twice.
    sizes = [(name, a.nbytes) for name, a in tree_flatten(model.parameters())]
    for names in batches(sizes, HUGE_PAGE_BATCH_BYTES):
        current = dict(tree_flatten(model.parameters()))
        copies = shared_copies([current[n] for n in names], kernels.huge_page_copies)
        del current
        model.update(tree_unflatten(list(zip(names, copies))))
        moved += sum(c.nbytes for c in copies)
    kernels.release_free_memory()
    return moved


def huge_pages_enabled(kernels: Optional[DecodeKernels]) -> bool:
    """Whether :func:`sparsify` moves weights to huge pages for ``kernels``."""
    return (
        hasattr(kernels, "huge_page_copies")
        and os.environ.get("CHESS_MLX_HUGE_PAGES", "1") != "0"
        and kernels.transparent_huge_pages() not in (None, "never")
    )


def batches(sizes: Sequence[Tuple[str, int]], limit: int) -> Iterator[List[str]]:
    """The names of ``sizes`` in order, in groups of at least ``limit`` bytes (the last one less)."""
    names, total = [], 0
    for name, nbytes in sizes:
        names.append(name)
        total += nbytes
        if total >= limit:
            yield names
            names, total = [], 0
    if names:
        yield names


def shared_copies(arrays: List[mx.array], copy: Callable[[List[mx.array]], List[mx.array]]) -> List[mx.array]:
    """``copy(arrays)``, where inside :func:`shared_relayouts` an array copied
    before keeps its first copy (models sharing weights share the copies)."""
    if _shared_relayouts is None:
        return copy(arrays)
    new = list({id(a): a for a in arrays if ("huge_pages", id(a)) not in _shared_relayouts}.values())
    for a, c in zip(new, copy(new) if new else []):
        _shared_relayouts[("huge_pages", id(a))] = (a, c)
    return [_shared_relayouts[("huge_pages", id(a))][1] for a in arrays]


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
