"""Asynchronous rounds on phones: which client tasks the ranks train at each server update, decided ahead
of real training from the FedBuff schedule (`fedbuff.AsyncSchedule`), the scheduler's one entry point to
asynchronous mode.

A task starts from the version current at its virtual start and lands in the buffer of a later version
(its target), with the staleness weight of its arrival. Before the plan of version v is made, the schedule
runs ahead until every task started from a version <= v has arrived, dropped out or been discarded as too
stale: so each task's fate and target are known before anyone trains it, and tasks whose update would not
count are never trained (their virtual compute is reported as saved).

A task is handed out at version max(start, target - HORIZON, the last checkpoint version before its
target). Ranks train tasks of at most HORIZON updates ahead of the current version (further ahead, a long
task would hold up a nearer update's push), so a task handed out earlier would only wait on one rank's
queue; handed out when it can start, it goes to the rank with the least work at that time, as from one
pool (bench/results/throughput_async.md: so in a model of the schedule; runs gained at C=20, not at 60). No
task whose update lands after a checkpoint trains before that checkpoint is written. The rule makes a
resumed run hand out exactly what an uninterrupted one does (the tasks pending at a checkpoint are handed
out again at it, from their own start versions, which the checkpoint holds), and keeps every
private-parameter write of a later version out of a checkpoint's state.

Exactness. The update of version t is the sum over its buffer's arrivals of w_i n_i (theta_i -
theta_start_i), divided by the sum of n_i (FedBuff's staleness-weighted buffer, with flock's sample
weights; stale updates count less, and weight exponent 0 gives FedAvg's mean of the buffer). The staleness
weight w_i is rounded to 8 significant bits (a relative change below 0.2%), so that w_i n_i theta_i is
exact in float64 like n_i theta_i of synchronous rounds: the sums do not depend on how the tasks are
spread over ranks and shards, and the model is the same at any -np.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from flock.common.domain import TaskSpec
from flock.common.errors import ConfigError
from scheduler.phones.clock import ClientTiming, client_timing
from scheduler.phones.fedbuff import AsyncConfig, AsyncSchedule, Buffer
from scheduler.phones.report import async_update_record
from scheduler.phones.rounds import PhoneRounds

WEIGHT_BITS = 8
HORIZON = 2       # ranks train tasks of updates up to the current version + HORIZON; tasks are handed out then


def exact_weight(weight: float, bits: int = WEIGHT_BITS) -> float:
    """`weight` rounded to `bits` significant bits: w * n * theta stays exact in float64 for float32 theta
    and sample counts n below 2^20."""
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"a staleness weight must be finite and > 0, got {weight}")
    mantissa, exponent = math.frexp(weight)
    return math.ldexp(round(mantissa * (1 << bits)), exponent - bits)


@dataclass
class AsyncRounds:
    """The asynchronous schedule of a run of `rounds` server updates over `population` (the training day's
    users with samples, `counts` of each). `checkpoint_due(version)` says which versions are checkpointed."""

    phones: PhoneRounds
    config: AsyncConfig
    population: Sequence[str]
    counts: Mapping[str, int]
    rounds: int
    bytes_down: int
    bytes_up: int
    checkpoint_due: Callable[[int], bool] = lambda version: False
    # a client selection (`scheduler.selection.Selection`) chooses who starts; None: the uniform draw
    selection: Any = None
    _schedule: AsyncSchedule = field(init=False)
    _buffers: dict[int, Buffer] = field(init=False, default_factory=dict)    # made, not yet recorded
    _waiting: list[TaskSpec] = field(init=False, default_factory=list)       # resolved, not yet handed out
    _resolved_through: int = field(init=False, default=-1)
    _last_time: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.config.buffer_size > self.config.concurrency:
            raise ConfigError(f"--async-buffer {self.config.buffer_size} is more than --async-concurrency "
                              f"{self.config.concurrency}: a buffer could never fill")
        self._schedule = AsyncSchedule(seed=self.phones.seed, population=self.population,
                                       duration_of=lambda uid: self.timing(uid).total_s, config=self.config,
                                       availability=self.phones.availability,
                                       choose=self._choose if self.selection is not None else None)

    def _choose(self, *, serial: int, version: int, t: float, exclude) -> Any:
        """A start chosen by the run's selection: the version being built is its round (the reports it sees
        are those handed over so far: `scheduler/selection/driver.py` says which)."""
        return self.selection.choose(purpose="async", index=serial, round=version + 1, users=self.population,
                                     counts=self.counts, count=1, availability=self.phones.availability, t=t,
                                     duration_of=lambda uid: self.timing(uid).total_s, exclude=exclude)

    def timing(self, uid: str) -> ClientTiming:
        """`uid`'s virtual download, compute and upload seconds for one task."""
        return client_timing(self.phones.profiles.profile(uid), samples=self.phones.local_epochs * self.counts[uid],
                             bytes_down=self.bytes_down, bytes_up=self.bytes_up)

    def _unresolved(self, version: int) -> bool:
        """Whether some task started from a version <= `version` has no known fate yet (or may still start)."""
        s = self._schedule
        return (s.version <= version or any(t.start_version <= version for t in s.in_flight)
                or any(a.task.start_version <= version for a in s.buffered))

    def _resolve(self, version: int) -> None:
        """Runs the schedule until every task started from a version <= `version` has its fate, and queues
        those that count for the run (target <= rounds) to be handed out."""
        if version <= self._resolved_through:
            return
        while self._unresolved(version):
            buffer = self._schedule.next_buffer()
            self._buffers[buffer.version] = buffer
        landed = [(a, b.version) for b in self._buffers.values() for a in b.arrivals
                  if self._resolved_through < a.task.start_version <= version and b.version <= self.rounds]
        self._waiting += [TaskSpec(task_id=a.task.task_id, uid=a.task.uid, start_version=a.task.start_version,
                                   target=target, weight=exact_weight(a.weight)) for a, target in landed]
        self._waiting.sort(key=lambda t: t.task_id)
        self._resolved_through = version

    def handout_version(self, task: TaskSpec) -> int:
        """The version at which `task` is handed out: its start, or HORIZON versions before its target, or
        the last checkpoint before its target, whichever is latest."""
        at = max(task.start_version, task.target - HORIZON)
        return next((v for v in range(task.target - 1, at, -1) if self.checkpoint_due(v)), at)

    def tasks_at(self, version: int) -> list[TaskSpec]:
        """The tasks handed out while `version` is current (by task id); each task is handed out once."""
        self._resolve(version)
        now = [t for t in self._waiting if self.handout_version(t) <= version]
        self._waiting = [t for t in self._waiting if self.handout_version(t) > version]
        return now

    def needed_versions(self, version: int) -> set[int]:
        """The versions older than `version` that tasks not yet handed out start from (a checkpoint at
        `version` must hold them)."""
        self._resolve(version)
        return {t.start_version for t in self._waiting if t.start_version < version}

    def record(self, version: int) -> dict[str, float]:
        """The clock's record of server update `version` (made from its buffer); versions in order."""
        self._resolve(version - 1)
        buffer = self._buffers.pop(version)
        if self.selection is not None:
            self.selection.expect(version, [(a.task.task_id, a.task.uid) for a in buffer.arrivals])
        record = async_update_record(buffer, previous_time=self._last_time, bytes_down=self.bytes_down,
                                     bytes_up=self.bytes_up)
        self._last_time = buffer.time
        return record

    def restore(self, version: int, sim_time: float) -> None:
        """Continues after a checkpoint at `version`: replays the schedule (a pure function of the seed, the
        profiles and the population) and checks that it reaches the saved virtual time. Tasks pending at the
        checkpoint are then handed out at it, as in the uninterrupted run. A client selection gets each
        version's logged reports back just before that version's plans, where the run handed them over."""
        for v in range(1, version + 1):
            if self.selection is not None:
                self.selection.replay(v - 1)
            self.tasks_at(v - 1)
            self.record(v)
        if self.selection is not None:
            self.selection.replay(version)
        if abs(self._last_time - sim_time) > 1e-6 * max(1.0, sim_time):
            raise ConfigError(f"the asynchronous schedule replayed to version {version} is at virtual time "
                              f"{self._last_time:.3f} s, the checkpoint at {sim_time:.3f} s: the device profiles "
                              f"or the availability changed")
