"""Reproduce the thresholds shipped for the default model (SmolLM2-135M-Instruct).

    python scripts/calibrate.py [--tokens 32768] [--out chess_mlx/thresholds/smollm2-135m-instruct.safetensors]

Calibrates on the first 30 articles of WikiText-2 validation (../shared/data)
at sparsities 0.1..0.9 and searches allocations (LM head input included) for
ideal speed-ups 1.25x, 1.35x and 1.5x on 2048 tokens spread over those articles; the last 30 articles are held out for
evaluation. Any flag of `python -m chess_mlx.calibrate`
can be passed and overrides the defaults below.
"""

import sys
from pathlib import Path

from chess_mlx.calibrate import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = [
    "--dtype", "float32",
    "--data", str(ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"),
    "--documents", ":30",
    "--tokens", "32768",
    "--out", str(ROOT / "chess_mlx" / "thresholds" / "smollm2-135m-instruct.safetensors"),
]

if __name__ == "__main__":
    sys.argv = [sys.argv[0], *DEFAULTS, *sys.argv[1:]]
    main()
