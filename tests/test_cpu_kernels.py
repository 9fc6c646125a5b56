"""Tests for the compiled CPU sparse GEMV kernels (chess_mlx.cpu_kernels).

Skipped only when the compiled module chess_mlx._cpu_kernels is not built;
if it is present but unusable (e.g. built against another mlx), tests fail.
"""

import numpy as np
import pytest

import mlx.core as mx

from chess_mlx import cpu_kernels as ck

if not ck.module_present():
    pytest.skip(
        "compiled module chess_mlx._cpu_kernels not built "
        "(cmake -S csrc -B build/cpu_kernels && cmake --build build/cpu_kernels)",
        allow_module_level=True,
    )

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# Error bound relative to sum_i |x_i w_io| (float32 accumulation + rounding
# of the output to the dtype).
TOL = {mx.float32: 2e-6, mx.float16: 1.5e-3, mx.bfloat16: 1e-2}
SHAPES = [(576, 1536), (1536, 576), (100, 37), (1, 1), (7, 1000)]


@pytest.fixture(autouse=True, scope="module")
def _require_available():
    assert ck.available(), ck.unavailable_reason()


def f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def rand(rng, shape, dtype, scale=1.0) -> mx.array:
    return mx.array((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)


def ref_in(x, wt, thr):
    """Reference for sparse_in_gemv: (value, error scale)."""
    xf = f32(x).reshape(-1)
    keep = np.abs(xf) >= f32(thr).reshape(-1)
    xs = np.where(keep, xf, 0.0).astype(np.float64)
    w = f32(wt).astype(np.float64)
    return xs @ w, np.abs(xs) @ np.abs(w)


def ref_out(x, w, gate, thr):
    """Reference for sparse_out_gate_gemv: (value, error scale)."""
    xf = f32(x).reshape(-1).astype(np.float64)
    g = f32(gate).reshape(-1)
    keep = np.abs(g) >= f32(thr).reshape(-1)
    g = np.where(keep, g, 0.0).astype(np.float64)
    wf = f32(w).astype(np.float64)
    return g * (wf @ xf), np.abs(g) * (np.abs(wf) @ np.abs(xf))


def check(y, ref, scale, dtype, shape):
    assert y.dtype == dtype
    assert tuple(y.shape) == tuple(shape)
    err = np.abs(f32(y).reshape(-1).astype(np.float64) - ref)
    bound = TOL[dtype] * scale
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())} mismatches, max err {err.max():.3g}, "
        f"e.g. index {int(np.argmax(bad))}: got {f32(y).reshape(-1)[np.argmax(bad)]}, "
        f"want {ref[np.argmax(bad)]}"
    )


def thresholds(rng, v: np.ndarray, mode: str, vector: bool) -> mx.array:
    """float32 threshold of shape [1] or [n] producing the given sparsity."""
    a = np.abs(v.reshape(-1))
    n = a.size
    if mode == "none":  # nothing dropped
        t = np.zeros(n if vector else 1, np.float32)
    elif mode == "all":  # everything dropped
        t = np.full(n if vector else 1, np.inf, np.float32)
    elif mode == "single":  # exactly one survivor (ties kept: |v| >= t)
        i = int(np.argmax(a))
        if vector:
            t = np.full(n, np.inf, np.float32)
            t[i] = a[i]
        else:
            t = np.array([a[i]], np.float32)
    else:
        s = float(mode)  # fraction dropped
        if vector:
            # Per-channel thresholds: each channel kept with prob. 1 - s.
            drop = rng.random(n) < s
            t = np.where(drop, a * 1.5 + 1e-3, a * 0.5).astype(np.float32)
        else:
            t = np.array([np.quantile(a, s)], np.float32)
    return mx.array(t)


MODES = ["none", "all", "single", "0.3", "0.5", "0.9"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sparse_in_gemv(dtype, shape):
    n_in, n_out = shape
    rng = np.random.default_rng(n_in * 7919 + n_out)
    x = rand(rng, (1, n_in), dtype)
    wt = rand(rng, (n_in, n_out), dtype, 0.1)
    for mode in MODES:
        for vector in (False, True):
            thr = thresholds(rng, f32(x), mode, vector)
            y = ck.sparse_in_gemv(x, wt, thr)
            ref, scale = ref_in(x, wt, thr)
            check(y, ref, scale, dtype, (1, n_out))
            if mode == "all":
                assert not f32(y).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sparse_out_gate_gemv(dtype, shape):
    n_in, n_out = shape
    rng = np.random.default_rng(n_in * 104729 + n_out)
    x = rand(rng, (1, n_in), dtype)
    w = rand(rng, (n_out, n_in), dtype, 0.1)
    gate = rand(rng, (1, n_out), dtype)
    for mode in MODES:
        for vector in (False, True):
            thr = thresholds(rng, f32(gate), mode, vector)
            y = ck.sparse_out_gate_gemv(x, w, gate, thr)
            ref, scale = ref_out(x, w, gate, thr)
            check(y, ref, scale, dtype, (1, n_out))
            kept = np.abs(f32(gate).reshape(-1)) >= f32(thr).reshape(-1)
            assert not f32(y).reshape(-1)[~kept].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_single_survivor_is_exact(dtype):
    # One kept channel: y = x_i * wt[i, :] rounded once, like MLX does.
    rng = np.random.default_rng(1)
    x = rand(rng, (37,), dtype)
    wt = rand(rng, (37, 300), dtype)
    i = int(np.argmax(np.abs(f32(x))))
    thr = mx.array([float(np.abs(f32(x))[i])], mx.float32)
    y = ck.sparse_in_gemv(x, wt, thr)
    want = (x[i].astype(mx.float32) * wt[i].astype(mx.float32)).astype(dtype)
    assert y.shape == (300,)
    np.testing.assert_array_equal(f32(y), f32(want))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_dropped_rows_are_not_used(dtype):
    # NaN in every weight row that belongs to a dropped channel: a masked
    # dense product would return NaN (0 * NaN), the sparse kernels must not.
    rng = np.random.default_rng(6)
    n_in, n_out = 300, 520
    x = rand(rng, (1, n_in), dtype)
    thr = mx.array([0.8])
    drop_in = np.abs(f32(x)).reshape(-1) < 0.8
    wt_np = 0.1 * rng.standard_normal((n_in, n_out)).astype(np.float32)
    wt_np[drop_in] = np.nan
    wt = mx.array(wt_np).astype(dtype)
    y = ck.sparse_in_gemv(x, wt, thr)
    ref, scale = ref_in(x, mx.array(np.where(drop_in[:, None], 0, wt_np)).astype(dtype), thr)
    check(y, ref, scale, dtype, (1, n_out))

    gate = rand(rng, (1, n_out), dtype)
    drop_out = np.abs(f32(gate)).reshape(-1) < 0.8
    w_np = 0.1 * rng.standard_normal((n_out, n_in)).astype(np.float32)
    w_np[drop_out] = np.inf
    w = mx.array(w_np).astype(dtype)
    y = ck.sparse_out_gate_gemv(x, w, gate, thr)
    ref, scale = ref_out(x, mx.array(np.where(drop_out[:, None], 0, w_np)).astype(dtype), gate, thr)
    check(y, ref, scale, dtype, (1, n_out))


def test_threshold_ties_are_kept():
    x = mx.array([1.0, -2.0, 3.0, -4.0])
    wt = mx.eye(4)
    y = ck.sparse_in_gemv(x, wt, mx.array([2.0]))
    np.testing.assert_array_equal(np.array(y), [0.0, -2.0, 3.0, -4.0])
    y = ck.sparse_out_gate_gemv(mx.ones((4,)), mx.eye(4), x, mx.array([3.0, 3.0, 3.0, 4.5]))
    np.testing.assert_array_equal(np.array(y), [0.0, 0.0, 3.0, 0.0])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_non_contiguous_inputs(dtype):
    rng = np.random.default_rng(2)
    n_in, n_out = 96, 80
    x_big = rand(rng, (3, 2 * n_in), dtype)
    x = x_big[1:2, ::2]  # strided row, shape (1, n_in)
    w_rows = rand(rng, (n_out, n_in), dtype, 0.1)
    wt = w_rows.T  # (n_in, n_out) column-major view
    wt_big = rand(rng, (n_in, 3 * n_out), dtype, 0.1)
    wt_slice = wt_big[:, n_out : 2 * n_out]  # row-strided view
    thr_vec = mx.array(np.abs(f32(x)).reshape(-1) * rng.uniform(0.5, 1.5, n_in).astype(np.float32))
    thr_strided = mx.repeat(thr_vec, 2)[::2]
    thr_bcast = mx.broadcast_to(mx.array([0.7]), (n_in,))
    for w_in in (wt, wt_slice):
        for thr in (thr_strided, thr_bcast, mx.array(0.5)):
            y = ck.sparse_in_gemv(x, w_in, thr)
            ref, scale = ref_in(x, w_in, thr)
            check(y, ref, scale, dtype, (1, n_out))

    w = wt_slice.T  # (n_out, n_in) column-major view
    gate_big = rand(rng, (2, 3 * n_out), dtype)
    gate = gate_big[1, ::3]  # strided
    gthr = mx.broadcast_to(mx.array([0.6]), (n_out,))
    for w_out in (w, w_rows[:, :]):
        y = ck.sparse_out_gate_gemv(x, w_out, gate, gthr)
        ref, scale = ref_out(x, w_out, gate, gthr)
        check(y, ref, scale, dtype, (1, n_out))


def test_shapes_and_python_thresholds():
    rng = np.random.default_rng(3)
    x = rand(rng, (1, 1, 64), mx.float32)
    wt = rand(rng, (64, 48), mx.float32)
    y = ck.sparse_in_gemv(x, wt, 0.25)
    assert y.shape == (1, 1, 48)
    ref, scale = ref_in(x, wt, mx.array([0.25]))
    check(y, ref, scale, mx.float32, (1, 1, 48))
    y = ck.sparse_out_gate_gemv(x, wt.T, x[..., :48], 0)
    ref, scale = ref_out(x, wt.T, x[..., :48], mx.array([0.0]))
    check(y, ref, scale, mx.float32, (1, 1, 48))
    # float16 threshold arrays are converted to float32 (0.25 is exact)
    y = ck.sparse_in_gemv(x, wt, mx.array([0.25], mx.float16))
    ref, scale = ref_in(x, wt, mx.array([0.25]))
    check(y, ref, scale, mx.float32, (1, 1, 48))


def test_lazy_graph_and_compile():
    rng = np.random.default_rng(4)
    x = rand(rng, (1, 128), mx.float32)
    wt = rand(rng, (128, 256), mx.float32)
    w2 = rand(rng, (64, 256), mx.float32)
    thr = mx.array([0.5])

    def f(x):
        h = ck.sparse_in_gemv(mx.tanh(x), wt, thr)  # input is an unevaluated op
        return ck.sparse_out_gate_gemv(h, w2, h[..., :64], thr) * 2

    want = f(x)
    got = mx.compile(f)(x)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    h_ref, _ = ref_in(mx.tanh(x), wt, thr)
    h = mx.array(h_ref.astype(np.float32))[None]
    ref, scale = ref_out(h, w2, h[..., :64], thr)
    check(want / 2, ref, scale * 10, mx.float32, (1, 64))


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(threads):
    """Column-tile, split-K and row-split paths give the same results."""
    rng = np.random.default_rng(5)
    old = ck.get_num_threads()
    try:
        ck.set_num_threads(threads)
        assert ck.get_num_threads() == threads
        for n_in, n_out in [(64, 8192), (1024, 512), (333, 2049)]:
            x = rand(rng, (1, n_in), mx.float32)
            wt = rand(rng, (n_in, n_out), mx.float32, 0.1)
            for s in ("0", "0.5"):
                thr = thresholds(rng, f32(x), s, False) if s != "0" else mx.array([0.0])
                y = ck.sparse_in_gemv(x, wt, thr)
                ref, scale = ref_in(x, wt, thr)
                check(y, ref, scale, mx.float32, (1, n_out))
            w = rand(rng, (n_out, n_in), mx.float32, 0.1)
            gate = rand(rng, (1, n_out), mx.float32)
            thr = thresholds(rng, f32(gate), "0.5", True)
            y = ck.sparse_out_gate_gemv(x, w, gate, thr)
            ref, scale = ref_out(x, w, gate, thr)
            check(y, ref, scale, mx.float32, (1, n_out))
    finally:
        ck.set_num_threads(0)
    assert ck.get_num_threads() == old


def test_errors():
    x = mx.ones((1, 8))
    wt = mx.ones((8, 4))
    t = mx.array([0.0])
    with pytest.raises(ValueError, match="single row"):
        ck.sparse_in_gemv(mx.ones((2, 8)), wt, t)
    with pytest.raises(ValueError, match="wt must have shape"):
        ck.sparse_in_gemv(x, mx.ones((4, 8)), t)
    with pytest.raises(ValueError, match="same dtype"):
        ck.sparse_in_gemv(x, wt.astype(mx.float16), t)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ck.sparse_in_gemv(x.astype(mx.int32), wt.astype(mx.int32), t)
    with pytest.raises(ValueError, match="threshold must have 1 or 8"):
        ck.sparse_in_gemv(x, wt, mx.zeros((3,)))
    with pytest.raises(ValueError, match="w must have shape"):
        ck.sparse_out_gate_gemv(x, wt, mx.ones((4,)), t)
    with pytest.raises(ValueError, match="gate must have 4"):
        ck.sparse_out_gate_gemv(x, wt.T, mx.ones((5,)), t)
    with pytest.raises(ValueError, match="threshold must have 1 or 4"):
        ck.sparse_out_gate_gemv(x, wt.T, mx.ones((4,)), mx.zeros((8,)))


def test_explicit_cpu_stream():
    x = mx.array([1.0, 2.0])
    wt = mx.array([[1.0, 0.0], [0.0, 1.0]])
    y = ck.sparse_in_gemv(x, wt, 1.5, stream=mx.cpu)
    np.testing.assert_array_equal(np.array(y), [0.0, 2.0])
    s = mx.new_stream(mx.cpu)
    y = ck.sparse_out_gate_gemv(x, wt, x, 1.5, stream=s)
    np.testing.assert_array_equal(np.array(y), [0.0, 4.0])


def test_version_mismatch_disables(monkeypatch):
    monkeypatch.setattr(mx, "__version__", "0.0.0-other")
    try:
        ck._load()
        assert not ck.available()
        reason = ck.unavailable_reason()
        assert "built against mlx" in reason and "0.0.0-other" in reason
        assert "\n" not in reason
        with pytest.raises(RuntimeError, match="unavailable"):
            ck.sparse_in_gemv(mx.ones((2,)), mx.ones((2, 2)), 0.0)
    finally:
        monkeypatch.undo()
        ck._load()
    assert ck.available()
