import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_windows

from chess_mlx.calibrate import calibrate
from chess_mlx.errors import ChessError
from chess_mlx.sparsify import InputSparseLinear, SparseMLP, rows_like, sparsify, track_sparsity, unsparsify

TOKENS = mx.array(random_windows(1, 24, seed=3))


@pytest.fixture
def calibrated(tiny_model):
    thresholds = calibrate(tiny_model, random_windows(), [0.3, 0.5, 0.7], progress=False)
    return tiny_model, thresholds


def test_dense_and_zero_sparsity_match_unpatched_logits(calibrated):
    model, thresholds = calibrated
    reference = model(TOKENS)
    for method, sparsity in [("dense", 0.5), ("chess", 0.0), ("cats", 0.0), ("chess+", 0.0)]:
        sparsify(model, thresholds, method, sparsity)
        assert mx.array_equal(model(TOKENS), reference), (method, sparsity)
    unsparsify(model)


def test_sparsity_changes_logits(calibrated):
    model, thresholds = calibrated
    reference = model(TOKENS)
    sparsify(model, thresholds, "chess", 0.7)
    assert not mx.allclose(model(TOKENS), reference)


class Recorder(nn.Module):
    def __init__(self, dense, inputs):
        super().__init__()
        self.dense = dense
        self._inputs = inputs

    def __call__(self, x):
        self._inputs.append(x)
        return self.dense(x)


@pytest.mark.parametrize("method", ["cats", "chess", "chess+"])
def test_gate_mask_zeroes_exactly_entries_below_threshold(calibrated, method):
    model, thresholds = calibrated
    sparsify(model, thresholds, method, 0.5)
    mlp = model.layers[1].mlp
    assert isinstance(mlp, SparseMLP)
    mlp_inputs, down_inputs = [], []
    model.layers[1].mlp = Recorder(mlp, mlp_inputs)
    mlp.dense.down_proj = Recorder(mlp.dense.down_proj, down_inputs)
    model(TOKENS)
    x = mlp_inputs[0]
    gate = mlp._activation(mlp.dense.gate_proj(x))
    up = mlp.dense.up_proj(x)
    tau = np.array(thresholds.chess if method != "cats" else thresholds.cats)[1, 1]
    expected = np.where(np.abs(np.array(gate)) >= tau, np.array(gate), 0) * np.array(up)
    np.testing.assert_array_equal(np.array(down_inputs[0]), expected)
    dropped = np.mean(np.abs(np.array(gate)) < tau)
    assert 0 < dropped < 1


def test_chess_plus_thresholds_q_and_o_but_not_k_v(calibrated):
    model, thresholds = calibrated
    sparsify(model, thresholds, "chess+", 0.5)
    attn = model.layers[2].self_attn
    assert isinstance(attn.q_proj, InputSparseLinear) and isinstance(attn.o_proj, InputSparseLinear)
    q_in, q_used, k_in, v_in, o_in, o_used = [], [], [], [], [], []
    attn.q_proj = Recorder(attn.q_proj, q_in)
    attn.q_proj.dense.dense = Recorder(attn.q_proj.dense.dense, q_used)
    attn.k_proj = Recorder(attn.k_proj, k_in)
    attn.v_proj = Recorder(attn.v_proj, v_in)
    attn.o_proj = Recorder(attn.o_proj, o_in)
    attn.o_proj.dense.dense = Recorder(attn.o_proj.dense.dense, o_used)
    model(TOKENS)
    x = np.array(q_in[0])
    np.testing.assert_array_equal(np.array(k_in[0]), x)
    np.testing.assert_array_equal(np.array(v_in[0]), x)
    for given, used, tau in [(q_in, q_used, thresholds.q_proj[2, 1]), (o_in, o_used, thresholds.o_proj[2, 1])]:
        given = np.array(given[0])
        np.testing.assert_array_equal(np.array(used[0]), np.where(np.abs(given) >= tau, given, 0))
        assert 0.2 < np.mean(np.abs(given) < tau) < 0.8


def test_chess_leaves_attention_dense(calibrated):
    model, thresholds = calibrated
    sparsify(model, thresholds, "chess", 0.5)
    assert not isinstance(model.layers[0].self_attn.q_proj, InputSparseLinear)
    sparsify(model, thresholds, "chess+", 0.5)
    sparsify(model, thresholds, "cats", 0.3)  # re-patching replaces, never stacks
    assert type(model.layers[0].mlp.dense).__name__ == "MLP"
    assert not isinstance(model.layers[0].self_attn.q_proj, InputSparseLinear)
    unsparsify(model)
    assert isinstance(model.layers[0].mlp.gate_proj, (nn.Linear, nn.QuantizedLinear))
    assert isinstance(model.layers[0].self_attn.k_proj, (nn.Linear, nn.QuantizedLinear))


def test_realized_sparsity_tracking(calibrated):
    model, thresholds = calibrated
    sparsify(model, thresholds, "chess+", 0.5)
    with track_sparsity(model) as tracker:
        model(TOKENS)
    per_layer = tracker.sparsity()
    assert set(per_layer) == {f"layers.{i}.{p}" for i in range(len(model.layers)) for p in ("gate", "q_proj", "o_proj")}
    summary = tracker.summary()
    assert all(0 <= v <= 1 for v in summary.values())
    assert 0.2 < summary["gate"] < 0.8
    # Off outside the block: no counting.
    model(TOKENS)
    assert tracker.sparsity() == per_layer


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, 0.4])
def test_bad_sparsity_is_one_clear_error(calibrated, sparsity):
    model, thresholds = calibrated
    with pytest.raises(ChessError, match="sparsity"):
        sparsify(model, thresholds, "chess", sparsity)


def test_unknown_method_and_model_type(calibrated):
    model, thresholds = calibrated
    with pytest.raises(ChessError, match="unknown method"):
        sparsify(model, thresholds, "bogus", 0.5)
    model.model_type = "mamba"
    with pytest.raises(ChessError, match="unsupported model type 'mamba'"):
        sparsify(model, thresholds, "chess", 0.5)


def test_rows_like_adds_no_graph_node_for_a_matching_shape():
    x = mx.zeros((1, 1, 6))
    y = mx.arange(4.0).reshape(1, 1, 4)
    assert rows_like(y, x) is y
    flat = mx.arange(4.0)
    shaped = rows_like(flat, x)
    assert shaped.shape == (1, 1, 4) and mx.array_equal(shaped.reshape(-1), flat)
