"""Word vocabularies in FL-mobile's `vocab.json` format: {"vocab": {word: id}, "size", "unk_symbol", "pad_symbol"}."""
from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from common.errors import DataError

PAD, UNK, BOS, EOS = "<PAD>", "<UNK>", "<BOS>", "<EOS>"


@dataclass(frozen=True)
class Vocab:
    """word -> id, with PAD and UNK ids; `size` is the model's vocabulary size (ids are < size)."""

    ids: Mapping[str, int]
    size: int
    pad_id: int
    unk_id: int
    digest: str

    def encode(self, tokens: Iterable[str]) -> list[int]:
        unk, ids = self.unk_id, self.ids
        return [ids.get(t, unk) for t in tokens]


def build_vocab(tokens: Iterable[str], size: int = 10_000) -> dict:
    """The `size` most frequent tokens (ties by word) after PAD=0 and UNK=1, as a vocab.json document."""
    counter = collections.Counter(t for t in tokens if t not in (PAD, UNK))
    words = [w for w, _ in sorted(counter.items(), key=lambda wc: (-wc[1], wc[0]))[: size - 2]]
    vocab = {PAD: 0, UNK: 1}
    for i, w in enumerate(words):
        vocab[w] = i + 2
    return {"vocab": vocab, "size": size, "unk_symbol": 1, "pad_symbol": 0}


def load_vocab(path: Path) -> Vocab:
    """Reads and checks a vocab.json; any fault is a DataError naming the file."""
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: vocabulary file not found (expected DATA_DIR/vocab.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(doc, dict) and "vocab" in doc:
        ids = doc["vocab"]
        size = doc.get("size", None)
        pad = doc.get("pad_symbol", ids.get(PAD) if isinstance(ids, dict) else None)
        unk = doc.get("unk_symbol", ids.get(UNK) if isinstance(ids, dict) else None)
    elif isinstance(doc, dict):
        ids, size, pad, unk = doc, None, doc.get(PAD), doc.get(UNK)
    else:
        raise DataError(f"{path}: expected an object with a 'vocab' mapping of word to id")
    if not isinstance(ids, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids.values()):
        raise DataError(f"{path}: 'vocab' must map words to integer ids")
    if not ids:
        raise DataError(f"{path}: the vocabulary is empty")
    if not isinstance(pad, int) or not isinstance(unk, int):
        raise DataError(f"{path}: needs pad_symbol and unk_symbol ids (or {PAD} and {UNK} entries)")
    top = max(max(ids.values()), pad, unk)
    if min(min(ids.values()), pad, unk) < 0:
        raise DataError(f"{path}: negative token id")
    if size is None:
        size = top + 1
    if not isinstance(size, int) or size <= top:
        raise DataError(f"{path}: size {size} is not above the largest id {top}")
    return Vocab(ids=ids, size=size, pad_id=pad, unk_id=unk, digest=hashlib.sha1(raw).hexdigest())


def save_json_atomic(path: Path, doc) -> None:
    """Writes JSON to a temporary file, fsyncs it and renames it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
