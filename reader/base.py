"""The reader plug-in interface. A reader turns a data folder into per-day user indexes and per-user samples.

Layout it serves: `DATA_DIR/<day>/<split>_data.json` day folders (sorted by name), split "train" or "test".
The scheduler calls `days`, `index` (user ids and sample counts, no samples); simulators call `load`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from reader.users import CHUNK, UserCounts, UserIds, UserSubset


@dataclass(frozen=True)
class DayIndex:
    """The users of one day's split and how many samples each has, in file order. A reader of many users
    gives `users` as a `reader.users.UserIds` table and `counts` as an integer array: then nothing here
    holds a Python object per user."""

    day: str
    split: str
    users: Sequence[str]
    counts: Sequence[int]

    def count_of(self) -> Mapping[str, int]:
        """user -> samples (a lookup over the table's arrays when `users` is a UserIds table)."""
        if isinstance(self.users, UserIds):
            return UserCounts(self.users, np.asarray(self.counts))
        return dict(zip(self.users, (int(c) for c in self.counts)))

    def with_samples(self) -> Sequence[str]:
        """The users that have at least one sample, in file order."""
        keep = np.flatnonzero(np.asarray(self.counts, dtype=np.int64) > 0)
        if len(keep) == len(self.users):
            return self.users
        if isinstance(self.users, UserIds):
            return UserSubset(self.users, keep)
        return [self.users[i] for i in keep.tolist()]

    def json_chunks(self) -> Iterator[str]:
        """`json.dumps([day, split, users, counts])` (lists for the tuples), piece by piece: a digest of
        1.66 million users never holds their whole text."""
        yield f"[{json.dumps(self.day)}, {json.dumps(self.split)}, "
        yield from _json_list(self.users, lambda part: list(part))
        yield ", "
        yield from _json_list(self.counts, lambda part: np.asarray(part, dtype=np.int64).tolist())
        yield "]"


def _json_list(values: Sequence[Any], as_list) -> Iterator[str]:
    yield "["
    for start in range(0, len(values), CHUNK):
        yield (", " if start else "") + json.dumps(as_list(values[start:start + CHUNK]))[1:-1]
    yield "]"


@runtime_checkable
class Reader(Protocol):
    """Example: `class MyReader: def __init__(self, data_dir: Path) -> None: ...` plus the methods below."""

    def __init__(self, data_dir: Path) -> None: ...

    def prepare(self) -> None:
        """One-time heavy work (parsing, caches). Called once, on rank 0, before any other rank reads."""

    def days(self) -> list[str]:
        """The day folders, sorted."""

    def has_split(self, day: str, split: str) -> bool:
        """Whether `day` holds data for `split`."""

    def index(self, day: str, split: str) -> DayIndex:
        """User ids and sample counts of a day's split, without loading samples."""

    def load(self, day: str, split: str, uid: str) -> Mapping[str, np.ndarray]:
        """All samples of one user, in order, as arrays with the sample axis first."""

    def spec(self) -> Mapping[str, int]:
        """Facts the model needs from the data (e.g. `vocab_size`, `pad_id`, `unk_id`)."""
