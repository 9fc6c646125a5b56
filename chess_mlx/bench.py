"""Decode speed of CHESS sparsity: end to end, and per sparse kernel.

    python -m chess_mlx.bench --output bench.json --plot bench.png
    python -m chess_mlx.bench --model llama-1b-random --tokens 32 --reps 3
    python -m chess_mlx.bench --short          # CI: under a minute on SmolLM2

End to end: tokens/s of greedy decoding (a short prompt prefilled into a KV
cache, then single-token steps, pipelined as mlx_lm.generate runs them) for
stock mlx-lm (the unpatched model), our dense path (patched at sparsity 0:
the kernels keep every channel) and every method at every sparsity. Each
config decodes on its own copy of the model (the weights and their
re-layouts shared), and the configs take turns of a few steps, so that
changing machine load hits them alike: speed-ups are medians of step times
paired within one turn.
Realized sparsity comes from a separate untimed pass. Kernel level: time of
each projection's sparse GEMV versus the kept fraction of channels, beside
the ideal (kept fraction times the kernel's time at 1) and MLX's dense
matmul.

Methods: cats, chess, chess+ and teal at each --sparsity, alloc (a searched
per-layer allocation) at each target ideal speed-up of --speedup.
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from . import __version__
from .blas import blas_in_use, reexec_with_openblas
from .allocation import search_allocations
from .calibrate import calibrate, parse_speedups, parse_sparsities, spread_tokens
from .costs import (Shapes, layers_speedup, model_params, planned_head_sparsity, planned_sparsity,
                    realized_head_sparsity, realized_sparsity)
from .errors import ChessError
from .quantized import QuantizedInputMajorLinear, half_scales
from .sparsify import (
    configurations, decode_dense, default_kernels, huge_pages_enabled, kernel_backend, lm_head, model_layers, out_gemv,
    parse_methods, shared_relayouts, sparsify, target_label, track_sparsity, unsparsify, weights_to_huge_pages,
)
from .thresholds import Thresholds, check_destination, linear_dims, load_thresholds
from .utils import DTYPES, cli_errors, load, shipped_thresholds

LLAMA_1B_ARGS = llama.ModelArgs(
    model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
    vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
)
CALIBRATION_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-valid.txt"
PROMPT = "The history of the city begins in the Roman period, when a small settlement grew up beside the river"
STOCK, DENSE = "mlx-lm", "dense"
# Sparsity levels the allocation search may pick from when bench calibrates itself.
ALLOCATION_GRID = tuple(i / 10 for i in range(1, 10))
# Tokens the allocation search runs on when bench calibrates itself. The
# allocation's quality is meaningless here (few tokens, maybe random weights):
# only its byte allocation matters for speed. Each probe of the search streams
# a block's weights, so its time grows slowly with tokens: on the Llama-3.2-1B
# shapes (2 busy CPU cores) 4-6 minutes on 32-64 tokens, about 17 on 256.
ALLOCATION_TOKENS = 64


@dataclass
class Settings:
    tokens: int = 64  # timed decode steps per rep (rounded up to whole turns)
    turn_steps: int = 4  # decode steps each config runs per turn
    reps: int = 5
    warmup: int = 2  # untimed decode steps before each timed run
    prompt_tokens: int = 16  # models without a tokenizer get this many random ids
    kernel_reps: int = 10
    kept: Tuple[float, ...] = tuple(i / 10 for i in range(11))
    # Decode streams every weight from memory once; cycling through weight
    # copies larger than the last-level cache keeps kernel timings memory-bound.
    cold_bytes: int = 256 << 20
    calibration_windows: Tuple[int, int] = (4, 512)  # count, tokens each


SHORT = Settings(tokens=4, reps=2, warmup=0, kernel_reps=2, kept=(0.0, 0.5, 1.0),
                 cold_bytes=32 << 20, calibration_windows=(2, 64))


@dataclass(frozen=True)
class Config:
    method: str  # STOCK (the unpatched model), DENSE (ours at sparsity 0) or a sparse method
    setting: float = 0.0  # the target sparsity, or for alloc the target ideal speed-up

    @property
    def name(self) -> str:
        if self.method == STOCK:
            return "mlx-lm dense"
        if self.method == DENSE:
            return "chess_mlx dense"
        return f"{self.method} {target_label(self.method, self.setting)}"


def make_configs(
    methods: Sequence[str], sparsities: Sequence[float], speedups: Sequence[float] = ()
) -> List[Config]:
    return [Config(STOCK), Config(DENSE)] + [Config(m, s) for m, s in configurations(methods, sparsities, speedups)]


def apply_config(model: nn.Module, thresholds: Thresholds, config: Config, kernels="auto"):
    if config.method == STOCK:
        unsparsify(model)
    elif config.method == DENSE:
        decode_dense(model, kernels)
    else:
        sparsify(model, thresholds, config.method, config.setting, kernels)
    mx.eval(model.parameters())  # the input-major re-layout happens here, not in the timing


class RecordingKernels:
    """Forwards to ``kernels``, recording each GEMV call while ``recording``."""

    def __init__(self, kernels):
        self._kernels = kernels
        self.recording = False
        self.calls: List[Tuple[Callable, tuple]] = []

    def __getattr__(self, name: str):
        target = getattr(self._kernels, name)
        if not name.startswith("sparse_"):
            return target

        def call(*args):
            if self.recording:
                self.calls.append((target, args))
            return target(*args)

        return call


def record_step_calls(model: nn.Module, prompt: mx.array, recorder: RecordingKernels) -> List[Tuple[Callable, tuple]]:
    """The GEMV calls, with their arguments, of one decode step of ``model``
    (patched with ``recorder``)."""
    cache, y = prefill(model, prompt)
    recorder.recording = True
    decode_steps(model, cache, y, 1)
    recorder.recording = False
    calls, recorder.calls = recorder.calls, []
    return calls


def replay_seconds(calls: Sequence[Tuple[Callable, tuple]]) -> float:
    """Seconds a step's GEMV calls take replayed alone, in step order; the
    rest of the step is everything else: attention, norms, small MLX ops and
    their dispatch."""
    outputs = [fn(*args) for fn, args in calls]
    start = time.perf_counter()
    mx.eval(outputs)
    return time.perf_counter() - start


# --------------------------------------------------------------------------
# Models and thresholds
# --------------------------------------------------------------------------
def random_model(args: llama.ModelArgs, dtype: str = "float32", seed: int = 0) -> nn.Module:
    """A Llama with random weights scaled so every projection keeps the scale
    of its input (std 1/sqrt(fan_in)); embeddings have unit-norm rows."""
    mx.random.seed(seed)
    model = llama.Model(args)
    for _, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            shape = module.weight.shape
            module.weight = (mx.random.normal(shape) * shape[1] ** -0.5).astype(DTYPES[dtype])
            mx.eval(module.weight)  # one at a time: the default init never materializes
    model.set_dtype(DTYPES[dtype])
    mx.eval(model.parameters())
    return model


@dataclass(frozen=True)
class Quantization:
    bits: int = 4
    group_size: int = 64  # mlx-community's default
    scales_dtype: str = "bfloat16"  # of the linears' scales and biases, as mlx-community's


def activation_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype decode runs in: the norms'."""
    return next(v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight"))


def quantize(model: nn.Module, quantization: Quantization) -> str:
    """Quantize a float model in place (every linear and the embedding) as
    ``mlx_lm.convert`` quantizes a checkpoint of ``scales_dtype``, then run
    it in its own dtype as :func:`chess_mlx.utils.load` runs such a
    checkpoint (bfloat16 scales stay bfloat16); its description.
    The random model is calibrated before, in float: MLX's CPU
    quantized matmul would make that prefill slow, and speed does not care."""
    dtype = activation_dtype(model)
    model.set_dtype(DTYPES[quantization.scales_dtype])
    nn.quantize(model, group_size=quantization.group_size, bits=quantization.bits)
    model.set_dtype(dtype)
    half_scales(model)
    mx.eval(model.parameters())
    scales = model_layers(model)[0].mlp.gate_proj.scales.dtype
    return f"{quantization.bits}-bit, group {quantization.group_size}, {dtype_name(scales)} scales"


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def quantized_linear(weight: mx.array, quantization: Quantization) -> nn.QuantizedLinear:
    """``weight`` (``[out, in]``, no bias) quantized, its scales and biases in
    ``quantization.scales_dtype``."""
    n_out, n_in = weight.shape
    layer = nn.QuantizedLinear(n_in, n_out, False, quantization.group_size, quantization.bits)
    layer.weight, scales, biases = mx.quantize(weight, quantization.group_size, quantization.bits)
    layer.scales, layer.biases = (a.astype(DTYPES[quantization.scales_dtype]) for a in (scales, biases))
    return layer


def is_quantized(model: nn.Module) -> bool:
    return isinstance(model_layers(model)[0].mlp.gate_proj, nn.QuantizedLinear)


def load_model(
    name: str, dtype: str, quantization: Optional[Quantization] = None
) -> Tuple[nn.Module, Optional[object], str]:
    """``(model, tokenizer or None, description)`` for a --model value.
    With ``quantization`` stored models keep their quantized weights; the
    random model stays float here (see :func:`quantize`)."""
    if name == "llama-1b-random":
        return random_model(LLAMA_1B_ARGS, dtype), None, "random weights, Llama-3.2-1B shapes"
    model, tokenizer, label = load(None if name == "smollm2" else name, None if quantization else dtype)
    if quantization is not None and not is_quantized(model):
        raise ChessError(f"--quantized: model '{name}' stores no quantized weights")
    return model, tokenizer, label


def random_ids(shape, vocab: int, seed: int) -> list:
    return np.random.default_rng(seed).integers(0, vocab, shape).tolist()


def calibration_windows(
    tokenizer, vocab: int, data: Optional[str], settings: Settings
) -> Tuple[List[List[int]], str]:
    from .data import load_documents, token_windows

    count, length = settings.calibration_windows
    if tokenizer is None:
        # Random weights: thresholds only need the right shapes and scales, so
        # few tokens do (prefill of a 1B model is slow on a CPU).
        count, length = min(count, 2), min(length, 128)
        return random_ids((count, length), vocab, 0), f"{count * length} random tokens"
    path = Path(data) if data else CALIBRATION_TEXT
    if not path.is_file():
        raise ChessError(
            "no shipped thresholds fit this model and no calibration text was found: pass "
            "--thresholds FILE (from python -m chess_mlx.calibrate) or --calibration-data TEXT"
        )
    # The first 30 WikiText articles are the calibration split (see README).
    documents = load_documents([str(path)], ":30" if data is None else None)
    windows = token_windows(documents, tokenizer, length, count * length)
    return windows, f"{count * length} tokens of {path.name}"


def calibrate_here(
    model: nn.Module, windows: Sequence[Sequence[int]], methods: Sequence[str], sparsities: Sequence[float],
    speedups: Sequence[float], progress: bool = True,
) -> Thresholds:
    """Thresholds at ``sparsities`` and, when alloc is asked, allocations for
    ``speedups`` searched over the levels 0.1..0.9 (plus ``sparsities``) on the
    first ALLOCATION_TOKENS tokens: only the bytes an allocation skips matter
    to the bench, not its quality."""
    if "alloc" not in methods:
        return calibrate(model, windows, sparsities, progress=progress)
    levels = sorted(set(sparsities) | set(ALLOCATION_GRID))
    thresholds = calibrate(model, windows, levels, progress=progress)
    return search_allocations(model, thresholds, spread_tokens(windows, ALLOCATION_TOKENS), speedups, progress)


def resolve_thresholds(
    model: nn.Module, tokenizer, args: argparse.Namespace, methods: Sequence[str], sparsities: Sequence[float],
    speedups: Sequence[float], settings: Settings,
) -> Tuple[Thresholds, str]:
    """Thresholds from --thresholds, else the shipped ones, else calibrated
    here on a few windows (good enough for speed, not for accuracy)."""
    if args.thresholds:
        thresholds, source = load_thresholds(args.thresholds), Path(args.thresholds).name
    elif tokenizer is not None and (shipped := shipped_thresholds(model)) is not None:
        thresholds, source = shipped, "shipped with chess_mlx"
    else:
        vocab = model_shapes(model).vocab
        windows, what = calibration_windows(tokenizer, vocab, args.calibration_data, settings)
        thresholds = calibrate_here(model, windows, methods, sparsities, speedups)
        source = f"calibrated here on {what}"
        if "alloc" in methods:
            source += f" (allocations searched on the first {ALLOCATION_TOKENS})"
    thresholds.validate(model)
    check_thresholds(thresholds, methods, sparsities, speedups)
    return thresholds, source


def check_thresholds(thresholds: Thresholds, methods: Sequence[str], sparsities: Sequence[float],
                     speedups: Sequence[float]):
    """A one-line error now, not after minutes of timing, for a missing
    sparsity, allocation or input threshold (teal and alloc need a recent file)."""
    for method, setting in configurations(methods, sparsities, speedups):
        thresholds.layer_thresholds(method, setting)


def model_shapes(model: nn.Module) -> Shapes:
    """The layer shapes :mod:`chess_mlx.costs` needs, read from an unpatched model."""
    layers = model_layers(model)
    attn, mlp = layers[0].self_attn, layers[0].mlp
    hidden, ffn = linear_dims(mlp.gate_proj)
    attn_width = linear_dims(attn.q_proj)[1]
    kv_width = linear_dims(attn.k_proj)[1]
    heads = getattr(attn, "n_heads", attn_width)
    head_dim = attn_width // heads
    embed = getattr(model, "model", model).embed_tokens
    return Shapes(hidden=hidden, intermediate=ffn, layers=len(layers), heads=heads,
                  kv_heads=kv_width // head_dim, head_dim=head_dim, vocab=embed.weight.shape[0])


def prompt_ids(tokenizer, vocab: int, settings: Settings) -> mx.array:
    if tokenizer is None:
        return mx.array(random_ids(settings.prompt_tokens, vocab, 1))
    return mx.array(tokenizer.encode(PROMPT))


# --------------------------------------------------------------------------
# End-to-end decode
# --------------------------------------------------------------------------
def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits[:, -1], axis=-1)


def prefill(model: nn.Module, prompt: mx.array) -> Tuple[list, mx.array]:
    cache = make_prompt_cache(model)
    y = greedy(model(prompt[None], cache=cache))
    mx.eval(y, [c.state for c in cache])
    return cache, y


def decode_steps(model: nn.Module, cache: list, y: mx.array, steps: int) -> mx.array:
    for _ in range(steps):
        y = greedy(model(y[:, None], cache=cache))
        mx.eval(y)
    return y


def clone(model: nn.Module) -> nn.Module:
    """A copy of ``model`` holding the same weight arrays (no memory copied)."""
    return copy.deepcopy(model, {id(a): a for _, a in tree_flatten(model.parameters())})


def swap_kernels(model: nn.Module, old, new):
    """Point the patched modules that decode through ``old`` at ``new``."""
    for _, module in model.named_modules():
        if getattr(module, "_kernels", None) is old:
            module._kernels = new


def pipelined_steps(model: nn.Module, cache: list, y: mx.array, steps: int) -> Tuple[float, mx.array]:
    """Seconds per step of ``steps`` decode steps run as mlx_lm.generate runs
    them: each step's graph is built while the step before evaluates
    (``mx.async_eval``). The first step's graph is built before the clock
    starts, as it would have been during the step before in a running
    generation."""
    following = greedy(model(y[:, None], cache=cache))
    start = time.perf_counter()
    mx.async_eval(following)
    for step in range(steps):
        y = following
        if step + 1 < steps:
            following = greedy(model(y[:, None], cache=cache))
            mx.async_eval(following)
        mx.eval(y)  # where generate reads the token
    return (time.perf_counter() - start) / steps, y


def turns(settings: Settings) -> int:
    return -(-settings.tokens // settings.turn_steps)


def interleaved_step_times(
    models: Sequence[nn.Module], prompt: mx.array, settings: Settings,
    step_calls: Optional[Sequence[Optional[list]]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Seconds per decode step, ``[turns, models]``: every model prefills
    and warms up, then the models take turns, ``settings.turn_steps``
    pipelined steps each (:func:`pipelined_steps`), in reverse order every
    other turn. After each turn, each model's recorded GEMV calls
    (``step_calls``) are replayed, so a step and its GEMVs alone are timed
    moments apart; their seconds come second (NaN without calls)."""
    states = []
    for model in models:
        cache, y = prefill(model, prompt)
        states.append([cache, decode_steps(model, cache, y, settings.warmup)])
    times = np.zeros((turns(settings), len(models)))
    replays = np.full((turns(settings), len(models)), np.nan)
    for turn in range(turns(settings)):
        # Every other turn in reverse order: no config always goes first.
        order = range(len(models)) if turn % 2 == 0 else reversed(range(len(models)))
        for i in order:
            model, state = models[i], states[i]
            times[turn, i], state[1] = pipelined_steps(model, state[0], state[1], settings.turn_steps)
        for i, calls in enumerate(step_calls or ()):
            if calls:
                replays[turn, i] = replay_seconds(calls)
    return times, replays


def rep_step_times(
    configs: Sequence[Config], models: Dict[Config, nn.Module], step_calls: Dict[Config, list],
    prompt: mx.array, settings: Settings,
) -> Tuple[np.ndarray, np.ndarray]:
    """One rep of :func:`interleaved_step_times` for ``configs``, ``[turns,
    configs]``: our configs take turns with each other, and stock mlx-lm
    runs its steps in a block of its own. In the turns, its long steps
    (about 0.85 s on the 4-bit 1B model) slowed the step that came next,
    always our dense path's, which inflated chess+ 0.5's paired ratio from
    about 1.18 to 1.22 (ad hoc A/B, README)."""
    ours = [c for c in configs if c.method != STOCK]
    alone = [c for c in configs if c.method == STOCK]
    times = np.zeros((turns(settings), len(configs)))
    replays = np.full((turns(settings), len(configs)), np.nan)
    for group in (ours, alone):
        if not group:
            continue
        t, r = interleaved_step_times([models[c] for c in group], prompt, settings, [step_calls.get(c) for c in group])
        columns = [configs.index(c) for c in group]
        times[:, columns], replays[:, columns] = t, r
    return times, replays


def measure_sparsity(model: nn.Module, prompt: mx.array, steps: int) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Dropped fraction over decode steps (prompt excluded): per projection
    kind, and per 'layers.N.kind' (what :func:`costs.realized_sparsity` reads)."""
    cache, y = prefill(model, prompt)
    with track_sparsity(model) as tracker:
        decode_steps(model, cache, y, steps)
    return tracker.summary(), tracker.sparsity()


def step_split(steps: np.ndarray, replays: np.ndarray) -> Dict[str, Optional[float]]:
    """Median ms of a step's GEMVs replayed alone, and of the rest of the
    step (step minus replay, paired per turn); None without replays."""
    paired = ~np.isnan(replays)
    if not paired.any():
        return {"kernel_ms_per_step": None, "other_ms_per_step": None}
    return {"kernel_ms_per_step": 1e3 * float(np.median(replays[paired])),
            "other_ms_per_step": 1e3 * float(np.median(steps[paired] - replays[paired]))}


def spread(values: Sequence[float]) -> Dict[str, float]:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "min": float(np.min(values)), "max": float(np.max(values)),
            "q1": float(q1), "q3": float(q3)}


@dataclass
class Ideal:
    """Ideal speed-ups from the weights each layer's projections skip, with
    the LM head's weights counted at its bytes per weight over the layers'
    (``head_ratio``: quantized models may store it at another width)."""

    layer_params: List[Dict[str, int]]
    head: float  # LM head weights times head_ratio

    @classmethod
    def of(cls, model: nn.Module, head_ratio: float = 1.0) -> "Ideal":
        layer_params, head = model_params(unsparsify(model))
        return cls(layer_params, head * head_ratio)

    def planned(self, thresholds: Thresholds, method: str, setting: float) -> float:
        if method in (STOCK, DENSE):
            return 1.0
        planned = planned_sparsity(thresholds, method, setting, len(self.layer_params))
        head = planned_head_sparsity(thresholds, method, setting)
        return float(layers_speedup(self.layer_params, self.head, planned, head))

    def realized(self, per_layer: Dict[str, float]) -> float:
        """For the realized sparsity: a tracker's 'layers.N.kind' (and 'lm_head') fractions."""
        realized = realized_sparsity(per_layer, len(self.layer_params))
        return float(layers_speedup(self.layer_params, self.head, realized, realized_head_sparsity(per_layer)))


def bytes_per_weight(module: nn.Module, n_weights: int) -> float:
    """Bytes of ``module``'s arrays (codes, scales and biases when quantized) per weight."""
    return sum(v.nbytes for _, v in tree_flatten(module.parameters())) / n_weights


def head_ratio(model: nn.Module, shapes: Shapes) -> float:
    """LM head bytes per weight over the layers' (1 unless stored differently)."""
    layer = bytes_per_weight(model_layers(model)[0].mlp.gate_proj, shapes.hidden * shapes.intermediate)
    return bytes_per_weight(lm_head(model), shapes.vocab * shapes.hidden) / layer


def bench_decode(
    model: nn.Module,
    thresholds: Thresholds,
    prompt: mx.array,
    configs: Sequence[Config],
    settings: Settings,
    ideal: Ideal,
    bar: tqdm,
) -> List[Dict]:
    """One row per config: tokens/s per rep, speed-ups (medians of step
    times paired within a turn), sparsity and the ideal speed-up, targeted
    and realized."""
    models, paths, sparsity, per_layer, step_calls = {}, {}, {}, {}, {}
    kernels = default_kernels()
    bar.set_description("decode (set-up, sparsity)")
    with shared_relayouts():
        for config in configs:
            models[config] = model if config.method == STOCK else clone(model)
            # Stock mlx-lm runs none of our GEMVs; the others record one step's.
            recorder = RecordingKernels(kernels) if kernels is not None and config.method != STOCK else None
            apply_config(models[config], thresholds, config, recorder)
            paths[config] = "mlx-lm (unpatched)" if config.method == STOCK else kernel_backend(models[config])
            sparsity[config], per_layer[config] = measure_sparsity(models[config], prompt, settings.tokens)
            if recorder is not None:
                step_calls[config] = record_step_calls(models[config], prompt, recorder)
                swap_kernels(models[config], recorder, kernels)
            bar.update()
    bar.set_description("decode")
    times, replays = [], []  # per rep: [steps, configs]
    for _ in range(settings.reps):
        rep_times, rep_replays = rep_step_times(configs, models, step_calls, prompt, settings)
        times.append(rep_times)
        replays.append(rep_replays)
        bar.update(len(configs))
    steps, replayed = np.concatenate(times), np.concatenate(replays)
    stock, dense = steps[:, 0], steps[:, 1]
    rows = []
    for i, config in enumerate(configs):
        tps = np.array([1.0 / t[:, i].mean() for t in times])
        dense_row = config.method in (STOCK, DENSE)
        rows.append({
            "config": config.name,
            "method": config.method,
            "target": None if dense_row else target_label(config.method, config.setting),
            "sparsity": None if config.method == "alloc" else config.setting,
            "target_speedup": config.setting if config.method == "alloc" else None,
            "decode_path": paths[config],
            "tokens_per_s": {**spread(tps), "reps": tps.tolist()},
            "step_ms": spread(1e3 * steps[:, i]),
            # Paired per turn: the configs' steps ran within moments of each other.
            "speedup": spread(stock / steps[:, i]),
            "speedup_vs_dense_path": spread(dense / steps[:, i]),
            "ideal_speedup": ideal.planned(thresholds, config.method, config.setting),
            "ideal_speedup_realized": ideal.realized(per_layer[config]),
            "realized_sparsity": sparsity[config],
            # Where a step goes: its GEMV calls replayed alone in the same turn, and the rest.
            **step_split(steps[:, i], replayed[:, i]),
        })
    unsparsify(model)
    return rows


# --------------------------------------------------------------------------
# Kernel level
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelShape:
    projections: Tuple[str, ...]
    kernel: str  # "sparse_in_gemv" or "sparse_out_gate_gemv"
    n_in: int
    n_out: int


def kernel_shapes(shapes: Shapes, methods: Sequence[str] = ()) -> List[KernelShape]:
    """The GEMV each sparsified projection runs at decode, one per distinct
    shape; teal and alloc also make k/v and gate/up input-sparse."""
    attn, h, f = shapes.heads * shapes.head_dim, shapes.hidden, shapes.intermediate
    kv = shapes.kv_heads * shapes.head_dim
    wanted = [("q_proj", "sparse_in_gemv", h, attn), ("o_proj", "sparse_in_gemv", attn, h),
              ("up_proj", "sparse_out_gate_gemv", h, f), ("down_proj", "sparse_in_gemv", f, h)]
    if {"teal", "alloc"} & set(methods):
        wanted[1:1] = [("k_proj", "sparse_in_gemv", h, kv), ("v_proj", "sparse_in_gemv", h, kv)]
        wanted[-1:-1] = [("gate_proj", "sparse_in_gemv", h, f), ("up_proj", "sparse_in_gemv", h, f)]
    merged: Dict[Tuple, List[str]] = {}
    for name, kernel, n_in, n_out in wanted:
        merged.setdefault((kernel, n_in, n_out), []).append(name)
    return [KernelShape(tuple(names), *key) for key, names in merged.items()]


def kept_vector(n: int, kept: float, seed: int = 0) -> mx.array:
    """``n`` values of which exactly ``round(kept * n)``, at random places,
    reach the threshold 1.0."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.0, 0.5, n)
    values[rng.permutation(n)[: round(kept * n)]] += 1.0
    return mx.array((values * rng.choice([-1.0, 1.0], n)).astype(np.float32))


def time_per_call(call: Callable[[mx.array], mx.array], weights: Sequence[mx.array]) -> float:
    """Seconds per call, one call per weight copy, evaluated together."""
    outputs = [call(w) for w in weights]  # lazy: nothing has run yet
    start = time.perf_counter()
    mx.eval(outputs)
    return (time.perf_counter() - start) / len(weights)


def kernel_calls(
    shape: KernelShape, kernels, kept: Sequence[float], dtype, quantization: Optional[Quantization] = None
) -> Dict[object, Callable]:
    """Per kept fraction the kernel call, and under "mlx" MLX's dense matmul
    as the stock layer does it (``x @ W.T`` on the ``[out, in]`` weight, or
    QuantizedLinear's quantized matmul)."""
    x = kept_vector(shape.n_in, 1.0).astype(dtype)[None]  # one row, as a decode step has
    if quantization is None:
        calls: Dict[object, Callable] = {"mlx": lambda w: x @ w.T}
    else:
        calls = {"mlx": lambda layer: layer(x)}
    for k in kept:
        if shape.kernel == "sparse_in_gemv":
            xk = kept_vector(shape.n_in, k).astype(dtype)[None]
            if quantization is None:
                calls[k] = lambda wt, xk=xk: kernels.sparse_in_gemv(xk, wt, 1.0)
            else:
                calls[k] = lambda w, xk=xk: w.sparse_gemv(kernels, xk, 1.0)
        else:
            gate = kept_vector(shape.n_out, k).astype(dtype)
            if quantization is None:
                calls[k] = lambda w, gate=gate: kernels.sparse_out_gate_gemv(x, w, gate, 1.0)
            else:
                calls[k] = lambda layer, gate=gate: out_gemv(kernels, x, layer, gate, 1.0)
    return calls


def weight_copies(
    shape: KernelShape, settings: Settings, dtype, quantization: Optional[Quantization] = None, kernels=None
) -> Tuple[list, list, int]:
    """Random weights in the kernel's layout and in the stock layer's, enough
    copies to exceed ``settings.cold_bytes``, and the bytes of one copy.
    Quantized copies are QuantizedLinear layers and their input-major re-layouts."""
    params = shape.n_in * shape.n_out
    size = params * dtype.size if quantization is None else params * quantization.bits // 8
    count = int(min(256, max(2, -(-settings.cold_bytes // size))))
    scale = shape.n_in**-0.5
    linear = [(mx.random.normal((shape.n_out, shape.n_in)) * scale).astype(dtype) for _ in range(count)]
    mx.eval(linear)
    if quantization is not None:
        layers = []
        for w in linear:
            layer = quantized_linear(w, quantization)
            mx.eval(layer.parameters())
            layers.append(layer)
        size = int(bytes_per_weight(layers[0], params) * params)
        if shape.kernel == "sparse_out_gate_gemv":
            return on_huge_pages(layers, kernels), layers, size
        relaid = [QuantizedInputMajorLinear(layer) for layer in layers]
        mx.eval([r.parameters() for r in relaid])
        return on_huge_pages(relaid, kernels), layers, size
    if shape.kernel == "sparse_out_gate_gemv":
        return on_huge_pages(linear, kernels), linear, size
    layout = [(mx.random.normal((shape.n_in, shape.n_out)) * scale).astype(dtype) for _ in range(count)]
    mx.eval(layout)
    return on_huge_pages(layout, kernels), linear, size


def on_huge_pages(weights: list, kernels) -> list:
    """The kernels' weight copies where a patched model keeps its weights:
    on huge pages where :func:`sparsify.weights_to_huge_pages` moves them.
    Layers the stock path also reads are moved for both."""
    if not huge_pages_enabled(kernels):
        return weights
    if isinstance(weights[0], nn.Module):
        for layer in weights:
            weights_to_huge_pages(layer, kernels)
        return weights
    return [kernels.huge_page_copies([w])[0] for w in weights]


def bench_kernels(
    shapes: Shapes, kernels, settings: Settings, dtype, bar: tqdm, quantization: Optional[Quantization] = None,
    methods: Sequence[str] = (),
) -> List[Dict]:
    """Per projection shape: kernel time versus kept fraction, interleaved over reps."""
    kept = sorted(set(settings.kept) | {1.0})
    rows = []
    bar.set_description("kernels")
    for shape in kernel_shapes(shapes, methods):
        sparse_weights, linear_weights, size = weight_copies(shape, settings, dtype, quantization, kernels)
        calls = kernel_calls(shape, kernels, kept, dtype, quantization)
        weights = {key: linear_weights if key == "mlx" else sparse_weights for key in calls}
        for key, call in calls.items():  # warm-up
            time_per_call(call, weights[key][:2])
        times = {key: [] for key in calls}
        for _ in range(settings.kernel_reps):
            for key, call in calls.items():
                times[key].append(time_per_call(call, weights[key]) * 1e6)
                bar.update()
        row = kernel_row(shape, len(sparse_weights), times, size)
        if quantization is not None:
            row["kernel"] = row["kernel"].replace("_gemv", "_qgemv")
        rows.append(row)
        del sparse_weights, linear_weights, weights
    return rows


def kernel_row(shape: KernelShape, copies: int, times: Dict[object, List[float]], size: int) -> Dict:
    full = float(np.median(times[1.0]))
    mlx_dense = spread(times["mlx"])
    return {
        "projections": list(shape.projections),
        "kernel": shape.kernel,
        "in": shape.n_in,
        "out": shape.n_out,
        "weight_bytes": size,
        "copies": copies,
        "mlx_dense_us": mlx_dense,
        "mlx_dense_gb_per_s": size / mlx_dense["median"] / 1e3,
        "kernel_dense_gb_per_s": size / full / 1e3,
        "points": [
            {"kept": k, "time_us": spread(v), "ideal_us": k * full}
            for k, v in times.items() if k != "mlx"
        ],
    }


# --------------------------------------------------------------------------
# Machine, output
# --------------------------------------------------------------------------
def cpu_model() -> Optional[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or None


def kernel_info(kernels) -> Dict[str, object]:
    """Which decode kernels run, and how (threads and ISA for the CPU ones)."""
    from . import cpu_kernels

    if kernels is None:
        reason = cpu_kernels.unavailable_reason() if mx.default_device() == mx.cpu else "Metal unavailable"
        return {"kernels": "none (reference path)", "reason": reason}
    if kernels is cpu_kernels:
        return {"kernels": "CPU extension", "threads": cpu_kernels.get_num_threads(),
                "isa": cpu_kernels.kernel_isa(), "huge_pages": huge_pages_enabled(kernels),
                "transparent_huge_pages": cpu_kernels.transparent_huge_pages()}
    return {"kernels": "Metal"}


def machine_info(kernels) -> Dict[str, object]:
    import mlx_lm

    gpu = mx.default_device() == mx.gpu
    info = {
        "backend": "gpu" if gpu else "cpu",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "chess_mlx": __version__,
        "blas": blas_in_use(),
        **kernel_info(kernels),
    }
    if gpu:
        try:
            info["gpu"] = mx.metal.device_info().get("device_name")
        except Exception:  # device_info moved between mlx versions; the name is a nicety
            pass
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    return info


def format_sparsity(sparsity: Dict[str, float]) -> str:
    return " ".join(f"{k.replace('_proj', '')} {v:.2f}" for k, v in sorted(sparsity.items())) or "-"


def print_decode(rows: List[Dict]):
    print(f"{'config':<16} {'tok/s':>7} {'(min-max)':>15} {'vs mlx-lm':>9} {'vs dense':>8} "
          f"{'ideal':>6} {'@real':>6} {'ms: GEMVs + rest':>17}  realized sparsity")
    for r in rows:
        t, s = r["tokens_per_s"], r["speedup"]
        split = "" if r["kernel_ms_per_step"] is None else \
            f"{r['kernel_ms_per_step']:.1f} + {r['other_ms_per_step']:.1f}"
        print(f"{r['config']:<16} {t['median']:7.2f} {'(%.2f-%.2f)' % (t['min'], t['max']):>15} "
              f"{s['median']:8.2f}x {r['speedup_vs_dense_path']['median']:7.2f}x {r['ideal_speedup']:5.2f}x "
              f"{r['ideal_speedup_realized']:5.2f}x {split:>17}  {format_sparsity(r['realized_sparsity'])}")


def print_kernels(rows: List[Dict]):
    for r in rows:
        print(f"\n{'/'.join(r['projections'])}: {r['kernel']} {r['in']}x{r['out']} "
              f"({r['weight_bytes'] / 2**20:.1f} MiB; kernel {r['kernel_dense_gb_per_s']:.1f} GB/s, "
              f"MLX dense {r['mlx_dense_us']['median']:.0f} us = {r['mlx_dense_gb_per_s']:.1f} GB/s)")
        print("  kept  " + " ".join(f"{p['kept']:6.2f}" for p in r["points"]))
        print("  us    " + " ".join(f"{p['time_us']['median']:6.0f}" for p in r["points"]))
        print("  ideal " + " ".join(f"{p['ideal_us']:6.0f}" for p in r["points"]))


def plot(result: Dict, path: str):
    """Two panels: measured decode speed-up vs the ideal one (for the realized
    sparsity, so methods at target sparsities and at target speed-ups share
    an axis), and kernel time vs kept fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = result["decode"]
    stock = next(r for r in rows if r["method"] == STOCK)["speedup_vs_dense_path"]["median"]
    # Against our dense path: the same kernels at sparsity 0, so only the
    # skipped bytes differ, which is what the ideal models.
    left.axhline(1.0, color="black", lw=0.8, label="chess_mlx dense (s=0)")
    left.axhline(stock, color="gray", ls=":", label="mlx-lm dense")
    sparse = [r for r in rows if r["method"] not in (STOCK, DENSE)]
    top = max([r["ideal_speedup_realized"] for r in sparse], default=1.0)
    left.plot([1.0, top], [1.0, top], "k--", lw=0.8, label="ideal (measured = ideal)")
    for i, method in enumerate(dict.fromkeys(r["method"] for r in sparse)):
        own = sorted((r for r in sparse if r["method"] == method), key=lambda r: r["ideal_speedup_realized"])
        x = [r["ideal_speedup_realized"] for r in own]
        ratio = [r["speedup_vs_dense_path"] for r in own]
        y = [q["median"] for q in ratio]
        err = [[a - q["min"] for a, q in zip(y, ratio)], [q["max"] - a for a, q in zip(y, ratio)]]
        left.errorbar(x, y, yerr=err, color=f"C{i}", marker="o", capsize=3, label=method)
        for r, xi, yi in zip(own, x, y):
            left.annotate(r["target"], (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    left.set(xlabel="ideal decode speed-up (realized sparsity)", ylabel="measured speed-up vs chess_mlx dense",
             title=f"End-to-end decode ({result['model']['name']})")
    left.legend(fontsize=8)
    for i, r in enumerate(result["kernels"]):
        side = "out" if "_out_" in r["kernel"] else "in"
        color, label = f"C{i}", f"{'/'.join(r['projections'])} {r['in']}x{r['out']} ({side})"
        kept = [p["kept"] for p in r["points"]]
        right.plot(kept, [p["time_us"]["median"] for p in r["points"]], "o-", color=color, label=label)
        right.plot(kept, [p["ideal_us"] for p in r["points"]], "--", color=color)
        right.axhline(r["mlx_dense_us"]["median"], color=color, ls=":")
    right.set(xlabel="kept fraction of channels", ylabel="time per call (us)",
              title="Sparse GEMV (dashed: ideal, dotted: MLX dense)")
    if result["kernels"]:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no sparse kernels on this machine", ha="center", transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: Dict, output: Optional[str], plot_path: Optional[str]):
    if output:
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    if plot_path:
        plot(result, plot_path)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------
def run_benchmark(
    model: nn.Module,
    thresholds: Thresholds,
    prompt: mx.array,
    methods: Sequence[str],
    sparsities: Sequence[float],
    settings: Settings,
    progress: bool = True,
    speedups: Sequence[float] = (),
) -> Dict:
    """Decode and kernel measurements for ``model`` (unpatched on return):
    alloc runs at each target ideal speed-up of ``speedups``, the other
    methods at each of ``sparsities``."""
    kernels = default_kernels()
    shapes = model_shapes(unsparsify(model))
    gate_proj = model_layers(model)[0].mlp.gate_proj
    quantization = None
    if isinstance(gate_proj, nn.QuantizedLinear):
        quantization = Quantization(gate_proj.bits, gate_proj.group_size, dtype_name(gate_proj.scales.dtype))
        if kernels is not None and not hasattr(kernels, "sparse_in_qgemv"):
            kernels = None  # no quantized kernels on this backend: no kernel rows
    dtype = activation_dtype(model)
    configs = make_configs(methods, sparsities, speedups)
    ratio = head_ratio(model, shapes)
    ideal = Ideal.of(model, ratio)
    kernel_points = (len(set(settings.kept) | {1.0}) + 1) * len(kernel_shapes(shapes, methods)) * settings.kernel_reps
    total = len(configs) * (settings.reps + 1) + (kernel_points if kernels is not None else 0)
    with tqdm(total=total, unit="run", disable=not progress) as bar:
        decode = bench_decode(model, thresholds, prompt, configs, settings, ideal, bar)
        kernel_rows = bench_kernels(shapes, kernels, settings, dtype, bar, quantization, methods) if kernels else []
    return {
        "machine": machine_info(kernels),
        "model": {"shapes": dataclasses.asdict(shapes), "dtype": dtype_name(dtype),
                  "quantization": dataclasses.asdict(quantization) if quantization else None,
                  "head_ratio": ratio},
        "settings": {**dataclasses.asdict(settings), "prompt_tokens": prompt.size},
        "decode": decode,
        "kernels": kernel_rows,
    }


def parse_bench_methods(text: str) -> List[str]:
    """Sparse methods only: dense rows (stock and ours) are always measured."""
    methods = parse_methods(text)
    if "dense" in methods:
        raise ChessError("--methods takes cats, chess, chess+, teal, alloc (the dense rows are always measured)")
    return methods


def make_settings(args: argparse.Namespace) -> Settings:
    settings = SHORT if args.short else Settings()
    given = {k: getattr(args, k) for k in ("tokens", "reps", "kernel_reps") if getattr(args, k) is not None}
    for name, value in given.items():
        if value < 1:
            raise ChessError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return dataclasses.replace(settings, **given)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark CHESS decode speed, end to end and per kernel.")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (offline default), llama-1b-random (random weights, Llama-3.2-1B "
                        "shapes) or a .gguf file, mlx-lm folder or Hugging Face repo")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="Weight type (float32: the fast one on CPUs); with --quantized, of activations")
    parser.add_argument("--quantized", action="store_true",
                        help="Quantized weights: the model's own (smollm2: 4-bit, group 32), or for "
                        "llama-1b-random a quantization with --q-bits and --q-group-size")
    parser.add_argument("--q-bits", type=int, choices=[4, 8], default=4, help="Bits for --quantized llama-1b-random")
    parser.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64,
                        help="Group size for --quantized llama-1b-random")
    parser.add_argument("--q-scales-dtype", choices=list(DTYPES), default="bfloat16",
                        help="Scales and biases of --quantized llama-1b-random, as a checkpoint "
                        "of this dtype stores them (on the CPU, float32 ones cost more bytes)")
    parser.add_argument("--thresholds", default=None,
                        help="Thresholds file (default: the shipped ones, else calibrated here on a few windows)")
    parser.add_argument("--calibration-data", default=None,
                        help="Text to calibrate on when no thresholds fit (default: WikiText-2 in ../shared/data)")
    parser.add_argument("--methods", default="cats,chess,chess+", help="Comma-separated sparse methods")
    parser.add_argument("--sparsity", default="0.3,0.5,0.7",
                        help="Comma-separated target sparsities (every method but alloc)")
    parser.add_argument("--speedup", default="1.25,1.35,1.5",
                        help="Comma-separated target ideal speed-ups of the searched allocations (method alloc)")
    parser.add_argument("--tokens", type=int, default=None, help="Timed decode steps per rep, in turns of 4 (default 64)")
    parser.add_argument("--reps", type=int, default=None, help="Interleaved repetitions of every config (default 5)")
    parser.add_argument("--kernel-reps", type=int, default=None, help="Repetitions of every kernel timing (default 10)")
    parser.add_argument("--output", default=None, help="Write the results as JSON here")
    parser.add_argument("--plot", default=None, help="Write a PNG plot here (needs matplotlib)")
    parser.add_argument("--short", action="store_true",
                        help="CI mode: few tokens and reps, kept fractions 0, 0.5, 1")
    return parser


def check_outputs(args: argparse.Namespace):
    for path in (args.output, args.plot):
        if path:
            check_destination(path)


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if argv is None:
        reexec_with_openblas()
    with cli_errors("chess_mlx.bench"):
        methods, sparsities = parse_bench_methods(args.methods), parse_sparsities(args.sparsity)
        speedups = parse_speedups(args.speedup) if "alloc" in methods else []
        settings = make_settings(args)
        check_outputs(args)
        quantization = Quantization(args.q_bits, args.q_group_size, args.q_scales_dtype) if args.quantized else None
        model, tokenizer, label = load_model(args.model, args.dtype, quantization)
        thresholds, source = resolve_thresholds(model, tokenizer, args, methods, sparsities, speedups, settings)
        if quantization is not None and not is_quantized(model):
            label += ", " + quantize(model, quantization)
        prompt = prompt_ids(tokenizer, model_shapes(model).vocab, settings)
        result = run_benchmark(model, thresholds, prompt, methods, sparsities, settings, speedups=speedups)
        result["model"].update(name=args.model, description=label, thresholds=source)
        machine, dense_path = result["machine"], result["decode"][1]["decode_path"]
        print(f"Model: {args.model} ({label}); thresholds {source}")
        pages = ", weights on huge pages" if machine.get("huge_pages") else ""
        copy = f" ({machine['isa']}, {machine['threads']} threads{pages})" if "isa" in machine else ""
        print(f"{machine['cpu']} | {machine['backend']} | {machine['blas']} | decode: {dense_path}{copy}\n")
        if "kernels" not in dense_path:
            print(f"warning: no sparse kernels, every config ran the reference path "
                  f"({machine.get('reason')})", file=sys.stderr)
        print_decode(result["decode"])
        print_kernels(result["kernels"])
        write_outputs(result, args.output, args.plot)


if __name__ == "__main__":
    main()
