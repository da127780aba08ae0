"""Word vocabularies in FL-mobile's `vocab.json` format: {"vocab": {word: id}, "size", "unk_symbol", "pad_symbol"}.

Vocabularies in the wild break the ids the trainer relies on in two ways, and both silently corrupt
training and top-1: PaddleFL's builder numbers words from 1, so the most frequent word shares id 1 with
`<UNK>`; and many files have no `<PAD>` entry while the data's sequences hold the literal `"<PAD>"`.
`load_vocab` therefore

- always encodes the strings `<PAD>` and `<UNK>` as the pad and unk ids (whether or not they are entries);
- **repairs** a vocabulary in which a word shares its id with `<PAD>` or `<UNK>`, or that has no id for one
  of them: the ids are renumbered as flock's own builder numbers them (`<PAD>` 0, `<UNK>` 1, then every
  other entry, `<BOS>`/`<EOS>` included, in the order of its old id from 2), `size` grows if it must, and
  `Vocab.repairs` says exactly what changed (the reader logs it). A word-frequency-ordered file numbered
  from 1 thus gets exactly the ids of a correct one;
- **refuses** two words with one id (which one the data means cannot be known).

`Vocab.digest` covers the final mapping, so caches and checkpoints follow a repair.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from flock.common.errors import DataError

PAD, UNK, BOS, EOS = "<PAD>", "<UNK>", "<BOS>", "<EOS>"


@dataclass(frozen=True)
class Vocab:
    """word -> id, with PAD and UNK ids; `size` is the model's vocabulary size (ids are < size);
    `repairs` lists what `load_vocab` changed in the file's mapping (empty when nothing)."""

    ids: Mapping[str, int]
    size: int
    pad_id: int
    unk_id: int
    digest: str
    repairs: tuple[str, ...] = ()

    def encode(self, tokens: Iterable[str]) -> list[int]:
        unk, ids = self.unk_id, self.ids
        return [ids.get(t, unk) for t in tokens]


def build_vocab(tokens: Iterable[str], size: int = 10_000) -> dict:
    """The `size` most frequent tokens (ties by word) after PAD=0 and UNK=1, as a vocab.json document."""
    return vocab_from_counts(collections.Counter(tokens), size)


def vocab_from_counts(counts: Mapping[str, int], size: int = 10_000) -> dict:
    """`build_vocab` from token counts (gathered a file at a time by a caller that cannot hold every token)."""
    counter = {t: c for t, c in counts.items() if t not in (PAD, UNK)}
    words = [w for w, _ in sorted(counter.items(), key=lambda wc: (-wc[1], wc[0]))[: size - 2]]
    vocab = {PAD: 0, UNK: 1}
    for i, w in enumerate(words):
        vocab[w] = i + 2
    return {"vocab": vocab, "size": size, "unk_symbol": 1, "pad_symbol": 0}


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_vocab(path: Path) -> Vocab:
    """Reads, checks and (see the module docstring) repairs a vocab.json; a fault is a DataError naming
    the file."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: vocabulary file not found (expected DATA_DIR/vocab.json)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(doc, dict) and "vocab" in doc:
        ids, size = doc["vocab"], doc.get("size")
        pad, unk = doc.get("pad_symbol"), doc.get("unk_symbol")
    elif isinstance(doc, dict):
        ids, size, pad, unk = doc, None, None, None
    else:
        raise DataError(f"{path}: expected an object with a 'vocab' mapping of word to id")
    if not isinstance(ids, dict) or not all(_is_id(v) for v in ids.values()):
        raise DataError(f"{path}: 'vocab' must map words to integer ids")
    if not ids:
        raise DataError(f"{path}: the vocabulary is empty")
    for name, value in (("pad_symbol", pad), ("unk_symbol", unk), ("size", size)):
        if value is not None and not _is_id(value):
            raise DataError(f"{path}: {name} must be an integer, got {value!r}")
    if min([*ids.values(), *(v for v in (pad, unk) if v is not None)]) < 0:
        raise DataError(f"{path}: negative token id")
    for symbol, declared, key in ((PAD, pad, "pad_symbol"), (UNK, unk, "unk_symbol")):
        if declared is not None and symbol in ids and ids[symbol] != declared:
            raise DataError(f"{path}: {key} is {declared} but the entry {symbol!r} has id {ids[symbol]}")
    pad = pad if pad is not None else ids.get(PAD)
    unk = unk if unk is not None else ids.get(UNK)

    words_at: dict[int, list[str]] = collections.defaultdict(list)
    for word, i in ids.items():
        if word not in (PAD, UNK):
            words_at[i].append(word)
    for i, words in sorted(words_at.items()):
        if len(words) > 1:
            shown = ", ".join(repr(w) for w in sorted(words)[:4])
            raise DataError(f"{path}: id {i} is shared by the words {shown}: the data's meaning cannot be "
                            f"recovered; fix the file")
    clashes = [f"{words_at[i][0]!r} shares id {i} with {symbol}" for symbol, i in ((PAD, pad), (UNK, unk))
               if i is not None and i in words_at]
    missing = [f"no id for {symbol}" for symbol, i in ((PAD, pad), (UNK, unk)) if i is None]
    if pad is not None and pad == unk:
        clashes.append(f"{PAD} and {UNK} share id {pad}")
    repairs: tuple[str, ...] = ()
    if clashes or missing:
        ordered = sorted(((i, w) for i, ws in words_at.items() for w in ws))
        new = {PAD: 0, UNK: 1, **{w: n + 2 for n, (_, w) in enumerate(ordered)}}
        moved = sum(1 for w, i in ids.items() if w in new and new[w] != i)
        old_size = size
        size = max(size or 0, len(new))
        repairs = (*clashes, *missing,
                   f"renumbered: {PAD} 0, {UNK} 1, the {len(ordered)} other entries from 2 in their old order "
                   f"({moved} ids changed; e.g. {ordered[0][1]!r} {ordered[0][0]} -> 2)"
                   + (f"; size {old_size} -> {size}" if old_size is not None and old_size != size else ""))
        ids, pad, unk = new, 0, 1
    else:
        ids = {**ids, PAD: pad, UNK: unk}
    top = max(ids.values())
    if size is None:
        size = top + 1
    if size <= top:
        raise DataError(f"{path}: size {size} is not above the largest id {top}")
    digest = hashlib.sha1(json.dumps([sorted(ids.items()), size, pad, unk]).encode()).hexdigest()
    return Vocab(ids=ids, size=size, pad_id=pad, unk_id=unk, digest=digest, repairs=repairs)


def save_json_atomic(path: Path, doc) -> None:
    """Writes JSON to a temporary file, fsyncs it and renames it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
