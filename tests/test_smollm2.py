"""The real default model (SmolLM2-135M-Instruct, offline): calibration,
held-out sparsity and perplexity, the CLIs and their errors."""

import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import WIKITEXT

from chess_mlx.calibrate import calibrate
from chess_mlx.data import load_documents, token_windows
from chess_mlx.perplexity import eval_ppl
from chess_mlx.sparsify import sparsify, track_sparsity, unsparsify
from chess_mlx.utils import load, shipped_thresholds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = load(dtype="float32")
    calibration = token_windows(load_documents([str(WIKITEXT)], ":30"), tokenizer, 512, 8192)
    thresholds = calibrate(model, calibration, [0.5], progress=False)
    held_out = token_windows(load_documents([str(WIKITEXT)], "30:"), tokenizer, 512, 2048)
    return model, thresholds, held_out


def test_held_out_sparsity_near_target_and_perplexity_order(smollm2):
    model, thresholds, held_out = smollm2
    unsparsify(model)
    dense = eval_ppl(model, held_out, progress=False)["ppl"]
    results = {}
    for method in ("cats", "chess"):
        sparsify(model, thresholds, method, 0.5)
        with track_sparsity(model) as tracker:
            results[method] = eval_ppl(model, held_out, progress=False)["ppl"]
        realized = tracker.summary()["gate"]
        assert abs(realized - 0.5) < 0.05, (method, realized)
    unsparsify(model)
    print(f"held-out ppl: dense {dense:.3f}, cats@0.5 {results['cats']:.3f}, chess@0.5 {results['chess']:.3f}")
    assert 1 < dense < results["chess"] < 100


def test_shipped_thresholds_fit_default_model(smollm2):
    model, _, _ = smollm2
    shipped = shipped_thresholds(model)
    assert shipped is not None
    assert list(shipped.sparsities) == pytest.approx([i / 10 for i in range(1, 10)])
    assert list(shipped.allocation_speedups) == pytest.approx([1.25, 1.35, 1.5])
    # The budget is met, with at most the overshoot of the levels' coarse steps.
    assert all(0 <= p - s < 0.04 for p, s in zip(shipped.allocation_predicted, shipped.allocation_speedups))
    assert shipped.head_in is not None and len(shipped.allocation_head) == 3
    assert "wikitext-2-valid.txt documents[:30]" in shipped.metadata["data"]


def run(module, *args):
    return subprocess.run([sys.executable, "-m", f"chess_mlx.{module}", *args],
                          capture_output=True, text=True, timeout=600)


def test_generate_cli_answers_with_sparsity():
    result = run("generate", "--max-tokens", "12", "--method", "chess+", "--sparsity", "0.3")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Generation:" in result.stdout and "Realized sparsity" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "0.45"], "sparsity 0.45 was not calibrated (available: 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7"),
    (["--method", "alloc", "--speedup", "1.3"], "no allocation was searched for speed-up 1.3 (available: 1.25, 1.35, 1.5)"),
    (["--sparsity", "1.5"], "sparsity must be in [0, 1), got 1.5"),
    (["--thresholds", "missing.safetensors"], "thresholds file 'missing.safetensors' not found"),
    (["--model", "missing.gguf"], "missing.gguf"),
])
def test_generate_cli_errors(args, message):
    result = run("generate", "--max-tokens", "2", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_calibrate_cli_errors(tmp_path):
    out = tmp_path / "t.safetensors"
    cases = [
        (["--tokens", "100000000", "--documents", ":1"], "tokens in windows, 100000000 asked"),
        (["--out", str(tmp_path / "no" / "t.safetensors")], "does not exist"),
        (["--sparsity", "0.5,1"], "sparsity must be in (0, 1)"),
        (["--data", str(tmp_path / "none.txt")], "not found"),
    ]
    for extra, message in cases:
        args = ["--data", str(WIKITEXT), "--out", str(out), *extra]
        result = run("calibrate", *args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_emulated_kernel_decode_gives_reference_next_token(smollm2):
    """A chess+ decode step of SmolLM2 (float32) whose seven projections per
    layer and the LM head run through the emulated Metal kernels picks the
    reference path's token."""
    from test_decode_kernels import EmulatedKernels, decode_logits

    model, thresholds, held_out = smollm2
    prompt, token = held_out[0][:15], held_out[0][15]
    sparsify(model, thresholds, "chess+", 0.5, kernels=None)
    reference = decode_logits(model, prompt, token)
    emulated = EmulatedKernels()
    sparsify(model, thresholds, "chess+", 0.5, kernels=emulated)
    result = decode_logits(model, prompt, token)
    unsparsify(model)
    assert emulated.calls == 7 * len(model.layers) + 1
    assert mx.argmax(result).item() == mx.argmax(reference).item()
    assert mx.abs(result - reference).max().item() < 1e-2


def test_quantized_default_model_decodes_the_same_tokens_with_kernels():
    """The default model as stored (4-bit weights, 8-bit embedding): greedy
    chess+ decoding through the quantized CPU kernels gives the reference
    path's tokens."""
    from chess_mlx import cpu_kernels
    from chess_mlx.quantized import QuantizedInputMajorLinear
    from test_quantized import greedy_tokens

    model, tokenizer, _ = load()
    thresholds = shipped_thresholds(model)
    prompt = tokenizer.encode("The history of the city begins in the Roman period")
    sparsify(model, thresholds, "chess+", 0.5, kernels=None)
    reference, _ = greedy_tokens(model, prompt, 8)
    sparsify(model, thresholds, "chess+", 0.5, kernels=cpu_kernels)
    assert isinstance(model.layers[0].self_attn.q_proj.dense, QuantizedInputMajorLinear)
    tokens, _ = greedy_tokens(model, prompt, 8)
    assert tokens == reference
