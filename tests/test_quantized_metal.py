"""Quantized sparse-GEMV Metal kernels (chess_mlx.kernels) in the CPU emulator.

Each kernel's exact generated Metal source runs in tests/emulator against a
numpy reference built from ``mx.dequantize`` of an ``nn.QuantizedLinear`` and
against the kernels' own float32 references; plus a quantized decode step
through the emulated kernels, and broken variants of the sources that the
checks must catch.
"""

from __future__ import annotations

import shutil
import zlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import random_windows, tiny_llama
from emulator import CXX, EmulatorError, build_many, emulate_spec
from test_decode_kernels import EmulatedKernels, decode_logits

from chess_mlx import kernels as K
from chess_mlx.calibrate import calibrate
from chess_mlx.quantized import QuantizedInputMajorLinear
from chess_mlx.sparsify import sparsify, unsparsify

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason="g++ not found")

# Each dtype with both widths, each width with every group size (one generated
# source per combination and threshold kind: each costs a g++ run).
QUANTIZATIONS = [(4, 32, mx.float32), (4, 64, mx.float16), (4, 128, mx.bfloat16),
                 (8, 32, mx.float16), (8, 64, mx.bfloat16), (8, 128, mx.float32)]
QUANT_IDS = [f"{b}bit-g{g}-{str(d).split('.')[-1]}" for b, g, d in QUANTIZATIONS]
SHAPES = [(384, 24), (256, 200), (1152, 40)]  # (in, out): several tiles, several chunks
CASES = ["empty", "full", 0.5]
KINDS = ["scalar", "vector"]
# Against the dequantized weights in the layer's dtype: bound relative to
# sum_i |x_i w_io| (the weights' and the output's rounding).
TOL = {mx.float32: 2e-6, mx.float16: 1.5e-3, mx.bfloat16: 1e-2}
# Against the float32 references: accumulation order, one output rounding.
ACC = 3e-5
ULP = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}


# ---------------------------------------------------------------------------
# Data and checks
# ---------------------------------------------------------------------------
def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def quantized_linear(n_in, n_out, bits, group_size, dtype, seed=0) -> nn.QuantizedLinear:
    mx.random.seed(seed)
    q = nn.QuantizedLinear.from_linear(nn.Linear(n_in, n_out, bias=False), group_size, bits)
    q.set_dtype(dtype)
    mx.eval(q.parameters())
    return q


def dequantized(q: nn.QuantizedLinear) -> np.ndarray:
    """``[out, in]`` in float64, from MLX's own dequantization in the layer's dtype."""
    return _f32(mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits))


def channels(rng, n, dtype, case, kind):
    """Activations and a threshold dropping none ("full"), all ("empty") or
    about half of them, with exact ties |v_i| == t_i (kept) where possible."""
    v = rng.standard_normal(n).astype(np.float32)
    v[rng.integers(0, n, size=max(1, n // 50))] = 0.0
    v = mx.array(v).astype(dtype)
    a = np.abs(_f32(v)).astype(np.float32)
    if kind == "scalar":
        t = {"empty": np.inf, "full": 0.0}.get(case)
        return v, float(np.sort(a)[n // 2]) if t is None else t
    if case == "empty":
        t = a * 2.0 + 1.0
    elif case == "full":
        t = np.where(rng.random(n) < 0.3, a, a * rng.uniform(0, 1, n).astype(np.float32))
    else:
        drop = rng.random(n) < 0.5
        t = np.where(drop, a * 1.5 + 1e-3, np.where(rng.random(n) < 0.3, a, 0.5 * a))
    return v, mx.array(t.astype(np.float32))


def kept(v: mx.array, threshold) -> np.ndarray:
    t = _f32(threshold) if isinstance(threshold, mx.array) else threshold
    return np.abs(_f32(v)) >= t


def assert_close(y, want, bound, what):
    err = np.abs(_f32(y).ravel() - want.ravel())
    bad = ~(err <= bound.ravel())  # NaN counts as bad
    if bad.any():
        i = int(np.argmax(bad))
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.size} outputs off, first at {i}: "
                             f"got {_f32(y).ravel()[i]!r}, want {want.ravel()[i]!r}")


def check_in(y, q, relaid, x, threshold, what="sparse_in_qgemv"):
    dtype = x.dtype
    assert y.shape == (relaid.scales.shape[1],) and y.dtype == dtype, (y.shape, y.dtype)
    w = dequantized(q)
    xm = np.where(kept(x, threshold), _f32(x), 0.0)
    terms = np.abs(xm) @ np.abs(w).T
    assert_close(y, xm @ w.T, TOL[dtype] * terms + 1e-6, what)
    ref = _f32(K.sparse_in_qgemv_reference(x, relaid.wq, relaid.scales, relaid.biases, threshold,
                                           q.group_size, q.bits))
    assert_close(y, ref, ACC * terms + ULP[dtype] * np.abs(ref) + 1e-30, what + " (f32 reference)")


def check_out(y, q, x, gate, threshold, what="sparse_out_gate_qgemv"):
    dtype = x.dtype
    assert y.shape == gate.shape and y.dtype == dtype, (y.shape, y.dtype)
    w, xf = dequantized(q), _f32(x)
    gm = np.where(kept(gate, threshold), _f32(gate), 0.0)
    terms = np.abs(gm) * (np.abs(w) @ np.abs(xf))
    assert_close(y, gm * (w @ xf), TOL[dtype] * terms + 1e-6, what)
    ref = _f32(K.sparse_out_gate_qgemv_reference(x, q.weight, q.scales, q.biases, gate, threshold,
                                                 q.group_size, q.bits))
    assert_close(y, ref, ACC * terms + ULP[dtype] * np.abs(ref) + 1e-30, what + " (f32 reference)")


def in_spec(q, relaid, x, threshold, tiles=None):
    return K.sparse_in_qgemv_launch(x, relaid.wq, relaid.scales, relaid.biases, threshold,
                                    q.group_size, q.bits, tiles)


def out_spec(q, x, gate, threshold, tiles=None):
    return K.sparse_out_gate_qgemv_launch(x, q.weight, q.scales, q.biases, gate, threshold,
                                          q.group_size, q.bits, tiles)


@pytest.fixture(scope="module", autouse=True)
def _prebuild():
    """Compile every source the module needs up front, two g++ at a time."""
    specs = []
    for bits, gs, dtype in QUANTIZATIONS:
        q = quantized_linear(128, 16, bits, gs, dtype)
        x, gate = mx.zeros((128,), dtype), mx.zeros((16,), dtype)
        for n_in, n_out in ((1, 1), (128, 16)):  # scalar ([1], constant) and vector thresholds
            specs.append(in_spec(q, QuantizedInputMajorLinear(q), x, mx.zeros((n_in,))))
            specs.append(out_spec(q, x, gate, mx.zeros((n_out,))))
    build_many(sorted({K.generated_metal_source(s) for s in specs}))


# ---------------------------------------------------------------------------
# The matrix: quantizations x dtypes x shapes x masks x threshold kinds
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits, group_size, dtype", QUANTIZATIONS, ids=QUANT_IDS)
def test_sparse_in_qgemv_emulated(bits, group_size, dtype, kind):
    rng = np.random.default_rng(zlib.crc32(f"in{bits}{group_size}{dtype}{kind}".encode()))
    for n_in, n_out in SHAPES:
        q = quantized_linear(n_in, n_out, bits, group_size, dtype, seed=n_in)
        relaid = QuantizedInputMajorLinear(q)
        for case in CASES:
            x, t = channels(rng, n_in, dtype, case, kind)
            y = emulate_spec(in_spec(q, relaid, x, t))[0]
            check_in(y, q, relaid, x, t, f"in {n_in}x{n_out} {case}")
            if case == "empty":
                assert not np.any(_f32(y))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits, group_size, dtype", QUANTIZATIONS, ids=QUANT_IDS)
def test_sparse_out_gate_qgemv_emulated(bits, group_size, dtype, kind):
    rng = np.random.default_rng(zlib.crc32(f"out{bits}{group_size}{dtype}{kind}".encode()))
    for n_in, n_out in SHAPES:
        q = quantized_linear(n_in, n_out, bits, group_size, dtype, seed=n_out)
        x = mx.array(rng.standard_normal(n_in).astype(np.float32)).astype(dtype)
        for case in CASES:
            gate, t = channels(rng, n_out, dtype, case, kind)
            y = emulate_spec(out_spec(q, x, gate, t))[0]
            check_out(y, q, x, gate, t, f"out {n_in}x{n_out} {case}")
            if case == "empty":
                assert not np.any(_f32(y))


def test_llama_1b_shapes_emulated():
    """The 1B MLP shapes: down (8192 -> 2048) input-sparse, up (2048 -> 8192) gated."""
    rng = np.random.default_rng(9)
    bits, group_size, dtype = 4, 64, mx.float16
    q = quantized_linear(8192, 2048, bits, group_size, dtype)
    relaid = QuantizedInputMajorLinear(q)
    x, t = channels(rng, 8192, dtype, 0.5, "vector")
    check_in(emulate_spec(in_spec(q, relaid, x, t))[0], q, relaid, x, t)
    q = quantized_linear(2048, 8192, bits, group_size, dtype)
    x = mx.array(rng.standard_normal(2048).astype(np.float32)).astype(dtype)
    gate, t = channels(rng, 8192, dtype, 0.5, "scalar")
    check_out(emulate_spec(out_spec(q, x, gate, t))[0], q, x, gate, t)


def test_other_tiles_and_schedules():
    """Non-default tiles (one word per lane, E=1 chunks, odd TILE_O) under
    other fiber orders and with buffers starting at a guard page."""
    rng = np.random.default_rng(13)
    q = quantized_linear(384, 200, 8, 32, mx.float32)
    relaid = QuantizedInputMajorLinear(q)
    in_tiles = K.QSpvmmTiles(WN=1, SN=8, NSG=2, CHUNK=64)
    out_tiles = K.QVmmspTiles(WPT=1, TM=3, NSG=2, TILE_O=50)
    for order, align in [("reverse", "start"), ("random", "end")]:
        x, t = channels(rng, 384, mx.float32, 0.5, "vector")
        spec = in_spec(q, relaid, x, t, in_tiles)
        check_in(emulate_spec(spec, order=order, align=align)[0], q, relaid, x, t)
        gate, t = channels(rng, 200, mx.float32, 0.5, "vector")
        spec = out_spec(q, x, gate, t, out_tiles)
        check_out(emulate_spec(spec, order=order, align=align)[0], q, x, gate, t)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    quantization=st.sampled_from(QUANTIZATIONS),
    groups=st.integers(1, 12),
    out_packs=st.integers(1, 40),
    case=st.sampled_from(CASES),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31),
)
def test_property_random_shapes(quantization, groups, out_packs, case, kind, seed):
    """Random shapes the layouts allow: in a multiple of the group size, out of 8."""
    bits, group_size, dtype = quantization
    n_in, n_out = groups * group_size, out_packs * 8
    rng = np.random.default_rng(seed)
    q = quantized_linear(n_in, n_out, bits, group_size, dtype, seed=seed % 1000)
    relaid = QuantizedInputMajorLinear(q)
    x, t = channels(rng, n_in, dtype, case, kind)
    check_in(emulate_spec(in_spec(q, relaid, x, t))[0], q, relaid, x, t)
    gate, t = channels(rng, n_out, dtype, case, kind)
    check_out(emulate_spec(out_spec(q, x, gate, t))[0], q, x, gate, t)


# ---------------------------------------------------------------------------
# Decode through the emulated kernels
# ---------------------------------------------------------------------------
class EmulatedQuantizedKernels(EmulatedKernels):
    def __init__(self):
        super().__init__()
        self.quantized_calls = 0

    def sparse_in_qgemv(self, x, wq, scales, biases, threshold, group_size, bits):
        self.calls += 1
        self.quantized_calls += 1
        spec = K.sparse_in_qgemv_launch(x, wq, scales, biases, threshold, group_size, bits)
        return emulate_spec(spec)[0]

    def sparse_out_gate_qgemv(self, x, wq, scales, biases, gate, threshold, group_size, bits):
        self.calls += 1
        self.quantized_calls += 1
        spec = K.sparse_out_gate_qgemv_launch(x, wq, scales, biases, gate, threshold, group_size, bits)
        return emulate_spec(spec)[0]


@pytest.mark.parametrize("method", ["cats", "chess+"])
def test_quantized_decode_step_matches_reference(method):
    mx.random.seed(5)
    model = tiny_llama(quantized=True)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    prompt, token = random_windows(1, 9, seed=7)[0], 5
    sparsify(model, thresholds, method, 0.5, kernels=None)
    reference = decode_logits(model, prompt, token)
    emulated = EmulatedQuantizedKernels()
    sparsify(model, thresholds, method, 0.5, kernels=emulated)
    assert isinstance(model.layers[0].mlp.dense.down_proj, QuantizedInputMajorLinear)
    result = decode_logits(model, prompt, token)
    # gate, up, down, q, k, v, o per layer and the tied LM head, all quantized
    assert emulated.calls == emulated.quantized_calls == 7 * len(model.layers) + 1
    unsparsify(model)
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# The checks catch broken kernels (mutants of the generated sources)
# ---------------------------------------------------------------------------
IN_MUTANTS = {
    "strict >": ("if (metal::abs(v) >= t) {", "if (metal::abs(v) > t) {"),
    "no barrier before use": ("      off++;\n    }\n  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);",
                              "      off++;\n    }\n  }\n"),
    "one scale for all groups": ("if (i / GS != group) {", "if (group < 0) {"),
    "xsum not reset": ("        xsum = 0.0f;\n      }\n", "      }\n"),
    "x read past end": ("if (i < in_size) {", "if (i <= in_size) {"),
    "drop last chunk": ("c0 < in_size;", "c0 + CHUNK <= in_size;"),
}
OUT_MUTANTS = {
    "strict >": ("if (metal::abs(g) >= t) {", "if (metal::abs(g) > t) {"),
    "no zero write": ("    y[o] = static_cast<T>(0.0f);\n", ""),
    "first group's scale": ("const int grp = kk / GS;", "const int grp = 0;"),
    "no bias term": (" + static_cast<float>(biases[sb]) * xsum;", ";"),
    "skip slices": ("kk += SLICE)", "kk += SLICE + VPT)"),
    "list overrun": ("valid[r] = k0 + r < n_active;", "valid[r] = k0 + r <= n_active;"),
}


def _mutate(src, old, new):
    assert src.count(old) == 1, f"mutation site not found: {old!r}"
    return src.replace(old, new)


def _caught(run, check) -> bool:
    try:
        check(run())
    except (AssertionError, EmulatorError):
        return True
    return False


def test_mutants_are_caught():
    rng = np.random.default_rng(21)
    q = quantized_linear(1152, 72, 4, 64, mx.float32)
    relaid = QuantizedInputMajorLinear(q)
    x = mx.array(rng.standard_normal(1152).astype(np.float32))
    in_data = [channels(rng, 1152, mx.float32, 0.5, "vector") for _ in range(2)]
    out_data = [channels(rng, 72, mx.float32, 0.5, "vector") for _ in range(2)]
    in_src = K.generated_metal_source(in_spec(q, relaid, *in_data[0]))
    out_src = K.generated_metal_source(out_spec(q, x, *out_data[0]))
    in_mut = {k: _mutate(in_src, *m) for k, m in IN_MUTANTS.items()}
    out_mut = {k: _mutate(out_src, *m) for k, m in OUT_MUTANTS.items()}
    build_many(list(in_mut.values()) + list(out_mut.values()))

    survivors = []
    for name, src in in_mut.items():
        if not any(_caught(lambda: emulate_spec(in_spec(q, relaid, *d), source=src)[0],
                           lambda y: check_in(y, q, relaid, *d)) for d in in_data):
            survivors.append("in: " + name)
    for name, src in out_mut.items():
        if not any(_caught(lambda: emulate_spec(out_spec(q, x, *d), source=src)[0],
                           lambda y: check_out(y, q, x, *d)) for d in out_data):
            survivors.append("out: " + name)
    assert not survivors, f"broken kernels passed the checks: {survivors}"
    for d in in_data:  # ... and the unmutated sources pass on the same data
        check_in(emulate_spec(in_spec(q, relaid, *d), source=in_src)[0], q, relaid, *d)
    for d in out_data:
        check_out(emulate_spec(out_spec(q, x, *d), source=out_src)[0], q, x, *d)


# ---------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------
def test_generated_signature_and_templates():
    src, spec = K.metal_source_for("sparse_in_qgemv", 128, 64, mx.bfloat16, per_channel=True,
                                   group_size=32, bits=8)
    assert "const device uint32_t* wq" in src and "const device bfloat16_t* scales" in src
    assert dict(spec.template)["BITS"] == 8 and dict(spec.template)["GS"] == 32
    assert spec.grid == (2 * 128, 1, 1)  # 64 outputs, 32 per threadgroup
    src, spec = K.metal_source_for("sparse_out_gate_qgemv", 128, 100, mx.float16, group_size=64)
    assert "const constant float* thr" in src and "const device float16_t* gate" in src
    assert spec.grid == (2 * 128, 1, 1)  # 100 outputs, 64 per threadgroup
    assert dict(spec.template)["WPT"] == 2


def test_public_api_falls_back_and_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    q = quantized_linear(128, 24, 4, 32, mx.float32)
    relaid = QuantizedInputMajorLinear(q)
    x, t = channels(rng, 128, mx.float32, 0.5, "vector")
    y = K.sparse_in_qgemv(x.reshape(1, 128), relaid.wq, relaid.scales, relaid.biases, t, 32, 4)
    assert y.shape == (1, 24)
    check_in(y.reshape(24), q, relaid, x, t)
    gate, t = channels(rng, 24, mx.float32, 0.5, "scalar")
    y = K.sparse_out_gate_qgemv(x, q.weight, q.scales, q.biases, gate.reshape(1, 24), t, 32, 4)
    assert y.shape == (1, 24)
    check_out(y.reshape(24), q, x, gate, t)

    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        K.sparse_in_qgemv(x, relaid.wq, relaid.scales, relaid.biases, 0.5, 32, 3)
    with pytest.raises(ValueError, match="group_size"):
        K.sparse_out_gate_qgemv(x, q.weight, q.scales, q.biases, gate, 0.5, 0, 4)
    with pytest.raises(ValueError, match="scales and biases must have shape"):
        K.sparse_in_qgemv(x, relaid.wq, q.scales, q.biases, 0.5, 32, 4)  # stock layout
    with pytest.raises(ValueError, match="gate"):
        K.sparse_out_gate_qgemv(x, q.weight, q.scales, q.biases, x, 0.5, 32, 4)
    with pytest.raises(ValueError, match="threshold"):
        K.sparse_in_qgemv(x, relaid.wq, relaid.scales, relaid.biases, mx.zeros((5,)), 32, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        K.sparse_out_gate_qgemv(mx.zeros((2, 128)), q.weight, q.scales, q.biases, gate, 0.5, 32, 4)
    with pytest.raises(TypeError, match="uint32"):
        K.sparse_in_qgemv(x, relaid.wq.astype(mx.int32), relaid.scales, relaid.biases, 0.5, 32, 4)
    with pytest.raises(TypeError, match="one dtype"):
        K.sparse_out_gate_qgemv(x.astype(mx.float16), q.weight, q.scales, q.biases,
                                gate.astype(mx.float16), 0.5, 32, 4)
    with pytest.raises(ValueError, match="WPT"):
        K.sparse_out_gate_qgemv(x, q.weight, q.scales, q.biases, gate, 0.5, 32, 4,
                                tiles=K.QVmmspTiles(WPT=8))


def test_check_command_runs_quantized_on_cpu_fallback(capsys):
    """On Linux the kernels fall back to the reference: this exercises only
    the check's own code for the quantized kernels."""
    from chess_mlx.check import check_quantized_shape

    assert check_quantized_shape(256, 64, mx.float32, [0, 0.5, 1], iters=2, bits=4, group_size=64)
    out = capsys.readouterr().out
    assert out.count("PASS") == 6 and "FAIL" not in out


# ---------------------------------------------------------------------------
# Real Metal (only on a Mac)
# ---------------------------------------------------------------------------
@pytest.mark.skipif(not K.metal_available(), reason="needs a Metal back-end")
@pytest.mark.parametrize("bits, group_size, dtype", QUANTIZATIONS, ids=QUANT_IDS)
def test_metal_quantized_kernels(bits, group_size, dtype):
    rng = np.random.default_rng(1)
    for n_in, n_out in SHAPES + [(2048, 8192), (8192, 2048)]:
        q = quantized_linear(n_in, n_out, bits, group_size, dtype)
        relaid = QuantizedInputMajorLinear(q)
        x_dense = mx.array(rng.standard_normal(n_in).astype(np.float32)).astype(dtype)
        for case in CASES:
            for kind in KINDS:
                x, t = channels(rng, n_in, dtype, case, kind)
                y = K.sparse_in_qgemv(x, relaid.wq, relaid.scales, relaid.biases, t, group_size, bits,
                                      stream=mx.gpu)
                check_in(y, q, relaid, x, t)
                gate, t = channels(rng, n_out, dtype, case, kind)
                y = K.sparse_out_gate_qgemv(x_dense, q.weight, q.scales, q.biases, gate, t,
                                            group_size, bits, stream=mx.gpu)
                check_out(y, q, x_dense, gate, t)
