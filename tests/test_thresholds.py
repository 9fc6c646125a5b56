import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_windows, tiny_gemma, tiny_llama

from chess_mlx.calibrate import calibrate
from chess_mlx.errors import ChessError
from chess_mlx.sparsify import sparsify
from chess_mlx.thresholds import load_thresholds


@pytest.fixture(scope="module")
def llama_and_thresholds():
    mx.random.seed(1)
    model = tiny_llama()
    return model, calibrate(model, random_windows(), [0.3, 0.5], progress=False)


def test_round_trip(tmp_path, llama_and_thresholds):
    model, thresholds = llama_and_thresholds
    path = tmp_path / "t.safetensors"
    thresholds.save(str(path))
    loaded = load_thresholds(str(path))
    for name in ("sparsities", "up_stat", "chess", "cats", "q_proj", "o_proj"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(thresholds, name))
    assert loaded.identity["num_layers"] == 3
    assert loaded.metadata["chess_mlx_version"]
    loaded.validate(model)
    assert list(tmp_path.iterdir()) == [path]


def test_other_model_is_rejected(llama_and_thresholds):
    _, thresholds = llama_and_thresholds
    with pytest.raises(ChessError, match="model_type is llama in the file but gemma3_text"):
        sparsify(tiny_gemma(), thresholds, "chess", 0.5)
    other = tiny_llama()  # same shapes, other weights
    for layer in other.layers:
        layer.input_layernorm.weight = layer.input_layernorm.weight * 1.5
    with pytest.raises(ChessError, match="same shapes"):
        sparsify(other, thresholds, "chess", 0.5)


def test_quantized_copy_of_same_model_is_accepted(llama_and_thresholds):
    import mlx.nn as nn

    model, thresholds = llama_and_thresholds
    weights = dict(tree for tree in mlx_flatten(model))
    copy = tiny_llama()
    copy.load_weights(list(weights.items()))
    nn.quantize(copy, group_size=32, bits=4)
    sparsify(copy, thresholds, "chess+", 0.5)


def mlx_flatten(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_width_mismatch_message(llama_and_thresholds, tmp_path):
    _, thresholds = llama_and_thresholds
    identity = thresholds.identity
    identity["intermediate_size"] = 128
    thresholds.metadata["identity"] = json.dumps(identity)
    try:
        with pytest.raises(ChessError, match="intermediate_size is 128 in the file but 96"):
            thresholds.validate(tiny_llama())
    finally:
        identity["intermediate_size"] = 96
        thresholds.metadata["identity"] = json.dumps(identity)


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ChessError, match="not found"):
        load_thresholds(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ChessError, match="not a readable safetensors"):
        load_thresholds(str(bad))
    foreign = tmp_path / "foreign.safetensors"
    mx.save_safetensors(str(foreign), {"w": mx.zeros((2,))})
    with pytest.raises(ChessError, match="not a chess_mlx thresholds file"):
        load_thresholds(str(foreign))


def test_nan_is_rejected_and_nothing_written(tmp_path, llama_and_thresholds):
    _, thresholds = llama_and_thresholds
    cats = thresholds.cats.copy()
    cats[0, 0] = np.nan
    with pytest.raises(ChessError, match="NaN or inf"):
        type(thresholds)(thresholds.sparsities, thresholds.up_stat, thresholds.chess, cats,
                         thresholds.q_proj, thresholds.o_proj, dict(thresholds.metadata))
    with pytest.raises(ChessError, match="does not exist"):
        thresholds.save(str(tmp_path / "missing" / "t.safetensors"))
    assert list(tmp_path.iterdir()) == []
