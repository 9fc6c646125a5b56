"""Quantized GEMV time with every weight copy under its own random mask.

    python scripts/quantized_masks.py                          # down_proj 8192x2048
    python scripts/quantized_masks.py --shape 2048x2048        # q_proj/o_proj
    python scripts/quantized_masks.py --shape 2048x8192 --out  # up_proj, gate-fused
    python scripts/quantized_masks.py --scales-dtype bfloat16  # as mlx-community stores them

In a decode step each layer keeps its own channels, so here each of
--copies random 4-bit weights (more bytes than the last-level cache) gets
its own mask, and the copies run together, as one step's layers do. Prints
microseconds per call with every channel kept, half kept at random, and
none, and half over all. The weights sit on huge pages where decode puts
them (``CHESS_MLX_HUGE_PAGES=0``: not). Run it on an otherwise idle machine.

``--pattern`` places the kept half: ``random`` (each channel on its own, as
CHESS's per-channel thresholds keep them), ``runs`` (random runs of
``--run-length`` neighbouring channels) or ``first`` (the first half): the
same bytes in longer contiguous pieces, to see what scattered rows cost.
"""

import argparse
import time

import mlx.core as mx
import numpy as np

from chess_mlx import cpu_kernels
from chess_mlx.bench import Quantization, kept_vector, quantized_linear
from chess_mlx.quantized import QuantizedInputMajorLinear
from chess_mlx.utils import DTYPES
from chess_mlx.sparsify import out_gemv, weights_to_huge_pages

KEPT = (1.0, 0.5, 0.0)
PATTERNS = ("random", "runs", "first")


def kept_channels(n: int, kept: float, pattern: str, run_length: int, seed: int) -> mx.array:
    """:func:`kept_vector` with the kept channels placed by ``pattern``."""
    if pattern == "random" or kept in (0.0, 1.0):
        return kept_vector(n, kept, seed)
    values = np.abs(np.array(kept_vector(n, 0.0, seed)))
    if pattern == "first":
        values[: round(kept * n)] += 1.0
    else:
        runs = np.random.default_rng(seed).permutation(n // run_length)[: round(kept * n / run_length)]
        for r in runs:
            values[r * run_length : (r + 1) * run_length] += 1.0
    return mx.array(values.astype(np.float32))


def quantized_layers(n_in: int, n_out: int, copies: int, quantization: Quantization) -> list:
    layers = [quantized_linear(mx.random.normal((n_out, n_in)) * n_in**-0.5, quantization) for _ in range(copies)]
    mx.eval([layer.parameters() for layer in layers])
    return layers


def shape(text: str) -> tuple:
    try:
        n_in, n_out = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IN x OUT such as 8192x2048, got '{text}'") from None
    return n_in, n_out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=shape, default="8192x2048",
                        help="IN x OUT (default: down_proj of Llama-3.2-1B)")
    parser.add_argument("--out", action="store_true", help="output-sparse, gate-fused GEMV (up_proj)")
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--scales-dtype", choices=list(DTYPES), default="float32",
                        help="Dtype of scales and biases (activations stay float32)")
    parser.add_argument("--pattern", choices=PATTERNS, default="random",
                        help="Where the kept half lies (default: random channels)")
    parser.add_argument("--run-length", type=int, default=8, help="Channels per run with --pattern runs")
    args = parser.parse_args()
    if args.run_length < 1:
        parser.error(f"--run-length must be at least 1, got {args.run_length}")
    n_in, n_out = args.shape
    quantization = Quantization(args.bits, args.group_size, args.scales_dtype)
    layers = quantized_layers(n_in, n_out, args.copies, quantization)
    if args.out:
        x = kept_vector(n_in, 1.0)[None]
        masks = {k: [kept_channels(n_out, k, args.pattern, args.run_length, i) for i in range(args.copies)]
                 for k in KEPT}

        def call(layer, gate):
            return out_gemv(cpu_kernels, x, layer, gate, 1.0)
    else:
        layers = [QuantizedInputMajorLinear(layer) for layer in layers]
        mx.eval([layer.parameters() for layer in layers])
        masks = {k: [kept_channels(n_in, k, args.pattern, args.run_length, i)[None] for i in range(args.copies)]
                 for k in KEPT}

        def call(layer, x):
            return layer.sparse_gemv(cpu_kernels, x, 1.0)
    for layer in layers:  # where a patched model keeps them (CHESS_MLX_HUGE_PAGES=0: not)
        weights_to_huge_pages(layer, cpu_kernels)
    for mask in masks.values():  # warm-up: thread pool, scratch buffers
        mx.eval([call(layer, m) for layer, m in zip(layers, mask)])
    seconds = {k: [] for k in KEPT}
    for _ in range(args.reps):
        for k, mask in masks.items():
            outputs = [call(layer, m) for layer, m in zip(layers, mask)]
            start = time.perf_counter()
            mx.eval(outputs)
            seconds[k].append((time.perf_counter() - start) / args.copies)
    us = {k: 1e6 * float(np.median(v)) for k, v in seconds.items()}
    print(f"dense {us[1.0]:.0f} us | half {us[0.5]:.0f} ({us[0.5] / us[1.0]:.3f}) | none {us[0.0]:.0f}")


if __name__ == "__main__":
    main()
