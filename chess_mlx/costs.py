"""Bytes a decode step streams, and the ideal speed-up sparsity can buy.

Decoding one token at batch 1 reads every weight once, so its time is about
weight bytes / memory bandwidth. Skipping a fraction s_p of projection p's
bytes gives at best 1 / (1 - sum_p s_p * bytes_p / all bytes).
"""

from dataclasses import dataclass
from typing import Dict

# Which projections' weight bytes each method skips (the dropped fraction of
# the gate channels applies to both up_proj rows and down_proj columns).
SKIPPED = {
    "dense": (),
    "cats": ("up_proj", "down_proj"),
    "chess": ("up_proj", "down_proj"),
    "chess+": ("up_proj", "down_proj", "q_proj", "o_proj"),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def projection_params(self) -> Dict[str, int]:
        attn, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, f = self.hidden, self.intermediate
        return {
            "q_proj": h * attn, "k_proj": h * kv, "v_proj": h * kv, "o_proj": attn * h,
            "gate_proj": h * f, "up_proj": h * f, "down_proj": f * h,
        }


SMOLLM2_135M = Shapes(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152)
LLAMA_32_1B = Shapes(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=128256)
LLAMA_3_8B = Shapes(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256)


def decode_bytes(
    shapes: Shapes, bytes_per_weight: float, sparsity: Dict[str, float] = None, head_bytes_per_weight: float = None
) -> Dict[str, float]:
    """Weight bytes read per decode token, by projection kind (all layers) and
    for the LM head, with ``sparsity[p]`` of projection p's bytes skipped.
    Quantized models count scales and biases in their bytes per weight, and
    may store the LM head at another width (``head_bytes_per_weight``)."""
    sparsity = sparsity or {}
    read = {
        p: shapes.layers * n * bytes_per_weight * (1 - sparsity.get(p, 0.0))
        for p, n in shapes.projection_params().items()
    }
    head = bytes_per_weight if head_bytes_per_weight is None else head_bytes_per_weight
    read["lm_head"] = shapes.vocab * shapes.hidden * head
    return read


def method_sparsity(method: str, sparsity: float) -> Dict[str, float]:
    return {p: sparsity for p in SKIPPED[method]}


def ideal_speedup(shapes: Shapes, method: str, sparsity: float, head_ratio: float = 1.0) -> float:
    """1 / (1 - skipped bytes / all bytes); the weight width cancels out
    unless the LM head's differs (``head_ratio``: its bytes per weight over
    the layers')."""
    return skipped_speedup(shapes, method_sparsity(method, sparsity), head_ratio)


def skipped_speedup(shapes: Shapes, sparsity: Dict[str, float], head_ratio: float = 1.0) -> float:
    """The ideal speed-up for ``sparsity[p]`` of each projection p's bytes skipped."""
    dense = sum(decode_bytes(shapes, 1.0, None, head_ratio).values())
    return dense / sum(decode_bytes(shapes, 1.0, sparsity, head_ratio).values())
