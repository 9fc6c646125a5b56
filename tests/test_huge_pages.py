"""Weights moved onto transparent huge pages for the CPU extension's decode."""

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_windows, tiny_llama
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from chess_mlx import cpu_kernels
from chess_mlx.bench import clone
from chess_mlx.calibrate import calibrate
from chess_mlx.sparsify import (
    batches, huge_pages_enabled, shared_relayouts, sparsify, unsparsify, weights_to_huge_pages,
)

SMAPS = Path("/proc/self/smaps_rollup")


@pytest.fixture(autouse=True)
def extension():
    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()


def needs_thp():
    mode = cpu_kernels.transparent_huge_pages()
    if mode in (None, "never") or not SMAPS.is_file():
        pytest.skip(f"this system has no transparent huge pages (THP mode: {mode})")


def huge_kib() -> int:
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", SMAPS.read_text()).group(1))


def test_copies_equal_their_arrays():
    arrays = [
        mx.random.normal((33, 77)),
        mx.random.normal((64, 5)).astype(mx.bfloat16).T,  # not contiguous
        mx.arange(40, dtype=mx.uint32)[::3],
        mx.zeros((0, 4), mx.float16),
        mx.array(7, mx.int8),
        mx.random.normal((1001,)).astype(mx.float16),
    ]
    copies = cpu_kernels.huge_page_copies(arrays)
    assert len(copies) == len(arrays)
    for a, c in zip(arrays, copies):
        assert c.dtype == a.dtype and c.shape == a.shape and mx.array_equal(c, a)
    assert mx.array_equal(copies[0] @ copies[0].T, arrays[0] @ arrays[0].T)
    assert cpu_kernels.huge_page_copies([]) == []


def test_copies_sit_on_huge_pages_until_freed():
    needs_thp()
    arrays = [mx.ones((4 << 20,)), mx.full((2 << 20,), 3, mx.uint32)]  # 24 MiB
    mx.eval(arrays)
    before = huge_kib()
    copies = cpu_kernels.huge_page_copies(arrays)
    held = huge_kib() - before
    assert held >= 2048, "no copy was placed on a huge page"
    assert mx.array_equal(copies[1], arrays[1])
    del copies
    assert huge_kib() - before < held, "the copies' region was not freed with them"


@pytest.fixture(scope="module")
def float_llama():
    mx.random.seed(11)
    model = tiny_llama()
    return model, calibrate(model, random_windows(), [0.5], progress=False)


def decode_logits(model):
    cache = make_prompt_cache(model)
    model(mx.array(random_windows(1, 7, seed=2)), cache=cache)
    return model(mx.array([[4]]), cache=cache)


def test_moved_weights_are_copies_that_decode_the_same(float_llama, monkeypatch):
    needs_thp()
    model, thresholds = float_llama
    monkeypatch.setenv("CHESS_MLX_HUGE_PAGES", "0")
    sparsify(model, thresholds, "chess+", 0.5, kernels=cpu_kernels)
    before = dict(tree_flatten(model.parameters()))
    reference = decode_logits(model)
    monkeypatch.setenv("CHESS_MLX_HUGE_PAGES", "1")
    assert huge_pages_enabled(cpu_kernels)
    moved = weights_to_huge_pages(model, cpu_kernels)
    after = dict(tree_flatten(model.parameters()))
    assert moved == sum(a.nbytes for a in before.values())
    assert after.keys() == before.keys()
    for name, a in after.items():
        assert a is not before[name] and mx.array_equal(a, before[name]), name
    assert mx.array_equal(decode_logits(model), reference)


def test_switched_off_or_without_thp_nothing_moves(float_llama, monkeypatch):
    model, thresholds = float_llama
    monkeypatch.setenv("CHESS_MLX_HUGE_PAGES", "0")
    sparsify(model, thresholds, "chess", 0.5, kernels=cpu_kernels)
    before = dict(tree_flatten(model.parameters()))
    assert weights_to_huge_pages(model, cpu_kernels) == 0
    monkeypatch.delenv("CHESS_MLX_HUGE_PAGES")
    monkeypatch.setattr(cpu_kernels, "transparent_huge_pages", lambda: "never")
    assert weights_to_huge_pages(model, cpu_kernels) == 0
    assert all(a is before[name] for name, a in tree_flatten(model.parameters()))
    assert not huge_pages_enabled(None)


def test_models_sharing_weights_share_their_copies(float_llama):
    needs_thp()
    model, thresholds = float_llama
    unsparsify(model)  # clones copy the module tree, which must not hold the kernels module
    with shared_relayouts():
        first, second = clone(model), clone(model)
        sparsify(first, thresholds, "chess", 0.5, kernels=cpu_kernels)
        sparsify(second, thresholds, "chess+", 0.5, kernels=cpu_kernels)
    embedding = "model.embed_tokens.embedding.weight"
    a, b = dict(tree_flatten(first.parameters())), dict(tree_flatten(second.parameters()))
    assert a[embedding] is b[embedding]
    up = "model.layers.0.mlp.dense.up_proj.weight"  # stock layout in both
    assert a[up] is b[up]
    np.testing.assert_array_equal(np.array(a[embedding]), np.array(model.model.embed_tokens.weight))


def test_batches_close_at_the_byte_limit():
    sizes = [("a", 3), ("b", 3), ("c", 5), ("d", 1)]
    assert list(batches(sizes, 4)) == [["a", "b"], ["c"], ["d"]]
    assert list(batches(sizes, 100)) == [["a", "b", "c", "d"]]
    assert list(batches([], 4)) == []
