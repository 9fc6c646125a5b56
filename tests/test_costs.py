import pytest

from chess_mlx.costs import LLAMA_3_8B, SMOLLM2_135M, decode_bytes, ideal_speedup


def test_smollm2_parameter_count():
    # 30 layers of attention and MLP weights plus the tied embedding read as LM head.
    total = sum(decode_bytes(SMOLLM2_135M, 1.0).values())
    assert total == pytest.approx(134.5e6, rel=0.01)


def test_llama3_8b_chess_plus_matches_the_reference_fraction():
    # chess-reference.md: q, o, up, down are 64.4% of the bytes Llama-3-8B
    # streams per token (LM head included), so the ideal at 50% is 1.47x.
    read = decode_bytes(LLAMA_3_8B, 1.0)
    share = sum(read[p] for p in ("q_proj", "o_proj", "up_proj", "down_proj")) / sum(read.values())
    assert share == pytest.approx(0.644, abs=0.001)
    assert ideal_speedup(LLAMA_3_8B, "chess+", 0.5) == pytest.approx(1 / (1 - 0.5 * share))
    assert round(ideal_speedup(LLAMA_3_8B, "chess+", 0.5), 2) == 1.47


def test_ideal_speedups_order():
    assert ideal_speedup(SMOLLM2_135M, "dense", 0.5) == 1.0
    assert ideal_speedup(SMOLLM2_135M, "cats", 0.5) == ideal_speedup(SMOLLM2_135M, "chess", 0.5)
    assert 1 < ideal_speedup(SMOLLM2_135M, "chess", 0.5) < ideal_speedup(SMOLLM2_135M, "chess+", 0.5)
    assert ideal_speedup(SMOLLM2_135M, "chess+", 0.5) == pytest.approx(1.37, abs=0.01)


def test_a_wider_lm_head_lowers_the_ideal():
    # SmolLM2 as stored: 4-bit layers (0.75 B/weight with float32 scales,
    # group 32) under an 8-bit embedding (1.25 B/weight).
    same = ideal_speedup(SMOLLM2_135M, "chess+", 0.5)
    assert ideal_speedup(SMOLLM2_135M, "chess+", 0.5, head_ratio=1.0) == same
    assert 1 < ideal_speedup(SMOLLM2_135M, "chess+", 0.5, head_ratio=1.25 / 0.75) < same
