"""LEAF Reddit JSON reader (token format), FL-mobile's `lm_data` layout.

    DATA_DIR/vocab.json                    FL-mobile's vocab format (reader/vocab.py)
    DATA_DIR/20200101/train_data.json      LEAF: {"users", "num_samples", "user_data": {uid: {"x", "y"}}}
    DATA_DIR/20200102/test_data.json

In LEAF's Reddit format `x` is a list of comments, each a list of fixed-length token sequences, and `y` the
matching list of {"target_tokens": [...], "count_tokens": [...], ...}. A sample is one sequence.

Each JSON file is parsed once into a binary cache beside the data (`DATA_DIR/.flock_cache/`, keyed by the
file's size and mtime and the vocab's digest); indexes and per-user loads then read memory-mapped arrays,
so no process ever holds a whole day in memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from common.errors import DataError
from reader.base import DayIndex
from reader.vocab import Vocab, load_vocab

CACHE_DIR = ".flock_cache"
log = logging.getLogger(__name__)


def split_file(data_dir: Path, day: str, split: str) -> Path:
    return data_dir / day / f"{split}_data.json"


@dataclass(frozen=True)
class _Columns:
    users: tuple[str, ...]
    offsets: np.ndarray        # int64, len(users) + 1
    x: np.ndarray              # int32 [samples, seq_len]
    y: np.ndarray              # int32 [samples, seq_len]
    mask: np.ndarray           # uint8 [samples, seq_len]
    position: Mapping[str, int]


class LeafRedditReader:
    """Reads LEAF Reddit token JSON day folders (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise DataError(f"{self.data_dir}: data folder not found")
        self._vocab: Vocab | None = None
        self._columns: dict[tuple[str, str], _Columns] = {}

    @property
    def vocab(self) -> Vocab:
        if self._vocab is None:
            self._vocab = load_vocab(self.data_dir / "vocab.json")
        return self._vocab

    def days(self) -> list[str]:
        days = sorted(p.name for p in self.data_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and any(p.glob("*_data.json")))
        if not days:
            raise DataError(f"{self.data_dir}: no day folders with train_data.json or test_data.json")
        return days

    def has_split(self, day: str, split: str) -> bool:
        return split_file(self.data_dir, day, split).is_file()

    def prepare(self) -> None:
        for repair in self.vocab.repairs:
            log.warning("%s: repaired: %s", self.data_dir / "vocab.json", repair)
        for day in self.days():
            for split in ("train", "test"):
                if self.has_split(day, split):
                    self._load_columns(day, split)

    def index(self, day: str, split: str) -> DayIndex:
        cols = self._load_columns(day, split)
        counts = np.diff(cols.offsets)
        return DayIndex(day=day, split=split, users=cols.users, counts=tuple(int(c) for c in counts))

    def load(self, day: str, split: str, uid: str) -> Mapping[str, np.ndarray]:
        cols = self._load_columns(day, split)
        try:
            i = cols.position[uid]
        except KeyError:
            raise DataError(f"{split_file(self.data_dir, day, split)}: no user {uid!r}") from None
        a, b = int(cols.offsets[i]), int(cols.offsets[i + 1])
        return {"x": cols.x[a:b], "y": cols.y[a:b], "mask": cols.mask[a:b]}

    def spec(self) -> Mapping[str, int]:
        v = self.vocab
        # the digest lets a checkpoint refuse a run whose vocabulary changed under the same users
        return {"vocab_size": v.size, "pad_id": v.pad_id, "unk_id": v.unk_id, "vocab_digest": int(v.digest[:12], 16)}

    # -- cache -------------------------------------------------------------------------------------------

    def _load_columns(self, day: str, split: str) -> _Columns:
        key = (day, split)
        if key not in self._columns:
            path = split_file(self.data_dir, day, split)
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            cache = self._cache_path(path)
            if not (cache / "done").is_file():
                self._build_cache(path, cache)
            users = tuple(json.loads((cache / "users.json").read_text(encoding="utf-8")))
            offsets = np.load(cache / "offsets.npy")
            arrays = {n: np.load(cache / f"{n}.npy", mmap_mode="r") for n in ("x", "y", "mask")}
            self._columns[key] = _Columns(users=users, offsets=offsets, position={u: i for i, u in enumerate(users)},
                                          **arrays)
        return self._columns[key]

    def _cache_path(self, path: Path) -> Path:
        st = path.stat()
        key = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}:{self.vocab.digest}".encode()).hexdigest()[:16]
        rel = path.relative_to(self.data_dir)
        return self.data_dir / CACHE_DIR / rel.parent / f"{rel.stem}-{key}"

    def _build_cache(self, path: Path, cache: Path) -> None:
        users, offsets, x, y, mask = parse_leaf_reddit(path, self.vocab)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "users.json").write_text(json.dumps(users), encoding="utf-8")
        for name, arr in (("offsets", offsets), ("x", x), ("y", y), ("mask", mask)):
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "done").write_text(path.name)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in cache.parent.glob(f"{path.stem}-*"):  # caches of older versions of the file
            if stale != cache:
                shutil.rmtree(stale, ignore_errors=True)


def parse_leaf_reddit(path: Path, vocab: Vocab):
    """Parses one LEAF Reddit JSON file into (users, offsets, x, y, mask); faults name the file and user."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
        raise DataError(f"{path}: expected a LEAF object with a 'user_data' mapping")
    user_data = doc["user_data"]
    users = doc.get("users", list(user_data))
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise DataError(f"{path}: 'users' must be a list of user ids")
    if len(set(users)) != len(users):
        raise DataError(f"{path}: 'users' lists a user twice")
    seq_len = None
    xs: list[list[int]] = []
    ys: list[list[int]] = []
    ms: list[list[int]] = []
    offsets = [0]
    for uid in users:
        where = f"{path}: user {uid!r}"
        ud = user_data.get(uid)
        if not isinstance(ud, dict) or not isinstance(ud.get("x"), list) or not isinstance(ud.get("y"), list):
            raise DataError(f"{where}: missing or malformed 'x'/'y' lists")
        if len(ud["x"]) != len(ud["y"]):
            raise DataError(f"{where}: {len(ud['x'])} comments in 'x' but {len(ud['y'])} labels in 'y'")
        for ci, (comment, label) in enumerate(zip(ud["x"], ud["y"])):
            if not isinstance(label, dict) or "target_tokens" not in label:
                raise DataError(f"{where}: comment {ci} has no 'target_tokens'")
            targets = label["target_tokens"]
            counts = label.get("count_tokens")
            if not isinstance(comment, list) or not isinstance(targets, list) or len(comment) != len(targets):
                raise DataError(f"{where}: comment {ci}: 'x' and 'target_tokens' differ in sequences")
            if counts is not None and (not isinstance(counts, list) or len(counts) != len(comment)):
                raise DataError(f"{where}: comment {ci}: 'count_tokens' differs from 'x' in sequences")
            for si, (seq, tgt) in enumerate(zip(comment, targets)):
                cnt = counts[si] if counts is not None else None
                if seq_len is None and isinstance(seq, list):
                    seq_len = len(seq)
                if (not isinstance(seq, list) or not isinstance(tgt, list) or len(seq) != seq_len
                        or len(tgt) != seq_len or (cnt is not None and (not isinstance(cnt, list) or len(cnt) != seq_len))):
                    raise DataError(f"{where}: comment {ci} sequence {si} is not {seq_len} tokens in x, y and counts")
                if not all(isinstance(t, str) for t in seq) or not all(isinstance(t, str) for t in tgt):
                    raise DataError(f"{where}: comment {ci} sequence {si}: tokens must be strings")
                xs.append(vocab.encode(seq))
                ys.append(vocab.encode(tgt))
                if cnt is None:
                    ms.append([int(t != vocab.pad_id) for t in xs[-1]])
                else:
                    try:
                        ms.append([1 if float(c) else 0 for c in cnt])
                    except (TypeError, ValueError):
                        raise DataError(f"{where}: comment {ci} sequence {si}: count_tokens must be numbers") from None
        offsets.append(len(xs))
    width = seq_len or 1
    x = np.asarray(xs, dtype=np.int32).reshape(-1, width)
    y = np.asarray(ys, dtype=np.int32).reshape(-1, width)
    mask = np.asarray(ms, dtype=np.uint8).reshape(-1, width)
    return users, np.asarray(offsets, dtype=np.int64), x, y, mask
