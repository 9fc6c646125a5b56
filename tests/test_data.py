import json

import pytest
from conftest import WIKITEXT, ByteTokenizer

from chess_mlx.data import load_documents, split_text, token_windows
from chess_mlx.errors import ChessError


def test_wikitext_articles():
    text = " \n = First = \n \n Some text . \n \n = = Section = = \n \n More . \n = Second = \n \n Other .\n"
    docs = split_text(text)
    assert len(docs) == 2
    assert docs[0].startswith("= First =") and "More ." in docs[0]
    assert docs[1].startswith("= Second =")


def test_blank_line_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\n\nthree\n  \nfour")
    assert load_documents([str(path)]) == ["one\ntwo", "three", "four"]
    assert load_documents([str(path)], "1:") == ["three", "four"]


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["a", "b"]) + "\n")
    assert load_documents([str(path)]) == ["a", "b"]
    path.write_text('{"txt": "a"}\n')
    with pytest.raises(ChessError, match="d.jsonl:1: expected a JSON object with a 'text' field"):
        load_documents([str(path)])


def test_missing_file_and_bad_slice(tmp_path):
    with pytest.raises(ChessError, match="not found"):
        load_documents([str(tmp_path / "none.txt")])
    with pytest.raises(ChessError, match="START:END"):
        load_documents([str(WIKITEXT)], "half")


def test_shared_wikitext_has_60_articles():
    docs = load_documents([str(WIKITEXT)])
    assert len(docs) == 60
    assert len(load_documents([str(WIKITEXT)], "30:")) == 30


def test_windows_exact_count_and_shortage():
    docs = ["x" * 100, "y" * 10, "z" * 70]
    windows = token_windows(docs, ByteTokenizer(), window=40, num_tokens=150, min_window=5)
    assert [len(w) for w in windows] == [40, 40, 20, 10, 40]
    assert sum(map(len, windows)) == 150
    with pytest.raises(ChessError, match="only 180 tokens in windows, 1000 asked"):
        token_windows(docs, ByteTokenizer(), window=40, num_tokens=1000, min_window=5)
    # Short tails are dropped without a token target.
    assert [len(w) for w in token_windows(docs, ByteTokenizer(), window=40, min_window=32)] == [40, 40, 40]


def test_windows_at_most_stop_early_without_error():
    seen = []

    class Recording(ByteTokenizer):
        def encode(self, text: str) -> list:
            seen.append(text[0])
            return super().encode(text)

    docs = ["x" * 100, "y" * 10, "z" * 70]
    windows = token_windows(docs, Recording(), window=40, min_window=5, at_most=90)
    assert [len(w) for w in windows] == [40, 40, 10] and seen == ["x"]  # the later documents are never tokenized
    assert token_windows(docs, ByteTokenizer(), window=40, min_window=5, at_most=1000) == token_windows(
        docs, ByteTokenizer(), window=40, min_window=5)  # fewer tokens than at_most: all of them


class BosTokenizer(ByteTokenizer):
    """Starts every text with BOS (id 50, no letter), as Gemma's tokenizer does."""

    bos_token_id = 50

    def encode(self, text: str) -> list:
        return [self.bos_token_id] + super().encode(text)


def test_every_window_starts_with_bos_when_the_tokenizer_adds_one():
    from chess_mlx.perplexity import strided_windows

    docs = ["abcdefghij" * 10]  # 100 text tokens
    windows = token_windows(docs, BosTokenizer(), window=40, min_window=5)
    assert [len(w) for w in windows] == [40, 40, 23] and all(w[0] == 50 for w in windows)
    assert sum((w[1:] for w in windows), []) == ByteTokenizer().encode(docs[0])  # every text token once
    assert sum(len(w) - 1 for w in token_windows(docs, BosTokenizer(), window=40, num_tokens=50)) == 50
    strided, scored = strided_windows(docs, BosTokenizer(), window=40, stride=40)
    assert all(w[0] == 50 and len(w) <= 40 for w in strided)
    assert sum(scored) == 100  # with BOS in front, the first text token is scored too
    strided, scored = strided_windows(docs, BosTokenizer(), window=40, stride=20)
    assert sum(scored) == 100 and all(0 < s < len(w) for w, s in zip(strided, scored))
