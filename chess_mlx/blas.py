"""Use OpenBLAS for float32 matmul on Linux when Debian's package is there.

The mlx[cpu] wheel's float32 matmul falls back to a bundled reference BLAS
that is about 30x slower than OpenBLAS. MLX picks its BLAS when the process
starts, so the only way in is LD_PRELOAD: the command-line tools restart
themselves once with it set. ``CHESS_MLX_NO_OPENBLAS=1`` turns this off.
"""

import os
import sys
from pathlib import Path
from typing import Optional

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)


def openblas_path() -> Optional[str]:
    return next((p for p in CANDIDATES if Path(p).exists()), None)


def blas_in_use() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    if sys.platform == "darwin":
        return "Accelerate"
    return "OpenBLAS (preloaded)" if "openblas" in preload else "MLX's bundled BLAS"


def reexec_with_openblas():
    """Restart this process with OpenBLAS preloaded, if useful and possible."""
    path = openblas_path()
    preload = os.environ.get("LD_PRELOAD", "")
    if (
        not sys.platform.startswith("linux")
        or path is None
        or path in preload
        or os.environ.get("CHESS_MLX_NO_OPENBLAS") == "1"
    ):
        return
    env = dict(os.environ, LD_PRELOAD=f"{path} {preload}".strip())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
