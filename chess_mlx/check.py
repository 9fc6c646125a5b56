"""Check the Metal sparse kernels on this Mac's GPU against the reference path.

    python -m chess_mlx.check [--shapes 576x1536,1536x576] [--iters 100] [--quantized 4:64,8:64]

For each kernel (float, and quantized for each bits:group_size), shape, dtype
and sparsity it prints pass/fail (against the pure-MLX reference) and the
time per call beside a dense matmul of the same shape (MLX's quantized matmul
for the quantized kernels). Please report the output: these kernels were verified only in
emulation on Linux.
"""

import argparse
import platform
import sys
import time
from typing import Callable, List, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .quantized import QuantizedInputMajorLinear
from .errors import ChessError
from .utils import DTYPES, cli_errors

TOLERANCE = {mx.float16: 2e-2, mx.bfloat16: 5e-2, mx.float32: 1e-4}


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    try:
        return [tuple(int(d) for d in s.split("x")) for s in text.split(",") if s]
    except ValueError:
        raise ChessError(f"--shapes expects INxOUT,INxOUT..., got '{text}'") from None


def time_call(fn: Callable[[], mx.array], iters: int) -> float:
    """Seconds per call, GPU work included (one sync at the end)."""
    mx.eval(fn())
    start = time.perf_counter()
    outputs = [fn() for _ in range(iters)]
    mx.eval(outputs)
    return (time.perf_counter() - start) / iters


def input_with_sparsity(n: int, sparsity: float, dtype) -> Tuple[mx.array, mx.array]:
    """A vector and a scalar threshold that drops about ``sparsity`` of it."""
    x = mx.random.normal((n,)).astype(dtype)
    if sparsity >= 1:
        return x, mx.array([float("inf")])
    k = min(int(sparsity * n), n - 1)
    tau = mx.sort(mx.abs(x.astype(mx.float32)))[k] if sparsity > 0 else mx.array(0.0)
    return x, tau.reshape(1)


def close(a: mx.array, b: mx.array, dtype) -> bool:
    scale = mx.maximum(mx.abs(b.astype(mx.float32)).max(), 1.0)
    return bool(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max() <= TOLERANCE[dtype] * scale)


def check_shape(n_in: int, n_out: int, dtype, sparsities, iters: int) -> bool:
    ok = True
    wt = (mx.random.normal((n_in, n_out)) / n_in**0.5).astype(dtype)
    w = (mx.random.normal((n_out, n_in)) / n_in**0.5).astype(dtype)  # up_proj layout
    x_dense = mx.random.normal((n_in,)).astype(dtype)
    dense_in = time_call(lambda: x_dense @ wt, iters)
    dense_out = time_call(lambda: w @ x_dense, iters)
    for s in sparsities:
        x, tau = input_with_sparsity(n_in, s, dtype)
        got = kernels.sparse_in_gemv(x, wt, tau)
        passed = close(got, kernels.sparse_in_gemv_reference(x, wt, tau), dtype)
        t = time_call(lambda: kernels.sparse_in_gemv(x, wt, tau), iters)
        print(f"sparse_in_gemv       {n_in:>5}x{n_out:<5} {str(dtype):15} s={s:<4} "
              f"{'PASS' if passed else 'FAIL'}  {t * 1e6:8.1f} us  dense {dense_in * 1e6:8.1f} us  "
              f"ratio {t / dense_in:5.2f}")
        gate, gtau = input_with_sparsity(n_out, s, dtype)
        got = kernels.sparse_out_gate_gemv(x_dense, w, gate, gtau)
        passed_out = close(got, kernels.sparse_out_gate_gemv_reference(x_dense, w, gate, gtau), dtype)
        t = time_call(lambda: kernels.sparse_out_gate_gemv(x_dense, w, gate, gtau), iters)
        print(f"sparse_out_gate_gemv {n_in:>5}x{n_out:<5} {str(dtype):15} s={s:<4} "
              f"{'PASS' if passed_out else 'FAIL'}  {t * 1e6:8.1f} us  dense {dense_out * 1e6:8.1f} us  "
              f"ratio {t / dense_out:5.2f}")
        ok = ok and passed and passed_out
    return ok


def parse_quantizations(text: str) -> List[Tuple[int, int]]:
    try:
        return [tuple(int(d) for d in s.split(":")) for s in text.split(",") if s and s != "none"]
    except ValueError:
        raise ChessError(f"--quantized expects BITS:GROUP,BITS:GROUP... or none, got '{text}'") from None


def check_quantized_shape(n_in: int, n_out: int, dtype, sparsities, iters: int, bits: int,
                          group_size: int) -> bool:
    """The quantized kernels on one random affine-quantized layer of this shape."""
    ok = True
    q = nn.QuantizedLinear.from_linear(nn.Linear(n_in, n_out, bias=False), group_size, bits)
    q.set_dtype(dtype)
    relaid = QuantizedInputMajorLinear(q)
    mx.eval(q.parameters(), relaid.parameters())
    x_dense = mx.random.normal((n_in,)).astype(dtype)
    dense = time_call(lambda: q(x_dense[None]), iters)
    name = f"{bits}-bit g{group_size}"
    for s in sparsities:
        x, tau = input_with_sparsity(n_in, s, dtype)
        args = (x, relaid.wq, relaid.scales, relaid.biases, tau, group_size, bits)
        passed = close(kernels.sparse_in_qgemv(*args), kernels.sparse_in_qgemv_reference(*args), dtype)
        t = time_call(lambda: kernels.sparse_in_qgemv(*args), iters)
        print(f"sparse_in_qgemv       {name:9} {n_in:>5}x{n_out:<5} {str(dtype):15} s={s:<4} "
              f"{'PASS' if passed else 'FAIL'}  {t * 1e6:8.1f} us  dense {dense * 1e6:8.1f} us  "
              f"ratio {t / dense:5.2f}")
        gate, gtau = input_with_sparsity(n_out, s, dtype)
        args = (x_dense, q.weight, q.scales, q.biases, gate, gtau, group_size, bits)
        passed_out = close(kernels.sparse_out_gate_qgemv(*args),
                           kernels.sparse_out_gate_qgemv_reference(*args), dtype)
        t = time_call(lambda: kernels.sparse_out_gate_qgemv(*args), iters)
        print(f"sparse_out_gate_qgemv {name:9} {n_in:>5}x{n_out:<5} {str(dtype):15} s={s:<4} "
              f"{'PASS' if passed_out else 'FAIL'}  {t * 1e6:8.1f} us  dense {dense * 1e6:8.1f} us  "
              f"ratio {t / dense:5.2f}")
        ok = ok and passed and passed_out
    return ok


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check the Metal sparse kernels on this GPU.")
    parser.add_argument("--shapes", default="576x1536,1536x576,2048x8192,8192x2048",
                        help="Comma-separated INxOUT weight shapes")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--sparsity", default="0,0.3,0.5,0.7,0.9,1", help="Fractions of inputs dropped")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--quantized", default="4:64,8:64",
                        help="BITS:GROUP_SIZE quantizations for the quantized kernels, or none")
    return parser


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    with cli_errors("chess_mlx.check"):
        if not kernels.metal_available():
            raise ChessError("no Metal GPU here: the kernels run only on Apple silicon "
                             "(on Linux they are tested in emulation: pytest tests/test_kernels.py)")
        shapes = parse_shapes(args.shapes)
        dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
        sparsities = [float(s) for s in args.sparsity.split(",")]
        quantizations = parse_quantizations(args.quantized)
        mx.set_default_device(mx.gpu)
        print(f"{platform.platform()} | mlx {mx.__version__} | {mx.metal.device_info().get('device_name', '?')}")
        results = [check_shape(n_in, n_out, d, sparsities, args.iters) for n_in, n_out in shapes for d in dtypes]
        results += [
            check_quantized_shape(n_in, n_out, d, sparsities, args.iters, bits, group_size)
            for bits, group_size in quantizations
            for n_in, n_out in shapes
            if n_in % group_size == 0 and n_out % (32 // bits) == 0
            for d in dtypes
        ]
        ok = all(results)
        print("ALL PASS" if ok else "SOME CHECKS FAILED")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
