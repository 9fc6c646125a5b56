"""Sparse-GEMV Metal kernels (chess_mlx.kernels) against their pure-MLX references.

Without Metal (Linux CI) the exact sources MLX generates are compiled with g++
and run by the CPU emulator in tests/emulator (see its docstring for what it
cannot catch). On a Mac with Metal the same cases also run on the GPU.
"""

from __future__ import annotations

import shutil
import sys
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chess_mlx import kernels as K

try:
    import emulator as E
except ImportError:  # pragma: no cover - other pytest import modes
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import emulator as E

HAVE_CXX = shutil.which(E.CXX) is not None
needs_emulator = pytest.mark.skipif(not HAVE_CXX, reason="g++ not found")

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
DTYPE_IDS = ["f16", "bf16", "f32"]
SHAPES = [(576, 1536), (1536, 576), (100, 37), (1, 1)]  # (in, out)
CASES = ["none", "all", "single", 0.3, 0.5, 0.9]
KINDS = ["scalar", "vector"]

# Relative size of one rounding of the output dtype, smallest subnormal.
_ULP = {mx.float16: (2.0**-10, 2.0**-24), mx.bfloat16: (2.0**-7, 2.0**-133),
        mx.float32: (2.0**-23, 2.0**-149)}
# float32 accumulation in another order: bound relative to sum |terms|.
_ACC = 3e-5


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def _activations(rng, n, dtype, case):
    """Channel activations (x for spvmm, gate for vmmsp); for "single" one
    entry is made the unique largest in magnitude."""
    v = rng.standard_normal(n).astype(np.float32)
    if n > 1:
        v[rng.integers(0, n, size=max(1, n // 50))] = 0.0  # exact zeros
    if case == "single":
        j = int(rng.integers(0, n))
        v[j] = (np.abs(v).max() + 1.0) * (1 if rng.random() < 0.5 else -1) * 2
    return mx.array(v).astype(dtype)


def _threshold(rng, v: mx.array, case, kind, thr_dtype=mx.float32):
    """Threshold for `v` giving the case's sparsity (fraction dropped), with
    exact ties |v_i| == t_i (kept) wherever possible."""
    a = np.abs(_f32(v)).astype(np.float32)
    n = a.size
    if kind == "scalar":
        if case == "none":
            t = 0.0
        elif case == "all":
            t = float(a.max()) * 2.0 + 1.0
        elif case == "single":
            t = float(a.max())  # tie with the unique survivor
        else:
            t = float(np.sort(a)[min(n - 1, int(case * n))])
        return mx.array([t], dtype=mx.float32).astype(thr_dtype)
    if case == "none":
        t = a * rng.uniform(0, 1, n).astype(np.float32)
        ties = rng.random(n) < 0.3
        t[ties] = a[ties]
    elif case == "all":
        t = a * 2.0 + 1.0
    elif case == "single":
        t = a * 2.0 + 1.0
        j = int(np.argmax(a))
        t[j] = a[j]
    else:
        drop = rng.random(n) < case
        t = np.where(drop, a * 1.5 + 1e-3, a * rng.uniform(0, 1, n).astype(np.float32))
        ties = (~drop) & (rng.random(n) < 0.3)
        t[ties] = a[ties]
    return mx.array(t.astype(np.float32)).astype(thr_dtype)


def _keep(v: mx.array, t: mx.array) -> np.ndarray:
    a = np.abs(_f32(v))
    tt = _f32(t)
    return a >= (tt if tt.size > 1 else tt[0])


def _expected_kept(case, n):
    return {"none": n, "all": 0, "single": 1}.get(case)


def spvmm_data(rng, n_in, n_out, dtype, case, kind, thr_dtype=mx.float32):
    x = _activations(rng, n_in, dtype, case)
    wt = mx.array(rng.standard_normal((n_in, n_out)).astype(np.float32)).astype(dtype)
    t = _threshold(rng, x, case, kind, thr_dtype)
    want = _expected_kept(case, n_in)
    if want is not None:
        assert _keep(x, t).sum() == want
    return x, wt, t


def vmmsp_data(rng, n_in, n_out, dtype, case, kind, thr_dtype=mx.float32):
    x = mx.array(rng.standard_normal(n_in).astype(np.float32)).astype(dtype)
    w = mx.array(rng.standard_normal((n_out, n_in)).astype(np.float32)).astype(dtype)
    g = _activations(rng, n_out, dtype, case)
    t = _threshold(rng, g, case, kind, thr_dtype)
    want = _expected_kept(case, n_out)
    if want is not None:
        assert _keep(g, t).sum() == want
    return x, w, g, t


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------
def _assert_close(y: mx.array, ref: mx.array, abs_terms: np.ndarray, what=""):
    assert y.dtype == ref.dtype and y.shape == ref.shape, (y.dtype, ref.dtype, y.shape, ref.shape)
    rel, tiny = _ULP[ref.dtype]
    yv, rv = _f32(y).ravel(), _f32(ref).ravel()
    tol = _ACC * abs_terms.ravel() + rel * np.abs(rv) + tiny
    err = np.abs(yv - rv)
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        i = int(np.argmax(bad))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} outputs off, first at {i}: "
            f"got {yv[i]!r}, want {rv[i]!r}, tol {tol[i]:.3g}"
        )


def check_spvmm(y, x, wt, t, what="spvmm"):
    ref = K.sparse_in_gemv_reference(x, wt, t)
    xs = np.where(_keep(x, t), np.abs(_f32(x)), 0.0)
    _assert_close(y.reshape(ref.shape), ref, xs @ np.abs(_f32(wt)), what)


def check_vmmsp(y, x, w, g, t, what="vmmsp"):
    ref = K.sparse_out_gate_gemv_reference(x, w, g, t)
    gs = np.where(_keep(g, t), np.abs(_f32(g)), 0.0)
    _assert_close(y.reshape(ref.shape), ref, gs * (np.abs(_f32(w)) @ np.abs(_f32(x))), what)


def emu_spvmm(x, wt, t, tiles=None, source=None, **kw):
    spec = K.sparse_in_gemv_launch(x, wt, t, tiles)
    return E.emulate_spec(spec, source=source, **kw)[0]


def emu_vmmsp(x, w, g, t, tiles=None, source=None, **kw):
    spec = K.sparse_out_gate_gemv_launch(x, w, g, t, tiles)
    return E.emulate_spec(spec, source=source, **kw)[0]


# ---------------------------------------------------------------------------
# Build every source the module needs once, two g++ at a time.
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _prebuild():
    if not HAVE_CXX:
        return
    specs = []
    for dtype in DTYPES:
        for n, thresholds in ((8, (1, 8)), (1, (1,))):  # device / constant variants
            for t in (mx.zeros((k,)) for k in thresholds):
                x = mx.zeros((n,), dtype)
                specs.append(K.sparse_in_gemv_launch(x, mx.zeros((n, n), dtype), t))
                specs.append(K.sparse_out_gate_gemv_launch(x, mx.zeros((n, n), dtype),
                                                           mx.zeros((n,), dtype), t))
    E.build_many(sorted({K.generated_metal_source(s) for s in specs}))


# ---------------------------------------------------------------------------
# Emulated kernels: the main matrix
# ---------------------------------------------------------------------------
@needs_emulator
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}x{o}" for i, o in SHAPES])
def test_sparse_in_gemv_emulated(shape, dtype, kind):
    rng = np.random.default_rng(zlib.crc32(f"spvmm{shape}{dtype}{kind}".encode()))
    for case in CASES:
        x, wt, t = spvmm_data(rng, *shape, dtype, case, kind)
        y = emu_spvmm(x, wt, t)
        check_spvmm(y, x, wt, t, f"spvmm {shape} {dtype} {kind} {case}")
        if case == "all":
            assert not np.any(_f32(y))


@needs_emulator
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}x{o}" for i, o in SHAPES])
def test_sparse_out_gate_gemv_emulated(shape, dtype, kind):
    rng = np.random.default_rng(zlib.crc32(f"vmmsp{shape}{dtype}{kind}".encode()))
    for case in CASES:
        x, w, g, t = vmmsp_data(rng, *shape, dtype, case, kind)
        y = emu_vmmsp(x, w, g, t)
        check_vmmsp(y, x, w, g, t, f"vmmsp {shape} {dtype} {kind} {case}")
        if case == "all":
            assert not np.any(_f32(y))


@needs_emulator
def test_large_2048x8192_emulated():
    """Wide output: spvmm's SN=16 tile; vmmsp with many threadgroups."""
    rng = np.random.default_rng(7)
    x, wt, t = spvmm_data(rng, 2048, 8192, mx.float16, 0.5, "vector")
    assert K.sparse_in_gemv_launch(x, wt, t).template[4] == ("SN", 16)
    check_spvmm(emu_spvmm(x, wt, t), x, wt, t)
    x, w, g, t = vmmsp_data(rng, 2048, 8192, mx.bfloat16, 0.5, "scalar")
    check_vmmsp(emu_vmmsp(x, w, g, t), x, w, g, t)


@needs_emulator
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_threshold_in_input_dtype(dtype, kind):
    rng = np.random.default_rng(3)
    x, wt, t = spvmm_data(rng, 300, 70, dtype, 0.5, kind, thr_dtype=dtype)
    spec = K.sparse_in_gemv_launch(x, wt, t)
    assert dict(spec.template[:2])["TT"] == dtype
    check_spvmm(emu_spvmm(x, wt, t), x, wt, t)
    x, w, g, t = vmmsp_data(rng, 70, 300, dtype, 0.5, kind, thr_dtype=dtype)
    check_vmmsp(emu_vmmsp(x, w, g, t), x, w, g, t)


@needs_emulator
@pytest.mark.parametrize("order,align", [("reverse", "start"), ("random", "end")])
def test_other_tiles_and_schedules(order, align):
    """Non-default tiles (E=1 chunking, TM=3, odd TILE_O) under other fiber
    orders and with buffers starting at a guard page."""
    rng = np.random.default_rng(11)
    sp_tiles = K.SpvmmTiles(TN=2, SN=4, NSG=2, CHUNK=64)
    vm_tiles = K.VmmspTiles(TN=1, TM=3, NSG=2, TILE_O=50)
    for shape in [(100, 37), (257, 130)]:
        for case in ["single", 0.5]:
            x, wt, t = spvmm_data(rng, *shape, mx.float32, case, "vector")
            check_spvmm(emu_spvmm(x, wt, t, sp_tiles, order=order, align=align), x, wt, t)
            check_spvmm(emu_spvmm(x, wt, t, order=order, align=align), x, wt, t)
            x, w, g, t = vmmsp_data(rng, *shape, mx.float16, case, "scalar")
            check_vmmsp(emu_vmmsp(x, w, g, t, vm_tiles, order=order, align=align), x, w, g, t)
            check_vmmsp(emu_vmmsp(x, w, g, t, order=order, align=align), x, w, g, t)


@needs_emulator
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n_in=st.integers(1, 300),
    n_out=st.integers(1, 300),
    sparsity=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31),
)
def test_property_random_shapes(n_in, n_out, sparsity, dtype, kind, seed):
    rng = np.random.default_rng(seed)
    x, wt, t = spvmm_data(rng, n_in, n_out, dtype, sparsity, kind)
    check_spvmm(emu_spvmm(x, wt, t), x, wt, t)
    x, w, g, t = vmmsp_data(rng, n_in, n_out, dtype, sparsity, kind)
    check_vmmsp(emu_vmmsp(x, w, g, t), x, w, g, t)


# ---------------------------------------------------------------------------
# The tests catch broken kernels (mutants of the generated source)
# ---------------------------------------------------------------------------
SPVMM_MUTANTS = {
    "strict >": ("if (metal::abs(v) >= t) {", "if (metal::abs(v) > t) {"),
    "no barrier before use": (
        "      off++;\n    }\n  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);",
        "      off++;\n    }\n  }\n"),
    "skip rows": ("k += RL)", "k += RL + 1)"),
    "bad shuffle": ("ushort(SN * sm)", "ushort(sm)"),
    "x read past end": ("if (i < in_size) {", "if (i <= in_size) {"),
    "drop last chunk": ("c0 < in_size;", "c0 + CHUNK <= in_size;"),
}
VMMSP_MUTANTS = {
    "strict >": ("if (metal::abs(g) >= t) {", "if (metal::abs(g) > t) {"),
    "no zero write": ("    y[o] = static_cast<T>(0.0f);\n", ""),
    "no barrier before use": ("  row_gate[off] = g;\n}\nthreadgroup_barrier(mem_flags::mem_threadgroup);",
                              "  row_gate[off] = g;\n}\n"),
    "skip slices": ("kk += SLICE)", "kk += SLICE + TN)"),
    "list overrun": ("valid[r] = k0 + r < n_active;", "valid[r] = k0 + r <= n_active;"),
}


def _mutate(src, old, new):
    assert src.count(old) == 1, f"mutation site not found: {old!r}"
    return src.replace(old, new)


@needs_emulator
def test_mutants_are_caught():
    rng = np.random.default_rng(5)
    sp = [spvmm_data(rng, 1100, 45, mx.float32, c, "scalar") for c in ("single", 0.5)]
    vm = [vmmsp_data(rng, 150, 70, mx.float32, c, "scalar") for c in ("single", 0.5)]
    sp_src = K.generated_metal_source(K.sparse_in_gemv_launch(*sp[0]))
    vm_src = K.generated_metal_source(K.sparse_out_gate_gemv_launch(*vm[0]))
    sp_mut = {k: _mutate(sp_src, *m) for k, m in SPVMM_MUTANTS.items()}
    vm_mut = {k: _mutate(vm_src, *m) for k, m in VMMSP_MUTANTS.items()}
    E.build_many(list(sp_mut.values()) + list(vm_mut.values()))

    def caught(run, check):
        try:
            check(run())
        except (AssertionError, E.EmulatorError):
            return True
        return False

    survivors = []
    for name, src in sp_mut.items():
        if not any(caught(lambda: emu_spvmm(*d, source=src), lambda y: check_spvmm(y, *d))
                   for d in sp):
            survivors.append("spvmm: " + name)
    for name, src in vm_mut.items():
        if not any(caught(lambda: emu_vmmsp(*d, source=src), lambda y: check_vmmsp(y, *d))
                   for d in vm):
            survivors.append("vmmsp: " + name)
    assert not survivors, f"broken kernels passed the checks: {survivors}"
    # ... and the unmutated sources pass on the same data.
    for d in sp:
        check_spvmm(emu_spvmm(*d, source=sp_src), *d)
    for d in vm:
        check_vmmsp(emu_vmmsp(*d, source=vm_src), *d)


# ---------------------------------------------------------------------------
# The emulator itself
# ---------------------------------------------------------------------------
def _toy(source, inputs, names, out_shape, out_dtype=mx.float32, grid=(64, 1, 1),
         tg=(32, 1, 1), template=(), **kw):
    kern = mx.fast.metal_kernel(name=f"toy_{zlib.crc32(source.encode())}",
                                input_names=names, output_names=["out"], source=source)
    outs, _ = E.emulate_kernel(kern, names, inputs, ["out"], [out_shape], [out_dtype], grid, tg,
                               template=template, **kw)
    return np.array(outs[0])


@needs_emulator
def test_emulator_partial_threadgroups_and_attributes():
    src = """
    uint i = thread_position_in_grid.x;
    if (i < uint(inp_shape[0])) {
      out[i] = threads_per_threadgroup.x * 10000 + simdgroup_index_in_threadgroup * 100
             + thread_index_in_simdgroup + 0 * inp[0] + threadgroup_position_in_grid.x * 1000000;
    }
    """
    y = _toy(src, [mx.zeros((70,), mx.uint32)], ["inp"], (70,), mx.uint32, grid=(70, 1, 1),
             tg=(64, 1, 1))
    i = np.arange(70)
    tgs = np.where(i < 64, 64, 6)
    want = tgs * 10000 + ((i % 64) // 32) * 100 + (i % 64) % 32 + (i // 64) * 1000000
    np.testing.assert_array_equal(y, want)


@needs_emulator
def test_emulator_simd_collectives():
    src = """
    uint l = thread_index_in_simdgroup;
    float v = inp[thread_position_in_grid.x];
    float s = simd_sum(v);
    uint p = simd_prefix_exclusive_sum(uint(v > 0.5f));
    float d = simd_shuffle_down(v, ushort(3));
    uint b = uint(static_cast<ulong>(simd_ballot(v > 0.5f)) & 0xffffffffu);
    out[thread_position_in_grid.x * 4 + 0] = s;
    out[thread_position_in_grid.x * 4 + 1] = float(p);
    out[thread_position_in_grid.x * 4 + 2] = d;
    out[thread_position_in_grid.x * 4 + 3] = l == 0 ? float(metal::popcount(b)) : 0.0f;
    """
    v = np.random.default_rng(0).random(64).astype(np.float32)
    y = _toy(src, [mx.array(v)], ["inp"], (256,)).reshape(64, 4)
    for s in range(2):
        vs = v[s * 32:(s + 1) * 32]
        ys = y[s * 32:(s + 1) * 32]
        np.testing.assert_allclose(ys[:, 0], vs.sum(), rtol=1e-6)
        np.testing.assert_array_equal(ys[:, 1], np.concatenate([[0], np.cumsum(vs > 0.5)[:-1]]))
        np.testing.assert_array_equal(ys[:, 2], np.concatenate([vs[3:], vs[29:]]))
        assert ys[0, 3] == (vs > 0.5).sum()


@needs_emulator
def test_emulator_detects_missing_barrier_and_errors():
    racy = """
    threadgroup float buf[32];
    uint l = thread_position_in_threadgroup.x;
    buf[l] = inp[thread_position_in_grid.x];
    BARRIER
    out[thread_position_in_grid.x] = buf[31 - l];
    """
    v = np.arange(64, dtype=np.float32)
    want = np.concatenate([v[31::-1], v[:31:-1]])
    good = racy.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    for order in ("forward", "reverse", "random"):
        np.testing.assert_array_equal(_toy(good, [mx.array(v)], ["inp"], (64,), order=order), want)
    bad = racy.replace("BARRIER", "")
    results = [_toy(bad, [mx.array(v)], ["inp"], (64,), order=o) for o in ("forward", "reverse")]
    assert any(not np.array_equal(r, want) for r in results)

    oob = "out[thread_position_in_grid.x] = inp[thread_position_in_grid.x + 1];"
    with pytest.raises(E.EmulatorError, match="invalid memory access"):
        _toy(oob, [mx.array(v)], ["inp"], (64,))
    divergent = """
    if (thread_position_in_grid.x % 2 == 0) { threadgroup_barrier(mem_flags::mem_threadgroup); }
    out[thread_position_in_grid.x] = inp[thread_position_in_grid.x];
    """
    with pytest.raises(E.EmulatorError, match="barrier"):
        _toy(divergent, [mx.array(v)], ["inp"], (64,))


# ---------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------
def test_generated_signature_and_cache():
    x = mx.zeros((16,), mx.float16)
    spec = K.sparse_in_gemv_launch(x, mx.zeros((16, 40), mx.float16), 0.1)
    src = K.generated_metal_source(spec)
    pk = E.ParsedKernel(src)
    assert [p.name for p in pk.buffers] == ["x", "wt", "wt_shape", "thr", "y"]
    assert "const constant float* thr" in src and "const device float16_t* wt" in src
    spec = K.sparse_out_gate_gemv_launch(x, mx.zeros((40, 16), mx.float16),
                                         mx.zeros((40,), mx.float16), mx.zeros((40,)))
    pk = E.ParsedKernel(K.generated_metal_source(spec))
    assert [p.name for p in pk.buffers] == ["x", "w", "w_shape", "gate", "thr", "y"]
    assert K._kernel("sparse_in_gemv") is K._kernel("sparse_in_gemv")
    assert spec.grid == (2 * 128, 1, 1) and spec.threadgroup == (128, 1, 1)
    assert isinstance(K.metal_available(), bool)
    src, spec = K.metal_source_for("sparse_out_gate_gemv", 16, 40, mx.float16, per_channel=True)
    assert src == K.generated_metal_source(spec) and "const device float* thr" in src


def test_public_api_shapes_and_errors():
    rng = np.random.default_rng(0)
    x, wt, t = spvmm_data(rng, 24, 10, mx.float32, 0.5, "vector")
    y = K.sparse_in_gemv(x.reshape(1, 1, 24), wt, t)
    assert y.shape == (1, 1, 10) and y.dtype == mx.float32
    check_spvmm(y.reshape(10), x, wt, t)
    assert K.sparse_in_gemv(x, wt, 0.0).shape == (10,)
    x, w, g, t = vmmsp_data(rng, 24, 10, mx.bfloat16, 0.5, "scalar")
    y = K.sparse_out_gate_gemv(x.reshape(1, 24), w, g.reshape(1, 10), float(_f32(t)[0]))
    assert y.shape == (1, 10) and y.dtype == mx.bfloat16
    check_vmmsp(y, x, w, g, t)
    with pytest.raises(ValueError):
        K.sparse_in_gemv(mx.zeros((2, 24)), wt, 0.1)  # two rows
    with pytest.raises(ValueError):
        K.sparse_in_gemv(x.astype(mx.float32), wt, mx.zeros((5,)))
    with pytest.raises(TypeError):
        K.sparse_in_gemv(x, wt, 0.1)  # bf16 x, f32 weight
    with pytest.raises(TypeError):
        K.sparse_in_gemv(mx.zeros((24,), mx.int32), mx.zeros((24, 3), mx.int32), 0.1)
    with pytest.raises(ValueError):
        K.sparse_in_gemv(mx.zeros((24,)), mx.zeros((24, 3)), 0.1,
                         tiles=K.SpvmmTiles(CHUNK=100))


# ---------------------------------------------------------------------------
# Real Metal (only on a Mac)
# ---------------------------------------------------------------------------
@pytest.mark.skipif(not K.metal_available(), reason="needs a Metal back-end")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_metal_kernels(dtype, kind):
    rng = np.random.default_rng(1)
    for shape in SHAPES + [(2048, 8192)]:
        for case in CASES:
            x, wt, t = spvmm_data(rng, *shape, dtype, case, kind)
            check_spvmm(K.sparse_in_gemv(x, wt, t, stream=mx.gpu), x, wt, t)
            x, w, g, t = vmmsp_data(rng, *shape, dtype, case, kind)
            check_vmmsp(K.sparse_out_gate_gemv(x, w, g, t, stream=mx.gpu), x, w, g, t)
