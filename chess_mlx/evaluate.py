"""Quality of dense and sparsified models: perplexity and multiple-choice accuracy.

    python -m chess_mlx.evaluate --ppl wikitext-2-valid.txt --documents 30: --tokens 16384 \\
        --tasks social_iqa.json strategyqa.json --limit 200 \\
        --methods dense,cats,chess,chess+ --sparsity 0.3,0.5,0.7 \\
        --output results.json --markdown results.md --plot quality.png

Tasks are BIG-bench JSON files (``examples`` of ``input`` and
``target_scores``). Each choice is scored by its summed log-likelihood after
the input, as lm-eval scores multiple choice; ``acc`` takes the best sum,
``acc_norm`` the best sum per byte of the choice. Thresholds apply to every
token, prefill included. For lm-eval's own tasks see chess_mlx.lm_eval_adapter.
"""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from .blas import reexec_with_openblas
from .calibrate import parse_speedups, parse_sparsities
from .costs import (layers_speedup, model_params, planned_head_sparsity, planned_sparsity, realized_head_sparsity,
                    realized_sparsity)
from .data import load_documents
from .errors import ChessError
from .perplexity import check_positive, check_spread, eval_ppl, format_change, paired_change, ppl_windows
from .sparsify import (METHODS, configurations, format_sparsity, parse_methods, sparsify, target_label,
                       track_sparsity, unsparsify)
from .thresholds import check_destination
from .utils import add_model_args, cli_errors, load_from_args, resolve_thresholds


@dataclass
class Example:
    context: str
    choices: List[str]
    gold: List[int]


@dataclass
class Task:
    name: str
    examples: List[Example]


def load_task(path: str, limit: Optional[int] = None) -> Task:
    """A BIG-bench multiple-choice task file, its first ``limit`` examples."""
    if not Path(path).is_file():
        raise ChessError(f"task file '{path}' not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)["examples"]
        examples = [
            Example(e["input"].rstrip(), list(e["target_scores"]),
                    [i for i, s in enumerate(e["target_scores"].values()) if s > 0])
            for e in raw[:limit]
        ]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ChessError(f"'{path}' is not a BIG-bench task: expected 'examples' with 'input' and "
                         f"'target_scores'") from None
    if not examples or not all(e.gold and len(e.choices) > 1 for e in examples):
        raise ChessError(f"'{path}': every example needs two or more choices and a correct one")
    return Task(Path(path).stem, examples)


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """Tokens of ``context`` and of ``continuation`` after it, split as lm-eval
    does: trailing spaces of the context move to the continuation, and the
    continuation's tokens are those of ``context + continuation`` past the
    context's, so a merge across the boundary is not scored twice."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_tokens = list(tokenizer.encode(context)) if context else []
    whole = list(tokenizer.encode(context + continuation))
    if not context_tokens:
        context_tokens, whole = start_tokens(tokenizer), start_tokens(tokenizer) + whole
    return context_tokens, whole[len(context_tokens):]


def start_tokens(tokenizer) -> List[int]:
    """What an empty context is: the BOS token, else EOS (lm-eval's choice)."""
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, int):
            return [token]
    raise ChessError("an empty context needs a tokenizer with a BOS or EOS token")


def score_continuations(
    model: nn.Module,
    context: Sequence[int],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> List[Tuple[float, bool]]:
    """Summed log-probability of each continuation after ``context`` and
    whether greedy decoding would produce it.

    The context runs once; the continuations then run as one right-padded
    batch on copies of its KV cache (causal attention keeps the padding out of
    the scores). Each call reads every weight, which dominates on a CPU, so
    two calls per example beat one per choice; the padding's few tokens do
    count in the realized sparsity.
    """
    cache = make_prompt_cache(model)
    logits = model(mx.array(context)[None], cache=cache)[:, -1:]
    first = nn.log_softmax(logits.astype(mx.float32), axis=-1)
    results = []
    for start in range(0, len(continuations), batch_size):
        results.extend(score_batch(model, cache, first, continuations[start : start + batch_size]))
    return results


def score_batch(model: nn.Module, cache: list, first: mx.array, batch: Sequence[Sequence[int]]):
    lengths = mx.array([len(tokens) for tokens in batch])
    width = max(1, max(len(tokens) for tokens in batch))
    targets = mx.array([list(tokens) + [0] * (width - len(tokens)) for tokens in batch])
    logprobs = mx.repeat(first, len(batch), axis=0)
    if width > 1:
        batch_cache = [type(c).merge([c] * len(batch)) for c in cache]
        logits = model(targets[:, :-1], cache=batch_cache)
        logprobs = mx.concatenate([logprobs, nn.log_softmax(logits.astype(mx.float32), axis=-1)], axis=1)
    real = mx.arange(width) < lengths[:, None]
    picked = mx.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    scores = mx.where(real, picked, 0).sum(axis=-1)
    greedy = ((mx.argmax(logprobs, axis=-1) == targets) | ~real).all(axis=-1)
    mx.eval(scores, greedy)
    return list(zip(scores.tolist(), greedy.tolist()))


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[Tuple[str, str]],
    batch_size: int = 8,
    max_length: Optional[int] = None,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> List[Tuple[float, bool]]:
    """``(summed log-likelihood, is_greedy)`` of each ``(context,
    continuation)``; requests sharing a context share its forward pass.
    ``max_length`` cuts contexts from the left so that each pair fits."""
    groups: Dict[Tuple[int, ...], List[Tuple[int, List[int]]]] = {}
    for i, (context, continuation) in enumerate(requests):
        context_tokens, tokens = encode_pair(tokenizer, context, continuation)
        groups.setdefault(tuple(context_tokens), []).append((i, tokens))
    results: List[Tuple[float, bool]] = [(0.0, True)] * len(requests)
    for context, members in tqdm(groups.items(), desc=desc, unit="ctx", disable=not progress, leave=False):
        if max_length is not None:
            longest = max(len(tokens) for _, tokens in members)
            context = context[-max(1, max_length - longest):]
        scores = score_continuations(model, context, [tokens for _, tokens in members], batch_size)
        for (i, _), score in zip(members, scores):
            results[i] = score
    return results


def mean_stderr(values: Sequence[float]) -> Tuple[float, float]:
    """Mean of 0/1 outcomes and its standard error sqrt(p (1 - p) / n)."""
    p = float(np.mean(values))
    return p, math.sqrt(p * (1 - p) / len(values))


def task_metrics(examples: Sequence[Example], logliks: Sequence[Sequence[float]]) -> Dict[str, float]:
    """acc (best summed log-likelihood is a correct choice) and acc_norm (the
    same per byte of the choice), with standard errors."""
    acc, acc_norm = [], []
    for example, scores in zip(examples, logliks):
        lengths = [max(1, len(choice.encode("utf-8"))) for choice in example.choices]
        acc.append(int(np.argmax(scores)) in example.gold)
        acc_norm.append(int(np.argmax(np.array(scores) / lengths)) in example.gold)
    (a, a_se), (n, n_se) = mean_stderr(acc), mean_stderr(acc_norm)
    return {"acc": a, "acc_stderr": a_se, "acc_norm": n, "acc_norm_stderr": n_se, "examples": len(examples)}


def eval_task(model: nn.Module, tokenizer, task: Task, batch_size: int = 8, progress: bool = True) -> Dict[str, float]:
    """Score every choice of every example (continuation = " " + choice)."""
    requests = [(e.context, " " + choice) for e in task.examples for choice in e.choices]
    scores = [s for s, _ in loglikelihoods(model, tokenizer, requests, batch_size, progress=progress, desc=task.name)]
    logliks, start = [], 0
    for example in task.examples:
        logliks.append(scores[start : start + len(example.choices)])
        start += len(example.choices)
    return task_metrics(task.examples, logliks)


def evaluate(
    model: nn.Module,
    tokenizer,
    thresholds,
    methods: Sequence[str],
    sparsities: Sequence[float],
    windows: Optional[Tuple[List[List[int]], List[int]]] = None,
    tasks: Sequence[Task] = (),
    batch_size: int = 8,
    progress: bool = True,
    on_row: Optional[Callable[[dict], None]] = None,
    speedups: Sequence[float] = (),
) -> List[dict]:
    """One result row per (method, setting): perplexity over ``windows``
    (from chess_mlx.perplexity.ppl_windows), each task's metrics, the mean
    acc_norm, the realized sparsity per projection kind (over the
    perplexity text when there is one: task batches count their padding) and
    the ideal speed-up, targeted and realized; rows after a dense one get their
    perplexity change against it (``vs_dense``, paired per window, with its
    standard error). ``alloc`` runs at each of
    ``speedups``, the other methods at each of ``sparsities``."""
    rows, dense = [], None
    layer_params, head = model_params(unsparsify(model))
    for method, setting in configurations(methods, sparsities, speedups):
        if method == "dense":
            unsparsify(model)
        else:
            sparsify(model, thresholds, method, setting)
        row = {"method": method, "target": target_label(method, setting),
               "sparsity": None if method == "alloc" else setting}
        planned = planned_sparsity(thresholds, method, setting, len(layer_params))
        planned_head = planned_head_sparsity(thresholds, method, setting)
        row["ideal_speedup"] = layers_speedup(layer_params, head, planned, planned_head)
        per_layer = None
        if windows is not None:
            with track_sparsity(model) as tracker:
                row["perplexity"] = eval_ppl(model, windows[0], progress, scored=windows[1])
            row["realized_sparsity"] = tracker.summary()
            if method == "dense":
                dense = row["perplexity"]
            elif dense is not None:
                row["vs_dense"] = paired_change(row["perplexity"], dense)
            per_layer = tracker.sparsity()
        with track_sparsity(model) as tracker:
            row["tasks"] = {t.name: eval_task(model, tokenizer, t, batch_size, progress) for t in tasks}
        if tasks:
            row["mean_acc_norm"] = float(np.mean([r["acc_norm"] for r in row["tasks"].values()]))
            # Batched choices are padded, and padding positions are counted here.
            row["realized_sparsity_tasks"] = tracker.summary()
            row.setdefault("realized_sparsity", row["realized_sparsity_tasks"])
            per_layer = per_layer if per_layer is not None else tracker.sparsity()
        realized = realized_sparsity(per_layer or {}, len(layer_params))
        row["ideal_speedup_realized"] = layers_speedup(layer_params, head, realized,
                                                       realized_head_sparsity(per_layer or {}))
        rows.append(row)
        if on_row is not None:
            on_row(row)
    unsparsify(model)
    return rows


def table_cells(row: dict, task_names: Sequence[str], has_ppl: bool = True) -> List[str]:
    """A row's cells; what it did not measure (merged runs) shows as '-'."""
    cells = [row["method"], row["target"], f"{row['ideal_speedup']:.2f}x", f"{row['ideal_speedup_realized']:.2f}x"]
    if has_ppl:
        cells.append(f"{row['perplexity']['ppl']:.3f}" if "perplexity" in row else "-")
        cells.append(format_change(row["vs_dense"]) if "vs_dense" in row else "-")
    for name in task_names:
        t = row.get("tasks", {}).get(name)
        cells.append(f"{100 * t['acc_norm']:.1f} ± {100 * t['acc_norm_stderr']:.1f}" if t else "-")
    if task_names:
        cells.append(f"{100 * row['mean_acc_norm']:.1f}" if "mean_acc_norm" in row else "-")
    cells.append(format_sparsity(row["realized_sparsity"]))
    return cells


def table_header(has_ppl: bool, task_names: Sequence[str]) -> List[str]:
    header = ["method", "target", "ideal", "realized ideal"] + (["ppl", "vs dense"] if has_ppl else [])
    header += list(task_names)
    return header + (["mean"] if task_names else []) + ["realized sparsity"]


def text_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


def markdown_table(rows: Sequence[dict], task_names: Sequence[str]) -> str:
    """Rows method x target; tasks show acc_norm in percent ± standard error;
    ideal speed-ups for the targeted and for the realized sparsity."""
    has_ppl = any("perplexity" in row for row in rows)
    header = table_header(has_ppl, task_names)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(table_cells(row, task_names, has_ppl)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def gate_sparsity(row: dict) -> float:
    return row["realized_sparsity"].get("gate", 0.0)


def interpolate(points: Sequence[Tuple[float, float]], x: float) -> Optional[float]:
    """Piecewise-linear value at ``x`` through ``points``; None outside them."""
    points = sorted(points)
    if not points or not points[0][0] <= x <= points[-1][0]:
        return None
    xs, ys = zip(*points)
    return float(np.interp(x, xs, ys))


def at_equal_sparsity(rows: Sequence[dict], reference: str = "cats") -> List[dict]:
    """Every method's quality at the realized gate sparsities of ``reference``'s
    rows, interpolated between its own rows (log-perplexity and mean acc_norm
    linearly in realized sparsity): targets are hit only on average, so
    methods are also compared where they really drop the same share."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m in ("cats", "chess", "chess+")]
    own = {m: [r for r in rows if r["method"] == m] for m in methods}
    table = []
    for ref in own.get(reference, []):
        x = gate_sparsity(ref)
        entry = {"realized_gate_sparsity": x}
        entry.update({method: quality_at(own[method], gate_sparsity, x) for method in methods})
        table.append(entry)
    return table


QUALITY = {"ppl": lambda r: math.log(r["perplexity"]["ppl"]) if "perplexity" in r else None,
           "mean_acc_norm": lambda r: r.get("mean_acc_norm")}


def quality_at(rows: Sequence[dict], position: Callable[[dict], float], x: float) -> Dict[str, float]:
    """Perplexity and mean acc_norm at ``x``, interpolated between ``rows``
    placed at ``position(row)`` (log-perplexity linear); a metric out of the
    rows' range is left out."""
    values = {}
    for name, value in QUALITY.items():
        y = interpolate([(position(r), value(r)) for r in rows if value(r) is not None], x)
        if y is not None:
            values[name] = math.exp(y) if name == "ppl" else y
    return values


EQUAL_SPARSITY_TITLE = ("At equal realized gate sparsity (each method interpolated between its own rows "
                        "at cats' realized sparsities; perplexity, mean acc_norm in brackets)")


def comparison_markdown(table: Sequence[dict], key: str, heading: str, label: Callable[[float], str]) -> str:
    """Perplexity (and mean acc_norm) per method, a row per ``entry[key]``."""
    if not table:
        return ""
    methods = [k for k in table[0] if k != key]
    lines = [f"| {heading} | " + " | ".join(methods) + " |",
             "|" + "|".join(" --- " for _ in range(len(methods) + 1)) + "|"]
    for entry in table:
        cells = []
        for method in methods:
            v = entry[method]
            cell = f"{v['ppl']:.2f}" if "ppl" in v else "-"
            if "mean_acc_norm" in v:
                cell += f" ({100 * v['mean_acc_norm']:.1f})"
            cells.append(cell)
        lines.append(f"| {label(entry[key])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def equal_sparsity_markdown(table: Sequence[dict]) -> str:
    """Perplexity (and mean acc_norm) per method at equal realized gate sparsity."""
    return comparison_markdown(table, "realized_gate_sparsity", "realized gate sparsity", lambda x: f"{x:.3f}")


def at_equal_speedup(rows: Sequence[dict], speedups: Sequence[float]) -> List[dict]:
    """Every method's perplexity and mean acc_norm at each ideal speed-up
    (realized), interpolated between its own rows and dense (1x): methods are
    judged by the quality they keep for the speed they buy."""
    dense = [r for r in rows if r["method"] == "dense"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    own = {m: dense + [r for r in rows if r["method"] == m] for m in methods}
    table = []
    for speedup in speedups:
        entry = {"ideal_speedup": speedup}
        entry.update({m: quality_at(own[m], lambda r: r["ideal_speedup_realized"], speedup) for m in methods})
        table.append(entry)
    return table


EQUAL_SPEEDUP_TITLE = ("At equal ideal speed-up (for the realized sparsity; each method interpolated between "
                       "dense and its own rows; perplexity, mean acc_norm in brackets, - where out of its range)")


def equal_speedup_markdown(table: Sequence[dict]) -> str:
    """Perplexity (and mean acc_norm) per method at equal ideal speed-up."""
    return comparison_markdown(table, "ideal_speedup", "ideal speed-up", lambda x: f"{x:.2f}x")


def plot_quality(rows: Sequence[dict], path: str):
    """The frontier: perplexity and mean acc_norm against the ideal decode
    speed-up of the realized sparsity, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Merged runs (scripts/frontier.py) may have tasks on some rows only.
    metrics = [(label, key, value) for label, key, value in (
        ("perplexity", "perplexity", lambda r: r["perplexity"]["ppl"]),
        ("mean acc_norm", "mean_acc_norm", lambda r: r["mean_acc_norm"]),
    ) if any(key in r for r in rows)]
    # A method keeps its colour in every panel, also where it has no points.
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, (label, key, value) in zip(axes[0], metrics):
        for method in dict.fromkeys(r["method"] for r in rows if key in r):
            points = [(r["ideal_speedup_realized"], value(r)) for r in rows if r["method"] == method and key in r]
            if method == "dense":
                ax.axhline(points[0][1], color="gray", linestyle=":", label="dense")
            else:
                ax.plot(*zip(*sorted(points)), marker="o", label=method, color=colors[method])
        if label == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("ideal decode speed-up (realized sparsity)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Perplexity and multiple-choice accuracy, dense and sparsified.")
    add_model_args(parser)
    parser.add_argument("--thresholds", default=None, help="Thresholds file (default: the shipped one)")
    parser.add_argument("--methods", default="dense,cats,chess,chess+,teal,alloc",
                        help=f"Comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--sparsity", default="0.3,0.5,0.7", help="Comma-separated target sparsities")
    parser.add_argument("--speedup", default="1.25,1.35,1.5",
                        help="Comma-separated target ideal speed-ups of the searched allocations (method alloc)")
    parser.add_argument("--ppl", nargs="+", default=None, help="Text or JSONL files for perplexity")
    parser.add_argument("--documents", default=None, help="A slice of the --ppl documents, e.g. '30:'")
    parser.add_argument("--window", type=int, default=512, help="Tokens per perplexity window")
    parser.add_argument("--stride", type=int, default=None, help="Start a window every N tokens (default: --window)")
    parser.add_argument("--tokens", type=int, default=None, help="Perplexity over only the first N tokens")
    parser.add_argument("--spread", action="store_true",
                        help="With --tokens: windows spread evenly over all the documents, not the first N tokens")
    parser.add_argument("--tasks", nargs="+", default=[], help="BIG-bench multiple-choice JSON files")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="Choices scored per forward pass")
    parser.add_argument("--output", default=None, help="Write the results as JSON")
    parser.add_argument("--markdown", default=None, help="Write the results table as Markdown")
    parser.add_argument("--plot", default=None, help="Plot quality against ideal speed-up, the frontier (PNG)")
    return parser


def check_args(args: argparse.Namespace):
    """Fail on bad flags before the model loads."""
    parse_methods(args.methods)
    parse_sparsities(args.sparsity)
    parse_speedups(args.speedup)
    if not args.ppl and not args.tasks:
        raise ChessError("nothing to evaluate: pass --ppl FILES and/or --tasks FILES")
    check_spread(args.tokens, args.spread)
    check_positive(args, "limit", "tokens", "batch_size", "window", "stride")
    for path in (args.output, args.markdown, args.plot):
        if path is not None:
            check_destination(path)


def run(args: argparse.Namespace, model: nn.Module, tokenizer, name: str) -> List[dict]:
    """Everything main does after loading the model (tests pass a tiny one)."""
    methods, sparsities = parse_methods(args.methods), parse_sparsities(args.sparsity)
    thresholds = resolve_thresholds(model, args.thresholds, methods)
    tasks = [load_task(path, args.limit) for path in args.tasks]
    windows = None
    if args.ppl:
        documents = load_documents(args.ppl, args.documents)
        windows = ppl_windows(documents, tokenizer, args.window, args.stride, args.tokens, args.spread)
        if not windows[0]:
            raise ChessError("the --ppl documents are too short for a perplexity window")
    task_names = [t.name for t in tasks]
    if len(set(task_names)) != len(task_names):
        raise ChessError("two task files have the same name")
    described = [f"{sum(windows[1])} perplexity tokens"] if windows else []
    described += [f"{t.name} ({len(t.examples)} examples)" for t in tasks]
    print(f"{name}: {', '.join(described)}")
    header = table_header(windows is not None, task_names)
    widths = [max(8, len(h)) for h in header]
    print(text_line(header, widths), flush=True)
    done: List[dict] = []

    def on_row(row: dict):
        print(text_line(table_cells(row, task_names), widths), flush=True)
        done.append(row)
        # Rewritten after every row: an evaluation takes hours on a CPU, and
        # an interruption keeps what was measured.
        write_outputs(args, done, task_names, name, thresholds)

    rows = evaluate(model, tokenizer, thresholds, methods, sparsities, windows, tasks, args.batch_size,
                    on_row=on_row, speedups=parse_speedups(args.speedup))
    print(comparisons_markdown(rows, args), end="")
    return rows


def comparisons_markdown(rows: Sequence[dict], args: argparse.Namespace) -> str:
    """The equal-sparsity (gate methods) and equal-speed-up tables, titled."""
    text = ""
    equal = equal_sparsity_markdown(at_equal_sparsity(rows))
    if equal:
        text += f"\n{EQUAL_SPARSITY_TITLE}:\n\n{equal}"
    speed = equal_speedup_markdown(at_equal_speedup(rows, parse_speedups(args.speedup)))
    if len(rows) > 1 and speed:
        text += f"\n{EQUAL_SPEEDUP_TITLE}:\n\n{speed}"
    return text


def write_outputs(args: argparse.Namespace, rows: List[dict], task_names: List[str], name: str, thresholds):
    equal = at_equal_sparsity(rows)
    if args.output:
        report = {
            "model": name,
            "thresholds": args.thresholds or ("shipped" if thresholds else None),
            "perplexity": {"files": args.ppl, "documents": args.documents, "window": args.window,
                           "stride": args.stride, "tokens": args.tokens, "spread": args.spread}
            if args.ppl else None,
            "tasks": dict(zip(task_names, args.tasks)),
            "limit": args.limit,
            "rows": rows,
            "at_equal_realized_sparsity": equal,
            "at_equal_ideal_speedup": at_equal_speedup(rows, parse_speedups(args.speedup)),
        }
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(rows, task_names) + comparisons_markdown(rows, args))
    if args.plot:
        plot_quality(rows, args.plot)


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas()
    with cli_errors("chess_mlx.evaluate"):
        check_args(args)
        model, tokenizer, name = load_from_args(args)
        run(args, model, tokenizer, name)


if __name__ == "__main__":
    main()
