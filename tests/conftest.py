"""Tiny random models built from ModelArgs, so most tests need no download."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import gemma3_text, llama

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext-2-valid.txt"


def tiny_llama(quantized: bool = False, tied: bool = True) -> nn.Module:
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101,
        tie_word_embeddings=tied,
    )
    model = llama.Model(args)
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    return model


def tiny_gemma() -> nn.Module:
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=64, intermediate_size=80,
        num_attention_heads=2, head_dim=32, num_key_value_heads=1, vocab_size=101, num_hidden_layers=3,
        query_pre_attn_scalar=32, sliding_window=16, sliding_window_pattern=2,
    )
    return gemma3_text.Model(args)


MODELS = {"llama": tiny_llama, "llama-4bit": lambda: tiny_llama(True), "gemma3_text": tiny_gemma}


@pytest.fixture(params=list(MODELS))
def tiny_model(request):
    mx.random.seed(0)
    model = MODELS[request.param]()
    # Random norm weights make the fingerprint and the activations less uniform.
    for layer in model.layers:
        norm = layer.input_layernorm
        norm.weight = norm.weight + 0.1 * mx.random.normal(norm.weight.shape)
    mx.eval(model.parameters())
    return model


class ByteTokenizer:
    """Token ids are bytes modulo a small vocabulary: enough for windows."""

    def __init__(self, vocab_size: int = 101):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list:
        return [b % self.vocab_size for b in text.encode("utf-8")]


def random_windows(count=4, length=40, vocab=101, seed=0):
    mx.random.seed(seed)
    return [mx.random.randint(0, vocab, (length,)).tolist() for _ in range(count)]


def pytest_configure(config):
    # The real-model tests run float32 prefill; with OpenBLAS preloaded that
    # is ~30x faster than MLX's bundled BLAS (see chess_mlx/blas.py).
    from chess_mlx.blas import reexec_with_openblas

    reexec_with_openblas()
