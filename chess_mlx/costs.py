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


def decode_bytes(shapes: Shapes, bytes_per_weight: float, sparsity: Dict[str, float] = None) -> Dict[str, float]:
    """Weight bytes read per decode token, by projection kind (all layers) and
    for the LM head, with ``sparsity[p]`` of projection p's bytes skipped."""
    sparsity = sparsity or {}
    read = {
        p: shapes.layers * n * bytes_per_weight * (1 - sparsity.get(p, 0.0))
        for p, n in shapes.projection_params().items()
    }
    read["lm_head"] = shapes.vocab * shapes.hidden * bytes_per_weight
    return read


def method_sparsity(method: str, sparsity: float) -> Dict[str, float]:
    return {p: sparsity for p in SKIPPED[method]}


def ideal_speedup(shapes: Shapes, method: str, sparsity: float) -> float:
    """1 / (1 - skipped bytes / all bytes); the weight dtype cancels out."""
    dense = sum(decode_bytes(shapes, 1.0).values())
    sparse = sum(decode_bytes(shapes, 1.0, method_sparsity(method, sparsity)).values())
    return dense / sparse
