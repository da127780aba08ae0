"""The non-federated baseline: one model trained on the pooled training data with the same trainer,
model, optimizer and batch size, for the same number of sample visits per round as the federated run.

Round r's visits are those of the federated round r: the sum of the sampled users' sample counts (the
same seeded sampler) times the local epochs. The pooled sequences are shuffled (seeded) and consumed as
one stream; evaluation is the federated one (same users, same per-user sums).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

import numpy as np
import torch

from flock.common import streams
from flock.common.domain import EVAL, TRAIN
from flock.common.metrics import add_user_eval, eval_record, train_record
from reader.base import Reader
from reader.calendar import Calendar
from scheduler.sampling import evaluation_users, sample_clients
from scheduler.state import Schedule
from trainer.base import Trainer

log = logging.getLogger(__name__)


class PooledStream:
    """All training sequences of some days, reshuffled (seeded) on every pass; `take(n)` the next n."""

    def __init__(self, reader: Reader, days: tuple[str, ...], seed: int) -> None:
        parts: dict[str, list[np.ndarray]] = {}
        for day in days:
            idx = reader.index(day, "train")
            for uid, n in zip(idx.users, idx.counts):
                if n:
                    for key, arr in reader.load(day, "train", uid).items():
                        parts.setdefault(key, []).append(np.asarray(arr))
        self.data = {k: np.concatenate(v) for k, v in parts.items()}
        self.size = len(next(iter(self.data.values())))
        self.rng = streams.centralized(seed)
        self.order = self.rng.permutation(self.size)
        self.cursor = 0

    def take(self, n: int) -> dict[str, np.ndarray]:
        picks = []
        while n > 0:
            if self.cursor == self.size:
                self.order, self.cursor = self.rng.permutation(self.size), 0
            k = min(n, self.size - self.cursor)
            picks.append(self.order[self.cursor:self.cursor + k])
            self.cursor += k
            n -= k
        idx = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        return {k: v[idx] for k, v in self.data.items()}


def run_centralized(*, reader: Reader, model: torch.nn.Module, trainer: Trainer, rounds: int,
                    clients_per_round: int, local_epochs: int, eval_every: int, eval_users: int, seed: int,
                    on_record: Callable[[dict], None]) -> None:
    """Runs the baseline; `trainer` must be configured with local_epochs=1 (visits are counted here)."""
    calendar = Calendar.from_reader(reader)
    counts = {day: reader.index(day, "train").count_of() for day in set(calendar.train_days)}
    stream = PooledStream(reader, tuple(sorted(set(calendar.train_days))), seed)
    test = reader.index(calendar.test_day, "test")
    test_users = evaluation_users(seed, [u for u, n in zip(test.users, test.counts) if n], eval_users)
    ratios: Mapping[str, tuple[str, str]] = trainer.eval_ratios
    for kind, done in Schedule(rounds, eval_every):
        started = time.perf_counter()
        if kind == TRAIN:
            day = calendar.train_day(done, rounds)
            eligible = [u for u, n in counts[day].items() if n]
            visits = local_epochs * sum(counts[day][u] for u in sample_clients(seed, done, eligible, clients_per_round))
            rng = torch.Generator().manual_seed(streams.user_seed(seed, done, "<centralized>"))
            sums = trainer.train(model, stream.take(visits), rng) if visits else {"samples": 0.0}
            on_record(train_record(done + 1, {**sums, "clients": clients_per_round}, trainer.train_ratios,
                                   time.perf_counter() - started))
        elif kind == EVAL:
            sums: dict[str, float] = {"users": 0.0}
            for uid in test_users:
                add_user_eval(sums, trainer.evaluate(model, reader.load(calendar.test_day, "test", uid)), ratios)
            on_record(eval_record(done, sums, ratios, time.perf_counter() - started))
