"""Text for calibration and evaluation: documents in, token windows out."""

import gzip
import json
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from .errors import ChessError

WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"


def split_text(text: str) -> List[str]:
    """Documents of a plain text file: WikiText articles if it has their
    ` = Title = ` headings, else paragraphs separated by blank lines."""
    starts = [m.start() for m in WIKITEXT_TITLE.finditer(text)]
    if starts:
        bounds = starts + [len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        pieces = re.split(r"\n\s*\n", text)
    return [p.strip() for p in pieces if p.strip()]


def read_jsonl(lines: Iterable[str], source: str) -> List[str]:
    documents = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            documents.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ChessError(f"{source}:{number}: expected a JSON object with a 'text' field") from None
    return documents


def download_c4() -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download("allenai/c4", C4_SHARD, repo_type="dataset"))


def load_documents(sources: Sequence[str], documents: Optional[str] = None) -> List[str]:
    """Read documents from text files, JSONL files (a "text" field per line)
    or ``c4`` (one shard of C4, downloaded once), in order.

    ``documents`` is an optional Python slice over the result, e.g. ``":30"``.
    """
    docs: List[str] = []
    for source in sources:
        if source == "c4":
            with gzip.open(download_c4(), "rt", encoding="utf-8") as f:
                docs.extend(read_jsonl(f, "c4"))
            continue
        path = Path(source)
        if not path.is_file():
            raise ChessError(f"data file '{source}' not found")
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                docs.extend(read_jsonl(f, source))
        else:
            docs.extend(split_text(path.read_text(encoding="utf-8")))
    if documents:
        docs = docs[parse_slice(documents)]
    if not docs:
        raise ChessError(f"no documents found in {', '.join(sources)}")
    return docs


def parse_slice(spec: str) -> slice:
    try:
        parts = [int(p) if p.strip() else None for p in spec.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
    except ValueError:
        raise ChessError(f"--documents expects START:END (Python slice), got '{spec}'") from None
    return slice(*parts)


def encode_document(tokenizer, document: str) -> Tuple[List[int], List[int]]:
    """``(prefix, tokens)`` of a document: when the tokenizer starts every
    text with BOS (Gemma), the prefix is that BOS, and every window gets it,
    as the model saw in training; models are far off without it."""
    tokens = list(tokenizer.encode(document))
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokens and bos is not None and tokens[0] == bos:
        return [bos], tokens[1:]
    return [], tokens


def token_windows(
    documents: Sequence[str],
    tokenizer,
    window: int,
    num_tokens: Optional[int] = None,
    min_window: int = 32,
    at_most: Optional[int] = None,
) -> List[List[int]]:
    """Split each document's tokens into windows of at most ``window`` tokens
    (each starting with the tokenizer's BOS, if it adds one).

    Windows never cross documents; a document's tail shorter than
    ``min_window`` is dropped. With ``num_tokens`` the windows hold exactly
    that many text tokens (BOS not counted), or a ChessError says how many
    the data has. With ``at_most`` they stop there, or hold all the data if
    it has fewer (no error), and later documents are not tokenized.
    """
    limit = num_tokens if num_tokens is not None else at_most
    windows, total = [], 0
    for doc in documents:
        prefix, tokens = encode_document(tokenizer, doc)
        step = window - len(prefix)
        for start in range(0, len(tokens), step):
            piece = tokens[start : start + step]
            if len(piece) + len(prefix) < min_window:
                continue
            if limit is not None:
                piece = piece[: limit - total]
            windows.append(prefix + piece)
            total += len(piece)
            if limit is not None and total >= limit:
                return windows
    if num_tokens is not None:
        raise ChessError(
            f"the data holds only {total} tokens in windows, {num_tokens} asked "
            f"(lower --tokens or add data)"
        )
    return windows
