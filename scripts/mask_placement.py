"""Decode speed of chess+ at kept 0.5 by where the kept channels lie.

    python scripts/mask_placement.py                  # 4-bit 1B shapes, random weights
    python scripts/mask_placement.py --reps 8 --run-length 64

CHESS thresholds every FFN channel on its own, so at kept 0.5 the rows the
sparse GEMVs read are scattered (about two neighbouring channels in a run,
as independent coin flips give). This script fixes chess+'s masks instead:
the same half of the gate channels (so of up_proj's rows and down_proj's
input channels) and of q_proj's and o_proj's inputs is kept in every layer
and step, placed ``random`` (each channel on its own, as CHESS keeps them),
in ``runs`` of --run-length neighbouring channels, or as the ``first`` half.
The bytes read are the same; only their placement differs (``first`` also
skips half of each input-sparse projection's scales, ``random`` and short
runs none). The configs decode in turns as the benchmark's do, and each
line gives the median of the paired ratio dense step / this step.
"""

import argparse

import mlx.core as mx
import numpy as np

from chess_mlx.bench import (LLAMA_1B_ARGS, Quantization, Settings, clone, interleaved_step_times, measure_sparsity,
                             quantize, random_ids, random_model)
from chess_mlx.sparsify import decode_dense, default_kernels, model_layers, patch_layers, shared_relayouts
from chess_mlx.thresholds import LayerThresholds

PLACEMENTS = ("first", "runs", "random")


def kept_half(n: int, placement: str, run_length: int, rng: np.random.Generator) -> mx.array:
    """Thresholds keeping half of ``n`` channels (0: kept, inf: dropped)."""
    keep = np.zeros(n, bool)
    if placement == "first":
        keep[: n // 2] = True
    elif placement == "runs":
        for run in rng.permutation(n // run_length)[: n // (2 * run_length)]:
            keep[run * run_length : (run + 1) * run_length] = True
    else:
        keep[rng.permutation(n)[: n // 2]] = True
    return mx.array(np.where(keep, 0.0, np.inf).astype(np.float32))


def fixed_masks(model, placement: str, run_length: int, kernels, seed: int = 0):
    rng = np.random.default_rng(seed)
    args, layers = model.args, model_layers(model)
    plans = [
        LayerThresholds(gate=kept_half(args.intermediate_size, placement, run_length, rng),
                        q_in=kept_half(args.hidden_size, placement, run_length, rng),
                        o_in=kept_half(args.hidden_size, placement, run_length, rng))
        for _ in layers
    ]
    return patch_layers(model, layers, plans, None, kernels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--placements", default=",".join(PLACEMENTS),
                        help=f"Comma-separated, from {', '.join(PLACEMENTS)} (default: all)")
    parser.add_argument("--run-length", type=int, default=8, help="Channels per run for 'runs' (default 8)")
    parser.add_argument("--tokens", type=int, default=16, help="Timed decode steps per rep (default 16)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    placements = args.placements.split(",")
    if not set(placements) <= set(PLACEMENTS) or args.run_length < 1 or args.tokens < 1 or args.reps < 1:
        parser.error(f"placements come from {', '.join(PLACEMENTS)}; run length, tokens and reps are at least 1")
    kernels = default_kernels()
    if kernels is None:
        parser.error("no decode kernels on this device")
    model = random_model(LLAMA_1B_ARGS)
    quantize(model, Quantization())
    prompt = mx.array(random_ids(16, LLAMA_1B_ARGS.vocab_size, 1))
    with shared_relayouts():
        models = [decode_dense(clone(model), kernels)]
        models += [fixed_masks(clone(model), p, args.run_length, kernels) for p in placements]
        mx.eval([m.parameters() for m in models])
        for placement, m in zip(placements, models[1:]):
            kept = {k: round(1 - v, 3) for k, v in measure_sparsity(m, prompt, 2)[0].items()}
            print(f"{placement}: kept {kept}")
        settings = Settings(tokens=args.tokens, warmup=2)
        steps = np.concatenate([interleaved_step_times(models, prompt, settings)[0] for _ in range(args.reps)])
    names = ["dense"] + [f"runs of {args.run_length}" if p == "runs" else p for p in placements]
    for name, column in zip(names, steps.T):
        ratio = steps[:, 0] / column
        q1, median, q3 = np.percentile(ratio, [25, 50, 75])
        print(f"{name:10s} step {1e3 * np.median(column):6.2f} ms   dense / this {median:.3f} (IQR {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
