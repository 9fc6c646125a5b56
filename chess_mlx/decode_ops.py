"""The rest of a CPU decode step as single ops: RMS norm, RoPE, attention, SiLU.

On MLX's CPU backend ``mx.fast.rms_norm``, ``mx.fast.rope`` and
``mx.fast.scaled_dot_product_attention`` run as graphs of small ops (their
fallbacks); at decode, dispatching those costs more than their arithmetic.
The CPU extension computes each as one op, with the same arithmetic
(``csrc/decode_ops.cpp``). :func:`patch` gives a model's attention blocks
and RMS norms subclasses of their own classes, in place (as
``torch.nn.utils.parametrize`` does), so that one-token calls on a plain
``KVCache`` take those ops; prompts, other caches and other RoPE variants
keep mlx-lm's own code, and every attribute, weight and path stays put.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import Llama3RoPE

# Attention blocks whose decode step is: q/k/v projections, optional per-head
# q/k RMS norms, RoPE at the cache offset, KV-cache update, attention over the
# cache, o_proj (mlx-lm's llama, qwen2 and qwen3 attention).
ATTENTION_TYPES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def is_decode(x: mx.array) -> bool:
    """One token: every axis but the last has size 1."""
    return x.size == x.shape[-1]


def ready(kernels) -> bool:
    return all(hasattr(kernels, op) for op in ("rms_norm", "rope_one", "attention_one"))


def rope_inv_freqs(rope: nn.Module) -> Optional[Tuple[mx.array, float, bool]]:
    """(inverse frequencies, position scale, traditional) of an ``nn.RoPE`` or
    mlx-lm ``Llama3RoPE``, computed as ``mx.fast.rope``'s fallback does; None
    for other RoPE variants."""
    if type(rope) is nn.RoPE:
        half = rope.dims // 2
        step = np.float32(np.log(np.float32(rope.base))) / np.float32(half)
        inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(step))
        scale, traditional = float(rope.scale), bool(rope.traditional)
    elif type(rope) is Llama3RoPE:
        inv, scale, traditional = mx.reciprocal(rope._freqs.astype(mx.float32)), 1.0, bool(rope.traditional)
    else:
        return None
    mx.eval(inv)
    return inv, scale, traditional


class KernelRMSNorm(nn.RMSNorm):
    """An ``nn.RMSNorm`` whose one-token calls run as one CPU op. :func:`patch`
    gives a norm this class in place (its weights and path stay as they
    are); :func:`unpatch` gives it back ``nn.RMSNorm``."""

    def __call__(self, x: mx.array) -> mx.array:
        if is_decode(x):
            return self._kernels.rms_norm(x, self.weight, self.eps)
        return super().__call__(x)


class KernelAttention:
    """Mixed into a llama-style attention block's own class by :func:`patch`
    (the block keeps its projections, sparse or not, its weights and its
    path): one-token calls on a ``KVCache`` run RoPE and the attention over
    the cache as single CPU ops; everything else takes mlx-lm's code."""

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache=None) -> mx.array:
        if type(cache) is not KVCache or mask is not None or not is_decode(x):
            return super().__call__(x, mask=mask, cache=cache)
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            queries, keys = self._head_norm(self.q_norm, queries), self._head_norm(self.k_norm, keys)
        queries = self._rope_one(queries, cache.offset)
        keys = self._rope_one(keys, cache.offset)
        keys, values = cache.update_and_fetch(keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3))
        output = self._kernels.attention_one(queries, keys, values, self.scale)
        return self.o_proj(output.reshape(B, L, -1))

    def _rope_one(self, x: mx.array, offset: int) -> mx.array:
        inv_freqs, scale, traditional = self._rope_args
        return self._kernels.rope_one(x, inv_freqs, offset, scale, traditional)

    def _head_norm(self, norm: nn.Module, x: mx.array) -> mx.array:
        return self._kernels.rms_norm(x, norm.weight, norm.eps) if type(norm) is nn.RMSNorm else norm(x)


# stock attention class -> the class that mixes KernelAttention into it
_KERNEL_CLASSES: Dict[type, type] = {}


def kernel_class(cls: type) -> type:
    if cls not in _KERNEL_CLASSES:
        _KERNEL_CLASSES[cls] = type(cls.__name__, (KernelAttention, cls), {"_stock_class": cls})
    return _KERNEL_CLASSES[cls]


def patch_attention(attn: nn.Module, kernels):
    """Give ``attn`` the :class:`KernelAttention` behaviour where its forward
    is the llama one and its RoPE a plain or Llama-3 one."""
    cls = type(attn)
    if cls.__module__ not in ATTENTION_TYPES or cls.__name__ != "Attention":
        return
    rope = rope_inv_freqs(getattr(attn, "rope", None))
    if rope is not None:
        attn.__class__ = kernel_class(cls)
        attn._kernels, attn._rope_args = kernels, rope


def patch_norm(norm: nn.Module, kernels):
    if type(norm) is nn.RMSNorm:
        norm.__class__ = KernelRMSNorm
        norm._kernels = kernels


def patch(model: nn.Module, layers, kernels):
    """Route ``model``'s one-token attention and RMS norms through ``kernels``."""
    for layer in layers:
        patch_attention(layer.self_attn, kernels)
        for name in LAYER_NORMS:
            if name in layer:
                patch_norm(layer[name], kernels)
    body = getattr(model, "model", None)
    if body is not None and "norm" in body:
        patch_norm(body.norm, kernels)


def unpatch(model: nn.Module):
    """Undo :func:`patch`."""
    for _, module in model.named_modules():
        if isinstance(module, KernelAttention):
            module.__class__ = module._stock_class
            del module._kernels, module._rope_args
        elif type(module) is KernelRMSNorm:
            module.__class__ = nn.RMSNorm
            del module._kernels
