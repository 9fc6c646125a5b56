"""Evaluate the default model (SmolLM2-135M-Instruct) dense and sparsified.

    python scripts/evaluate.py [--limit 200] [--tokens 16384] [--output evaluation.json]

Perplexity on the last 30 articles of WikiText-2 validation (held out from
the shipped thresholds' calibration) and acc_norm on the four BIG-bench tasks
in ../shared/data/bigbench, for dense, CATS, CHESS and CHESS+ at 0.3, 0.5 and
0.7. Writes evaluation.json, evaluation.md and evaluation.png in the current
folder. Any flag of `python -m chess_mlx.evaluate` can be passed and
overrides the defaults below.
"""

import sys
from pathlib import Path

from chess_mlx.evaluate import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ["social_iqa", "goal_step_wikihow_goal_inference", "strategyqa", "physical_intuition"]
DEFAULTS = [
    "--dtype", "float32",
    "--methods", "dense,cats,chess,chess+",
    "--sparsity", "0.3,0.5,0.7",
    "--ppl", str(DATA / "wikitext-2-valid.txt"),
    "--documents", "30:",
    "--tokens", "16384",
    "--tasks", *[str(DATA / "bigbench" / f"{task}.json") for task in TASKS],
    "--limit", "200",
    "--output", "evaluation.json",
    "--markdown", "evaluation.md",
    "--plot", "evaluation.png",
]

if __name__ == "__main__":
    sys.argv = [sys.argv[0], *DEFAULTS, *sys.argv[1:]]
    main()
