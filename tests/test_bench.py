"""The benchmark runs end to end (short mode) and writes what it promises."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_windows
from mlx_lm.models import llama

from chess_mlx import bench, costs, cpu_kernels
from chess_mlx.calibrate import calibrate
from chess_mlx.errors import ChessError
from chess_mlx.sparsify import huge_pages_enabled, shared_relayouts, sparsify, target_label

TINY = llama.ModelArgs(
    model_type="llama", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101,
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS, SPARSITIES, SPEEDUPS = ["cats", "chess", "chess+", "teal", "alloc"], [0.5, 0.7], [1.25, 1.5]


@pytest.fixture(scope="module")
def tiny_result():
    model = bench.random_model(TINY)
    # As bench calibrates a model without thresholds: alloc adds the 0.1..0.9
    # levels and a searched allocation per target speed-up.
    thresholds = bench.calibrate_here(model, random_windows(), METHODS, SPARSITIES, SPEEDUPS, progress=False)
    prompt = mx.array(random_windows(1, 8, seed=3)[0])
    result = bench.run_benchmark(model, thresholds, prompt, METHODS, SPARSITIES, bench.SHORT, progress=False,
                                 speedups=SPEEDUPS)
    result["model"].update(name="tiny")
    return result


def old_realized_ideal(shapes: costs.Shapes, sparsity: dict, head_ratio: float) -> float:
    """The bench's formula before per-layer costs: gate, q and o pooled over layers."""
    gate = sparsity.get("gate", 0.0)
    skipped = {"up_proj": gate, "down_proj": gate,
               "q_proj": sparsity.get("q_proj", 0.0), "o_proj": sparsity.get("o_proj", 0.0)}
    return costs.skipped_speedup(shapes, skipped, head_ratio)


def check_result(result: dict, methods, sparsities, speedups=()):
    assert {"machine", "model", "settings", "decode", "kernels"} <= result.keys()
    assert {"backend", "platform", "mlx", "blas", "cpu", "kernels"} <= result["machine"].keys()
    configs = [r["config"] for r in result["decode"]]
    expected = [f"{m} {target_label(m, s)}" for m in methods for s in (speedups if m == "alloc" else sparsities)]
    assert configs == ["mlx-lm dense", "chess_mlx dense"] + expected
    shapes, head_ratio = costs.Shapes(**result["model"]["shapes"]), result["model"]["head_ratio"]
    for row in result["decode"]:
        assert row["tokens_per_s"]["median"] > 0 and min(row["tokens_per_s"]["reps"]) > 0
        assert all(0 <= v <= 1 for v in row["realized_sparsity"].values())
        assert row["ideal_speedup"] >= 1 and row["ideal_speedup_realized"] >= 1
        if row["method"] in ("cats", "chess", "chess+"):
            # Per-layer costs give what the pooled formula gave for these methods.
            assert row["ideal_speedup"] == pytest.approx(
                costs.ideal_speedup(shapes, row["method"], row["sparsity"], head_ratio), rel=1e-9)
            assert row["ideal_speedup_realized"] == pytest.approx(
                old_realized_ideal(shapes, row["realized_sparsity"], head_ratio), rel=1e-6)
    sparse = [r for r in result["decode"] if r["method"] in methods]
    assert all("gate" in r["realized_sparsity"] for r in sparse if r["method"] in ("cats", "chess", "chess+"))
    assert all({"q_proj", "o_proj"} <= r["realized_sparsity"].keys() for r in sparse if r["method"] == "chess+")
    for row in sparse:
        if row["method"] == "teal":
            assert set(row["realized_sparsity"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "mlp_in", "down_in"}
        if row["method"] == "alloc":
            assert row["sparsity"] is None and row["target"] == f"{row['target_speedup']:.2f}x"
            assert row["ideal_speedup"] == pytest.approx(row["target_speedup"], abs=0.05)


def test_tiny_benchmark_writes_json(tiny_result, tmp_path):
    output = tmp_path / "bench.json"
    bench.write_outputs(tiny_result, str(output), None)
    result = json.loads(output.read_text())
    check_result(result, METHODS, SPARSITIES, SPEEDUPS)
    for row in result["decode"]:
        if row["method"] == "alloc":  # what decode realizes is near what the allocation planned
            assert row["ideal_speedup_realized"] == pytest.approx(row["target_speedup"], rel=0.1)
    if cpu_kernels.available():
        assert result["decode"][1]["decode_path"] == "CPU extension kernels"
        assert result["decode"][0]["kernel_ms_per_step"] is None  # stock mlx-lm runs no GEMVs of ours
        assert all(r["kernel_ms_per_step"] > 0 for r in result["decode"][1:])
        shapes = {(r["kernel"], r["in"], r["out"]) for r in result["kernels"]}
        assert shapes == {("sparse_in_gemv", 64, 64), ("sparse_out_gate_gemv", 64, 96), ("sparse_in_gemv", 96, 64),
                          ("sparse_in_gemv", 64, 32), ("sparse_in_gemv", 64, 96)}  # k/v, gate/up for teal, alloc
        for row in result["kernels"]:
            assert [p["kept"] for p in row["points"]] == [0.0, 0.5, 1.0]
            assert all(p["time_us"]["median"] > 0 for p in row["points"])


@pytest.mark.parametrize("scales_dtype", ["bfloat16", "float32"])
def test_quantized_tiny_benchmark_runs_the_quantized_kernels(scales_dtype):
    model = bench.random_model(TINY)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    label = bench.quantize(model, bench.Quantization(4, 32, scales_dtype))
    assert label == f"4-bit, group 32, {scales_dtype} scales"
    gate_proj = model.layers[0].mlp.gate_proj
    assert gate_proj.scales.dtype == getattr(mx, scales_dtype)
    embed = model.model.embed_tokens  # half scales as the linears', float32 lookups
    assert embed.scales.dtype == getattr(mx, scales_dtype)
    assert embed(mx.array([[1, 2]])).dtype == mx.float32
    prompt = mx.array(random_windows(1, 8, seed=3)[0])
    result = bench.run_benchmark(model, thresholds, prompt, ["chess+", "teal"], [0.5], bench.SHORT, progress=False)
    check_result(result, ["chess+", "teal"], [0.5])
    assert result["model"]["quantization"] == {"bits": 4, "group_size": 32, "scales_dtype": scales_dtype}
    assert result["model"]["dtype"] == "float32"  # activations
    if cpu_kernels.available():
        assert result["decode"][1]["decode_path"] == "CPU extension kernels"
        scale_bytes = 2 * getattr(mx, scales_dtype).size / 32  # a scale and a bias per 32 weights
        for row in result["kernels"]:
            assert row["weight_bytes"] == row["in"] * row["out"] * (0.5 + scale_bytes)
            assert all(p["time_us"]["median"] > 0 for p in row["points"])


def test_tiny_benchmark_writes_png(tiny_result, tmp_path):
    png = tmp_path / "bench.png"
    bench.write_outputs(tiny_result, None, str(png))
    assert png.read_bytes()[:8] == PNG_MAGIC
    bench.write_outputs({**tiny_result, "kernels": []}, None, str(png))  # no kernels: left panel only
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_model_shapes_match_costs():
    assert bench.model_shapes(llama.Model(bench.LLAMA_1B_ARGS)) == costs.LLAMA_32_1B  # lazy: no weights made
    names = [s.projections for s in bench.kernel_shapes(costs.SMOLLM2_135M)]
    assert names == [("q_proj", "o_proj"), ("up_proj",), ("down_proj",)]
    names = [s.projections for s in bench.kernel_shapes(costs.SMOLLM2_135M, ["chess", "teal"])]
    assert names == [("q_proj", "o_proj"), ("k_proj", "v_proj"), ("up_proj",), ("gate_proj", "up_proj"), ("down_proj",)]


def test_teal_and_alloc_need_a_recent_thresholds_file():
    model = bench.random_model(TINY)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    bench.check_thresholds(thresholds, ["teal"], [0.5], [])
    with pytest.raises(ChessError, match="no allocations"):
        bench.check_thresholds(thresholds, ["alloc"], [0.5], [1.25])
    thresholds.mlp_in = thresholds.down_in = None  # a file from before these inputs were calibrated
    with pytest.raises(ChessError, match="no mlp_in, down_in"):
        bench.check_thresholds(thresholds, ["chess", "teal"], [0.5], [])


@pytest.mark.parametrize("kept", [0.0, 0.3, 1.0])
def test_kept_vector_keeps_exactly(kept):
    v = np.abs(np.array(bench.kept_vector(1000, kept)))
    assert (v >= 1.0).sum() == round(kept * 1000)


def test_random_model_activations_are_not_degenerate():
    model = bench.random_model(TINY)
    logits = model(mx.array(random_windows(1, 16)[0])[None])
    assert 0.3 < logits.std().item() < 3


@pytest.mark.parametrize("argv", [["--methods", "dense"], ["--sparsity", "1.5"], ["--tokens", "0"],
                                  ["--methods", "alloc", "--speedup", "0.9"]])
def test_cli_rejects_bad_flags_before_loading(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert "chess_mlx.bench: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_short_run_on_smollm2(tmp_path, capsys):
    output, png = tmp_path / "bench.json", tmp_path / "bench.png"
    bench.main(["--short", "--methods", "chess,chess+", "--sparsity", "0.5",
                "--output", str(output), "--plot", str(png)])
    result = json.loads(output.read_text())
    check_result(result, ["chess", "chess+"], [0.5])
    if cpu_kernels.available():  # the header names the kernel copy that ran
        assert f"decode: CPU extension kernels ({cpu_kernels.kernel_isa()}, " in capsys.readouterr().out
        assert result["machine"]["huge_pages"] == huge_pages_enabled(cpu_kernels)
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU extension is not built")
def test_recording_kernels_forward_and_record_only_while_asked():
    recorder = bench.RecordingKernels(cpu_kernels)
    assert recorder.__name__ == cpu_kernels.__name__  # kernel_backend names the wrapped module
    x, wt = mx.ones((4,)), mx.ones((4, 3))
    recorder.sparse_in_gemv(x, wt, 0.0)
    assert recorder.calls == []
    recorder.recording = True
    y = recorder.sparse_in_gemv(x, wt, 0.0)
    assert len(recorder.calls) == 1 and recorder.calls[0][1][1] is wt
    assert mx.array_equal(y, cpu_kernels.sparse_in_gemv(x, wt, 0.0))


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU extension is not built")
def test_config_copies_share_weights_and_relayouts():
    model = bench.random_model(TINY)
    thresholds = calibrate(model, random_windows(), [0.5], progress=False)
    a, b = bench.clone(model), bench.clone(model)
    assert a.layers[0].mlp.down_proj.weight is model.layers[0].mlp.down_proj.weight
    with shared_relayouts():
        sparsify(a, thresholds, "chess", 0.5, kernels=cpu_kernels)
        sparsify(b, thresholds, "chess+", 0.5, kernels=cpu_kernels)
    assert a.layers[0].mlp.dense.down_proj.wt is b.layers[0].mlp.dense.down_proj.wt
    assert type(model.layers[0].mlp) is llama.MLP  # the original stays unpatched
    sparsify(model, thresholds, "chess", 0.5, kernels=cpu_kernels)
    assert model.layers[0].mlp.dense.down_proj.wt is not a.layers[0].mlp.dense.down_proj.wt
    prompt = mx.array(random_windows(1, 8, seed=3)[0])
    assert mx.array_equal(model(prompt[None]), a(prompt[None]))


def test_stock_steps_run_in_a_block_of_their_own(monkeypatch):
    configs = bench.make_configs(["chess"], [0.5])
    models = {c: f"model {c.name}" for c in configs}
    groups = []

    def fake_times(group, prompt, settings, calls):
        groups.append(group)
        return (np.full((bench.turns(settings), len(group)), float(len(groups))),
                np.full((bench.turns(settings), len(group)), np.nan))

    monkeypatch.setattr(bench, "interleaved_step_times", fake_times)
    times, _ = bench.rep_step_times(configs, models, {}, None, bench.Settings(tokens=12, turn_steps=4))
    stock = models[configs[0]]
    assert [stock in g for g in groups] == [False, True] and groups[1] == [stock]
    assert times[:, 0].tolist() == [2.0] * 3 and (times[:, 1:] == 1.0).all()


def test_turns_alternate_their_order(monkeypatch):
    order = []
    monkeypatch.setattr(bench, "prefill", lambda model, prompt: (None, 0))
    monkeypatch.setattr(bench, "decode_steps", lambda model, cache, y, steps: y)
    monkeypatch.setattr(bench, "pipelined_steps", lambda model, cache, y, steps: order.append((model, steps)) or (0.1, y))
    # 5 tokens round up to 3 turns of 2 steps
    times, _ = bench.interleaved_step_times(["a", "b", "c"], None, bench.Settings(tokens=5, turn_steps=2, warmup=0))
    assert [m for m, _ in order] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {steps for _, steps in order} == {2} and times.shape == (3, 3)


def test_pipelined_steps_decode_the_tokens_of_synchronous_steps():
    model = bench.random_model(TINY)
    prompt = mx.array(random_windows(1, 8, seed=3)[0])
    runs = {}
    for name, run in (("sync", lambda c, y: bench.decode_steps(model, c, y, 5)),
                      ("pipelined", lambda c, y: bench.pipelined_steps(model, c, y, 5)[1])):
        cache, y = bench.prefill(model, prompt)
        runs[name] = run(cache, y), cache
    (y_sync, cache_sync), (y_pipe, cache_pipe) = runs["sync"], runs["pipelined"]
    assert y_sync.item() == y_pipe.item() and cache_pipe[-1].offset == prompt.size + 5
    # the keys of every step's token, not only the last one's
    assert all(mx.array_equal(a.state[0], b.state[0]) for a, b in zip(cache_sync, cache_pipe))
