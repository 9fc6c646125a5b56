"""Perplexity of a (sparsified) model on held-out text.

    python -m chess_mlx.perplexity --data wikitext-2-valid.txt --documents 30: \\
        --methods dense,cats,chess,chess+ --sparsity 0.3,0.5,0.7
"""

import argparse
import math
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .calibrate import parse_speedups, parse_sparsities
from .data import encode_document, load_documents, token_windows
from .blas import reexec_with_openblas
from .errors import ChessError
from .sparsify import (METHODS, configurations, format_sparsity, parse_methods, sparsify, target_label,
                       track_sparsity, unsparsify)
from .utils import add_model_args, cli_errors, load_from_args, resolve_thresholds


def window_nll(model: nn.Module, window: Sequence[int], scored: Optional[int] = None) -> mx.array:
    """Summed negative log-likelihood of the last ``scored`` tokens of
    ``window`` (default: tokens 1..)."""
    tokens = mx.array(window)[None]
    scored = len(window) - 1 if scored is None else scored
    logits = model(tokens[:, :-1])[:, -scored:].astype(mx.float32)
    return nn.losses.cross_entropy(logits, tokens[:, -scored:], reduction="sum")


def eval_ppl(
    model: nn.Module,
    windows: Sequence[Sequence[int]],
    progress: bool = True,
    scored: Optional[Sequence[int]] = None,
) -> Dict[str, float]:
    """Perplexity over windows (each scored independently) with the standard
    error of the mean token loss, estimated from per-window losses (returned
    too, for :func:`paired_change`).

    ``scored`` gives, per window, how many of its last tokens count (the rest
    is context, see :func:`strided_windows`); by default all but the first.
    """
    losses, counts = [], []
    scored = [len(w) - 1 for w in windows] if scored is None else scored
    for window, count in tqdm(list(zip(windows, scored)), desc="perplexity", unit="win",
                              disable=not progress, leave=False):
        nll = window_nll(model, window, count)
        mx.eval(nll)
        losses.append(nll.item())
        counts.append(count)
    losses, counts = np.array(losses), np.array(counts)
    mean, stderr = token_mean(losses / counts, counts)
    if not math.isfinite(mean):
        raise ChessError("the model produced non-finite losses")
    return {"ppl": math.exp(mean), "loss": mean, "loss_stderr": stderr, "tokens": int(counts.sum()),
            "window_nll": losses.tolist(), "window_tokens": counts.tolist()}


def token_mean(per_window: np.ndarray, counts: np.ndarray) -> Tuple[float, float]:
    """Token-weighted mean of per-window means and its standard error,
    estimated from the spread of the windows."""
    mean = float(np.sum(per_window * counts) / counts.sum())
    return mean, float(np.sqrt(np.sum(counts**2 * (per_window - mean) ** 2)) / counts.sum())


def paired_change(result: Dict, reference: Dict) -> Dict[str, float]:
    """Relative perplexity change of ``result`` against ``reference`` on the
    same windows, with its standard error from the per-window differences
    (paired: the text's own difficulty cancels, so small changes resolve)."""
    counts = np.array(result["window_tokens"])
    if not np.array_equal(counts, reference["window_tokens"]):
        raise ChessError("perplexities measured on different windows cannot be paired")
    mean, stderr = token_mean((np.array(result["window_nll"]) - np.array(reference["window_nll"])) / counts, counts)
    return {"ppl_change": math.expm1(mean), "ppl_change_stderr": math.exp(mean) * stderr}


def format_change(change: Dict[str, float]) -> str:
    """'+8.7% ± 0.4' (the paired standard error, in percentage points)."""
    return f"{100 * change['ppl_change']:+.1f}% ± {100 * change['ppl_change_stderr']:.1f}"


def strided_windows(
    documents: Sequence[str],
    tokenizer,
    window: int,
    stride: int,
    num_tokens: Optional[int] = None,
) -> Tuple[List[List[int]], List[int]]:
    """Windows of ``window`` tokens every ``stride`` tokens of each document,
    and per window how many of its last tokens are new (scored); the overlap
    is context. ``num_tokens`` caps the tokens covered, as in token_windows."""
    if not 0 < stride <= window:
        raise ChessError(f"--stride must be in [1, --window], got {stride}")
    windows, scored, total = [], [], 0
    for doc in documents:
        prefix, tokens = encode_document(tokenizer, doc)
        # A BOS prefix takes a window place, and the first text token gets scored.
        span = window - len(prefix)
        step = min(stride, span)
        end = 0
        while end < len(tokens) - (0 if prefix else 1):
            new_end = min(end + step if end else span, len(tokens))
            if num_tokens is not None:
                new_end = min(new_end, end + num_tokens - total)
            piece = prefix + tokens[max(0, new_end - span) : new_end]
            count = min(new_end - end, len(piece) - 1)
            if count > 0:
                windows.append(piece)
                scored.append(count)
            total += new_end - end
            end = new_end
            if num_tokens is not None and total >= num_tokens:
                return windows, scored
    if num_tokens is not None:
        raise ChessError(f"the data holds only {total} tokens, {num_tokens} asked (lower --tokens or add data)")
    return windows, scored


def ppl_windows(documents: Sequence[str], tokenizer, window: int, stride: Optional[int] = None,
                num_tokens: Optional[int] = None, spread: bool = False) -> Tuple[List[List[int]], List[int]]:
    """Non-overlapping windows (stride None) or strided ones, with scored counts.
    ``num_tokens`` takes the first tokens of the documents, or with ``spread``
    windows spread evenly over all of them."""
    check_spread(num_tokens, spread)
    if spread:
        return spread_windows(*ppl_windows(documents, tokenizer, window, stride), num_tokens)
    if stride is None:
        windows = token_windows(documents, tokenizer, window, num_tokens)
        return windows, [len(w) - 1 for w in windows]
    return strided_windows(documents, tokenizer, window, stride, num_tokens)


def check_positive(args: argparse.Namespace, *flags: str):
    """A one-line error for a given count flag below 1."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ChessError(f"--{flag.replace('_', '-')} must be positive, got {value}")


def check_spread(num_tokens: Optional[int], spread: bool):
    if spread and num_tokens is None:
        raise ChessError("--spread needs --tokens (how many tokens to spread over the documents)")


def spread_windows(windows: Sequence[List[int]], scored: Sequence[int],
                   num_tokens: int) -> Tuple[List[List[int]], List[int]]:
    """The fewest windows, evenly spaced over ``windows``, that score at least
    ``num_tokens`` tokens: a text's first tokens are a few documents only."""
    if sum(scored) < num_tokens:
        raise ChessError(f"the data holds only {sum(scored)} tokens, {num_tokens} asked (lower --tokens or add data)")
    for count in range(1, len(windows) + 1):
        picks = sorted({round(i) for i in np.linspace(0, len(windows) - 1, count)})
        if sum(scored[i] for i in picks) >= num_tokens:
            return [windows[i] for i in picks], [scored[i] for i in picks]
    return list(windows), list(scored)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Perplexity of dense and sparsified models.")
    add_model_args(parser)
    parser.add_argument("--data", nargs="+", required=True, help="Text or JSONL files")
    parser.add_argument("--documents", default=None, help="A slice of the documents, e.g. '30:'")
    parser.add_argument("--window", type=int, default=512, help="Tokens per window")
    parser.add_argument("--stride", type=int, default=None,
                        help="Start a window every N tokens, scoring only its new tokens (default: --window, no overlap)")
    parser.add_argument("--tokens", type=int, default=None, help="Evaluate only the first N tokens")
    parser.add_argument("--spread", action="store_true",
                        help="With --tokens: windows spread evenly over all the documents, not the first N tokens")
    parser.add_argument("--thresholds", default=None, help="Thresholds file (default: the shipped one)")
    parser.add_argument("--methods", default="dense,chess", help=f"Comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--sparsity", default="0.5", help="Comma-separated target sparsities")
    parser.add_argument("--speedup", default="1.35",
                        help="Comma-separated target ideal speed-ups of searched allocations (method alloc)")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas()
    with cli_errors("chess_mlx.perplexity"):
        methods = parse_methods(args.methods)
        sparsities = parse_sparsities(args.sparsity)
        speedups = parse_speedups(args.speedup)
        check_positive(args, "window", "stride", "tokens")
        check_spread(args.tokens, args.spread)
        documents = load_documents(args.data, args.documents)
        model, tokenizer, name = load_from_args(args)
        thresholds = resolve_thresholds(model, args.thresholds, methods)
        windows, scored = ppl_windows(documents, tokenizer, args.window, args.stride, args.tokens, args.spread)
        print(f"{name}: {sum(len(w) for w in windows)} tokens in {len(windows)} windows of <= {args.window}")
        print(f"{'method':8} {'target':>8} {'ppl':>9} {'+-loss':>7} {'vs dense':>13}  realized sparsity")
        dense = None
        for method, setting in configurations(methods, sparsities, speedups):
            if method == "dense":
                unsparsify(model)
            else:
                sparsify(model, thresholds, method, setting)
            with track_sparsity(model) as tracker:
                result = eval_ppl(model, windows, scored=scored)
            realized = format_sparsity(tracker.summary())
            dense = result if method == "dense" else dense
            change = "-" if dense is None or method == "dense" else format_change(paired_change(result, dense))
            print(f"{method:8} {target_label(method, setting):>8} {result['ppl']:9.3f} {result['loss_stderr']:7.4f} "
                  f"{change:>13}  {realized}", flush=True)


if __name__ == "__main__":
    main()
