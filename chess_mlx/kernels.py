"""Custom Metal sparse-GEMV kernels for CHESS decoding (``mx.fast.metal_kernel``).

Two kernels, each in a float and an affine-quantized (4/8-bit) variant, all
for a single token (decode), all reading only the weight rows of surviving
channels, all accumulating in float32:

* :func:`sparse_in_gemv` ("spvmm"): input-sparse ``x @ wt`` with ``wt`` of
  shape ``[in, out]`` (the transposed ``nn.Linear`` weight). Used for
  ``down_proj``, ``q_proj``, ``o_proj``.
* :func:`sparse_out_gate_gemv` ("vmmsp"): output-sparse
  ``where(keep(gate), gate * (w @ x), 0)`` with ``w`` of shape ``[out, in]``
  (the ``nn.Linear`` weight of ``up_proj``) and ``gate`` the activated gate.
* :func:`sparse_in_qgemv` and :func:`sparse_out_gate_qgemv`: the same on
  quantized weights, the input-sparse one on the input-major re-layout of
  :mod:`chess_mlx.quantized`, the output one on ``nn.QuantizedLinear``'s own
  arrays; scales and biases share the dtype of ``x``.

A channel is kept when ``|v| >= threshold`` (entries strictly below the
threshold are dropped; NaN is dropped). The threshold is one scalar (a Python
number, a 0-d array or shape ``[1]``) or one value per channel.

Dtypes: ``x``, the weight and ``gate`` must share one dtype among float16,
bfloat16 and float32; the output has that dtype. The threshold may be float32
or that same dtype (any other dtype is cast to float32 first); the comparison
is done in float32, which is exact for all three.

The kernel bodies live in ``metal/*.metal``: looked up, in order, in the
directory named by ``CHESS_MLX_METAL_DIR``, in ``chess_mlx/metal/`` (where
package data can put them) and in ``metal/`` at the root of the source tree
(one level above this file's directory). Each ``mx.fast.metal_kernel`` object
is built once per process; MLX compiles each distinct generated source (one
per dtype / threshold kind / tile configuration) once and caches it.

Where Metal is not available (Linux, or a CPU stream) the public functions
fall back to the pure-MLX references, which compute the same values.
:func:`generated_metal_source` returns the exact Metal source MLX would
compile for a call, which the CPU emulator in ``tests/emulator`` runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Tuple, Union

import mlx.core as mx

from .quantized import BITS as QUANTIZED_BITS, unpack_codes
from .sparsify import keep_mask

__all__ = [
    "SpvmmTiles",
    "VmmspTiles",
    "LaunchSpec",
    "metal_available",
    "sparse_in_gemv",
    "sparse_out_gate_gemv",
    "sparse_in_gemv_reference",
    "sparse_out_gate_gemv_reference",
    "generated_metal_source",
    "capture_generated_source",
    "metal_source_for",
    "sparse_in_gemv_launch",
    "sparse_out_gate_gemv_launch",
    "QSpvmmTiles",
    "QVmmspTiles",
    "sparse_in_qgemv",
    "sparse_out_gate_qgemv",
    "sparse_in_qgemv_reference",
    "sparse_out_gate_qgemv_reference",
    "sparse_in_qgemv_launch",
    "sparse_out_gate_qgemv_launch",
]

_FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
Threshold = Union[float, mx.array]


# --------------------------------------------------------------------------
# Tile configurations (compile-time template parameters of the kernels)
# --------------------------------------------------------------------------
class SpvmmTiles(NamedTuple):
    """Tiles of :func:`sparse_in_gemv` (see ``metal/sparse_in_gemv.metal``).

    A threadgroup has ``NSG`` simdgroups and owns ``SN * TN`` output columns;
    a lane owns ``TN`` columns, ``32 // SN`` lanes of a simdgroup split the
    rows; input channels are compacted in chunks of ``CHUNK`` (a multiple of
    ``NSG * 32``, at most ``32 * NSG * 32``).
    """

    TN: int = 4
    SN: int = 8
    NSG: int = 4
    CHUNK: int = 1024


class VmmspTiles(NamedTuple):
    """Tiles of :func:`sparse_out_gate_gemv` (see ``metal/sparse_out_gate_gemv.metal``).

    A threadgroup has ``NSG`` simdgroups and owns ``TILE_O`` (<= ``NSG * 32``)
    outputs; a simdgroup computes ``TM`` surviving rows at a time, a lane loads
    ``TN`` consecutive elements of a row per step.
    """

    TN: int = 4
    TM: int = 2
    NSG: int = 4
    TILE_O: int = 32


def default_spvmm_tiles(in_features: int, out_features: int) -> SpvmmTiles:
    """Wider column tiles for wide outputs (fewer re-reads of x per weight byte)."""
    if out_features >= 2048:
        return SpvmmTiles(TN=4, SN=16, NSG=4, CHUNK=1024)
    return SpvmmTiles()


def default_vmmsp_tiles(in_features: int, out_features: int) -> VmmspTiles:
    return VmmspTiles()


def _check_spvmm_tiles(t: SpvmmTiles) -> None:
    tgs = t.NSG * 32
    if not (t.TN >= 1 and t.SN >= 1 and 32 % t.SN == 0 and t.NSG >= 1 and tgs <= 1024):
        raise ValueError(f"invalid SpvmmTiles {t}")
    if t.CHUNK % tgs != 0 or not (1 <= t.CHUNK // tgs <= 32):
        raise ValueError(f"SpvmmTiles.CHUNK must be 1..32 times NSG*32: {t}")
    if 8 * t.CHUNK + 4 * t.NSG * (1 + t.SN * t.TN) > 32768:
        raise ValueError(f"SpvmmTiles {t} need more than 32 KiB of threadgroup memory")


def _check_vmmsp_tiles(t: VmmspTiles) -> None:
    tgs = t.NSG * 32
    if not (t.TN >= 1 and t.TM >= 1 and t.NSG >= 1 and tgs <= 1024 and 1 <= t.TILE_O <= tgs):
        raise ValueError(f"invalid VmmspTiles {t}")


class QSpvmmTiles(NamedTuple):
    """Tiles of :func:`sparse_in_qgemv` (see ``metal/sparse_in_qgemv.metal``).

    A threadgroup has ``NSG`` simdgroups and owns ``SN * WN * 32 / bits``
    output columns; a lane owns ``WN`` packed words of a row, ``32 // SN``
    lanes of a simdgroup split the rows; input channels are compacted in
    chunks of ``CHUNK`` (a multiple of ``NSG * 32``, at most ``32 * NSG * 32``).
    """

    WN: int = 2
    SN: int = 2
    NSG: int = 4
    CHUNK: int = 1024


class QVmmspTiles(NamedTuple):
    """Tiles of :func:`sparse_out_gate_qgemv` (see ``metal/sparse_out_gate_qgemv.metal``).

    A threadgroup has ``NSG`` simdgroups and owns ``TILE_O`` (<= ``NSG * 32``)
    outputs; a simdgroup computes ``TM`` surviving rows at a time, a lane reads
    ``WPT`` packed words of a row per step (``WPT * 32 / bits`` must divide the
    group size).
    """

    WPT: int = 2
    TM: int = 4
    NSG: int = 4
    TILE_O: int = 64


def default_qspvmm_tiles(bits: int) -> QSpvmmTiles:
    """16 columns per lane (8 or 16 bytes of a row), as MLX's qvm reads."""
    return QSpvmmTiles(WN=2 if bits == 4 else 4)


def default_qvmmsp_tiles(bits: int, group_size: int) -> QVmmspTiles:
    """Two words per lane and step, as MLX's qmv, where the group size allows."""
    return QVmmspTiles(WPT=2 if group_size % (2 * (32 // bits)) == 0 else 1)


def _check_quantization(group_size: int, bits: int) -> None:
    if bits not in QUANTIZED_BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    per = 32 // bits
    if not (isinstance(group_size, int) and group_size > 0 and group_size % per == 0):
        raise ValueError(f"group_size must be a positive multiple of {per}, got {group_size}")


def _check_qspvmm_tiles(t: QSpvmmTiles, bits: int) -> None:
    tgs = t.NSG * 32
    if not (t.WN >= 1 and t.SN >= 1 and 32 % t.SN == 0 and t.NSG >= 1 and tgs <= 1024):
        raise ValueError(f"invalid QSpvmmTiles {t}")
    if t.CHUNK % tgs != 0 or not (1 <= t.CHUNK // tgs <= 32):
        raise ValueError(f"QSpvmmTiles.CHUNK must be 1..32 times NSG*32: {t}")
    bn = t.SN * t.WN * (32 // bits)
    if 8 * t.CHUNK + 4 * t.NSG * (1 + bn) > 32768:
        raise ValueError(f"QSpvmmTiles {t} need more than 32 KiB of threadgroup memory")


def _check_qvmmsp_tiles(t: QVmmspTiles, bits: int, group_size: int) -> None:
    tgs = t.NSG * 32
    if not (t.WPT >= 1 and t.TM >= 1 and t.NSG >= 1 and tgs <= 1024 and 1 <= t.TILE_O <= tgs):
        raise ValueError(f"invalid QVmmspTiles {t}")
    if group_size % (t.WPT * (32 // bits)) != 0:
        raise ValueError(f"QVmmspTiles.WPT * 32 / bits must divide group_size {group_size}: {t}")


# --------------------------------------------------------------------------
# Kernel objects
# --------------------------------------------------------------------------
def _metal_dir() -> Path:
    candidates = []
    env = os.environ.get("CHESS_MLX_METAL_DIR")
    if env:
        candidates.append(Path(env))
    here = Path(__file__).resolve().parent
    candidates += [here / "metal", here.parent / "metal"]
    for c in candidates:
        if (c / "sparse_in_gemv.metal").is_file():
            return c
    raise FileNotFoundError(
        "chess_mlx Metal kernel sources not found; looked in: "
        + ", ".join(str(c) for c in candidates)
    )


@functools.lru_cache(maxsize=None)
def _kernel_source(name: str) -> str:
    return (_metal_dir() / f"{name}.metal").read_text()


_KERNEL_IO = {
    "sparse_in_gemv": (["x", "wt", "thr"], ["y"]),
    "sparse_out_gate_gemv": (["x", "w", "gate", "thr"], ["y"]),
    "sparse_in_qgemv": (["x", "wq", "scales", "biases", "thr"], ["y"]),
    "sparse_out_gate_qgemv": (["x", "wq", "scales", "biases", "gate", "thr"], ["y"]),
}


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    """The ``mx.fast.metal_kernel`` object, built once per process."""
    inputs, outputs = _KERNEL_IO[name]
    return mx.fast.metal_kernel(
        name=f"chess_{name}",
        input_names=inputs,
        output_names=outputs,
        source=_kernel_source(name),
        ensure_row_contiguous=True,
    )


@functools.lru_cache(maxsize=None)
def _template(dtype, thr_dtype, per_channel: bool, params: tuple) -> tuple:
    """Template argument list, cached per template-parameter combination."""
    return (("T", dtype), ("TT", thr_dtype), ("PER_CHANNEL", bool(per_channel))) + params


def _params(tiles: tuple, **quantization: int) -> tuple:
    """``(name, value)`` pairs: the quantization (``BITS``, ``GS``), then the
    tiles. Named, so that tiles of two kernels with equal values (equal as
    tuples) never share a cached template."""
    named = list(quantization.items()) + list(zip(tiles._fields, tiles))
    return tuple((k, int(v)) for k, v in named)


def metal_available() -> bool:
    """True when MLX has a Metal back-end (Apple silicon macOS)."""
    try:
        return bool(mx.metal.is_available())
    except Exception:  # pragma: no cover - very old / unusual builds
        return False


# --------------------------------------------------------------------------
# Argument normalisation
# --------------------------------------------------------------------------
def _as_vector(v: mx.array, n: int, what: str) -> mx.array:
    """[n] / [1, n] / [..., n] with one row -> [n]."""
    if v.ndim == 0 or v.shape[-1] != n or v.size != n:
        raise ValueError(f"{what} must have shape [..., {n}] with a single row, got {v.shape}")
    return v.reshape(n) if v.ndim != 1 else v


def _threshold(threshold: Threshold, n: int, dtype) -> Tuple[mx.array, bool]:
    """-> (threshold as [1] or [n] array of float32 or `dtype`, per_channel)."""
    t = threshold if isinstance(threshold, mx.array) else mx.array(threshold, dtype=mx.float32)
    if t.dtype not in (mx.float32, dtype):
        t = t.astype(mx.float32)
    if t.size == 1:
        return t.reshape(1), False
    if t.size != n:
        raise ValueError(f"threshold must be a scalar or have {n} elements, got shape {t.shape}")
    return t.reshape(n), True


def _check_dtype(*arrays: mx.array) -> None:
    d = arrays[0].dtype
    if d not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {d}")
    for a in arrays[1:]:
        if a.dtype != d:
            raise TypeError(f"all inputs must share one dtype, got {d} and {a.dtype}")


class LaunchSpec(NamedTuple):
    """Everything one ``mx.fast.metal_kernel`` call needs (also used by the emulator)."""

    name: str  # key of _KERNEL_IO, file name in metal/
    inputs: Tuple[mx.array, ...]
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]
    template: tuple
    grid: Tuple[int, int, int]
    threadgroup: Tuple[int, int, int]
    output_shapes: Tuple[Tuple[int, ...], ...]
    output_dtypes: tuple


def sparse_in_gemv_launch(
    x: mx.array, wt: mx.array, threshold: Threshold, tiles: Optional[SpvmmTiles] = None
) -> LaunchSpec:
    """Normalised arguments, template and dispatch of :func:`sparse_in_gemv`."""
    if wt.ndim != 2:
        raise ValueError(f"wt must be [in, out], got shape {wt.shape}")
    n_in, n_out = wt.shape
    xv = _as_vector(x, n_in, "x")
    _check_dtype(xv, wt)
    thr, per_channel = _threshold(threshold, n_in, xv.dtype)
    tiles = tiles or default_spvmm_tiles(n_in, n_out)
    _check_spvmm_tiles(tiles)
    tgs = tiles.NSG * 32
    n_tiles = -(-n_out // (tiles.SN * tiles.TN))
    return LaunchSpec(
        name="sparse_in_gemv",
        inputs=(xv, wt, thr),
        input_names=tuple(_KERNEL_IO["sparse_in_gemv"][0]),
        output_names=tuple(_KERNEL_IO["sparse_in_gemv"][1]),
        template=_template(xv.dtype, thr.dtype, per_channel, _params(tiles)),
        grid=(n_tiles * tgs, 1, 1),
        threadgroup=(tgs, 1, 1),
        output_shapes=((n_out,),),
        output_dtypes=(xv.dtype,),
    )


def sparse_out_gate_gemv_launch(
    x: mx.array,
    w: mx.array,
    gate: mx.array,
    threshold: Threshold,
    tiles: Optional[VmmspTiles] = None,
) -> LaunchSpec:
    """Normalised arguments, template and dispatch of :func:`sparse_out_gate_gemv`."""
    if w.ndim != 2:
        raise ValueError(f"w must be [out, in], got shape {w.shape}")
    n_out, n_in = w.shape
    xv = _as_vector(x, n_in, "x")
    gv = _as_vector(gate, n_out, "gate")
    _check_dtype(xv, w, gv)
    thr, per_channel = _threshold(threshold, n_out, xv.dtype)
    tiles = tiles or default_vmmsp_tiles(n_in, n_out)
    _check_vmmsp_tiles(tiles)
    tgs = tiles.NSG * 32
    n_tiles = -(-n_out // tiles.TILE_O)
    return LaunchSpec(
        name="sparse_out_gate_gemv",
        inputs=(xv, w, gv, thr),
        input_names=tuple(_KERNEL_IO["sparse_out_gate_gemv"][0]),
        output_names=tuple(_KERNEL_IO["sparse_out_gate_gemv"][1]),
        template=_template(xv.dtype, thr.dtype, per_channel, _params(tiles)),
        grid=(n_tiles * tgs, 1, 1),
        threadgroup=(tgs, 1, 1),
        output_shapes=((n_out,),),
        output_dtypes=(xv.dtype,),
    )


def _check_packed(wq: mx.array) -> None:
    if wq.dtype != mx.uint32:
        raise TypeError(f"wq must be uint32 (packed codes), got {wq.dtype}")
    if wq.ndim != 2:
        raise ValueError(f"wq must be 2-d, got shape {wq.shape}")


def _check_groups(scales: mx.array, biases: mx.array, shape: Tuple[int, int], layout: str) -> None:
    if tuple(scales.shape) != shape or tuple(biases.shape) != shape:
        raise ValueError(
            f"scales and biases must have shape {layout} = {shape}, "
            f"got {tuple(scales.shape)} and {tuple(biases.shape)}"
        )


def sparse_in_qgemv_launch(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    threshold: Threshold,
    group_size: int,
    bits: int,
    tiles: Optional[QSpvmmTiles] = None,
) -> LaunchSpec:
    """Normalised arguments, template and dispatch of :func:`sparse_in_qgemv`."""
    _check_quantization(group_size, bits)
    _check_packed(wq)
    n_in, n_out = wq.shape[0], wq.shape[1] * (32 // bits)
    xv = _as_vector(x, n_in, "x")
    _check_dtype(xv, scales, biases)
    if n_in % group_size != 0:
        raise ValueError(f"in = {n_in} must be a multiple of group_size {group_size}")
    _check_groups(scales, biases, (n_in // group_size, n_out), "(in / group_size, out)")
    thr, per_channel = _threshold(threshold, n_in, xv.dtype)
    tiles = tiles or default_qspvmm_tiles(bits)
    _check_qspvmm_tiles(tiles, bits)
    tgs = tiles.NSG * 32
    n_tiles = -(-n_out // (tiles.SN * tiles.WN * (32 // bits)))
    return LaunchSpec(
        name="sparse_in_qgemv",
        inputs=(xv, wq, scales, biases, thr),
        input_names=tuple(_KERNEL_IO["sparse_in_qgemv"][0]),
        output_names=tuple(_KERNEL_IO["sparse_in_qgemv"][1]),
        template=_template(xv.dtype, thr.dtype, per_channel, _params(tiles, BITS=bits, GS=group_size)),
        grid=(n_tiles * tgs, 1, 1),
        threadgroup=(tgs, 1, 1),
        output_shapes=((n_out,),),
        output_dtypes=(xv.dtype,),
    )


def sparse_out_gate_qgemv_launch(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    gate: mx.array,
    threshold: Threshold,
    group_size: int,
    bits: int,
    tiles: Optional[QVmmspTiles] = None,
) -> LaunchSpec:
    """Normalised arguments, template and dispatch of :func:`sparse_out_gate_qgemv`."""
    _check_quantization(group_size, bits)
    _check_packed(wq)
    n_out, n_in = wq.shape[0], wq.shape[1] * (32 // bits)
    xv = _as_vector(x, n_in, "x")
    gv = _as_vector(gate, n_out, "gate")
    _check_dtype(xv, scales, biases, gv)
    if n_in % group_size != 0:
        raise ValueError(f"in = {n_in} must be a multiple of group_size {group_size}")
    _check_groups(scales, biases, (n_out, n_in // group_size), "(out, in / group_size)")
    thr, per_channel = _threshold(threshold, n_out, xv.dtype)
    tiles = tiles or default_qvmmsp_tiles(bits, group_size)
    _check_qvmmsp_tiles(tiles, bits, group_size)
    tgs = tiles.NSG * 32
    n_tiles = -(-n_out // tiles.TILE_O)
    return LaunchSpec(
        name="sparse_out_gate_qgemv",
        inputs=(xv, wq, scales, biases, gv, thr),
        input_names=tuple(_KERNEL_IO["sparse_out_gate_qgemv"][0]),
        output_names=tuple(_KERNEL_IO["sparse_out_gate_qgemv"][1]),
        template=_template(xv.dtype, thr.dtype, per_channel, _params(tiles, BITS=bits, GS=group_size)),
        grid=(n_tiles * tgs, 1, 1),
        threadgroup=(tgs, 1, 1),
        output_shapes=((n_out,),),
        output_dtypes=(xv.dtype,),
    )


def _launch(spec: LaunchSpec, stream=None, verbose: bool = False) -> mx.array:
    kwargs = {} if stream is None else {"stream": stream}
    return _kernel(spec.name)(
        inputs=list(spec.inputs),
        template=list(spec.template),
        grid=spec.grid,
        threadgroup=spec.threadgroup,
        output_shapes=list(spec.output_shapes),
        output_dtypes=list(spec.output_dtypes),
        verbose=verbose,
        **kwargs,
    )[0]


def _use_metal(stream) -> bool:
    if not metal_available():
        return False
    if stream is None:
        return mx.default_device() == mx.gpu
    dev = getattr(stream, "device", stream)
    return dev == mx.gpu or dev == mx.Device(mx.gpu)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def sparse_in_gemv(
    x: mx.array,
    wt: mx.array,
    threshold: Threshold,
    *,
    tiles: Optional[SpvmmTiles] = None,
    stream=None,
) -> mx.array:
    """Input-sparse vector-matrix product ("spvmm") for one decode token.

    ``y[o] = sum_i (|x_i| >= t_i ? x_i : 0) * wt[i, o]``

    Args:
        x: ``[in]`` (or ``[1, in]`` / ``[..., in]`` holding a single row).
        wt: ``[in, out]``, input-major (the transpose of an ``nn.Linear`` weight).
        threshold: scalar (float, 0-d or ``[1]``) or per-channel ``[in]``.
        tiles: optional :class:`SpvmmTiles` override.
        stream: MLX stream / device; the kernel runs on a GPU stream only.

    Returns:
        ``x.shape[:-1] + (out,)`` in ``x.dtype``; float32 accumulation. Weight rows of
        dropped channels are not read. Without Metal (or on a CPU stream) the
        result comes from :func:`sparse_in_gemv_reference`.
    """
    spec = sparse_in_gemv_launch(x, wt, threshold, tiles)
    out_shape = tuple(x.shape[:-1]) + (wt.shape[1],)
    if wt.shape[0] == 0 or wt.shape[1] == 0:
        return mx.zeros(out_shape, dtype=x.dtype)
    if not _use_metal(stream):
        return sparse_in_gemv_reference(x, wt, threshold).reshape(out_shape)
    return _launch(spec, stream).reshape(out_shape)


def sparse_out_gate_gemv(
    x: mx.array,
    w: mx.array,
    gate: mx.array,
    threshold: Threshold,
    *,
    tiles: Optional[VmmspTiles] = None,
    stream=None,
) -> mx.array:
    """Output-sparse, gate-multiplied matrix-vector product ("vmmsp") for one token.

    ``y[o] = (|gate_o| >= t_o) ? gate_o * dot(w[o, :], x) : 0``

    Args:
        x: ``[in]`` (or ``[1, in]`` / ``[..., in]`` holding a single row).
        w: ``[out, in]`` (``nn.Linear`` layout, e.g. ``up_proj.weight``).
        gate: ``[out]`` (or one row of ``[..., out]``): the activated gate.
        threshold: scalar (float, 0-d or ``[1]``) or per-channel ``[out]``.
        tiles: optional :class:`VmmspTiles` override.
        stream: MLX stream / device; the kernel runs on a GPU stream only.

    Returns:
        ``gate.shape`` in ``x.dtype`` (float32 accumulation, one rounding of
        ``gate_o * dot``). Rows of ``w`` whose gate is dropped are not read.
        Without Metal (or on a CPU stream) the result comes from
        :func:`sparse_out_gate_gemv_reference`.
    """
    spec = sparse_out_gate_gemv_launch(x, w, gate, threshold, tiles)
    out_shape = tuple(gate.shape)
    if w.shape[0] == 0:
        return mx.zeros(out_shape, dtype=x.dtype)
    if w.shape[1] == 0:
        return mx.zeros(out_shape, dtype=x.dtype)
    if not _use_metal(stream):
        return sparse_out_gate_gemv_reference(x, w, gate, threshold).reshape(out_shape)
    return _launch(spec, stream).reshape(out_shape)


def sparse_in_gemv_reference(x: mx.array, wt: mx.array, threshold: Threshold) -> mx.array:
    """Pure-MLX :func:`sparse_in_gemv`: ``[out]`` in x.dtype, float32 accumulation."""
    n_in = wt.shape[0]
    xv = _as_vector(x, n_in, "x")
    thr, _ = _threshold(threshold, n_in, xv.dtype)
    x32 = xv.astype(mx.float32)
    keep = keep_mask(x32, thr.astype(mx.float32))
    xs = mx.where(keep, x32, mx.zeros_like(x32))
    return (xs @ wt.astype(mx.float32)).astype(xv.dtype)


def sparse_out_gate_gemv_reference(
    x: mx.array, w: mx.array, gate: mx.array, threshold: Threshold
) -> mx.array:
    """Pure-MLX :func:`sparse_out_gate_gemv`: ``[out]`` in x.dtype, float32 accumulation."""
    n_out, n_in = w.shape
    xv = _as_vector(x, n_in, "x")
    g32 = _as_vector(gate, n_out, "gate").astype(mx.float32)
    thr, _ = _threshold(threshold, n_out, xv.dtype)
    keep = keep_mask(g32, thr.astype(mx.float32))
    dots = w.astype(mx.float32) @ xv.astype(mx.float32)
    return mx.where(keep, g32 * dots, mx.zeros_like(dots)).astype(xv.dtype)


def sparse_in_qgemv(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    threshold: Threshold,
    group_size: int,
    bits: int,
    *,
    tiles: Optional[QSpvmmTiles] = None,
    stream=None,
) -> mx.array:
    """:func:`sparse_in_gemv` on affine-quantized weights in the input-major
    re-layout of :mod:`chess_mlx.quantized`.

    ``y[o] = sum_g scales[g, o] * sum_{kept i in g} x_i q[i, o]
    + biases[g, o] * sum_{kept i in g} x_i``

    Args:
        x: ``[in]`` (or one row of ``[..., in]``).
        wq: uint32 ``[in, out * bits / 32]``: channel ``i``'s codes for all
            outputs, packed along the outputs.
        scales, biases: ``[in / group_size, out]``, dtype of ``x``.
        threshold: scalar (float, 0-d or ``[1]``) or per-channel ``[in]``.
        group_size, bits: the quantization (``bits`` 4 or 8).
        tiles: optional :class:`QSpvmmTiles` override.
        stream: MLX stream / device; the kernel runs on a GPU stream only.

    Returns:
        ``x.shape[:-1] + (out,)`` in ``x.dtype``; float32 accumulation. Rows of
        dropped channels are not read, and a group's scales and biases only if
        one of its channels is kept. Without Metal (or on a CPU stream) the
        result comes from :func:`sparse_in_qgemv_reference`.
    """
    spec = sparse_in_qgemv_launch(x, wq, scales, biases, threshold, group_size, bits, tiles)
    n_out = spec.output_shapes[0][0]
    out_shape = tuple(x.shape[:-1]) + (n_out,)
    if wq.shape[0] == 0 or n_out == 0:
        return mx.zeros(out_shape, dtype=x.dtype)
    if not _use_metal(stream):
        reference = sparse_in_qgemv_reference(x, wq, scales, biases, threshold, group_size, bits)
        return reference.reshape(out_shape)
    return _launch(spec, stream).reshape(out_shape)


def sparse_out_gate_qgemv(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    gate: mx.array,
    threshold: Threshold,
    group_size: int,
    bits: int,
    *,
    tiles: Optional[QVmmspTiles] = None,
    stream=None,
) -> mx.array:
    """:func:`sparse_out_gate_gemv` on an ``nn.QuantizedLinear``'s own arrays.

    ``y[o] = (|gate_o| >= t_o) ? gate_o * dot(dequantized row o, x) : 0``

    Args:
        x: ``[in]`` (or one row of ``[..., in]``).
        wq: uint32 ``[out, in * bits / 32]`` (``QuantizedLinear.weight``).
        scales, biases: ``[out, in / group_size]``, dtype of ``x``.
        gate: ``[out]`` (or one row of ``[..., out]``): the activated gate.
        threshold: scalar (float, 0-d or ``[1]``) or per-channel ``[out]``.
        group_size, bits: the quantization (``bits`` 4 or 8).
        tiles: optional :class:`QVmmspTiles` override.
        stream: MLX stream / device; the kernel runs on a GPU stream only.

    Returns:
        ``gate.shape`` in ``x.dtype`` (float32 accumulation). Rows, scales and
        biases of dropped outputs are not read. Without Metal (or on a CPU
        stream) the result comes from :func:`sparse_out_gate_qgemv_reference`.
    """
    spec = sparse_out_gate_qgemv_launch(x, wq, scales, biases, gate, threshold, group_size, bits, tiles)
    out_shape = tuple(gate.shape)
    if wq.shape[0] == 0 or wq.shape[1] == 0:
        return mx.zeros(out_shape, dtype=x.dtype)
    if not _use_metal(stream):
        reference = sparse_out_gate_qgemv_reference(
            x, wq, scales, biases, gate, threshold, group_size, bits
        )
        return reference.reshape(out_shape)
    return _launch(spec, stream).reshape(out_shape)


def sparse_in_qgemv_reference(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    threshold: Threshold,
    group_size: int,
    bits: int,
) -> mx.array:
    """Pure-MLX :func:`sparse_in_qgemv`: ``[out]`` in x.dtype, float32 dequantization."""
    codes = unpack_codes(wq, bits).astype(mx.float32)
    s = mx.repeat(scales.astype(mx.float32), group_size, axis=0)
    b = mx.repeat(biases.astype(mx.float32), group_size, axis=0)
    w = s * codes + b
    return sparse_in_gemv_reference(x.astype(mx.float32), w, threshold).astype(x.dtype)


def sparse_out_gate_qgemv_reference(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    gate: mx.array,
    threshold: Threshold,
    group_size: int,
    bits: int,
) -> mx.array:
    """Pure-MLX :func:`sparse_out_gate_qgemv`: ``[out]`` in x.dtype, float32 dequantization."""
    codes = unpack_codes(wq, bits).astype(mx.float32)
    s = mx.repeat(scales.astype(mx.float32), group_size, axis=1)
    b = mx.repeat(biases.astype(mx.float32), group_size, axis=1)
    w = s * codes + b
    y = sparse_out_gate_gemv_reference(x.astype(mx.float32), w, gate.astype(mx.float32), threshold)
    return y.astype(x.dtype)


# --------------------------------------------------------------------------
# Generated Metal source (for the CPU emulator and for inspection)
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _capture_fd1():
    """Capture what C/C++ code writes to file descriptor 1."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    buf = tempfile.TemporaryFile(mode="w+b")
    result = {"text": ""}
    try:
        os.dup2(buf.fileno(), 1)
        yield result
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        buf.seek(0)
        result["text"] = buf.read().decode("utf-8", "replace")
        buf.close()


def _source_key(spec: LaunchSpec) -> tuple:
    # What the generated source depends on: kernel, template, and per input its
    # dtype, whether it is 0-d and whether MLX passes it as `constant` (< 8 elements).
    return (
        spec.name,
        spec.template,
        tuple((str(a.dtype), a.ndim == 0, a.size < 8) for a in spec.inputs),
        tuple(str(d) for d in spec.output_dtypes),
    )


_SOURCE_CACHE: dict = {}


def capture_generated_source(fn, *inputs: mx.array) -> str:
    """Metal source printed by ``fn(*inputs)``, which must call an
    ``mx.fast.metal_kernel`` with ``stream=mx.gpu, verbose=True``.

    Works without a Metal back-end: ``fn`` is traced inside
    ``mx.export_function`` (no evaluation) and MLX's printout, written by C++
    to file descriptor 1, is captured.
    """
    with tempfile.TemporaryDirectory() as d:
        with _capture_fd1() as cap:
            mx.export_function(os.path.join(d, "kernel.mlxfn"), fn, *inputs)
    text = cap["text"]
    start = text.find("```\n")
    end = text.find("\n```", start + 4)
    if start < 0 or end < 0:
        raise RuntimeError("could not capture MLX's generated Metal source:\n" + text[-2000:])
    return text[start + 4 : end]


def generated_metal_source(spec: LaunchSpec) -> str:
    """The complete Metal source MLX generates (and would compile) for ``spec``.

    ``spec`` comes from one of the ``*_launch`` functions; the source depends on the template
    and on the input dtypes and sizes (MLX passes inputs of fewer than 8
    elements in the ``constant`` address space). It lacks MLX's
    ``metal::utils()`` preamble (``<metal_stdlib>``, bf16 helpers,
    ``using namespace metal``), which MLX prepends when compiling.
    """
    key = _source_key(spec)
    if key not in _SOURCE_CACHE:

        def traced(*inputs):
            return _launch(spec._replace(inputs=tuple(inputs)), stream=mx.gpu, verbose=True)

        _SOURCE_CACHE[key] = capture_generated_source(traced, *spec.inputs)
    return _SOURCE_CACHE[key]


def metal_source_for(
    kernel: str,
    in_features: int,
    out_features: int,
    dtype=mx.float16,
    per_channel: bool = False,
    threshold_dtype=mx.float32,
    tiles=None,
    group_size: int = 64,
    bits: int = 4,
) -> Tuple[str, LaunchSpec]:
    """Generated Metal source and launch spec for shapes / dtypes (zero inputs).

    ``kernel`` is ``"sparse_in_gemv"``, ``"sparse_out_gate_gemv"``,
    ``"sparse_in_qgemv"`` or ``"sparse_out_gate_qgemv"`` (the quantized ones
    with ``group_size`` and ``bits``). The source is what MLX compiles for any
    inputs of these shapes and dtypes.
    """
    input_sparse = kernel in ("sparse_in_gemv", "sparse_in_qgemv")
    n_thr = (in_features if input_sparse else out_features) if per_channel else 1
    thr = mx.zeros((n_thr,), dtype=threshold_dtype)
    x = mx.zeros((in_features,), dtype=dtype)
    gate = mx.zeros((out_features,), dtype)
    per = 32 // bits if bits in QUANTIZED_BITS else 1
    if kernel == "sparse_in_gemv":
        spec = sparse_in_gemv_launch(x, mx.zeros((in_features, out_features), dtype), thr, tiles)
    elif kernel == "sparse_out_gate_gemv":
        spec = sparse_out_gate_gemv_launch(
            x, mx.zeros((out_features, in_features), dtype), gate, thr, tiles
        )
    elif kernel == "sparse_in_qgemv":
        wq = mx.zeros((in_features, out_features // per), mx.uint32)
        groups = mx.zeros((in_features // group_size, out_features), dtype)
        spec = sparse_in_qgemv_launch(x, wq, groups, groups, thr, group_size, bits, tiles)
    elif kernel == "sparse_out_gate_qgemv":
        wq = mx.zeros((out_features, in_features // per), mx.uint32)
        groups = mx.zeros((out_features, in_features // group_size), dtype)
        spec = sparse_out_gate_qgemv_launch(x, wq, groups, groups, gate, thr, group_size, bits, tiles)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return generated_metal_source(spec), spec
