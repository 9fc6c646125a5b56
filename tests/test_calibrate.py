import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import WIKITEXT, ByteTokenizer, random_windows

from chess_mlx.calibrate import calibrate, parse_sparsities, quantiles
from chess_mlx.errors import ChessError

SPARSITIES = [0.3, 0.5, 0.7]


def np_activation(model_type, x):
    if model_type == "llama":
        return x / (1 + np.exp(-x))
    # gelu, tanh approximation (gemma3)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


class Capture(nn.Module):
    def __init__(self, dense, store):
        super().__init__()
        self.dense = dense
        self._store = store

    def __call__(self, x):
        self._store.append(np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1]))
        return self.dense(x)


def captured_activations(model, windows):
    """Per layer and window: MLP input, q_proj input, o_proj input."""
    stores = []
    for layer in model.layers:
        store = {"mlp": [], "q": [], "o": []}
        layer.mlp = Capture(layer.mlp, store["mlp"])
        layer.self_attn.q_proj = Capture(layer.self_attn.q_proj, store["q"])
        layer.self_attn.o_proj = Capture(layer.self_attn.o_proj, store["o"])
        stores.append(store)
    for w in windows:
        mx.eval(model(mx.array(w)[None]))
    for layer in model.layers:
        layer.mlp = layer.mlp.dense
        layer.self_attn.q_proj = layer.self_attn.q_proj.dense
        layer.self_attn.o_proj = layer.self_attn.o_proj.dense
    return stores


def weighted_quantiles(per_window, weights):
    return sum(w * np.quantile(v, SPARSITIES) for v, w in zip(per_window, weights)) / sum(weights)


def test_thresholds_match_independent_numpy(tiny_model):
    windows = random_windows(count=3, length=33) + random_windows(count=1, length=17, seed=1)
    result = calibrate(tiny_model, windows, SPARSITIES, progress=False)
    stores = captured_activations(tiny_model, windows)
    weights = [len(w) for w in windows]
    for i, (layer, store) in enumerate(zip(tiny_model.layers, stores)):
        mlp = layer.mlp
        gates, ups = [], []
        for x in store["mlp"]:
            gates.append(np.abs(np_activation(tiny_model.model_type, np.array(mlp.gate_proj(mx.array(x))))))
            ups.append(np.array(mlp.up_proj(mx.array(x))))
        m = np.abs(np.concatenate(ups)).mean(axis=0)
        np.testing.assert_allclose(result.up_stat[i], m, rtol=1e-5)
        tau_imp = weighted_quantiles([g * m for g in gates], weights)
        np.testing.assert_allclose(result.chess[i], tau_imp[:, None] / m[None, :], rtol=2e-4)
        np.testing.assert_allclose(result.cats[i], weighted_quantiles(gates, weights), rtol=2e-4)
        np.testing.assert_allclose(result.q_proj[i], weighted_quantiles([np.abs(q) for q in store["q"]], weights), rtol=2e-4)
        np.testing.assert_allclose(result.o_proj[i], weighted_quantiles([np.abs(o) for o in store["o"]], weights), rtol=2e-4)


def test_head_thresholds_match_independent_numpy(tiny_model):
    windows = random_windows(count=3, length=33) + random_windows(count=1, length=17, seed=1)
    result = calibrate(tiny_model, windows, SPARSITIES, progress=False)
    store = []
    body = tiny_model.model
    body.norm = Capture(body.norm, store)
    for w in windows:
        mx.eval(body(mx.array(w)[None]))
    body.norm = body.norm.dense
    x = [np.array(body.norm(mx.array(h))) for h in store]  # the head's input: the norm's output
    eye = mx.eye(x[0].shape[1])  # the head applied to the identity is its (dequantized) weight, transposed
    head = tiny_model.lm_head(eye) if "lm_head" in tiny_model else body.embed_tokens.as_linear(eye)
    weight = np.array(head, dtype=np.float64).T
    logits = np.concatenate(x) @ weight.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    fisher = np.sqrt((p @ weight**2 - (p @ weight) ** 2).mean(axis=0))
    tau_imp = weighted_quantiles([np.abs(h) * fisher for h in x], [len(w) for w in windows])
    np.testing.assert_allclose(result.head_in, tau_imp[:, None] / fisher[None, :], rtol=2e-4)


def test_rms_statistic(tiny_model):
    windows = random_windows(count=2, length=30)
    result = calibrate(tiny_model, windows, [0.5], statistic="rms", progress=False)
    stores = captured_activations(tiny_model, windows)
    mlp = tiny_model.layers[0].mlp
    ups = np.concatenate([np.array(mlp.up_proj(mx.array(x))) for x in stores[0]["mlp"]])
    np.testing.assert_allclose(result.up_stat[0], np.sqrt(np.mean(ups**2, axis=0)), rtol=1e-5)
    assert result.metadata["statistic"] == "rms"


def test_realized_sparsity_near_target_on_calibration_data(tiny_model):
    from chess_mlx.sparsify import sparsify, track_sparsity

    windows = random_windows(count=4, length=48)
    thresholds = calibrate(tiny_model, windows, SPARSITIES, progress=False)
    for method in ("cats", "chess"):
        for s in SPARSITIES:
            sparsify(tiny_model, thresholds, method, s)
            with track_sparsity(tiny_model) as tracker:
                for w in windows:
                    tiny_model(mx.array(w)[None])
            # First layer's input does not depend on earlier thresholds.
            assert abs(tracker.sparsity()["layers.0.gate"] - s) < 0.02, (method, s)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_quantiles_match_numpy(n):
    values = mx.random.normal((n,))
    levels = [0.0, 0.3, 0.5, 0.77, 1.0]
    np.testing.assert_allclose(np.array(quantiles(values, levels)), np.quantile(np.array(values), np.array(levels)), rtol=1e-6, atol=1e-6)


def test_bad_inputs(tiny_model):
    with pytest.raises(ChessError, match="sparsit"):
        calibrate(tiny_model, random_windows(), [0.5, 1.0], progress=False)
    with pytest.raises(ChessError, match="statistic"):
        calibrate(tiny_model, random_windows(), [0.5], statistic="max", progress=False)
    with pytest.raises(ChessError, match="sparsity"):
        parse_sparsities("0.3,0")
    with pytest.raises(ChessError, match="comma-separated"):
        parse_sparsities("half")
    assert parse_sparsities("0.7,0.3,0.3") == [0.3, 0.7]


def test_cli_reports_an_unsupported_architecture_before_the_data(tmp_path, monkeypatch, capsys):
    from mlx_lm.models import gpt2

    from chess_mlx import calibrate as calibrate_module

    args = gpt2.ModelArgs(model_type="gpt2", n_ctx=32, n_embd=16, n_head=2, n_layer=1, n_positions=32,
                          layer_norm_epsilon=1e-5, vocab_size=101)
    monkeypatch.setattr(calibrate_module, "load_from_args", lambda _: (gpt2.Model(args), ByteTokenizer(), "gpt2"))
    out = tmp_path / "t.safetensors"
    # More tokens than the data holds: the architecture error must come first.
    with pytest.raises(SystemExit) as e:
        calibrate_module.main(["--data", str(WIKITEXT), "--documents", ":1", "--tokens", "100000000",
                               "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported model type 'gpt2'" in err[0]
    assert not out.exists()
