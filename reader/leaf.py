"""LEAF Reddit JSON reader (token format), FL-mobile's `lm_data` layout.

    DATA_DIR/vocab.json                    FL-mobile's vocab format (reader/vocab.py)
    DATA_DIR/20200101/train_data.json      LEAF: {"users", "num_samples", "user_data": {uid: {"x", "y"}}}
    DATA_DIR/20200102/test_data.json

A day's split may also come in several files, as LEAF cuts its data: `train_data_00000.json`,
`train_data_00001.json`, ... (every `<split>_data*.json` of the day folder, read in name order; a user
may be in only one of them).

In LEAF's Reddit format `x` is a list of comments, each a list of fixed-length token sequences, and `y` the
matching list of {"target_tokens": [...], "count_tokens": [...], ...}. A sample is one sequence.

A day's split is parsed once into one binary cache beside the data (`DATA_DIR/.flock_cache/`, keyed by
its files' names, sizes and mtimes and the vocab's digest), a file at a time, with a progress bar on a
terminal (log lines otherwise). Indexes then read the user ids as a memory-mapped `reader.users.UserIds`
table (no Python object per user) and a load reads one user's rows from the cache files: a process holds
the samples of the users it is simulating, never a day. Building the cache holds one JSON file in memory
at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from flock.common.errors import DataError
from reader.base import DayIndex
from reader.leaf_format import leaf_users
from reader.users import UserIds, first_duplicate, fixed_width, sort_ids
from reader.vocab import Vocab, load_vocab

CACHE_DIR = ".flock_cache"
CACHE_FORMAT = 2           # v2: one cache per day's split (several files), user ids as fixed-width bytes
log = logging.getLogger(__name__)


def split_files(data_dir: Path, day: str, split: str) -> list[Path]:
    """The LEAF files of a day's split: `<split>_data.json` and/or `<split>_data_<part>.json`, in name order."""
    return sorted(p for p in (Path(data_dir) / day).glob(f"{split}_data*.json") if p.is_file())


def describe_files(files: Sequence[Path]) -> str:
    """How messages name a split's files: the file, or the folder's pattern and how many."""
    if len(files) == 1:
        return str(files[0])
    return f"{files[0].parent}/{files[0].name.split('_data')[0]}_data*.json ({len(files)} files)"


class _Rows:
    """One [samples, seq_len] array of the cache, read a user's rows at a time with pread: a process holds
    only the rows it is using. (A memory map would keep every page it touched, with the kernel's
    fault-around neighbours, resident: a rank's RSS would grow with the users it ever trained.)"""

    def __init__(self, path: Path, dtype, rows: int, width: int) -> None:
        self.dtype, self.rows, self.width = np.dtype(dtype), rows, width
        self._file = open(path, "rb", buffering=0) if rows else None     # closed with this object
        self._row_bytes = self.dtype.itemsize * width

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.rows)
        if b <= a:
            return np.zeros((0, self.width), dtype=self.dtype)
        raw = os.pread(self._file.fileno(), (b - a) * self._row_bytes, a * self._row_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(b - a, self.width)


@dataclass(frozen=True)
class _Columns:
    where: str                 # the split's files, for messages
    index: DayIndex            # users (a UserIds table) and their counts
    offsets: np.ndarray        # int64, len(users) + 1
    x: _Rows                   # int32 [samples, seq_len]
    y: _Rows                   # int32 [samples, seq_len]
    mask: _Rows                # uint8 [samples, seq_len]


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
                      if p.is_dir() and not p.name.startswith(".") and any(p.glob("*_data*.json")))
        if not days:
            raise DataError(f"{self.data_dir}: no day folders with train_data.json or test_data.json")
        return days

    def has_split(self, day: str, split: str) -> bool:
        return bool(split_files(self.data_dir, day, split))

    def prepare(self) -> None:
        for repair in self.vocab.repairs:
            log.warning("%s: repaired: %s", self.data_dir / "vocab.json", repair)
        for day in self.days():
            for split in ("train", "test"):
                if self.has_split(day, split):
                    self._load_columns(day, split, progress=True)

    def index(self, day: str, split: str) -> DayIndex:
        return self._load_columns(day, split).index

    def load(self, day: str, split: str, uid: str) -> Mapping[str, np.ndarray]:
        cols = self._load_columns(day, split)
        i = cols.index.users.position(uid)
        if i is None:
            raise DataError(f"{cols.where}: no user {uid!r}")
        a, b = int(cols.offsets[i]), int(cols.offsets[i + 1])
        return {"x": cols.x[a:b], "y": cols.y[a:b], "mask": cols.mask[a:b]}

    def spec(self) -> Mapping[str, int]:
        v = self.vocab
        # the digest lets a checkpoint refuse a run whose vocabulary changed under the same users
        return {"vocab_size": v.size, "pad_id": v.pad_id, "unk_id": v.unk_id, "vocab_digest": int(v.digest[:12], 16)}

    # -- cache -------------------------------------------------------------------------------------------

    def _load_columns(self, day: str, split: str, *, progress: bool = False) -> _Columns:
        key = (day, split)
        if key not in self._columns:
            files = split_files(self.data_dir, day, split)
            if not files:
                raise DataError(f"{self.data_dir / day / f'{split}_data.json'}: file not found")
            cache = self._cache_path(day, split, files)
            if not (cache / "done").is_file():
                self._build_cache(files, cache, f"{day}/{split}", progress)
            self._columns[key] = open_cache(cache, day, split, describe_files(files))
        return self._columns[key]

    def _cache_path(self, day: str, split: str, files: list[Path]) -> Path:
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        key = hashlib.sha1(json.dumps([CACHE_FORMAT, stats, self.vocab.digest]).encode()).hexdigest()[:16]
        return self.data_dir / CACHE_DIR / day / f"{split}_data-{key}"

    def _build_cache(self, files: list[Path], cache: Path, label: str, progress: bool) -> None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_cache(files, tmp, self.vocab, label=label, progress=progress)
            os.replace(tmp, cache)
        except OSError:  # another process finished the same cache first
            if not (cache / "done").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        split_prefix = cache.name.rsplit("-", 1)[0]
        for stale in cache.parent.glob(f"{split_prefix}-*"):  # caches of older versions of the files
            if stale != cache:
                shutil.rmtree(stale, ignore_errors=True)


def open_cache(cache: Path, day: str, split: str, where: str) -> _Columns:
    """A built cache: user ids memory-mapped, offsets in memory, samples read per user."""
    meta = json.loads((cache / "meta.json").read_text(encoding="utf-8"))
    rows, width = meta["sequences"], meta["seq_len"]

    def samples(name: str, dtype) -> _Rows:
        return _Rows(cache / name, dtype, rows, width)

    def ids(name: str) -> np.ndarray:
        return np.load(cache / name, mmap_mode="r" if meta["users"] else None)

    users = UserIds(ids("users.npy"), ids("users_sorted.npy"), ids("users_sorted_positions.npy"))
    offsets = np.load(cache / "offsets.npy")
    index = DayIndex(day=day, split=split, users=users, counts=np.diff(offsets))
    return _Columns(where=where, index=index, offsets=offsets, x=samples("x.i32", np.int32),
                    y=samples("y.i32", np.int32), mask=samples("mask.u8", np.uint8))


class _Progress:
    """A cache build's progress over its files' bytes: a bar on a terminal, else a log line per file."""

    def __init__(self, label: str, files: list[Path], shown: bool) -> None:
        self.label, self.files, self.started = label, len(files), time.perf_counter()
        self.shown = shown and log.isEnabledFor(logging.INFO)
        self.bar = None
        if self.shown and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, file=sys.stderr,
                            desc=f"cache {label}", dynamic_ncols=True)

    def file_done(self, path: Path, done: int, users: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix({"files": f"{done}/{self.files}", "users": f"{users:,}"}, refresh=False)
            self.bar.update(path.stat().st_size)
        elif self.shown:
            log.info("cache %s: %d/%d files, %d users, %.0f s", self.label, done, self.files, users,
                     time.perf_counter() - self.started)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_cache(files: list[Path], out: Path, vocab: Vocab, *, label: str = "", progress: bool = False) -> None:
    """Parses a split's LEAF files, one at a time, into the cache folder `out` (see `open_cache`)."""
    uids: list[bytes] = []
    counts = array("q")
    shape = {"seq_len": None, "sequences": 0}
    bar = _Progress(label, files, progress)
    with open(out / "x.i32", "wb") as fx, open(out / "y.i32", "wb") as fy, open(out / "mask.u8", "wb") as fm:
        for done, path in enumerate(files, 1):
            parsed = parse_leaf_reddit(path, vocab, seq_len=shape["seq_len"])
            users, file_counts, x, y, mask, width = parsed
            shape["seq_len"] = width
            shape["sequences"] += len(x)
            uids.extend(u.encode("utf-8") for u in users)
            counts.extend(file_counts)
            fx.write(x.tobytes())
            fy.write(y.tobytes())
            fm.write(mask.tobytes())
            bar.file_done(path, done, len(uids))
    bar.close()
    ids, sorted_ids, positions = sort_ids(fixed_width(uids))
    twice = first_duplicate(sorted_ids)
    if twice is not None:
        raise DataError(f"{describe_files(files)}: user {twice!r} is in more than one file")
    np.save(out / "users.npy", ids)
    np.save(out / "users_sorted.npy", sorted_ids)
    np.save(out / "users_sorted_positions.npy", positions)
    np.save(out / "offsets.npy", np.concatenate([[0], np.cumsum(np.frombuffer(counts, dtype=np.int64))]).astype(np.int64)
            if len(counts) else np.zeros(1, dtype=np.int64))
    (out / "meta.json").write_text(json.dumps({"users": len(uids), "sequences": shape["sequences"],
                                               "seq_len": shape["seq_len"] or 1, "files": [p.name for p in files]}))
    (out / "done").write_text("\n".join(p.name for p in files))


def parse_leaf_reddit(path: Path, vocab: Vocab, *, seq_len: int | None = None):
    """Parses one LEAF Reddit JSON file into (users, per-user sample counts, x, y, mask, seq_len): x and y
    int32 and mask uint8 arrays of [sequences, seq_len]. `seq_len`: the length the split's
    earlier files had (None: the file's first sequence sets it). Faults name the file and user."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    users = leaf_users(doc, str(path))
    user_data = doc["user_data"]
    # sequences as lists (fast to build), turned into numpy a chunk at a time (compact to keep)
    xs: list[list[int]] = []
    ys: list[list[int]] = []
    ms: list[list[int]] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    done = 0                       # sequences already in `parts`
    counts = array("q")
    pad = vocab.pad_id
    for uid in users:
        where = f"{path}: user {uid!r}"
        ud = user_data.get(uid)
        if not isinstance(ud, dict) or not isinstance(ud.get("x"), list) or not isinstance(ud.get("y"), list):
            raise DataError(f"{where}: missing or malformed 'x'/'y' lists")
        if len(ud["x"]) != len(ud["y"]):
            raise DataError(f"{where}: {len(ud['x'])} comments in 'x' but {len(ud['y'])} labels in 'y'")
        if len(xs) >= PARSE_CHUNK:
            parts.append(_as_arrays(xs, ys, ms, seq_len))
            done += len(xs)
            xs, ys, ms = [], [], []
        before = done + len(xs)
        for ci, (comment, label) in enumerate(zip(ud["x"], ud["y"])):
            if not isinstance(label, dict) or "target_tokens" not in label:
                raise DataError(f"{where}: comment {ci} has no 'target_tokens'")
            targets = label["target_tokens"]
            counts_tokens = label.get("count_tokens")
            if not isinstance(comment, list) or not isinstance(targets, list) or len(comment) != len(targets):
                raise DataError(f"{where}: comment {ci}: 'x' and 'target_tokens' differ in sequences")
            if counts_tokens is not None and (not isinstance(counts_tokens, list) or len(counts_tokens) != len(comment)):
                raise DataError(f"{where}: comment {ci}: 'count_tokens' differs from 'x' in sequences")
            for si, (seq, tgt) in enumerate(zip(comment, targets)):
                cnt = counts_tokens[si] if counts_tokens is not None else None
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
                    ms.append([int(t != pad) for t in xs[-1]])
                else:
                    try:
                        ms.append([1 if float(c) else 0 for c in cnt])
                    except (TypeError, ValueError):
                        raise DataError(f"{where}: comment {ci} sequence {si}: count_tokens must be numbers") from None
        counts.append(done + len(xs) - before)
    parts.append(_as_arrays(xs, ys, ms, seq_len))
    x, y, mask = (np.concatenate([part[i] for part in parts]) for i in range(3))
    return users, counts, x, y, mask, seq_len


PARSE_CHUNK = 65_536       # sequences held as Python lists at once while parsing


def _as_arrays(xs: list, ys: list, ms: list, seq_len: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = seq_len or 1
    return (np.asarray(xs, dtype=np.int32).reshape(-1, width), np.asarray(ys, dtype=np.int32).reshape(-1, width),
            np.asarray(ms, dtype=np.uint8).reshape(-1, width))


def main(argv: list[str] | None = None) -> int:
    """`python -m reader.leaf DATA_DIR`: builds the data's caches now (what rank 0 does at a job's start)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m reader.leaf", description=main.__doc__)
    p.add_argument("data_dir", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    try:
        LeafRedditReader(args.data_dir).prepare()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB
    print(json.dumps({"data_dir": str(args.data_dir), "seconds": round(time.perf_counter() - started, 1),
                      "peak_rss_mb": round(peak_mb)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
