"""Quantized (affine 4/8-bit) decode: the exact input-major re-layout, the
CPU extension's quantized kernels against the reference path, and decoding."""

import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_windows, tiny_llama
from mlx_lm.models.cache import make_prompt_cache

from chess_mlx import cpu_kernels as ck
from chess_mlx.calibrate import calibrate
from chess_mlx.quantized import (
    Float32LookupEmbedding,
    QuantizedInputMajorLinear,
    half_scales,
    relayout_ready,
    unpack_codes,
)
from chess_mlx.sparsify import (
    KernelHeadEmbedding, KernelLinear, SparseMLP, decode_dense, dense_input_major, sparsify, unsparsify,
)

if not ck.module_present():
    pytest.skip("compiled module chess_mlx._cpu_kernels not built", allow_module_level=True)

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# Bound relative to sum_i |x_i w_io| (float32 accumulation, output rounding).
TOL = {mx.float32: 2e-6, mx.float16: 1.5e-3, mx.bfloat16: 1e-2}
QUANTIZATIONS = [(bits, gs) for bits in (4, 8) for gs in (32, 64, 128)]
# (x, scales and biases): one dtype, or float32 activations with the half
# scales of a half-precision checkpoint.
DTYPE_PAIRS = [(d, d) for d in DTYPES] + [(mx.float32, mx.float16), (mx.float32, mx.bfloat16)]
# (in, out): in a multiple of 128, out of 8. Outputs no multiple of 16 take
# the plain 4-bit input-sparse loop, 1040 the 16-output even/odd one and 96
# the 32-output one (AVX-512 copy); the big shape runs on two threads.
SHAPES = [(384, 24), (256, 200), (384, 96), (512, 1040)]


def quantized_linear(n_in, n_out, bits, group_size, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    linear = nn.Linear(n_in, n_out, bias=False)
    q = nn.QuantizedLinear.from_linear(linear, group_size=group_size, bits=bits)
    q.set_dtype(dtype)
    mx.eval(q.parameters())
    return q


def dequantized(q) -> np.ndarray:
    """Float32 weights (exact: mx.dequantize computes in the scales' dtype)."""
    scales, biases = q.scales.astype(mx.float32), q.biases.astype(mx.float32)
    return np.array(mx.dequantize(q.weight, scales, biases, q.group_size, q.bits))


@pytest.mark.parametrize("bits, group_size", QUANTIZATIONS)
def test_relayout_moves_codes_scales_and_biases_exactly(bits, group_size):
    q = quantized_linear(256, 200, bits, group_size)
    relaid = QuantizedInputMajorLinear(q)
    codes = np.array(unpack_codes(q.weight, bits))
    assert np.array_equal(np.array(unpack_codes(relaid.wq, bits)), codes.T)
    assert np.array_equal(np.array(relaid.scales), np.array(q.scales).T)
    assert np.array_equal(np.array(relaid.biases), np.array(q.biases).T)
    assert relaid.nbytes == sum(a.nbytes for a in (q.weight, q.scales, q.biases))
    restored = relaid.to_linear()
    for name in ("weight", "scales", "biases"):
        assert mx.array_equal(getattr(restored, name), getattr(q, name)), name
    # Dequantized values are bit-identical, and so is a prompt's output.
    assert np.array_equal(dequantized(restored), dequantized(q))
    x = mx.random.normal((3, 256))
    assert mx.array_equal(relaid(x), q(x))


def test_relayout_applies_to_supported_layers_only():
    assert relayout_ready(quantized_linear(64, 32, 4, 32))
    assert not relayout_ready(quantized_linear(64, 32, 2, 32))  # 2-bit: no kernels
    assert not relayout_ready(quantized_linear(64, 36, 4, 32))  # 36 outputs do not pack in 8s
    assert not relayout_ready(nn.Linear(64, 32))


def kept_input(rng, n, mask, dtype):
    """An input and its threshold: 'empty' drops all, 'full' keeps all,
    'scalar' / 'vector' drop about half."""
    x = rng.standard_normal(n).astype(np.float32)
    thresholds = {"empty": math.inf, "full": 0.0, "scalar": 0.7,
                  "vector": mx.array(np.abs(rng.standard_normal(n)).astype(np.float32))}
    return mx.array(x).astype(dtype), thresholds[mask]


def masked(v: mx.array, threshold) -> np.ndarray:
    v = np.array(v.astype(mx.float32))
    t = np.array(threshold) if isinstance(threshold, mx.array) else threshold
    return np.where(np.abs(v) >= t, v, 0.0)


def dtype_pair_id(pair) -> str:
    x, scales = (str(d).split(".")[-1] for d in pair)
    return x if x == scales else f"{x}-{scales}-scales"


@pytest.mark.parametrize("mask", ["empty", "full", "scalar", "vector"])
@pytest.mark.parametrize("dtype, scales_dtype", DTYPE_PAIRS, ids=map(dtype_pair_id, DTYPE_PAIRS))
@pytest.mark.parametrize("bits, group_size", QUANTIZATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_input_sparse_qgemv_matches_reference(shape, bits, group_size, dtype, scales_dtype, mask):
    n_in, n_out = shape
    rng = np.random.default_rng(n_in + bits + group_size)
    q = quantized_linear(n_in, n_out, bits, group_size, scales_dtype)
    relaid = QuantizedInputMajorLinear(q)
    x, threshold = kept_input(rng, n_in, mask, dtype)
    y = ck.sparse_in_qgemv(x, relaid.wq, relaid.scales, relaid.biases, threshold, group_size, bits)
    assert y.shape == (n_out,) and y.dtype == dtype
    w = dequantized(q)
    xm = masked(x, threshold)
    reference = xm @ w.T
    bound = TOL[dtype] * (np.abs(xm) @ np.abs(w).T) + 1e-6
    assert np.all(np.abs(np.array(y.astype(mx.float32)) - reference) <= bound)
    if mask == "empty":
        assert not np.any(np.array(y.astype(mx.float32)))


@pytest.mark.parametrize("mask", ["empty", "full", "scalar", "vector"])
@pytest.mark.parametrize("dtype, scales_dtype", DTYPE_PAIRS, ids=map(dtype_pair_id, DTYPE_PAIRS))
@pytest.mark.parametrize("bits, group_size", QUANTIZATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_output_sparse_qgemv_matches_reference(shape, bits, group_size, dtype, scales_dtype, mask):
    n_in, n_out = shape
    rng = np.random.default_rng(n_out + bits + group_size)
    q = quantized_linear(n_in, n_out, bits, group_size, scales_dtype)
    x = mx.array(rng.standard_normal(n_in).astype(np.float32)).astype(dtype)
    gate, threshold = kept_input(rng, n_out, mask, dtype)
    y = ck.sparse_out_gate_qgemv(x, q.weight, q.scales, q.biases, gate, threshold, group_size, bits)
    assert y.shape == (n_out,) and y.dtype == dtype
    w, xf = dequantized(q), np.array(x.astype(mx.float32))
    gm = masked(gate, threshold)
    reference = gm * (w @ xf)
    bound = TOL[dtype] * np.abs(gm) * (np.abs(w) @ np.abs(xf)) + 1e-6
    assert np.all(np.abs(np.array(y.astype(mx.float32)) - reference) <= bound)


@pytest.mark.parametrize("call, message", [
    (lambda x, q: ck.sparse_in_qgemv(x, q.weight, q.scales, q.biases, 0.5, 32, 3), "bits must be 4 or 8"),
    (lambda x, q: ck.sparse_in_qgemv(x, q.weight, q.scales, q.biases, 0.5, 32, 4), "scales and biases must have shape"),
    (lambda x, q: ck.sparse_out_gate_qgemv(x, q.weight, q.scales, q.biases, x, 0.5, 32, 4), "gate must have 32"),
    (lambda x, q: ck.sparse_out_gate_qgemv(x, q.weight, q.scales, q.biases.astype(mx.bfloat16), x[:32], 0.5, 32, 4),
     "scales and biases must have the same dtype"),
    (lambda x, q: ck.sparse_out_gate_qgemv(x.astype(mx.float16), q.weight, q.scales, q.biases, x[:32], 0.5, 32, 4),
     "scales must have the dtype of x, or float16/bfloat16 with float32 x"),
])
def test_quantized_kernels_reject_bad_arguments(call, message):
    q = quantized_linear(64, 32, 4, 32)
    with pytest.raises(ValueError, match=message):
        call(mx.ones((64,)), q)


def greedy_tokens(model, prompt, steps):
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)
    tokens = []
    for _ in range(steps):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[:, None], cache=cache)
    return tokens, logits[0, -1]


@pytest.fixture(scope="module")
def quantized_llama():
    mx.random.seed(3)
    model = tiny_llama(quantized=True)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    return model, thresholds


@pytest.mark.parametrize("method", ["cats", "chess", "chess+", "teal"])
def test_quantized_decode_with_kernels_equals_reference(quantized_llama, method):
    model, thresholds = quantized_llama
    prompt = random_windows(1, 9, seed=5)[0]
    sparsify(model, thresholds, method, 0.5, kernels=None)
    reference_tokens, reference = greedy_tokens(model, prompt, 6)
    sparsify(model, thresholds, method, 0.5, kernels=ck)
    layer = model.layers[0]
    assert isinstance(layer.mlp.dense.down_proj, QuantizedInputMajorLinear)
    # gate_proj is re-laid only where its input is thresholded (teal)
    gate_type = QuantizedInputMajorLinear if method == "teal" else KernelLinear
    assert isinstance(layer.mlp.dense.gate_proj, gate_type)
    assert isinstance(layer.self_attn.k_proj, KernelLinear) == (method != "teal")
    assert isinstance(model.model.embed_tokens, KernelHeadEmbedding)
    tokens, result = greedy_tokens(model, prompt, 6)
    unsparsify(model)
    assert type(layer.mlp.down_proj) is nn.QuantizedLinear
    assert tokens == reference_tokens
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)


def test_half_scales_are_exact_and_kept_only_where_exact():
    mx.random.seed(3)
    model = tiny_llama(quantized=True)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    # a bfloat16 checkpoint's MLP scales run in float32 (as loading on the CPU
    # gives), float16 ones on q_proj
    for layer in model.layers:
        for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            linear.scales, linear.biases = (a.astype(mx.bfloat16).astype(mx.float32) for a in (linear.scales, linear.biases))
        q_proj = layer.self_attn.q_proj
        q_proj.scales, q_proj.biases = (a.astype(mx.float16).astype(mx.float32) for a in (q_proj.scales, q_proj.biases))
    embed = model.model.embed_tokens  # tied: also the LM head
    embed.scales, embed.biases = (a.astype(mx.bfloat16).astype(mx.float32) for a in (embed.scales, embed.biases))
    gate, q_proj = model.layers[0].mlp.gate_proj, model.layers[0].self_attn.q_proj
    stock_gate = (gate.weight, gate.scales, gate.biases)
    ids = mx.array([[0, 7, 5, 7]])
    stock_rows = embed(ids)
    prompt = random_windows(1, 9, seed=5)[0]
    sparsify(model, thresholds, "chess+", 0.5, kernels=ck)
    reference_tokens, reference = greedy_tokens(model, prompt, 6)
    unsparsify(model)
    gate = model.layers[0].mlp.gate_proj  # a re-laid layer comes back as a new one
    embed_bytes = (embed.scales.nbytes + embed.biases.nbytes) // 2
    assert half_scales(model) == sum(a.nbytes for a in stock_gate[1:]) // 2 * 3 * len(model.layers) + embed_bytes
    assert gate.scales.dtype == gate.biases.dtype == mx.bfloat16
    assert q_proj.scales.dtype == mx.float32  # not exact in bfloat16: unchanged
    assert type(embed) is Float32LookupEmbedding and embed.scales.dtype == embed.biases.dtype == mx.bfloat16
    rows = embed(ids)
    assert rows.dtype == mx.float32 and mx.array_equal(rows, stock_rows)
    x = mx.random.normal((3, gate.weight.shape[1] * 32 // gate.bits))
    assert mx.array_equal(gate(x), mx.quantized_matmul(x, *stock_gate, True, gate.group_size, gate.bits))
    sparsify(model, thresholds, "chess+", 0.5, kernels=ck)
    tokens, result = greedy_tokens(model, prompt, 6)
    unsparsify(model)
    assert tokens == reference_tokens
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["stock", "input-major"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_unsparsified_quantized_projections_decode_and_restore_exactly(group_size, layout, monkeypatch):
    """Unsparsified projections decode on their stock layout (the output
    GEMV) or, with rows as short as the tiny model's, re-laid input-major;
    either way, for every group size, they give the reference path's tokens
    and restore bit for bit."""
    if layout == "stock":
        monkeypatch.setattr(ck, "DENSE_INPUT_MAJOR_MAX_IN", 0)
    mx.random.seed(3)
    model = tiny_llama()
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    # Layers whose inputs the groups do not divide (down_proj's 96) stay float.
    nn.quantize(model, group_size=group_size, bits=4,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0)
    stock = model.layers[0].mlp.gate_proj
    prompt = random_windows(1, 9, seed=5)[0]
    sparsify(model, thresholds, "chess+", 0.5, kernels=None)
    reference_tokens, reference = greedy_tokens(model, prompt, 6)
    sparsify(model, thresholds, "chess+", 0.5, kernels=ck)
    gate = model.layers[0].mlp.dense.gate_proj
    assert isinstance(gate, KernelLinear)
    assert type(gate.dense) is (nn.QuantizedLinear if layout == "stock" else QuantizedInputMajorLinear)
    tokens, result = greedy_tokens(model, prompt, 6)
    unsparsify(model)
    restored = model.layers[0].mlp.gate_proj
    assert type(restored) is nn.QuantizedLinear
    assert all(mx.array_equal(getattr(restored, k), getattr(stock, k)) for k in ("weight", "scales", "biases"))
    assert tokens == reference_tokens
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)


def test_unsupported_quantization_keeps_the_reference_path():
    mx.random.seed(3)
    model = tiny_llama()
    nn.quantize(model, group_size=32, bits=2)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    sparsify(model, thresholds, "chess+", 0.5, kernels=ck)
    assert type(model.layers[0].mlp.dense.down_proj) is nn.QuantizedLinear
    assert model.layers[0].mlp._kernels is None
    tokens, _ = greedy_tokens(model, random_windows(1, 9, seed=5)[0], 3)
    assert len(tokens) == 3


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_each_kernel_copy_matches_reference(isa):
    """The suite runs the best kernel copy for this CPU (AVX-512 where it has
    it); the quantized kernel tests run again, in a subprocess, under each
    lower copy that CHESS_MLX_ISA selects."""
    env = {**os.environ, "CHESS_MLX_ISA": isa}
    probe = "from chess_mlx import cpu_kernels; print(cpu_kernels.kernel_isa())"
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    if got.stdout.strip() != isa:
        pytest.skip(f"this CPU has no {isa} kernel copy (got {got.stdout.strip()})")
    tests = Path(__file__).parent
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_quantized.py"),
         "-k", "qgemv_matches_reference"],
        env=env, capture_output=True, text=True, cwd=tests.parent,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_dense_input_major_only_for_short_quantized_rows(monkeypatch):
    linear = nn.Linear(64, 32)
    quantized = nn.QuantizedLinear(64, 32, group_size=32, bits=4)
    monkeypatch.setattr(ck, "DENSE_INPUT_MAJOR_MAX_IN", 64)
    assert dense_input_major(quantized, ck) and not dense_input_major(linear, ck)
    monkeypatch.setattr(ck, "DENSE_INPUT_MAJOR_MAX_IN", 63)
    assert not dense_input_major(quantized, ck)
    assert not dense_input_major(quantized, object())  # kernels without the bound: never


def test_decode_dense_runs_the_kernels_and_keeps_every_token(quantized_llama):
    """--method dense decodes through the kernels with nothing dropped: the
    reference path's tokens, no thresholds needed, and unsparsify restores."""
    model, _ = quantized_llama
    unsparsify(model)
    prompt = random_windows(1, 9, seed=5)[0]
    reference_tokens, reference = greedy_tokens(model, prompt, 6)
    decode_dense(model, kernels=ck)
    assert isinstance(model.layers[0].mlp.dense.down_proj, QuantizedInputMajorLinear)
    assert isinstance(model.layers[0].self_attn.k_proj, KernelLinear)
    tokens, result = greedy_tokens(model, prompt, 6)
    unsparsify(model)
    assert type(model.layers[0].mlp.down_proj) is nn.QuantizedLinear
    assert tokens == reference_tokens
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)
    assert decode_dense(model, kernels=None) is model and type(model.layers[0].mlp) is not SparseMLP


def test_decode_dense_leaves_an_unsupported_architecture_as_loaded(quantized_llama):
    model, _ = quantized_llama
    unsparsify(model)
    model.model_type = "not-a-model"
    try:
        assert decode_dense(model, kernels=ck) is model
        assert type(model.layers[0].mlp) is not SparseMLP
    finally:
        model.model_type = "llama"
