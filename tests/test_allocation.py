"""Per-projection sparsity: the teal and alloc methods and the allocation search."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from conftest import MODELS, ByteTokenizer, random_windows, tiny_llama
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from chess_mlx import cpu_kernels
from chess_mlx.allocation import (BlockProbe, allocate_budget, allocation_loss, even_allocation, greedy_path,
                                  lower_hull, record_blocks, search_allocations)
from chess_mlx.calibrate import calibrate, spread_tokens
from chess_mlx.costs import allocation_speedup, model_params, projection_sparsity, skipped_params
from chess_mlx.errors import ChessError
from chess_mlx.sparsify import InputMajorLinear, SparseMLP, sparsify, track_sparsity, unsparsify
from chess_mlx.thresholds import ALLOCATED, load_thresholds

GRID = [0.1 * i for i in range(1, 10)]


@pytest.fixture(scope="module")
def searched():
    mx.random.seed(2)
    model = tiny_llama()
    mx.eval(model.parameters())
    thresholds = calibrate(model, random_windows(), GRID, progress=False)
    search_allocations(model, thresholds, random_windows(2, 40, seed=3), [1.2, 1.5], progress=False)
    return model, thresholds


def test_up_proj_takes_the_sparser_of_mask_and_input():
    assert projection_sparsity({"gate": 0.5, "mlp_in": 0.2})["up_proj"] == 0.5
    assert projection_sparsity({"gate": 0.2, "mlp_in": 0.4})["up_proj"] == 0.4
    levels = projection_sparsity({"gate": 0.5, "down_in": 0.3, "attn_in": 0.2})
    assert levels["down_proj"] == 0.5 and levels["k_proj"] == levels["q_proj"] == 0.2
    params = {p: 10 for p in levels}
    assert skipped_params(params, {"gate": 0.5, "down_in": 0.7}) == pytest.approx(10 * (0.5 + 0.7))


def test_greedy_path_raises_the_cheapest_part_first():
    # error grows 10x faster in 'b' than in 'a'; both save the same bytes per level
    def error(levels):
        return levels["a"] ** 2 + 10 * levels["b"] ** 2

    def skipped(levels):
        return levels["a"] + levels["b"]

    path = greedy_path(error, ("a", "b"), [0.0, 0.25, 0.5, 0.75], skipped)
    assert path[0] == (0.0, 0.0, {"a": 0.0, "b": 0.0})
    assert [p[2]["b"] for p in path[:4]] == [0.0, 0.0, 0.0, 0.0]  # a goes all the way first
    assert path[-1][2] == {"a": 0.75, "b": 0.75} and len(path) == 7
    assert all(later[0] > earlier[0] for earlier, later in zip(path, path[1:]))


def test_lower_hull_and_budget_take_the_cheapest_moves():
    cheap = lower_hull([(0, 0, "c0"), (1, 1, "c1"), (2, 5, "c2"), (3, 3.5, "c3")])
    assert [p[2] for p in cheap] == ["c0", "c1", "c3"]  # c2 lies above the hull
    assert [p[2] for p in lower_hull([(0, 0, "x"), (1, 1, "y"), (2, 2, "z")])] == ["x", "z"]  # collinear
    dear = lower_hull([(0, 0, "d0"), (1, 2, "d1"), (2, 5, "d2")])
    # costs per unit: cheap 1, 1.25; dear 2, 3
    assert allocate_budget([cheap, dear], 1) == [1, 0]
    assert allocate_budget([cheap, dear], 3) == [2, 0]
    assert allocate_budget([cheap, dear], 4) == [2, 1]
    assert allocate_budget([cheap, dear], 99) == [2, 2]


def test_even_allocation_gives_every_block_the_same_share():
    small = [(0, 0, "s0"), (1, 5, "s1"), (2, 9, "s2")]  # a block of 4 weights
    large = [(0, 0, "l0"), (3, 1, "l1"), (4, 2, "l2"), (6, 3, "l3")]  # a block of 8
    sizes = [4, 8]
    assert even_allocation([small, large], sizes, 1) == [1, 0]  # a quarter of each, however dear
    assert even_allocation([small, large], sizes, 3) == [1, 1]  # 3/8 of the large one
    assert even_allocation([small, large], sizes, 5) == [2, 2]
    assert even_allocation([small, large], sizes, 99) == [2, 3]


@pytest.mark.parametrize("strategy", ["even", "global"])
def test_both_strategies_hit_the_target(strategy):
    mx.random.seed(2)
    model = tiny_llama()
    thresholds = calibrate(model, random_windows(), GRID, progress=False)
    search_allocations(model, thresholds, random_windows(1, 40, seed=3), [1.3], progress=False, strategy=strategy)
    assert 1.3 <= thresholds.allocation_predicted[0] < 1.36
    assert strategy in thresholds.metadata["allocation"] or "same share" in thresholds.metadata["allocation"]
    with pytest.raises(ChessError, match="unknown allocation strategy"):
        search_allocations(model, thresholds, random_windows(1, 40), [1.3], strategy="random")


def test_search_hits_the_target_speedups(searched):
    model, thresholds = searched
    assert thresholds.allocations.shape == (2, len(model.layers), len(ALLOCATED))
    layer_params, head = model_params(model)
    assert set(thresholds.allocation_head) <= set(np.float32([0.0] + GRID))
    for target, predicted, allocation, head_level in zip(
            [1.2, 1.5], thresholds.allocation_predicted, thresholds.allocations, thresholds.allocation_head):
        assert predicted == pytest.approx(allocation_speedup(allocation, layer_params, head, head_level))
        assert target <= predicted < target + 0.06  # the budget is met with the last move's overshoot
        assert set(np.unique(allocation)) <= set(np.float32([0.0] + GRID))
    # more speed never takes sparsity away from a component
    assert np.all(thresholds.allocations[1] >= thresholds.allocations[0])


def test_allocations_survive_save_and_load(searched, tmp_path):
    _, thresholds = searched
    path = tmp_path / "t.safetensors"
    thresholds.save(str(path))
    loaded = load_thresholds(str(path))
    np.testing.assert_array_equal(loaded.allocations, thresholds.allocations)
    np.testing.assert_array_equal(loaded.allocation_speedups, thresholds.allocation_speedups)
    with pytest.raises(ChessError, match="no allocation was searched for speed-up 1.3 .available: 1.2, 1.5"):
        loaded.allocation(1.3)


def test_old_files_ask_for_recalibration(searched, tmp_path):
    model, thresholds = searched
    old = calibrate(model, random_windows(), [0.5], progress=False)
    old.mlp_in = old.down_in = None
    path = tmp_path / "old.safetensors"
    old.save(str(path))
    old = load_thresholds(str(path))
    sparsify(model, old, "chess", 0.5)  # the gate methods still work
    for method, setting in (("teal", 0.5), ("alloc", 1.2)):
        with pytest.raises(ChessError, match="no mlp_in, down_in.* recalibrate"):
            sparsify(model, old, method, setting)
    unsparsify(model)


@pytest.mark.parametrize("name", list(MODELS))
def test_teal_thresholds_every_projection_input(name):
    mx.random.seed(0)
    model = MODELS[name]()
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    sparsify(model, thresholds, "teal", 0.5, kernels=None)
    with track_sparsity(model) as tracker:
        model(mx.array(random_windows(1, 30, seed=4)))
    dropped = tracker.summary()
    assert set(dropped) == {"q_proj", "k_proj", "v_proj", "o_proj", "mlp_in", "down_in"}
    for kind, value in dropped.items():
        assert 0.3 < value < 0.7, (kind, value)
    mlp = model.layers[0].mlp
    assert isinstance(mlp, SparseMLP) and not mlp._has_gate and not mlp._up_from_mask
    unsparsify(model)


def test_mlp_reference_path_drops_exactly_the_planned_entries(searched):
    model, thresholds = searched
    sparsify(model, thresholds, "alloc", 1.5, kernels=None)
    layer = max(range(len(model.layers)), key=lambda i: thresholds.allocation(1.5)[i].sum())
    mlp = model.layers[layer].mlp
    x = mx.random.normal((1, 7, 64))
    dense = mlp.dense
    x_in = mx.where(mx.abs(x) >= mlp.tau_in, x, 0) if mlp.tau_in is not None else x
    gate = mlp._activation(dense.gate_proj(x_in))
    if mlp._has_gate:
        gate = mx.where(mx.abs(gate) >= mlp.tau, gate, 0)
    hidden = gate * dense.up_proj(x if mlp._up_from_mask else x_in)
    if mlp.tau_down is not None:
        hidden = mx.where(mx.abs(hidden) >= mlp.tau_down, hidden, 0)
    np.testing.assert_allclose(np.array(mlp(x)), np.array(dense.down_proj(hidden)), rtol=1e-5, atol=1e-6)
    unsparsify(model)


def greedy(model, prompt, steps=5):
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
    tokens, all_logits = [], []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        tokens.append(token.item())
        all_logits.append(logits)
        logits = model(token[None], cache=cache)[:, -1]
    return tokens, mx.concatenate(all_logits)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the compiled CPU extension is not built")
@pytest.mark.parametrize("method,setting", [("teal", 0.5), ("alloc", 1.2), ("alloc", 1.5)])
def test_cpu_kernel_decode_equals_reference(searched, method, setting):
    model, thresholds = searched
    prompt = random_windows(1, 9, seed=6)[0]
    sparsify(model, thresholds, method, setting, kernels=None)
    reference_tokens, reference = greedy(model, prompt)
    sparsify(model, thresholds, method, setting, kernels=cpu_kernels)
    mlps = [layer.mlp for layer in model.layers]
    assert all(m._kernels is cpu_kernels for m in mlps)
    # up_proj is re-laid input-major exactly where its input threshold serves it
    assert all(isinstance(m.dense.up_proj, InputMajorLinear) == (not m._up_from_mask) for m in mlps)
    tokens, result = greedy(model, prompt)
    unsparsify(model)
    assert tokens == reference_tokens
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)


def test_search_tokens_are_spread_over_all_windows():
    windows = [[i] * 100 for i in range(10)] + [[99]]
    assert [p[0] for p in spread_tokens(windows, 300, length=100)] == [0, 4, 9]  # not the first three
    everything = spread_tokens(windows, 10_000, length=64)
    assert sum(len(p) for p in everything) == 1000  # the one-token window has nothing to predict


def test_probe_mlp_is_sparse_mlp_and_windows_are_spread(searched):
    model, thresholds = searched
    source = random_windows(2, 40, seed=1)
    windows = spread_tokens(source, 50, length=16)
    # Every window's first piece before any second piece; 50 tokens in all.
    assert [len(w) for w in windows] == [16, 16, 16, 2]
    assert windows[1] == source[1][:16] and windows[2] == source[0][16:32]
    records = record_blocks(model, windows, progress=False)
    probe = BlockProbe(model, 1, "mlp", records[1]["mlp"], thresholds)
    cases = [{"mlp_in": 0.3, "gate": 0.5, "down_in": 0.6}, {"mlp_in": 0.6, "gate": 0.2}, {"gate": 0.4}, {"down_in": 0.5}]
    for levels in cases:
        plan = thresholds.layer_plan(1, levels)
        expected = SparseMLP(model.layers[1].mlp, probe.activation, plan, "check")(records[1]["mlp"].inputs[2])
        got = probe.run_mlp(plan, levels.get("mlp_in", 0.0), 2)
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-6)
    assert probe.error({}) == 0 and probe.error(cases[0]) > probe.error(cases[3]) > 0


def test_cli_searches_an_existing_file(searched, tmp_path, monkeypatch, capsys):
    from chess_mlx import allocation as allocation_module

    model, thresholds = searched
    source = tmp_path / "t.safetensors"
    thresholds.save(str(source))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join("Some words of paragraph %d, and more words." % i * 3 for i in range(6)))
    monkeypatch.setattr(allocation_module, "load_from_args", lambda _: (model, ByteTokenizer(), "tiny"))
    out = tmp_path / "out.safetensors"
    allocation_module.main(["--thresholds", str(source), "--data", str(text), "--tokens", "64",
                            "--speedup", "1.3", "--out", str(out)])
    assert "allocation for 1.3x: ideal speed-up" in capsys.readouterr().out
    loaded = load_thresholds(str(out))
    assert list(loaded.allocation_speedups) == [np.float32(1.3)]
    np.testing.assert_array_equal(loaded.chess, thresholds.chess)
    with pytest.raises(SystemExit):
        allocation_module.main(["--thresholds", str(source), "--data", str(text), "--speedup", "0.9",
                                "--out", str(out)])
    assert "target speed-ups must be above 1" in capsys.readouterr().err


def test_cli_reports_an_unsupported_architecture(tmp_path, monkeypatch, capsys, searched):
    from mlx_lm.models import gpt2

    from chess_mlx import allocation as allocation_module

    _, thresholds = searched
    source = tmp_path / "t.safetensors"
    thresholds.save(str(source))
    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=1, n_positions=64,
                          layer_norm_epsilon=1e-5, vocab_size=101)
    monkeypatch.setattr(allocation_module, "load_from_args", lambda _: (gpt2.Model(args), ByteTokenizer(), "gpt2"))
    text = tmp_path / "text.txt"
    text.write_text("Some words. " * 40)
    with pytest.raises(SystemExit) as exit_info:
        allocation_module.main(["--thresholds", str(source), "--data", str(text), "--out", str(tmp_path / "o.st")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "chess_mlx.allocation: error: unsupported model type 'gpt2' (supported: gemma, gemma2, gemma3, "
        "gemma3_text, llama, mistral, qwen2, qwen3)")
    assert not (tmp_path / "o.st").exists()


def with_head_level(thresholds, level):
    """The searched allocations with the LM head input at ``level``."""
    return replace(thresholds, allocation_head=np.full(len(thresholds.allocation_speedups), level, np.float32))


def test_head_level_is_searched_by_loss_and_kept_dense_without_head_thresholds(searched):
    model, thresholds = searched
    windows = random_windows(1, 40, seed=3)
    chosen = replace(thresholds)
    search_allocations(model, chosen, windows, [1.3], progress=False)
    level = float(chosen.allocation_head[0])
    loss = allocation_loss(model, chosen, windows, chosen.allocations[0], level)
    # its loss is no higher than the layers-only allocation for the same target
    dense_head = replace(thresholds, head_in=None)
    search_allocations(model, dense_head, windows, [1.3], progress=False)
    assert dense_head.allocation_head[0] == 0
    assert loss <= allocation_loss(model, dense_head, windows, dense_head.allocations[0], 0.0) + 1e-6


def searched_model(tied: bool, head_level: float):
    """A tiny llama with an allocation for 1.2x, its LM head input at ``head_level``."""
    mx.random.seed(1)
    model = tiny_llama(tied=tied)
    mx.eval(model.parameters())
    thresholds = calibrate(model, random_windows(), GRID, progress=False)
    search_allocations(model, thresholds, random_windows(1, 40, seed=3), [1.2], progress=False)
    return model, with_head_level(thresholds, head_level)


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_input_is_thresholded(tied):
    model, thresholds = searched_model(tied, 0.5)
    assert np.all(np.diff(thresholds.head_in, axis=0) > 0)
    weights = dict(tree_flatten(model.parameters()))
    sparsify(model, thresholds, "alloc", 1.2, kernels=None)
    with track_sparsity(model) as tracker:
        model(mx.array(random_windows(1, 30, seed=4)))
    assert tracker.summary()["lm_head"] == pytest.approx(0.5, abs=0.15)
    unsparsify(model)
    restored = dict(tree_flatten(model.parameters()))
    assert set(restored) == set(weights) and all(mx.array_equal(restored[k], weights[k]) for k in weights)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the compiled CPU extension is not built")
@pytest.mark.parametrize("tied", [True, False])
def test_sparse_lm_head_decodes_with_kernels_as_the_reference(tied):
    model, thresholds = searched_model(tied, 0.4)
    prompt = random_windows(1, 9, seed=6)[0]
    sparsify(model, thresholds, "alloc", 1.2, kernels=None)
    reference_tokens, reference = greedy(model, prompt)
    sparsify(model, thresholds, "alloc", 1.2, kernels=cpu_kernels)
    head = model.model.embed_tokens if tied else model.lm_head.dense
    assert "wt" in head if tied else isinstance(head, InputMajorLinear)  # read input-major, not copied
    tokens, result = greedy(model, prompt)
    unsparsify(model)
    assert tokens == reference_tokens
    np.testing.assert_allclose(np.array(result), np.array(reference), rtol=1e-4, atol=1e-4)
