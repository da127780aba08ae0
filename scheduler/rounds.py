"""Round policies: how a run's training rounds are made. The `Scheduler` (scheduler/state.py) keeps the lock,
the versions, the steps and the checkpoint; a policy says who trains in a round and on which version (the
round's plans), what the round's record adds (the virtual clock), and what of its state a checkpoint holds.

- `Synchronous`: every round's clients train on the current version. Without phones they are sampled
  uniformly (`sample_clients`); with phones (`PhoneRounds`) they are chosen among those on-line, timed on
  the virtual clock, and only those whose results will count are trained.
- `Asynchronous` (FedBuff, phones only): a task starts from the version that was current when its phone
  began; each server update applies a buffer of arrivals, staleness-weighted. The schedule is a pure function
  of the seed and the profiles, computed ahead in virtual time, so tasks are handed out to the ranks as
  soon as the versions they start from exist.

A new way of running rounds is a new `RoundPolicy`; the Scheduler does not change.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flock.common.domain import TRAIN, ParamLayout, Plan, TaskSpec, assign_users, home_rank
from flock.common.errors import ConfigError
from reader.calendar import Calendar
from reader.users import counts_for
from scheduler.checkpoint import load_versions
from scheduler.phones.asynchronous import AsyncRounds
from scheduler.phones.clock import model_bytes
from scheduler.phones.fedbuff import AsyncConfig
from scheduler.phones.files import check_covers
from scheduler.phones.rounds import PhoneRounds, PlannedRound
from scheduler.sampling import sample_clients
from scheduler.selection import Selection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundView:
    """What a policy sees of its run: the world, the calendar, each day's users with samples and their
    counts (`eligible(day, split)`), and whether the run checkpoints after a given round (`checkpoint_due`)."""

    world_size: int
    rounds: int
    clients_per_round: int
    seed: int
    pin_users: bool
    calendar: Calendar
    eligible: Callable[[str, str], tuple[Sequence[str], Mapping[str, int]]]
    checkpoint_due: Callable[[int], bool]


def spread(view: RoundView, *, step: int, kind: str, done: int, day: str, split: str, chosen: Sequence[str],
           counts: Mapping[str, int], version: int, **fields: Any) -> list[Plan]:
    """One plan per rank for the users `chosen` of (day, split): spread over the ranks by their sample
    counts (or each on its home rank with private parameters)."""
    per_rank = assign_users(chosen, counts_for(counts, chosen), view.world_size, pinned=view.pin_users)
    return [Plan(step=step, kind=kind, round=done, day=day, split=split, users=tuple(mine), version=version,
                 total_users=len(chosen), **fields) for mine in per_rank]


class RoundPolicy:
    """The base: no virtual clock. Subclasses choose a round's clients (`plans`); with `selection` (phones
    only) a selector other than uniform picks among the on-line candidates, from the clients' reports."""

    phones: PhoneRounds | None = None
    selection: Selection | None = None

    def __init__(self) -> None:
        self.sim_time = 0.0      # virtual seconds since the run began (with phones)
        self.view: RoundView | None = None

    def bind(self, view: RoundView) -> None:
        """Checks the run's data against the policy, once, before anything is written."""
        self.view = view
        if self.selection is not None and self.phones is None:
            raise ConfigError("client selection chooses among on-line phones: it needs device profiles")
        if self.phones is None:
            return
        for day in sorted(set(view.calendar.train_days)):   # a per-user file that lacks a user fails now
            users = view.eligible(day, "train")[0]
            check_covers(self.phones.profiles, users, what=f"training day {day}")
            check_covers(self.phones.availability, users, what=f"training day {day}")

    def start(self, layout: ParamLayout) -> None:
        """The model is known (its size times the transfers)."""
        self.layout = layout

    def plans(self, step: int, done: int, version: int, clip: float) -> list[Plan]:
        """The plans of training round `done` (0-based) at `version`; `clip` is the round's clipping norm."""
        raise NotImplementedError

    def sampling(self) -> tuple[int, int] | None:
        """The current round's (population, cohort) for a per-round DP accountant; None: the run's."""
        return None

    def record(self, done: int) -> dict[str, Any]:
        """The clock's fields of round `done`'s training record."""
        return {}

    def applied(self, done: int, record: Mapping[str, Any], version: int, before: np.ndarray) -> None:
        """Round `done` was recorded; `version` is the one it replaced, whose parameters were `before`."""

    def params_of(self, version: int) -> np.ndarray | None:
        """An older version that tasks still start from (asynchronous), or None."""
        return None

    def checkpoint_versions(self, version: int) -> dict[int, np.ndarray]:
        """The older versions a checkpoint at `version` must hold."""
        return {}

    def check_resume(self, saved_rounds: int, path: Path) -> None:
        """A checkpoint of a `saved_rounds`-round run is about to continue as this one."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """The policy's part of a checkpoint's metadata (the selector's state; nothing for uniform)."""
        return {"selection": self.selection.state_dict()} if self.selection is not None else {}

    def restore(self, version: int, sim_time: float, path: Path, meta: Mapping[str, Any]) -> None:
        """Continues after the checkpoint at `path` (its metadata `meta`), the model known (`start`)."""
        self.sim_time = sim_time
        if self.selection is not None:      # asynchronous: replayed with the schedule
            self.selection.load_state_dict(meta.get("selection"))


class Synchronous(RoundPolicy):
    """Rounds of K clients on the current version, spread over the training days in order."""

    def __init__(self, phones: PhoneRounds | None = None, selection: Selection | None = None) -> None:
        super().__init__()
        self.phones, self.selection = phones, selection
        self._planned: PlannedRound | None = None     # the current round's clock decisions (phones)

    def plans(self, step: int, done: int, version: int, clip: float) -> list[Plan]:
        view = self.view
        day = view.calendar.train_day(done, view.rounds)
        users, counts = view.eligible(day, "train")
        if self.phones is None:
            chosen = sample_clients(view.seed, done, users, view.clients_per_round)
        else:        # decided in virtual time before anyone trains: late or off-line phones are not trained
            self._planned = self.phones.plan_round(done, users, counts, view.clients_per_round,
                                                   start_time=self.sim_time, shared_params=self.layout.size,
                                                   selection=self.selection)
            chosen = self._planned.trained
        return spread(view, step=step, kind=TRAIN, done=done, day=day, split="train", chosen=chosen, counts=counts,
                      version=version, checkpoint=view.checkpoint_due(done + 1), clip=clip)

    def sampling(self) -> tuple[int, int] | None:
        return self._planned.sampling if self._planned is not None else None

    def record(self, done: int) -> dict[str, Any]:
        return dict(self._planned.record) if self._planned is not None else {}

    def applied(self, done: int, record: Mapping[str, Any], version: int, before: np.ndarray) -> None:
        if self._planned is None:
            return
        self.sim_time = self._planned.outcome.end_time
        if self._planned.outcome.failed:
            log.warning("round %d failed: fewer than %d results in time (%d of %d phones off-line, %d late, %d in "
                        "time); nothing applied", done + 1, self.phones.min_clients, record["dropped"],
                        record["selected"], record["stale"], record["voided"])


class Asynchronous(RoundPolicy):
    """FedBuff on phones: `config`'s concurrency and buffer, over the one training day's users."""

    def __init__(self, phones: PhoneRounds | None, config: AsyncConfig, selection: Selection | None = None) -> None:
        super().__init__()
        if phones is None:
            raise ConfigError("asynchronous aggregation times its tasks on phones: it needs device profiles")
        self.phones, self.config, self.selection = phones, config, selection
        self._async: AsyncRounds | None = None
        self._old_versions: dict[int, np.ndarray] = {}   # versions tasks still start from
        self._rank_load: dict[int, list[int]] = {}        # target -> samples handed to each rank

    def bind(self, view: RoundView) -> None:
        super().bind(view)
        days = view.calendar.train_days
        if len(set(days)) > 1:
            raise ConfigError(f"asynchronous aggregation runs on one training day's population; the data has "
                              f"{len(days)} training days ({', '.join(days)})")

    def start(self, layout: ParamLayout) -> None:
        super().start(layout)
        view = self.view
        users, counts = view.eligible(view.calendar.train_days[0], "train")
        size = model_bytes(layout.size)
        self._async = AsyncRounds(phones=self.phones, config=self.config, population=users, counts=counts,
                                  rounds=view.rounds, bytes_down=size, bytes_up=size,
                                  checkpoint_due=view.checkpoint_due, selection=self.selection)

    def plans(self, step: int, done: int, version: int, clip: float) -> list[Plan]:
        """The tasks handed out while version `done` is current, spread over the ranks (each rank's in task
        order); the policy keeps the old versions that tasks still start from."""
        view = self.view
        day = view.calendar.train_days[0]
        tasks = self._async.tasks_at(done)
        later = self._async.needed_versions(done)      # the ranks keep these too
        keep = {t.start_version for t in tasks} | later
        self._old_versions = {v: a for v, a in self._old_versions.items() if v in keep}
        counts = view.eligible(day, "train")[1]
        world = view.world_size
        # the work each rank holds for updates not yet applied: a new task goes to the least loaded rank
        # (largest first), so that a long task on one rank is met by fewer others there
        self._rank_load = {t: load for t, load in self._rank_load.items() if t > done}
        outstanding = [sum(load[r] for load in self._rank_load.values()) for r in range(world)]
        per_rank: list[list[TaskSpec]] = [[] for _ in range(world)]
        for t in sorted(tasks, key=lambda t: (-counts[t.uid], t.task_id)):
            r = home_rank(t.uid, world) if view.pin_users else min(range(world), key=lambda i: (outstanding[i], i))
            per_rank[r].append(t)
            outstanding[r] += counts[t.uid]
            self._rank_load.setdefault(t.target, [0] * world)[r] += counts[t.uid]
        for mine in per_rank:
            mine.sort(key=lambda t: t.task_id)
        checkpoint = view.checkpoint_due(done + 1)
        return [Plan(step=step, kind=TRAIN, round=done, day=day, split="train", users=tuple(t.uid for t in mine),
                     version=version, total_users=len(tasks), checkpoint=checkpoint, tasks=tuple(mine),
                     keep=tuple(sorted(later)))
                for mine in per_rank]

    def record(self, done: int) -> dict[str, Any]:
        return self._async.record(done + 1)

    def applied(self, done: int, record: Mapping[str, Any], version: int, before: np.ndarray) -> None:
        self._old_versions[version] = before       # tasks handed out later may still start from it
        self.sim_time = record["sim_time"]

    def params_of(self, version: int) -> np.ndarray | None:
        return self._old_versions.get(version)

    def checkpoint_versions(self, version: int) -> dict[int, np.ndarray]:
        """The versions that tasks pending at a checkpoint at `version` start from (they train again)."""
        return {v: self._old_versions[v] for v in self._async.needed_versions(version)}

    def check_resume(self, saved_rounds: int, path: Path) -> None:
        if saved_rounds != self.view.rounds:
            raise ConfigError(f"--rounds {self.view.rounds}: an asynchronous run continues with the --rounds it "
                              f"had ({saved_rounds}): its checkpoint keeps only the model versions that the tasks "
                              f"of {saved_rounds} server updates start from")

    def restore(self, version: int, sim_time: float, path: Path, meta: Mapping[str, Any]) -> None:
        super().restore(version, sim_time, path, meta)
        self._async.restore(version, sim_time)
        self._old_versions = load_versions(path)


def round_policy(phones: PhoneRounds | None = None, asynchronous: AsyncConfig | None = None,
                 selection: Selection | None = None) -> RoundPolicy:
    """The run's policy: FedBuff with an asynchronous configuration, else synchronous rounds."""
    if asynchronous is not None:
        return Asynchronous(phones, asynchronous, selection)
    return Synchronous(phones, selection)
