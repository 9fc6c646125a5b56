"""Search per-layer, per-projection sparsities for a target ideal speed-up.

Every layer has five thresholded inputs (ALLOCATED): the attention input
(q/k/v), the o_proj input, the MLP input (gate/up), CHESS's per-channel gate
mask (up rows and down columns) and the down_proj input. Their thresholds
come from calibration at a grid of sparsities; the search picks one level of
each per layer:

1. Within each block (attention or MLP of one layer), TEAL's greedy search on
   calibration activations: starting dense, repeatedly raise the one
   component whose next level adds the least output error per weight byte
   saved, recording the path.
2. Across blocks, the byte budget of the target speed-up is spread either
   evenly (``even``, the default and TEAL's choice: every block skips the
   same share of its own weights, at the point of its path that gets there)
   or where it costs least (``global``: each block's path, on its lower
   convex hull, is a list of moves of increasing error per byte; the
   cheapest moves over all blocks are taken until the budget is reached).

3. The LM head is one more weight read at every step, thresholded on its
   input (the final norm's output). Its level is chosen end to end: for each
   level the budget allows, the layers get the rest of the budget as above,
   and the pair with the lowest loss on the search tokens wins.

A block's error is the squared change of what it adds to the residual stream
over the squared norm of the residual stream entering it, so that ``global``
compares blocks of every depth. Activations entering each block are the
dense model's. On SmolLM2-135M, ``global`` lost to uniform input thresholds
(teal) at equal speed-up: a block's own error misjudges how much later
blocks amplify it.
"""

import argparse
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .blas import reexec_with_openblas
from .data import load_documents
from .errors import ChessError
from .sparsify import ACTIVATIONS, InputSparseLinear, model_layers, sparsify, unsparsify
from .costs import allocation_speedup, model_params, skipped_params
from .thresholds import ALLOCATED, LayerThresholds, Thresholds, check_destination, load_thresholds
from .utils import add_model_args, cli_errors, load_from_args

ATTENTION_PARTS = ("attn_in", "o_in")
MLP_PARTS = ("mlp_in", "gate", "down_in")
BLOCK_PROJECTIONS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


@dataclass
class BlockRecord:
    """A block's calibration inputs and dense outputs, one entry per window."""

    inputs: List[mx.array] = field(default_factory=list)
    masks: List[object] = field(default_factory=list)
    outputs: List[mx.array] = field(default_factory=list)
    residual_sq: float = 0.0


class Recorder(nn.Module):
    def __init__(self, module: nn.Module, record: BlockRecord):
        super().__init__()
        self.module = module
        self._record = record

    def __call__(self, x, *args, **kwargs):
        y = self.module(x, *args, **kwargs)
        mx.eval(x, y)
        self._record.inputs.append(x)
        self._record.masks.append(kwargs.get("mask", args[0] if args else None))
        self._record.outputs.append(y)
        return y


class NormRecorder(nn.Module):
    """Sums the squared norm of the residual stream entering a block."""

    def __init__(self, norm: nn.Module, record: BlockRecord):
        super().__init__()
        self.norm = norm
        self._record = record

    def __call__(self, h):
        self._record.residual_sq += mx.sum(mx.square(h.astype(mx.float32))).item()
        return self.norm(h)


def mlp_norm_name(layer: nn.Module) -> str:
    """The norm in front of the MLP: Gemma 2/3 have post-norms as well."""
    return "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") else "post_attention_layernorm"


def contribution(layer: nn.Module, kind: str, y: mx.array) -> mx.array:
    """What a block's output adds to the residual stream."""
    if not hasattr(layer, "post_feedforward_layernorm"):
        return y
    norm = layer.post_attention_layernorm if kind == "attn" else layer.post_feedforward_layernorm
    return norm(y)


def record_blocks(model: nn.Module, windows: Sequence[Sequence[int]], progress: bool) -> List[Dict[str, BlockRecord]]:
    """Run the dense model on ``windows``, keeping each block's inputs and outputs."""
    layers = model_layers(model)
    records = [{"attn": BlockRecord(), "mlp": BlockRecord()} for _ in layers]
    for layer, record in zip(layers, records):
        layer.self_attn = Recorder(layer.self_attn, record["attn"])
        layer.mlp = Recorder(layer.mlp, record["mlp"])
        layer.input_layernorm = NormRecorder(layer.input_layernorm, record["attn"])
        name = mlp_norm_name(layer)
        setattr(layer, name, NormRecorder(getattr(layer, name), record["mlp"]))
    body = getattr(model, "model", model)
    try:
        for window in tqdm(windows, desc="allocation: recording blocks", unit="win", disable=not progress):
            body(mx.array(window)[None])
    finally:
        for layer in layers:
            layer.self_attn, layer.mlp = layer.self_attn.module, layer.mlp.module
            layer.input_layernorm = layer.input_layernorm.norm
            name = mlp_norm_name(layer)
            setattr(layer, name, getattr(layer, name).norm)
    return records


class BlockProbe:
    """Evaluates one block's output error at given component levels."""

    def __init__(self, model: nn.Module, layer_index: int, kind: str, record: BlockRecord, thresholds: Thresholds):
        self.layer = model.layers[layer_index]
        self.index = layer_index
        self.kind = kind
        self.record = record
        self.thresholds = thresholds
        self.activation = ACTIVATIONS[model.model_type]
        self.dense_contribution = [contribution(self.layer, kind, y) for y in record.outputs]
        # MLP projections of each window by MLP-input level: the gate mask and
        # the down threshold change only what follows them.
        self._projected: Dict[float, List[Tuple[mx.array, mx.array]]] = {}

    def error(self, levels: Dict[str, float]) -> float:
        plan = self.thresholds.layer_plan(self.index, levels)
        squared = 0.0
        for w, (x, mask, reference) in enumerate(zip(self.record.inputs, self.record.masks, self.dense_contribution)):
            y = self.run_mlp(plan, levels.get("mlp_in", 0.0), w) if self.kind == "mlp" else self.run_attention(plan, x, mask)
            squared += mx.sum(mx.square((contribution(self.layer, self.kind, y) - reference).astype(mx.float32))).item()
        return squared / self.record.residual_sq

    def run_mlp(self, plan: LayerThresholds, mlp_in: float, window: int) -> mx.array:
        """SparseMLP's reference path on projections computed once per MLP-input level."""
        gate, up_in = self.projected(plan, mlp_in)[window]
        mlp = self.layer.mlp
        if plan.gate is not None:
            gate = mx.where(mx.abs(gate) >= plan.gate, gate, 0)
        up = self.projected(plan, 0.0)[window][1] if plan.gate is not None and plan.up_from_mask else up_in
        hidden = gate * up
        if plan.down_in is not None:
            hidden = mx.where(mx.abs(hidden) >= plan.down_in, hidden, 0)
        return mlp.down_proj(hidden)

    def projected(self, plan: LayerThresholds, mlp_in: float) -> List[Tuple[mx.array, mx.array]]:
        if mlp_in not in self._projected:
            mlp, results = self.layer.mlp, []
            for x in self.record.inputs:
                if mlp_in > 0:
                    x = mx.where(mx.abs(x) >= plan.mlp_in, x, 0)
                gate, up = self.activation(mlp.gate_proj(x)), mlp.up_proj(x)
                mx.eval(gate, up)
                results.append((gate, up))
            self._projected[mlp_in] = results
        return self._projected[mlp_in]

    def run_attention(self, plan: LayerThresholds, x: mx.array, mask) -> mx.array:
        attn = self.layer.self_attn
        saved = {p: getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        inputs = {"q_proj": plan.q_in, "k_proj": plan.kv_in, "v_proj": plan.kv_in, "o_proj": plan.o_in}
        try:
            for proj, tau in inputs.items():
                if tau is not None:
                    setattr(attn, proj, InputSparseLinear(saved[proj], tau, "probe"))
            return attn(x, mask=mask)
        finally:
            for proj, module in saved.items():
                setattr(attn, proj, module)


def greedy_path(
    probe_error: Callable[[Dict[str, float]], float],
    parts: Sequence[str],
    grid: Sequence[float],
    skipped: Callable[[Dict[str, float]], float],
) -> List[Tuple[float, float, Dict[str, float]]]:
    """TEAL's greedy: from all-dense, raise the part whose next level costs the
    least error per skipped weight; returns (skipped, error, levels) per step."""
    steps = {p: 0 for p in parts}
    levels = {p: 0.0 for p in parts}
    path = [(0.0, 0.0, dict(levels))]
    while True:
        best = None
        for part in parts:
            # A level that saves nothing (down_in under the gate mask's) is skipped over.
            step = steps[part] + 1
            while step < len(grid) and skipped(dict(levels, **{part: grid[step]})) <= path[-1][0]:
                step += 1
            if step >= len(grid):
                continue
            trial = dict(levels, **{part: grid[step]})
            err = probe_error(trial)
            cost = max(err - path[-1][1], 0.0) / (skipped(trial) - path[-1][0])
            if best is None or cost < best[0]:
                best = (cost, part, step, trial, err)
        if best is None:
            return path
        _, part, steps[part], levels, err = best
        path.append((skipped(levels), err, dict(levels)))


def lower_hull(path: Sequence[Tuple[float, float, dict]]) -> List[Tuple[float, float, dict]]:
    """The points of ``path`` on its lower convex hull (error against skipped
    weights), so that successive moves cost ever more error per weight."""
    hull: List[Tuple[float, float, dict]] = []
    for point in sorted(path, key=lambda p: (p[0], p[1])):
        if hull and point[0] == hull[-1][0]:
            continue
        while len(hull) >= 2 and cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(point)
    return hull


def cross(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def allocate_budget(hulls: Sequence[List[Tuple[float, float, dict]]], budget: float) -> List[int]:
    """Index into each block's hull after taking the cheapest moves (error per
    weight) over all blocks until ``budget`` weights are skipped."""
    position = [0] * len(hulls)
    skipped = 0.0
    while skipped < budget:
        best = None
        for b, hull in enumerate(hulls):
            if position[b] + 1 < len(hull):
                here, there = hull[position[b]], hull[position[b] + 1]
                cost = (there[1] - here[1]) / (there[0] - here[0])
                if best is None or cost < best[0]:
                    best = (cost, b)
        if best is None:
            break
        b = best[1]
        skipped += hulls[b][position[b] + 1][0] - hulls[b][position[b]][0]
        position[b] += 1
    return position


def even_allocation(
    paths: Sequence[List[Tuple[float, float, dict]]], sizes: Sequence[float], budget: float
) -> List[int]:
    """Index into each block's greedy path so that every block skips the same
    fraction of its own weights (TEAL's uniform block sparsity), the smallest
    fraction whose skipped weights reach ``budget``."""

    def positions(fraction: float) -> List[int]:
        return [max(k for k, point in enumerate(path) if point[0] <= fraction * size * (1 + 1e-9))
                for path, size in zip(paths, sizes)]

    fractions = sorted({point[0] / size for path, size in zip(paths, sizes) for point in path})
    for fraction in fractions:
        position = positions(fraction)
        if sum(path[k][0] for path, k in zip(paths, position)) >= budget:
            return position
    return positions(1.0)


STRATEGIES = ("even", "global")


def search_allocations(
    model: nn.Module,
    thresholds: Thresholds,
    windows: Sequence[Sequence[int]],
    speedups: Sequence[float],
    progress: bool = True,
    strategy: str = "even",
) -> Thresholds:
    """``thresholds`` with the allocations for each target ideal speed-up added.

    ``thresholds`` must hold every component's thresholds (a calibration
    from this version); its sparsities are the levels the search may pick.
    ``strategy`` spreads the budget over blocks: ``even`` (every block skips
    the same share of its weights, as TEAL) or ``global`` (the cheapest
    error per weight over all blocks).
    """
    if strategy not in STRATEGIES:
        raise ChessError(f"unknown allocation strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    thresholds.require("mlp_in", "down_in")
    for s in speedups:
        if s <= 1:
            raise ChessError(f"target speed-ups must be above 1, got {s:g}")
    unsparsify(model)
    layer_params, head = model_params(model)
    total = sum(sum(p.values()) for p in layer_params) + head
    grid = [0.0] + [float(s) for s in thresholds.sparsities]
    records = record_blocks(model, windows, progress)
    paths, sizes, owners = [], [], []
    blocks = [(i, kind) for i in range(len(layer_params)) for kind in ("attn", "mlp")]
    for i, kind in tqdm(blocks, desc="allocation: greedy search", unit="block", disable=not progress):
        probe = BlockProbe(model, i, kind, records[i][kind], thresholds)
        parts = ATTENTION_PARTS if kind == "attn" else MLP_PARTS
        path = greedy_path(probe.error, parts, grid, lambda levels: skipped_params(layer_params[i], levels))
        paths.append(path if strategy == "even" else lower_hull(path))
        sizes.append(sum(layer_params[i][p] for p in BLOCK_PROJECTIONS[kind]))
        owners.append(i)
        records[i][kind] = None  # free the activations as we go
    def spread(budget: float) -> np.ndarray:
        if strategy == "even":
            position = even_allocation(paths, sizes, budget)
        else:
            position = allocate_budget(paths, budget)
        allocation = np.zeros((len(layer_params), len(ALLOCATED)), dtype=np.float32)
        for path, i, pos in zip(paths, owners, position):
            for part, level in path[pos][2].items():
                allocation[i, ALLOCATED.index(part)] = level
        return allocation

    allocations, heads, predicted = [], [], []
    for target in speedups:
        budget = total * (1 - 1 / target)
        allocation, head_level = choose_head_level(model, thresholds, windows, target, budget, head, grid, spread,
                                                   progress)
        allocations.append(allocation)
        heads.append(head_level)
        predicted.append(allocation_speedup(allocation, layer_params, head, head_level))
    thresholds.allocation_speedups = np.array(speedups, dtype=np.float32)
    thresholds.allocation_predicted = np.array(predicted, dtype=np.float32)
    thresholds.allocations = np.stack(allocations)
    thresholds.allocation_head = np.array(heads, dtype=np.float32)
    how = "the same share of each block's weights" if strategy == "even" else "global by error per weight"
    head_how = "" if thresholds.head_in is None else ", LM head input level by calibration loss"
    thresholds.metadata["allocation"] = (
        f"greedy block-wise (TEAL), then {how}{head_how}; {sum(len(w) for w in windows)} tokens"
    )
    return thresholds


def choose_head_level(
    model: nn.Module,
    thresholds: Thresholds,
    windows: Sequence[Sequence[int]],
    target: float,
    budget: float,
    head: int,
    grid: Sequence[float],
    spread: Callable[[float], np.ndarray],
    progress: bool,
) -> Tuple[np.ndarray, float]:
    """The layers' allocation and the LM head input's level for one target.

    The LM head is one weight read by one input, so its level is chosen by
    what the model loses end to end: each level the budget allows (rising
    from dense) leaves the rest of the budget to the layers, and the pair
    with the lowest loss on the search tokens wins. The search stops once
    two levels in a row lose to the best. Without head thresholds (older
    files) the head stays dense.
    """
    levels = [0.0] if thresholds.head_in is None else [g for g in grid if head * g < budget]
    if len(levels) == 1:
        return spread(budget), 0.0
    best, worse = None, 0
    for level in tqdm(levels, desc=f"allocation: LM head level for {target:g}x", unit="level",
                      disable=not progress, leave=False):
        allocation = spread(budget - head * level)
        loss = allocation_loss(model, thresholds, windows, allocation, level)
        if best is None or loss < best[0]:
            best, worse = (loss, allocation, level), 0
        else:
            worse += 1
            if worse == 2:
                break
    return best[1], best[2]


def allocation_loss(model: nn.Module, thresholds: Thresholds, windows: Sequence[Sequence[int]],
                    allocation: np.ndarray, head_level: float) -> float:
    """Mean next-token loss on ``windows`` with ``allocation`` applied (reference path)."""
    from .perplexity import window_nll

    # A copy holding only this allocation, filed under a placeholder target.
    trial = replace(thresholds, allocation_speedups=np.array([2.0], dtype=np.float32), allocations=allocation[None],
                    allocation_head=np.array([head_level], dtype=np.float32))
    windows = [w for w in windows if len(w) > 1]
    sparsify(model, trial, "alloc", 2.0, kernels=None)
    try:
        total = sum(window_nll(model, window).item() for window in windows)
    finally:
        unsparsify(model)
    return total / sum(len(window) - 1 for window in windows)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Search per-layer sparsity allocations for target ideal speed-ups in an existing thresholds file.")
    add_model_args(parser)
    parser.add_argument("--thresholds", required=True, help="Thresholds file from chess_mlx.calibrate")
    parser.add_argument("--data", nargs="+", required=True, help="Text or JSONL files (as for calibration)")
    parser.add_argument("--documents", default=None, help="A slice of the documents, e.g. ':30'")
    parser.add_argument("--tokens", type=int, default=2048,
                        help="Tokens for the search, in 256-token pieces spread over the documents (their first 64x as many tokens)")
    parser.add_argument("--speedup", default="1.25,1.35,1.5", help="Comma-separated target ideal speed-ups")
    parser.add_argument("--strategy", choices=STRATEGIES, default="even",
                        help="Spread the budget evenly over blocks (TEAL) or by the cheapest error per weight")
    parser.add_argument("--out", required=True, help="Output thresholds file (may be --thresholds itself)")
    return parser


def main(argv=None):
    from .calibrate import parse_speedups, search_windows

    args = setup_arg_parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas()
    with cli_errors("chess_mlx.allocation"):
        speedups = parse_speedups(args.speedup)
        if args.tokens <= 0:
            raise ChessError(f"--tokens must be positive, got {args.tokens}")
        check_destination(args.out)
        thresholds = load_thresholds(args.thresholds)
        documents = load_documents(args.data, args.documents)
        model, tokenizer, _ = load_from_args(args)
        model_layers(model)  # an unsupported architecture fails here, in one line
        thresholds.validate(model)
        windows = search_windows(documents, tokenizer, args.tokens)
        search_allocations(model, thresholds, windows, speedups, strategy=args.strategy)
        thresholds.save(args.out)
        for target, predicted in zip(speedups, thresholds.allocation_predicted):
            print(f"allocation for {target:g}x: ideal speed-up {predicted:.3f}x")
        print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
