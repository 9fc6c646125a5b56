"""The decode path through sparse GEMV kernels equals the reference path.

The kernels run here in the CPU emulator of their exact generated Metal
source (tests/emulator); on a Mac, `python -m chess_mlx.check` runs them on
the GPU.
"""

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_windows, tiny_llama
from emulator import emulate_spec
from mlx_lm.models.cache import make_prompt_cache

from chess_mlx import kernels
from chess_mlx.calibrate import calibrate
from chess_mlx.sparsify import InputMajorLinear, sparsify, unsparsify


class EmulatedKernels:
    def __init__(self):
        self.calls = 0

    def sparse_in_gemv(self, x, wt, threshold):
        self.calls += 1
        return emulate_spec(kernels.sparse_in_gemv_launch(x, wt, threshold))[0]

    def sparse_out_gate_gemv(self, x, w, gate, threshold):
        self.calls += 1
        return emulate_spec(kernels.sparse_out_gate_gemv_launch(x, w, gate, threshold))[0]


def decode_logits(model, prompt, token):
    cache = make_prompt_cache(model)
    model(mx.array(prompt)[None], cache=cache)
    return model(mx.array([[token]]), cache=cache)[0, -1]


@pytest.fixture(scope="module")
def float_llama():
    mx.random.seed(4)
    model = tiny_llama()
    thresholds = calibrate(model, random_windows(), [0.5, 0.7], progress=False)
    return model, thresholds


@pytest.mark.parametrize("method", ["cats", "chess", "chess+", "teal"])
def test_emulated_decode_step_matches_reference(float_llama, method):
    model, thresholds = float_llama
    prompt, token = random_windows(1, 9, seed=7)[0], 5
    sparsify(model, thresholds, method, 0.7, kernels=None)
    reference = decode_logits(model, prompt, token)
    emulated = EmulatedKernels()
    sparsify(model, thresholds, method, 0.7, kernels=emulated)
    assert isinstance(model.layers[0].mlp.dense.down_proj, InputMajorLinear)
    result = decode_logits(model, prompt, token)
    # gate, up, down, q, k, v, o per layer and the LM head; the prompt took the reference path
    assert emulated.calls == 7 * len(model.layers) + 1
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)
    unsparsify(model)


def test_relayout_is_undone_exactly(float_llama):
    model, thresholds = float_llama
    from mlx.utils import tree_flatten

    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    sparsify(model, thresholds, "chess+", 0.5, kernels=EmulatedKernels())
    attn = model.layers[0].self_attn
    assert attn.q_proj.dense.wt.shape == (64, 64) and "weight" not in attn.q_proj.dense
    unsparsify(model)
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_quantized_layers_keep_reference_path():
    mx.random.seed(5)
    model = tiny_llama(quantized=True)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    emulated = EmulatedKernels()
    sparsify(model, thresholds, "chess+", 0.5, kernels=emulated)
    decode_logits(model, [1, 2, 3], 4)
    assert emulated.calls == 0


def test_check_command_logic_runs_on_cpu_fallback(capsys):
    """On Linux the kernels fall back to the reference, so this only exercises
    the check's own code (inputs, tolerances, timing, output)."""
    from chess_mlx.check import check_shape, main

    assert check_shape(37, 100, mx.float32, [0, 0.5, 1], iters=2)
    out = capsys.readouterr().out
    assert out.count("PASS") == 6 and "FAIL" not in out
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "no Metal GPU here" in capsys.readouterr().err


def test_cpu_extension_decode_step_matches_reference(float_llama):
    from chess_mlx import cpu_kernels
    from chess_mlx.sparsify import kernel_backend

    if not cpu_kernels.available():
        pytest.skip(f"CPU extension unavailable: {cpu_kernels.unavailable_reason()}")
    model, thresholds = float_llama
    prompt, token = random_windows(1, 9, seed=8)[0], 3
    for method in ("chess", "chess+"):
        sparsify(model, thresholds, method, 0.7, kernels=None)
        assert kernel_backend(model) == "reference path (plain MLX ops)"
        reference = decode_logits(model, prompt, token)
        sparsify(model, thresholds, method, 0.7, kernels=cpu_kernels)
        assert kernel_backend(model) == "CPU extension kernels"
        np.testing.assert_allclose(np.array(decode_logits(model, prompt, token)), np.array(reference),
                                   rtol=1e-4, atol=1e-4)
    unsparsify(model)


def test_untied_lm_head_decodes_through_kernels():
    from mlx.utils import tree_flatten

    mx.random.seed(6)
    model = tiny_llama(tied=False)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    sparsify(model, thresholds, "chess", 0.5, kernels=None)
    reference = decode_logits(model, [1, 2, 3], 4)
    emulated = EmulatedKernels()
    sparsify(model, thresholds, "chess", 0.5, kernels=emulated)
    result = decode_logits(model, [1, 2, 3], 4)
    assert emulated.calls == 7 * len(model.layers) + 1
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)
    unsparsify(model)
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_emulated_decode_of_a_searched_allocation(float_llama):
    from chess_mlx.allocation import search_allocations

    model, thresholds = float_llama
    search_allocations(model, thresholds, random_windows(1, 30, seed=2), [1.3], progress=False)
    prompt, token = random_windows(1, 9, seed=7)[0], 5
    sparsify(model, thresholds, "alloc", 1.3, kernels=None)
    reference = decode_logits(model, prompt, token)
    sparsify(model, thresholds, "alloc", 1.3, kernels=EmulatedKernels())
    result = decode_logits(model, prompt, token)
    unsparsify(model)
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)


def test_emulated_decode_with_a_thresholded_lm_head(float_llama):
    from dataclasses import replace

    from chess_mlx.allocation import search_allocations

    model, thresholds = float_llama
    search_allocations(model, thresholds, random_windows(1, 30, seed=2), [1.3], progress=False)
    thresholds = replace(thresholds, allocation_head=np.array([0.5], np.float32))
    prompt, token = random_windows(1, 9, seed=7)[0], 5
    sparsify(model, thresholds, "alloc", 1.3, kernels=None)
    reference = decode_logits(model, prompt, token)
    sparsify(model, thresholds, "alloc", 1.3, kernels=EmulatedKernels())
    assert "wt" in model.model.embed_tokens  # the tied table, read input-major by the Metal GEMV
    result = decode_logits(model, prompt, token)
    unsparsify(model)
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)
