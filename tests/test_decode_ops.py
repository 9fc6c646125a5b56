"""The CPU extension's fused decode ops (RMS norm, RoPE, attention, SiLU)
equal MLX's own, alone and inside a patched model (chess_mlx.decode_ops)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_windows, tiny_llama
from mlx_lm.models import qwen3
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.models.rope_utils import Llama3RoPE

from chess_mlx import cpu_kernels as ck
from chess_mlx import decode_ops
from chess_mlx.calibrate import calibrate
from chess_mlx.sparsify import sparsify, unsparsify

if not ck.module_present():
    pytest.skip("compiled module chess_mlx._cpu_kernels not built", allow_module_level=True)

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]
# float32 differs from MLX only in summation order and libm's cos/sin/exp.
ATOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 2e-2}


def f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def rand(shape, dtype, seed=0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 1, 1), (3, 5, 77), (1, 1, 4, 64)])
def test_rms_norm(dtype, shape):
    x, w = rand(shape, dtype), rand(shape[-1:], dtype, seed=1)
    np.testing.assert_allclose(f32(ck.rms_norm(x, w, 1e-5)), f32(mx.fast.rms_norm(x, w, 1e-5)),
                               atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 8192), (1, 1, 1), (3, 77), (0,)])
def test_silu(dtype, shape):
    x = rand(shape, dtype) * 6  # well into both tails
    expected = f32(nn.silu(x))
    np.testing.assert_allclose(f32(ck.silu(x)), expected, atol=ATOL[dtype], rtol=ATOL[dtype])


def test_silu_extremes():
    x = mx.array([0.0, -0.0, 1e-30, -1e-30, 90.0, -90.0, 200.0, -200.0, np.inf, np.nan])
    y = np.array(ck.silu(x))
    x64 = np.array(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        exact = x64 / (1 + np.exp(-x64))
    np.testing.assert_allclose(y[:-2], exact[:-2], rtol=3e-7, atol=1e-35)
    assert y[-2] == np.inf and np.isnan(y[-1])


ROPES = {
    "default": nn.RoPE(64, base=10000.0),
    "traditional": nn.RoPE(64, traditional=True, base=500000.0),
    "partial-scaled": nn.RoPE(32, base=10000.0, scale=0.25),
    "llama3": Llama3RoPE(64, max_position_embeddings=2048, base=500000.0, scaling_config={
        "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("offset", [0, 1, 4099])
def test_rope_one(dtype, rope, offset):
    module = ROPES[rope]
    inv_freqs, scale, traditional = decode_ops.rope_inv_freqs(module)
    x = rand((1, 1, 5, 64), dtype)  # [B, L, heads, head_dim]
    reference = module(x.transpose(0, 2, 1, 3), offset=offset).transpose(0, 2, 1, 3)
    result = ck.rope_one(x, inv_freqs, offset, scale, traditional)
    # Angles near 4099 radians lose a few float32 bits in any cos/sin.
    np.testing.assert_allclose(f32(result), f32(reference), atol=max(ATOL[dtype], 1e-4))


def test_other_rope_variants_are_not_fused():
    class CustomRoPE(nn.Module):
        def __call__(self, x, offset=0):
            return x

    assert decode_ops.rope_inv_freqs(CustomRoPE()) is None


# 12 query heads on one KV head: more than the 8 done together, and (3000
# keys, over the thread pool) tasks that split the group
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,kv_heads,keys,dv", [(4, 4, 1, 64), (8, 2, 37, 64), (6, 3, 300, 48), (32, 8, 2000, 64),
                                                     (12, 1, 50, 16), (12, 1, 3000, 16)])
def test_attention_one(dtype, heads, kv_heads, keys, dv):
    q = rand((2, 1, heads, 64), dtype)
    # Keys and values as a KVCache holds them: views into longer buffers.
    k = rand((2, kv_heads, keys + 13, 64), dtype, seed=1)[:, :, :keys]
    v = rand((2, kv_heads, keys + 13, dv), dtype, seed=2)[:, :, :keys]
    reference = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k, v, scale=0.125)
    result = ck.attention_one(q, k, v, 0.125)
    assert result.shape == (2, 1, heads, dv) and result.dtype == dtype
    np.testing.assert_allclose(f32(result), f32(reference.transpose(0, 2, 1, 3)), atol=ATOL[dtype])


def test_attention_reads_transposed_views():
    q = rand((1, 1, 4, 16), mx.float32)
    k = rand((1, 16, 9, 2), mx.float32, seed=1).transpose(0, 3, 2, 1)  # [1, 2, 9, 16], last axis strided
    v = rand((1, 2, 9, 16), mx.float32, seed=2)
    reference = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k, v, scale=0.25)
    np.testing.assert_allclose(f32(ck.attention_one(q, k, v, 0.25)), f32(reference.transpose(0, 2, 1, 3)), atol=1e-6)


def test_errors():
    x = mx.zeros((1, 1, 8))
    with pytest.raises(ValueError, match=r"\[rms_norm\] w must have shape"):
        ck.rms_norm(x, mx.zeros((7,)), 1e-5)
    with pytest.raises(ValueError, match=r"\[rope_one\] inv_freqs must be float32"):
        ck.rope_one(x, mx.zeros((5,)), 0, 1.0, False)
    with pytest.raises(ValueError, match=r"\[silu\] x must be"):
        ck.silu(mx.zeros((4,), mx.int32))
    with pytest.raises(ValueError, match=r"\[attention_one\] .*multiple of Hkv"):
        ck.attention_one(mx.zeros((1, 1, 3, 8)), mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)), 1.0)
    with pytest.raises(ValueError, match=r"\[attention_one\] k and v must have the same dtype"):
        ck.attention_one(mx.zeros((1, 1, 2, 8)), mx.zeros((1, 2, 4, 8), mx.float16), mx.zeros((1, 2, 4, 8)), 1.0)


def tiny_qwen3() -> nn.Module:
    args = qwen3.ModelArgs(
        model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=101, max_position_embeddings=512,
        rope_theta=1e6, tie_word_embeddings=True,
    )
    return qwen3.Model(args)


def greedy_tokens(model, prompt, steps=6, cache=None):
    cache = cache or make_prompt_cache(model)
    y = mx.argmax(model(mx.array(prompt)[None], cache=cache)[:, -1], axis=-1)
    out = [y.item()]
    for _ in range(steps):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        out.append(y.item())
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_patched_decode_equals_reference(make):
    if not ck.available():
        pytest.fail(ck.unavailable_reason())
    mx.random.seed(3)
    model = make()
    mx.eval(model.parameters())
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    prompt = random_windows(1, 11, seed=5)[0]
    sparsify(model, thresholds, "chess+", 0.5, kernels=None)
    reference = greedy_tokens(model, prompt)
    sparsify(model, thresholds, "chess+", 0.5, kernels=ck)
    layer = model.layers[0]
    assert isinstance(layer.self_attn, decode_ops.KernelAttention)
    assert isinstance(layer.input_layernorm, decode_ops.KernelRMSNorm)
    assert isinstance(model.model.norm, decode_ops.KernelRMSNorm)
    assert layer.mlp._decode_activation is ck.silu
    assert greedy_tokens(model, prompt) == reference
    unsparsify(model)
    assert not isinstance(model.layers[0].self_attn, decode_ops.KernelAttention)
    assert type(model.layers[0].input_layernorm) is nn.RMSNorm and type(model.model.norm) is nn.RMSNorm


def test_other_caches_take_mlx_lm_attention():
    mx.random.seed(4)
    model = tiny_llama()
    mx.eval(model.parameters())
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    prompt = random_windows(1, 11, seed=6)[0]
    rotating = lambda: [RotatingKVCache(max_size=8) for _ in model.layers]  # noqa: E731
    sparsify(model, thresholds, "chess", 0.5, kernels=None)
    reference = greedy_tokens(model, prompt, cache=rotating())
    sparsify(model, thresholds, "chess", 0.5, kernels=ck)
    calls = []
    attention_one = ck.attention_one

    class Counting:
        def __getattr__(self, name):
            return getattr(ck, name)

        def attention_one(self, *args):
            calls.append(1)
            return attention_one(*args)

    for layer in model.layers:
        layer.self_attn._kernels = Counting()
    assert greedy_tokens(model, prompt, cache=rotating()) == reference
    assert not calls
    greedy_tokens(model, prompt, steps=2, cache=[KVCache() for _ in model.layers])
    assert len(calls) == 2 * len(model.layers)
    unsparsify(model)
