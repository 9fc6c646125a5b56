"""lm-evaluation-harness model "chess_mlx": a sparsified MLX model on lm-eval's tasks.

    pip install 'chess_mlx[eval]'
    python -m chess_mlx.lm_eval_adapter \\
        --tasks arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,sciq,winogrande \\
        --methods dense,cats,chess,chess+ --sparsity 0.5 --output lm_eval.json

Importing this module registers the model with lm-eval:

    import lm_eval, chess_mlx.lm_eval_adapter
    lm_eval.simple_evaluate(model="chess_mlx", model_args="method=chess,sparsity=0.5", tasks=["piqa"])

Model args: ``model``, ``dtype``, ``thresholds``, ``method``, ``sparsity``, ``speedup`` (alloc),
``batch_size``, ``max_length``. Multiple-choice scoring is chess_mlx.evaluate's;
lm-eval downloads its task data (online).
"""

import argparse
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import lm_eval
import mlx.core as mx
import mlx.nn as nn
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
from mlx_lm.generate import generate_step
from tqdm import tqdm

from .blas import reexec_with_openblas
from .calibrate import parse_speedups, parse_sparsities
from .evaluate import loglikelihoods, score_continuations, start_tokens
from .sparsify import (SparsityTracker, configurations, format_sparsity, parse_methods, sparsify, target_label,
                       track_sparsity, unsparsify)
from .thresholds import Thresholds, check_destination
from .utils import add_model_args, cli_errors, load, resolve_thresholds


@register_model("chess_mlx")
class ChessLM(LM):
    """``model`` is a path or repo id as for chess_mlx.utils.load, or a loaded
    model together with ``tokenizer``; ``thresholds`` a file, a Thresholds, or
    None for the shipped ones. lm-eval's ``device``/``max_batch_size`` are ignored."""

    def __init__(
        self,
        model=None,
        thresholds=None,
        method: str = "chess",
        sparsity: float = 0.5,
        speedup: float = 1.35,
        dtype: Optional[str] = None,
        batch_size=8,
        max_length: int = 2048,
        tokenizer=None,
        **_,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            model, tokenizer, _ = load(model, dtype)
        if method == "dense":
            unsparsify(model)
        else:
            if not isinstance(thresholds, Thresholds):
                thresholds = resolve_thresholds(model, thresholds, [method])
            sparsify(model, thresholds, method, float(speedup if method == "alloc" else sparsity))
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length)
        self.tracker = SparsityTracker()

    def _track(self, fn, *args):
        with track_sparsity(self.model) as tracker:
            result = fn(*args)
        for name, kept in tracker.kept.items():
            self.tracker.kept[name] = self.tracker.kept.get(name, 0) + kept
            self.tracker.total[name] = self.tracker.total.get(name, 0) + tracker.total[name]
        return result

    def realized_sparsity(self) -> dict:
        """Fraction of entries dropped per projection kind over every call so far."""
        return self.tracker.summary()

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        pairs = [req.args for req in requests]
        return self._track(loglikelihoods, self.model, self.tokenizer, pairs, self.batch_size, self.max_length)

    def loglikelihood_rolling(self, requests) -> List[float]:
        return [self._track(self._rolling, req.args[0]) for req in tqdm(requests, desc="rolling", leave=False)]

    def _rolling(self, text: str) -> float:
        prefix = start_tokens(self.tokenizer)
        tokens = list(self.tokenizer.encode(text))
        if tokens[:1] == prefix:
            tokens = tokens[1:]
        total = 0.0
        for pair in get_rolling_token_windows(tokens, prefix[0], self.max_length, context_len=1):
            context, continuation = make_disjoint_window(pair)
            total += score_continuations(self.model, context, [continuation])[0][0]
        return total

    def generate_until(self, requests) -> List[str]:
        return [self._track(self._generate, *req.args) for req in tqdm(requests, desc="generate", leave=False)]

    def _generate(self, context: str, options: dict) -> str:
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else until
        max_tokens = int(options.get("max_gen_toks", 256))
        prompt = list(self.tokenizer.encode(context)) or start_tokens(self.tokenizer)
        prompt = prompt[-max(1, self.max_length - max_tokens):]
        eos = getattr(self.tokenizer, "eos_token_ids", None) or {getattr(self.tokenizer, "eos_token_id", None)}
        tokens, text = [], ""
        for token, _ in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens):
            token = int(token)
            if token in eos:
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens)
            if any(u in text for u in until):
                break
        return cut_at(text, until)


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first stop sequence."""
    ends = [text.find(u) for u in until if u and u in text]
    return text[: min(ends)] if ends else text


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="lm-eval tasks on dense and sparsified models.")
    add_model_args(parser)
    parser.add_argument("--thresholds", default=None, help="Thresholds file (default: the shipped one)")
    parser.add_argument("--methods", default="dense,cats,chess,chess+", help="Comma-separated methods")
    parser.add_argument("--sparsity", default="0.5", help="Comma-separated target sparsities")
    parser.add_argument("--speedup", default="1.35",
                        help="Comma-separated target ideal speed-ups of searched allocations (method alloc)")
    parser.add_argument("--tasks", required=True, help="Comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N examples of each task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="Few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=8, help="Continuations scored per forward pass")
    parser.add_argument("--max-length", type=int, default=2048, help="Longest context in tokens")
    parser.add_argument("--include-path", default=None, help="A folder of extra task YAML files")
    parser.add_argument("--output", default=None, help="Write the results as JSON")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas()
    with cli_errors("chess_mlx.lm_eval_adapter"):
        methods, sparsities = parse_methods(args.methods), parse_sparsities(args.sparsity)
        speedups = parse_speedups(args.speedup)
        if args.output:
            check_destination(args.output)
        model, tokenizer, name = load(args.model, args.dtype)
        thresholds = resolve_thresholds(model, args.thresholds, methods)
        task_manager = TaskManager(include_path=args.include_path)
        rows = []
        for method, setting in configurations(methods, sparsities, speedups):
            lm = ChessLM(model, thresholds, method, setting, speedup=setting, tokenizer=tokenizer,
                         batch_size=args.batch_size, max_length=args.max_length)
            results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), limit=args.limit,
                                              num_fewshot=args.num_fewshot, task_manager=task_manager)
            realized = lm.realized_sparsity()
            print(f"{name} | {method} {target_label(method, setting)} | realized sparsity: {format_sparsity(realized)}")
            print(make_table(results), flush=True)
            rows.append({"method": method, "target": target_label(method, setting), "results": results["results"],
                         "realized_sparsity": realized})
        unsparsify(model)
        if args.output:
            Path(args.output).write_text(json.dumps({"model": name, "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
