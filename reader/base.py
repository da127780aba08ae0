"""The reader plug-in interface. A reader turns a data folder into per-day user indexes and per-user samples.

Layout it serves: `DATA_DIR/<day>/<split>_data.json` day folders (sorted by name), split "train" or "test".
The scheduler calls `days`, `index` (user ids and sample counts, no samples); simulators call `load`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class DayIndex:
    """The users of one day's split and how many samples each has, in file order."""

    day: str
    split: str
    users: tuple[str, ...]
    counts: tuple[int, ...]

    def count_of(self) -> dict[str, int]:
        return dict(zip(self.users, self.counts))


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
