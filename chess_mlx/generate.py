"""Generate text with a sparsified model: ``mlx_lm.generate`` plus CHESS.

    python -m chess_mlx.generate --prompt "What is the capital of France?"
"""

import argparse
import sys

import mlx.core as mx
from mlx_lm.generate import str2bool, stream_generate
from mlx_lm.sample_utils import make_sampler

from .blas import reexec_with_openblas
from .errors import ChessError
from .sparsify import METHODS, decode_dense, format_sparsity, kernel_backend, sparsify, track_sparsity
from .utils import add_model_args, cli_errors, load_from_args, resolve_thresholds

DEFAULT_PROMPT = "What is the capital of France?"


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sparse LLM generation with CHESS thresholds.")
    add_model_args(parser)
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Message to the model ('-' reads stdin)")
    parser.add_argument("--max-tokens", "-m", type=int, default=100, help="Maximum number of tokens to generate")
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="Sampling top-p")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument("--system-prompt", default=None, help="System prompt for the chat template")
    parser.add_argument("--ignore-chat-template", action="store_true",
                        help="Use the raw prompt without the tokenizer's chat template")
    parser.add_argument("--verbose", type=str2bool, default=True,
                        help="Print timing and sparsity ('True'), or only the response ('False')")
    parser.add_argument("--thresholds", default=None,
                        help="Thresholds file from chess_mlx.calibrate (default: the ones shipped for the model)")
    parser.add_argument("--method", choices=METHODS, default="chess+", help="Sparsification method")
    parser.add_argument("--sparsity", type=float, default=0.5, help="Target sparsity (one of the calibrated ones)")
    parser.add_argument("--speedup", type=float, default=1.35,
                        help="Target ideal speed-up of a searched allocation (--method alloc; one of the calibrated ones)")
    return parser


def build_prompt(tokenizer, args) -> list:
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if not use_chat_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas()
    with cli_errors("chess_mlx.generate"):
        if args.max_tokens < 1:
            raise ChessError(f"--max-tokens must be positive, got {args.max_tokens}")
        if not 0 <= args.sparsity < 1:
            raise ChessError(f"sparsity must be in [0, 1), got {args.sparsity:g}")
        if args.method == "alloc" and not args.speedup > 1:
            raise ChessError(f"--speedup must be above 1, got {args.speedup:g}")
        setting = args.speedup if args.method == "alloc" else args.sparsity
        if args.seed is not None:
            mx.random.seed(args.seed)
        model, tokenizer, name = load_from_args(args)
        thresholds = resolve_thresholds(model, args.thresholds, [args.method])
        if thresholds is not None:
            sparsify(model, thresholds, args.method, setting)
        else:  # dense: the kernels with nothing dropped, the baseline the methods save against
            decode_dense(model)
        prompt = build_prompt(tokenizer, args)
        sampler = make_sampler(args.temp, args.top_p)

        if args.verbose:
            target = f"speed-up {setting:g}x" if args.method == "alloc" else f"sparsity {setting:g}"
            method = "method dense" if args.method == "dense" else f"method {args.method}, {target}"
            print(f"Model: {name} | {method} | decode: {kernel_backend(model)}")
            print("=" * 10)
        text, response = [], None
        with track_sparsity(model) as tracker:
            for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler):
                text.append(response.text)
                if args.verbose:
                    print(response.text, end="", flush=True)
        if not args.verbose:
            print("".join(text))
            return
        print()
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
        if args.method != "dense":
            print(f"Realized sparsity (prompt and generation): {format_sparsity(tracker.summary())}")


if __name__ == "__main__":
    main()
