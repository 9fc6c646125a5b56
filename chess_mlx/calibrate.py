"""Calibrate CHESS, CATS and attention thresholds on text, in MLX.

Per layer, on the dense model (see the project's chess-reference.md):
  m_i      = E|a_up_i| over all calibration tokens            (pass 1)
  CATS     = quantile_s(|a_gate|)                              (pass 1)
  q, o     = quantile_s(|input|) of q_proj and o_proj          (pass 1)
  mlp, down = quantile_s(|input|) of gate/up and of down_proj  (pass 1)
  tau_imp  = quantile_s(|a_gate| * m),  tau_i = tau_imp / m_i  (pass 2)
  head     = the same for the LM head's input x (the final norm's output),
             with w_j = sqrt(E_tokens Var_{v~p}(W[v, j])), p the model's
             next-token distribution and W the head's weight: dropping x_j
             moves the log-probabilities by about x_j^2 w_j^2 (the diagonal
             Fisher information of the logits). w comes from the first
             HEAD_WEIGHT_TOKENS tokens (pass 1), then
             tau_imp = quantile_s(|x| * w), tau_j = tau_imp / w_j   (pass 2)
Quantiles are taken per window (windows never cross documents) and averaged
over windows weighted by their token counts. Every sparsity is computed in the
same passes. Only per-window scalars and per-channel sums are kept, so memory
does not grow with the number of tokens.
"""

import argparse
import datetime
import json
from pathlib import Path
from typing import Dict, List, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from . import __version__
from .allocation import search_allocations
from .data import load_documents, token_windows
from .blas import reexec_with_openblas
from .errors import ChessError
from .sparsify import ACTIVATIONS, lm_head, model_layers, unsparsify
from .thresholds import Thresholds, check_destination, model_identity
from .utils import add_model_args, cli_errors, load_from_args

STATISTICS = ("mean_abs", "rms")
# Tokens whose next-token distributions weight the LM head's input channels.
HEAD_WEIGHT_TOKENS = 2048
# The allocation search's pieces come from the data's first this-many times its tokens.
SEARCH_SPAN = 64


def quantiles(values: mx.array, levels: Sequence[float]) -> mx.array:
    """Quantiles of all entries of ``values`` (linear interpolation).

    numpy partitions once for all levels; MLX would partition once per level
    (its sort is slower still), about 4x the time at nine levels.
    """
    flat = np.array(values.reshape(-1).astype(mx.float32))
    return mx.array(np.quantile(flat, levels).astype(np.float32))


class LayerStats:
    """Running statistics of one layer: weighted quantile sums, channel sums."""

    def __init__(self, levels: Sequence[float], statistic: str):
        self.levels = levels
        self.statistic = statistic
        self.sums: Dict[str, mx.array] = {}
        self.up_sum = None
        self.up_stat = None  # m, set between the passes

    def add(self, name: str, value: mx.array):
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def observe_input(self, name: str, x: mx.array):
        if self.up_stat is not None:
            return  # attention thresholds are complete after pass 1
        tokens = x.size // x.shape[-1]
        self.add(name, quantiles(mx.abs(x), self.levels) * tokens)

    def observe_mlp(self, x: mx.array, gate: mx.array, up: mx.array):
        tokens = gate.size // gate.shape[-1]
        gate = mx.abs(gate.astype(mx.float32)).reshape(tokens, -1)
        if self.up_stat is None:
            up = up.astype(mx.float32).reshape(tokens, -1)
            self.add("mlp_in", quantiles(mx.abs(x), self.levels) * tokens)
            self.add("down_in", quantiles(gate * mx.abs(up), self.levels) * tokens)
            up = mx.abs(up) if self.statistic == "mean_abs" else mx.square(up)
            self.add("up", up.sum(axis=0))
            self.add("cats", quantiles(gate, self.levels) * tokens)
        else:
            self.add("chess", quantiles(gate * self.up_stat, self.levels) * tokens)

    def finish_first_pass(self, num_tokens: int):
        up = self.sums.pop("up") / num_tokens
        if self.statistic == "rms":
            up = mx.sqrt(up)
        # A channel whose up projection is always zero contributes nothing
        # whatever its gate; the floor keeps its threshold finite.
        self.up_stat = mx.maximum(up, 1e-12)


class MLPRecorder(nn.Module):
    def __init__(self, dense: nn.Module, activation, stats: LayerStats):
        super().__init__()
        self.dense = dense
        self._activation = activation
        self._stats = stats

    def __call__(self, x: mx.array) -> mx.array:
        gate = self._activation(self.dense.gate_proj(x))
        up = self.dense.up_proj(x)
        self._stats.observe_mlp(x, gate, up)
        return self.dense.down_proj(gate * up)


class InputRecorder(nn.Module):
    """Records the quantiles of what enters ``dense``."""

    def __init__(self, dense: nn.Module, name: str, stats: LayerStats):
        super().__init__()
        self.dense = dense
        self._name = name
        self._stats = stats

    def __call__(self, x: mx.array) -> mx.array:
        self._stats.observe_input(self._name, x)
        return self.dense(x)


class HeadRecorder(nn.Module):
    """Wraps the final norm, whose output is the LM head's input: pass 1 keeps
    the first ``keep`` tokens of it (for the channel weights), pass 2 records
    the quantiles of ``|x| * weights``."""

    def __init__(self, norm: nn.Module, levels: Sequence[float], keep: int):
        super().__init__()
        self.dense = norm
        self.levels = levels
        self.kept: List[mx.array] = []
        self._room = keep
        self.weights = None  # set between the passes
        self.sums = {}

    def __call__(self, x: mx.array) -> mx.array:
        y = self.dense(x)
        rows = y.reshape(-1, y.shape[-1]).astype(mx.float32)
        if self.weights is None:
            if self._room > 0:
                self.kept.append(rows[: self._room])
                mx.eval(self.kept[-1])  # or each window's graph stays alive
                self._room -= self.kept[-1].shape[0]
        else:
            q = quantiles(mx.abs(rows) * self.weights, self.levels) * rows.shape[0]
            self.sums["head"] = self.sums["head"] + q if "head" in self.sums else q
        return y


def head_weight(model: nn.Module) -> mx.array:
    """The LM head's ``[vocab, hidden]`` weight in float32 (dequantized)."""
    head = lm_head(model)
    if isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(head.weight, head.scales, head.biases, head.group_size, head.bits)
    return head.weight.astype(mx.float32)


def head_channel_weights(model: nn.Module, x: mx.array, chunk: int = 256) -> mx.array:
    """``w_j = sqrt(mean over tokens of Var_{v~p}(W[v, j]))`` for the LM head's
    input ``x`` ``[tokens, hidden]``, with ``p = softmax(x @ W.T)`` (logit
    soft-capping, where a model has it, is left out of ``p``)."""
    weight = head_weight(model)
    square = weight * weight
    total = mx.zeros((weight.shape[1],))
    for i in range(0, x.shape[0], chunk):
        p = mx.softmax(x[i : i + chunk] @ weight.T, axis=-1)
        mean = p @ weight
        total = total + (p @ square - mean * mean).sum(axis=0)
        mx.eval(total)
    return mx.sqrt(mx.maximum(total / x.shape[0], 1e-12))


def install_recorders(model: nn.Module, stats: List[LayerStats]):
    activation = ACTIVATIONS[model.model_type]
    for layer, layer_stats in zip(model.layers, stats):
        layer.mlp = MLPRecorder(layer.mlp, activation, layer_stats)
        attn = layer.self_attn
        attn.q_proj = InputRecorder(attn.q_proj, "q_proj", layer_stats)
        attn.o_proj = InputRecorder(attn.o_proj, "o_proj", layer_stats)


def remove_recorders(model: nn.Module):
    for layer in model.layers:
        layer.mlp = layer.mlp.dense
        attn = layer.self_attn
        attn.q_proj, attn.o_proj = attn.q_proj.dense, attn.o_proj.dense


def run_pass(model, windows, stats, description: str, progress: bool):
    # The decoder body without the LM head: logits are not needed here.
    body = getattr(model, "model", model)
    total = sum(len(w) for w in windows)
    with tqdm(total=total, desc=description, unit="tok", disable=not progress) as bar:
        for window in windows:
            body(mx.array(window)[None])
            mx.eval([s.sums for s in stats])
            bar.update(len(window))


def calibrate(
    model: nn.Module,
    windows: Sequence[Sequence[int]],
    sparsities: Sequence[float],
    statistic: str = "mean_abs",
    progress: bool = True,
) -> Thresholds:
    """Thresholds for every layer of ``model`` at each target sparsity."""
    if statistic not in STATISTICS:
        raise ChessError(f"unknown statistic '{statistic}' (choose from {', '.join(STATISTICS)})")
    for s in sparsities:
        if not 0 < s < 1:
            raise ChessError(f"calibration sparsities must be in (0, 1), got {s}")
    layers = model_layers(model)
    unsparsify(model)
    levels = sorted(sparsities)
    stats = [LayerStats(levels, statistic) for _ in layers]
    num_tokens = sum(len(w) for w in windows)
    if num_tokens == 0:
        raise ChessError("no calibration tokens")
    body = getattr(model, "model", model)
    head = HeadRecorder(body.norm, levels, HEAD_WEIGHT_TOKENS)
    install_recorders(model, stats)
    body.norm = head
    try:
        run_pass(model, windows, stats, "calibration pass 1/2", progress)
        for s in stats:
            s.finish_first_pass(num_tokens)
        head.weights = head_channel_weights(model, mx.concatenate(head.kept))
        head.kept = []
        run_pass(model, windows, stats + [head], "calibration pass 2/2", progress)
    finally:
        remove_recorders(model)
        body.norm = head.dense

    def stacked(name):
        return np.stack([np.array(s.sums[name] / num_tokens) for s in stats])

    up_stat = np.stack([np.array(s.up_stat) for s in stats])
    tau_imp = stacked("chess")
    return Thresholds(
        sparsities=np.array(levels),
        up_stat=up_stat,
        chess=tau_imp[:, :, None] / up_stat[:, None, :],
        cats=stacked("cats"),
        q_proj=stacked("q_proj"),
        o_proj=stacked("o_proj"),
        mlp_in=stacked("mlp_in"),
        down_in=stacked("down_in"),
        head_in=np.array(head.sums["head"] / num_tokens)[:, None] / np.array(head.weights)[None, :],
        metadata={
            "chess_mlx_version": __version__,
            "identity": json.dumps(model_identity(model)),
            "statistic": statistic,
            "aggregation": "per-window quantiles (linear), token-weighted mean over windows",
            "methods": "cats,chess,chess+,teal",
            "tokens": str(num_tokens),
            "windows": str(len(windows)),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )


def parse_numbers(text: str, flag: str) -> List[float]:
    """Comma-separated numbers, sorted, duplicates dropped."""
    try:
        return sorted({float(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ChessError(f"{flag} expects comma-separated numbers, got '{text}'") from None


def parse_sparsities(text: str) -> List[float]:
    values = parse_numbers(text, "--sparsity")
    for s in values:
        if not 0 < s < 1:
            raise ChessError(f"sparsity must be in (0, 1) for calibration, got {s:g}")
    return values


def spread_tokens(windows: Sequence[Sequence[int]], count: int, length: int = 256) -> List[List[int]]:
    """About ``count`` tokens in pieces of at most ``length``, taken from
    windows spread evenly over ``windows`` (first pieces first), so that a
    search sees many documents, not only the first. Short pieces keep
    attention cheap (its cost grows with the square of the length)."""
    windows = [w for w in windows if len(w) > 1]
    wanted = -(-count // length)
    picks = sorted({round(i) for i in np.linspace(0, len(windows) - 1, min(wanted, len(windows)))})
    pieces, left = [], count
    for start in range(0, max((len(windows[i]) for i in picks), default=0), length):
        for i in picks:
            if left <= 0:
                return pieces
            piece = list(windows[i][start : start + min(length, left)])
            if len(piece) > 1:
                pieces.append(piece)
                left -= len(piece)
    return pieces


def search_windows(documents: Sequence[str], tokenizer, count: int, window: int = 2048) -> List[List[int]]:
    """The allocation search's ``count`` tokens, spread over the windows of
    the documents' first SEARCH_SPAN * count tokens (all of a 30-article
    WikiText slice at the default 2048; a large corpus is not tokenized whole)."""
    return spread_tokens(token_windows(documents, tokenizer, window, at_most=SEARCH_SPAN * count), count)


def parse_speedups(text: str) -> List[float]:
    """Comma-separated target ideal speed-ups, each above 1."""
    values = parse_numbers(text, "--speedup")
    for s in values:
        if not s > 1:
            raise ChessError(f"target speed-ups must be above 1, got {s:g}")
    return values


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Calibrate CHESS thresholds for an MLX model.")
    add_model_args(parser)
    parser.add_argument("--data", nargs="+", required=True,
                        help="Text files (WikiText or blank-line separated), JSONL files with a 'text' field, or 'c4'")
    parser.add_argument("--documents", default=None,
                        help="Use a slice of the documents, e.g. ':30' for the first 30")
    parser.add_argument("--sparsity", default=",".join(f"{i / 10:g}" for i in range(1, 10)),
                        help="Comma-separated target sparsities (also the levels the allocation search picks from)")
    parser.add_argument("--tokens", type=int, default=65536, help="Calibration tokens")
    parser.add_argument("--window", type=int, default=2048, help="Tokens per window (windows never cross documents)")
    parser.add_argument("--statistic", choices=STATISTICS, default="mean_abs",
                        help="Per-channel statistic of |a_up|: E|a_up| (paper, 2025 code) or sqrt(E[a_up^2]) (2024 code)")
    parser.add_argument("--speedup", default="1.25,1.35,1.5",
                        help="Target ideal speed-ups to search per-layer allocations for (method alloc)")
    parser.add_argument("--allocation-tokens", type=int, default=2048,
                        help="Tokens for the allocation search, spread over the documents (their first 64x as many tokens); 0 skips it")
    parser.add_argument("--out", required=True, help="Output thresholds file (.safetensors)")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas()
    with cli_errors("chess_mlx.calibrate"):
        sparsities = parse_sparsities(args.sparsity)
        speedups = parse_speedups(args.speedup) if args.allocation_tokens else []
        if args.tokens <= 0:
            raise ChessError(f"--tokens must be positive, got {args.tokens}")
        if args.allocation_tokens < 0:
            raise ChessError(f"--allocation-tokens must be 0 or more, got {args.allocation_tokens}")
        check_destination(args.out)
        documents = load_documents(args.data, args.documents)
        model, tokenizer, name = load_from_args(args)
        model_layers(model)  # an unsupported architecture fails here, before tokenizing the data
        windows = token_windows(documents, tokenizer, args.window, args.tokens)
        thresholds = calibrate(model, windows, sparsities, args.statistic)
        thresholds.metadata.update(
            model=name,
            data=" ".join(Path(d).name for d in args.data)
            + (f" documents[{args.documents}]" if args.documents else ""),
            window=str(args.window),
        )
        # Saved before the search too: an interrupted search keeps the thresholds.
        thresholds.save(args.out)
        print(f"Wrote thresholds for {len(model.layers)} layers at sparsities "
              f"{', '.join(f'{s:g}' for s in sparsities)} ({args.tokens} tokens) to {args.out}")
        if speedups:
            pieces = search_windows(documents, tokenizer, args.allocation_tokens, args.window)
            search_allocations(model, thresholds, pieces, speedups)
            thresholds.save(args.out)
            for target, predicted in zip(speedups, thresholds.allocation_predicted):
                print(f"  allocation for {target:g}x: ideal speed-up {predicted:.3f}x")


if __name__ == "__main__":
    main()
