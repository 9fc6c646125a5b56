"""Reproduce the decode benchmark (end to end and per kernel) of one model.

    python scripts/bench.py                            # SmolLM2-135M, float32
    python scripts/bench.py --model llama-1b-random --tokens 32 --reps 3
    python scripts/bench.py --methods chess+,teal,alloc --speedup 1.25,1.5

Writes results/bench-<model>.json and .png at the root of the source tree.
Any flag of `python -m chess_mlx.bench` can be passed and overrides the
defaults below. Run it on an otherwise idle machine: the timings are only
as quiet as the machine is.
"""

import argparse
import sys
from pathlib import Path

from chess_mlx.bench import main

ROOT = Path(__file__).resolve().parents[1]


def model_name(argv: list) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default="smollm2")
    name = Path(parser.parse_known_args(argv)[0].model).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


if __name__ == "__main__":
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    name = model_name(sys.argv[1:])
    defaults = [
        "--output", str(results / f"bench-{name}.json"),
        "--plot", str(results / f"bench-{name}.png"),
    ]
    sys.argv = [sys.argv[0], *defaults, *sys.argv[1:]]
    main()
