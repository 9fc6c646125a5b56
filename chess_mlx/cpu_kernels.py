"""CPU sparse GEMV kernels for CHESS decoding (compiled MLX extension).

Thin wrapper around the optional compiled module ``chess_mlx._cpu_kernels``
(sources in ``csrc/``). Two ops, both for a single activation row (decode):

* :func:`sparse_in_gemv` ("spvmm"):
  ``y[o] = sum_i (|x_i| >= t_i ? x_i : 0) * wt[i, o]`` with ``wt`` ``[in, out]``
  (transposed ``nn.Linear`` weight); rows of dropped channels are not read.
* :func:`sparse_out_gate_gemv` ("vmmsp"):
  ``y[o] = gate_o * dot(w[o, :], x) if |gate_o| >= t_o else 0`` with ``w``
  ``[out, in]``; rows of dropped outputs are not read.

Three more ops compute the rest of a decode step, each as one op where MLX's
CPU backend runs a graph of small ones (see :mod:`chess_mlx.decode_ops`):
:func:`rms_norm`, :func:`rope_one` and :func:`attention_one`.

Thresholds are a float (scalar) or a float32 array of 1 or per-channel
elements; entries with ``|v| >= t`` are kept. Inputs are float32, float16
or bfloat16 (one dtype; the quantized ops also take float16 or bfloat16
scales and biases with float32 ``x``), accumulation is float32, the result
has the dtype of ``x``. The ops run on a CPU stream (default: the default
CPU stream) and are lazy like any MLX op.

Use :func:`available` before calling; :func:`unavailable_reason` says in one
line why the kernels cannot be used (module not built, or built against a
different mlx version).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import List, Optional, Sequence, Union

import mlx.core as mx

__all__ = [
    "available",
    "unavailable_reason",
    "module_present",
    "sparse_in_gemv",
    "sparse_out_gate_gemv",
    "sparse_in_qgemv",
    "sparse_out_gate_qgemv",
    "rms_norm",
    "rope_one",
    "attention_one",
    "set_num_threads",
    "get_num_threads",
    "kernel_isa",
    "huge_page_copies",
    "release_free_memory",
    "transparent_huge_pages",
]

_MODULE_NAME = __package__ + "._cpu_kernels" if __package__ else "_cpu_kernels"

_ext = None
_reason: Optional[str] = None


def _load() -> None:
    global _ext, _reason
    _ext, _reason = None, None
    if importlib.util.find_spec(_MODULE_NAME) is None:
        _reason = (
            "compiled module chess_mlx._cpu_kernels is not built "
            "(see csrc/CMakeLists.txt)"
        )
        return
    try:
        mod = importlib.import_module(_MODULE_NAME)
    except Exception as e:  # ImportError, OSError (missing/ABI-mismatched libmlx)
        msg = " ".join(str(e).split())
        _reason = f"chess_mlx._cpu_kernels failed to import: {type(e).__name__}: {msg}"
        return
    built = getattr(mod, "built_mlx_version", None)
    installed = mx.__version__
    if built != installed:
        _reason = (
            f"chess_mlx._cpu_kernels was built against mlx {built} but mlx "
            f"{installed} is installed; rebuild it"
        )
        return
    _ext = mod


_load()


def available() -> bool:
    """True if the compiled kernels can be used."""
    return _ext is not None


def unavailable_reason() -> Optional[str]:
    """One-line reason why :func:`available` is False (None if available)."""
    return _reason


def module_present() -> bool:
    """True if a compiled ``_cpu_kernels`` file exists (usable or not)."""
    return importlib.util.find_spec(_MODULE_NAME) is not None


def _require():
    if _ext is None:
        raise RuntimeError(f"chess_mlx CPU kernels unavailable: {_reason}")
    return _ext


# Unsparsified quantized projections with at most this many inputs decode
# through the input-sparse GEMV on the input-major re-layout, keeping every
# channel, instead of the output GEMV on their own layout: with rows this
# short the output GEMV's work per row and group dominates. Session 16, dense,
# 4-bit, input-major time over the output GEMV's: 576 inputs (the default
# model) 0.68-0.86, 896 0.72, 1024 0.87, 1536 0.88, 2048 0.93-1.02.
DENSE_INPUT_MAJOR_MAX_IN = 1536

Threshold = Union[float, int, mx.array]
Stream = Union[None, mx.Stream, mx.Device]


def _threshold(t: Threshold) -> mx.array:
    if isinstance(t, mx.array):
        return t if t.dtype == mx.float32 else t.astype(mx.float32)
    return mx.array([float(t)], dtype=mx.float32)


def sparse_in_gemv(
    x: mx.array, wt: mx.array, threshold: Threshold, *, stream: Stream = None
) -> mx.array:
    """``y = (x * (|x| >= threshold)) @ wt`` reading only kept rows of ``wt``.

    Args:
        x: ``[in]`` or ``[..., in]`` with a single row.
        wt: ``[in, out]`` (transposed linear weight), dtype of ``x``.
        threshold: float, or float32 array with 1 or ``in`` elements.
        stream: CPU stream/device; default CPU stream if None.

    Returns:
        ``x.shape[:-1] + (out,)`` array with the dtype of ``x``.
    """
    return _require().sparse_in_gemv(x, wt, _threshold(threshold), stream=stream)


def sparse_out_gate_gemv(
    x: mx.array,
    w: mx.array,
    gate: mx.array,
    threshold: Threshold,
    *,
    stream: Stream = None,
) -> mx.array:
    """``y = where(|gate| >= threshold, gate * (x @ w.T), 0)`` reading only
    the kept rows of ``w``.

    Args:
        x: ``[in]`` or ``[..., in]`` with a single row.
        w: ``[out, in]`` (linear weight), dtype of ``x``.
        gate: ``out`` elements (activated gate), dtype of ``x``.
        threshold: float, or float32 array with 1 or ``out`` elements.
        stream: CPU stream/device; default CPU stream if None.

    Returns:
        ``x.shape[:-1] + (out,)`` array with the dtype of ``x``.
    """
    return _require().sparse_out_gate_gemv(
        x, w, gate, _threshold(threshold), stream=stream
    )


def sparse_in_qgemv(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    threshold: Threshold,
    group_size: int,
    bits: int,
    *,
    stream: Stream = None,
) -> mx.array:
    """:func:`sparse_in_gemv` on affine-quantized weights in the input-major
    re-layout of :mod:`chess_mlx.quantized` (``wq`` uint32 ``[in, out*bits/32]``,
    ``scales``/``biases`` ``[in/group_size, out]``, dtype of ``x`` or half
    with float32 ``x``). A group's scales and biases are read only when one
    of its channels is kept."""
    return _require().sparse_in_qgemv(
        x, wq, scales, biases, _threshold(threshold), group_size, bits, stream=stream
    )


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
    stream: Stream = None,
) -> mx.array:
    """:func:`sparse_out_gate_gemv` on an ``nn.QuantizedLinear``'s own arrays
    (``wq`` uint32 ``[out, in*bits/32]``, ``scales``/``biases`` ``[out, in/group_size]``,
    dtype of ``x`` or half with float32 ``x``)."""
    return _require().sparse_out_gate_qgemv(
        x, wq, scales, biases, gate, _threshold(threshold), group_size, bits, stream=stream
    )


def rms_norm(x: mx.array, w: mx.array, eps: float, *, stream: Stream = None) -> mx.array:
    """``mx.fast.rms_norm(x, w, eps)`` (``w`` in the dtype of ``x``)."""
    return _require().rms_norm(x, w, float(eps), stream=stream)


def silu(x: mx.array, *, stream: Stream = None) -> mx.array:
    """``nn.silu(x)``: ``x * sigmoid(x)``, the sigmoid rounded to the dtype of ``x``."""
    return _require().silu(x, stream=stream)


def rope_one(
    x: mx.array, inv_freqs: mx.array, offset: int, scale: float, traditional: bool, *, stream: Stream = None
) -> mx.array:
    """``mx.fast.rope`` of one position: each row of ``x`` (last axis: one
    head) rotated by the angles ``offset * scale * inv_freqs`` (float32,
    ``dims / 2`` of them); entries past ``dims`` pass through."""
    return _require().rope_one(x, inv_freqs, int(offset), float(scale), bool(traditional), stream=stream)


def attention_one(q: mx.array, k: mx.array, v: mx.array, scale: float, *, stream: Stream = None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` of one query per head, no
    mask: ``q`` ``[B, 1, Hq, D]``, ``k``/``v`` ``[B, Hkv, S, D]`` (views of a
    KV cache are read in place), ``Hq`` a multiple of ``Hkv``. Returns
    ``[B, 1, Hq, Dv]``."""
    return _require().attention_one(q, k, v, float(scale), stream=stream)


def set_num_threads(n: int) -> None:
    """Threads used by the kernels (incl. MLX's stream thread); n <= 0 resets
    to the default (env ``CHESS_MLX_NUM_THREADS`` or the CPUs available)."""
    _require().set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads used by the kernels."""
    return _require().get_num_threads()


def kernel_isa() -> str:
    """Instruction set of the kernels in use ("avx512", "avx2" or "generic")."""
    return _require().kernel_isa()


def huge_page_copies(arrays: Sequence[mx.array]) -> List[mx.array]:
    """Copies of ``arrays`` (evaluated) packed into one region of memory
    advised for transparent huge pages, freed with the last copy (Linux;
    elsewhere ordinary copies). A sparse GEMV's scattered rows then cost
    no page walks (see csrc/huge_pages.h)."""
    return _require().huge_page_copies(list(arrays))


def release_free_memory() -> None:
    """Return the heap's free memory to the system (glibc's ``malloc_trim``;
    elsewhere nothing): glibc otherwise keeps arrays freed inside its heap
    in the process's resident memory."""
    _require().release_free_memory()


THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> Optional[str]:
    """The system's THP mode ("always", "madvise" or "never"), None where
    it has none (not Linux)."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None
