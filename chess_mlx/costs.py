"""Bytes a decode step streams, and the ideal speed-up sparsity can buy.

Decoding one token at batch 1 reads every weight once, so its time is about
weight bytes / memory bandwidth. Skipping a fraction s_p of projection p's
bytes gives at best 1 / (1 - sum_p s_p * bytes_p / all bytes).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import mlx.nn as nn

    from .thresholds import Thresholds

# Which projections' weight bytes each method skips (the dropped fraction of
# the gate channels applies to both up_proj rows and down_proj columns).
SKIPPED = {
    "dense": (),
    "cats": ("up_proj", "down_proj"),
    "chess": ("up_proj", "down_proj"),
    "chess+": ("up_proj", "down_proj", "q_proj", "o_proj"),
    "teal": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
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


def projection_params(layer: "nn.Module") -> Dict[str, int]:
    """Weights of each projection of one layer."""
    from .thresholds import linear_dims

    attn, mlp = layer.self_attn, layer.mlp
    modules = {p: getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    modules.update({p: getattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")})
    return {p: int(np.prod(linear_dims(m))) for p, m in modules.items()}


def model_params(model: "nn.Module") -> Tuple[List[Dict[str, int]], int]:
    """Per-layer projection weights and the LM head's (read at every step)."""
    from .sparsify import lm_head, model_layers
    from .thresholds import linear_dims

    layers = model_layers(model)
    vocab, hidden = lm_head(model).weight.shape[0], linear_dims(layers[0].mlp.gate_proj)[0]
    return [projection_params(layer) for layer in layers], vocab * hidden


def projection_sparsity(levels: Dict[str, float]) -> Dict[str, float]:
    """The fraction of each projection's weights a layer's allocation skips.

    up_proj is served by the sparser of the gate mask (its rows) and the MLP
    input threshold (its columns); down_proj's input is zero wherever the
    gate mask dropped a channel, so it skips at least that fraction.
    """
    gate, mlp_in = levels.get("gate", 0.0), levels.get("mlp_in", 0.0)
    attn = levels.get("attn_in", 0.0)
    return {
        "q_proj": attn, "k_proj": attn, "v_proj": attn, "o_proj": levels.get("o_in", 0.0),
        "gate_proj": mlp_in, "up_proj": max(gate, mlp_in), "down_proj": max(gate, levels.get("down_in", 0.0)),
    }


def skipped_params(params: Dict[str, int], levels: Dict[str, float]) -> float:
    sparsity = projection_sparsity(levels)
    return sum(params[p] * s for p, s in sparsity.items())


def speedup_for(skipped: float, total: float) -> float:
    return float(total / (total - skipped))


def allocation_speedup(allocation: np.ndarray, layer_params: Sequence[Dict[str, int]], head: int,
                       head_sparsity: float = 0.0) -> float:
    """The ideal speed-up of an allocation ``[L, len(ALLOCATED)]`` (and of
    ``head_sparsity`` of the LM head's input)."""
    from .thresholds import ALLOCATED

    levels = [projection_sparsity(dict(zip(ALLOCATED, row))) for row in allocation]
    return layers_speedup(layer_params, head, levels, head_sparsity)


def layers_speedup(layer_params: Sequence[Dict[str, int]], head: int, sparsity: Sequence[Dict[str, float]],
                   head_sparsity: float = 0.0) -> float:
    """The ideal speed-up when layer i skips ``sparsity[i][p]`` of projection p
    and the LM head ``head_sparsity`` of its weights."""
    total = sum(sum(p.values()) for p in layer_params) + head
    skipped = sum(params[p] * float(s.get(p, 0.0)) for params, s in zip(layer_params, sparsity) for p in params)
    return speedup_for(skipped + head * head_sparsity, total)


def planned_sparsity(thresholds: "Thresholds", method: str, setting: float, num_layers: int) -> List[Dict[str, float]]:
    """The fraction of each projection's weights ``method`` targets to skip, per layer."""
    if method == "alloc":
        from .thresholds import ALLOCATED

        return [projection_sparsity(dict(zip(ALLOCATED, row))) for row in thresholds.allocation(setting)]
    return [method_sparsity(method, setting) for _ in range(num_layers)]


def planned_head_sparsity(thresholds: "Thresholds", method: str, setting: float) -> float:
    """The fraction of the LM head's weights ``method`` targets to skip (only
    searched allocations threshold its input)."""
    return thresholds.head_sparsity(method, setting) if method == "alloc" else 0.0


def realized_head_sparsity(dropped: Dict[str, float]) -> float:
    """The LM head input's dropped fraction from a tracker's fractions."""
    return dropped.get("lm_head", 0.0)


def realized_sparsity(dropped: Dict[str, float], num_layers: int) -> List[Dict[str, float]]:
    """Per-layer projection sparsity from a tracker's 'layers.N.kind' fractions."""
    result = []
    for i in range(num_layers):
        levels = {kind: dropped.get(f"layers.{i}.{proj}", 0.0) for kind, proj in REALIZED.items()}
        sparsity = projection_sparsity(levels)
        # chess+ thresholds q alone: each attention projection counts its own input.
        sparsity.update({p: dropped.get(f"layers.{i}.{p}", 0.0) for p in ("q_proj", "k_proj", "v_proj")})
        result.append(sparsity)
    return result


# The tracker's names for ALLOCATED components.
REALIZED = {"o_in": "o_proj", "mlp_in": "mlp_in", "gate": "gate", "down_in": "down_in"}
