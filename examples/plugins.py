"""A complete plug-in set in a user's own module: a CSV reader, a logistic-regression model with a private
per-user bias, and a full-batch trainer. Run it with

    mpirun -np 2 python application.py DATA_DIR --reader examples.plugins:CsvReader \\
        --model examples.plugins:LogisticModel --trainer examples.plugins:LogisticTrainer

DATA_DIR holds day folders with `train.csv` / `test.csv`, rows `user,label,x1,x2,...`, and `classes.txt`
(the number of classes).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from flock.common.errors import DataError
from reader.base import DayIndex
from trainer.base import LocalSGD, TrainConfig


class CsvReader:
    """Reads DATA_DIR/<day>/<split>.csv; small data sets, so each file is loaded whole once."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._cache: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def prepare(self) -> None:
        pass

    def days(self) -> list[str]:
        return sorted(p.name for p in self.data_dir.iterdir() if p.is_dir() and any(p.glob("*.csv")))

    def has_split(self, day: str, split: str) -> bool:
        return (self.data_dir / day / f"{split}.csv").is_file()

    def _users(self, day: str, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if (day, split) not in self._cache:
            path = self.data_dir / day / f"{split}.csv"
            rows: dict[str, list[list[float]]] = {}
            with open(path, newline="") as f:
                for line, row in enumerate(csv.reader(f), 1):
                    try:
                        rows.setdefault(row[0], []).append([float(v) for v in row[1:]])
                    except (IndexError, ValueError):
                        raise DataError(f"{path}:{line}: expected user,label,features...") from None
            self._cache[(day, split)] = {u: (np.array(r)[:, 1:].astype(np.float32), np.array(r)[:, 0].astype(np.int64))
                                         for u, r in rows.items()}
        return self._cache[(day, split)]

    def index(self, day: str, split: str) -> DayIndex:
        users = self._users(day, split)
        return DayIndex(day=day, split=split, users=tuple(users), counts=tuple(len(y) for _, y in users.values()))

    def load(self, day: str, split: str, uid: str) -> Mapping[str, np.ndarray]:
        x, y = self._users(day, split)[uid]
        return {"x": x, "y": y}

    def spec(self) -> Mapping[str, int]:
        first = next(iter(self._users(self.days()[0], "train").values()))
        return {"features": first[0].shape[1], "num_classes": int((self.data_dir / "classes.txt").read_text())}


class LogisticModel(torch.nn.Module):
    private_patterns: ClassVar[tuple[str, ...]] = ("user_bias",)     # each user keeps its own bias

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, classes)
        self.user_bias = torch.nn.Parameter(torch.zeros(classes))

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> "LogisticModel":
        return cls(spec["features"], spec["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.user_bias


class LogisticTrainer:
    train_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"loss": ("loss_sum", "samples")}
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"accuracy": ("correct", "samples")}

    def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None:
        self.config = config

    def train(self, model, samples, rng=None) -> dict[str, float]:
        x, y = torch.from_numpy(samples["x"]), torch.from_numpy(samples["y"])
        sgd = LocalSGD(list(model.parameters()), self.config)
        for _ in range(self.config.local_epochs):       # full-batch gradient steps
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            sgd.step()
        return {"samples": float(len(y)), "loss_sum": float(loss.detach()) * len(y)}

    @torch.no_grad()
    def evaluate(self, model, samples) -> dict[str, float]:
        x, y = torch.from_numpy(samples["x"]), torch.from_numpy(samples["y"])
        return {"samples": float(len(y)), "correct": float((model(x).argmax(-1) == y).sum())}
