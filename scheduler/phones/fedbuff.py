"""Asynchronous aggregation in virtual time: FedBuff (Nguyen et al. 2022), and FedAsync (Xie et al. 2019) as
its buffer size K = 1; the two differ in that one number.

The model:
- Up to C clients (`concurrency`) train at once. Whenever fewer are in flight, new ones start at the
  current virtual time from the current version: on-line users not already training, each drawn by
  `selection.select_online(purpose="async", index=<the start's serial number>)`, or chosen by a client
  selection (`choose`, `scheduler/selection/`) from such a draw.
- Events go in (virtual time, uid, task id) order. An arrival with staleness s = version - start version is
  discarded and counted when s > `max_staleness`; otherwise it joins the buffer with weight (1 + s)^-a
  (a = `staleness_exponent`, 0.5 by default: FedBuff's 1/sqrt(1 + s); 0 weighs all alike). When the buffer
  holds K arrivals, version v + 1 is made of exactly those K, and clients started from then on train from
  v + 1.
- A client whose phone goes off-line before its task ends drops out at that moment, freeing its slot.
- When nobody can be started (everyone off-line or busy), the schedule tries again `retry_s` virtual
  seconds later. When no version is made for `max_idle_s` virtual seconds (e.g. every task drops out), it
  raises a ConfigError that says why: never a hang.

All of it is a function of the seed, the population, the durations and the availability model: not of real
time, nor of which rank trains which task in which real order. So the scheduler can run the schedule ahead
of real training (`PendingBuffers`): every task whose start version already exists can be trained at once,
on any rank; results come back in any order and versions are still applied strictly in virtual order, with
the arrivals summed in the buffer's order. Tasks that will drop out or arrive too stale are known before
they would train and are never trained. The schedule's state is plain JSON-able data for checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Container, Generic, Protocol, Sequence, TypeVar

from flock.common.errors import ConfigError, RefusedError
from scheduler.phones.availability import AlwaysOn, Availability
from scheduler.phones.selection import Candidates, select_online

STATE_FORMAT = 1
DEFAULT_RETRY_S = 60.0
DEFAULT_MAX_IDLE_S = 30 * 86400.0
# no version after this many events in a row: a schedule that spins without progress fails loudly
MAX_EVENTS_PER_VERSION = 10_000_000

Result = TypeVar("Result")


@dataclass(frozen=True)
class Task:
    """One client's local training: `uid` starts from `start_version` at `start_time` and, if its phone
    stays on-line, its update arrives at `finish_time` (virtual seconds)."""

    task_id: int
    uid: str
    start_version: int
    start_time: float
    finish_time: float


@dataclass(frozen=True)
class Arrival:
    """A task's update in a buffer, with its staleness (versions made while it trained) and weight."""

    task: Task
    staleness: int
    weight: float


@dataclass(frozen=True)
class Buffer:
    """The K arrivals that make `version` at virtual time `time`, in arrival order, with what happened
    since the previous version: tasks started, dropped out, discarded as too stale."""

    version: int
    time: float
    arrivals: tuple[Arrival, ...]
    started: int
    dropped: int
    stale: int


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """(1 + s)^-exponent: FedBuff's 1/sqrt(1 + s) by default; exponent 0 weighs every arrival 1."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1 + staleness) ** -exponent)


@dataclass(frozen=True)
class _InFlight:
    task: Task
    drop_time: float | None    # the phone goes off-line before finishing (no update will come)

    @property
    def event_time(self) -> float:
        return self.task.finish_time if self.drop_time is None else self.drop_time


@dataclass(frozen=True, kw_only=True)
class AsyncConfig:
    """FedBuff's settings: C clients in flight, K arrivals per version (1: FedAsync), the staleness limit
    (None: none) and weighting exponent, and the virtual seconds between start attempts when nobody is
    on-line and without a new version before the schedule gives up."""

    concurrency: int
    buffer_size: int
    max_staleness: int | None = None
    staleness_exponent: float = 0.5
    retry_s: float = DEFAULT_RETRY_S
    max_idle_s: float = DEFAULT_MAX_IDLE_S

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.buffer_size < 1:
            raise ConfigError(f"asynchronous aggregation needs concurrency >= 1 and buffer size >= 1, got "
                              f"{self.concurrency} and {self.buffer_size}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError(f"maximum staleness must be >= 0, got {self.max_staleness}")
        if not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ConfigError(f"staleness exponent must be finite and >= 0, got {self.staleness_exponent}")
        if not (0 < self.retry_s < math.inf and 0 < self.max_idle_s < math.inf):
            raise ConfigError("retry and idle limits must be finite and > 0 seconds")


class Chooser(Protocol):
    def __call__(self, *, serial: int, version: int, t: float, exclude: Container[str]) -> Candidates:
        """At most one on-line user not in `exclude` to start at virtual time `t` from `version` (start
        number `serial`), with when it goes off-line."""


class AsyncSchedule:
    """The FedBuff event schedule (see the module). `duration_of(uid)` is a user's virtual task duration
    (`clock.client_timing(...).total_s`); it and `availability` must be pure functions of the user.
    `choose`: who starts next (None: the uniform draw)."""

    def __init__(self, *, seed: int, population: Sequence[str], duration_of: Callable[[str], float],
                 config: AsyncConfig, availability: Availability | None = None,
                 choose: Chooser | None = None) -> None:
        if not population:
            raise ConfigError("asynchronous aggregation: the population has no users")
        self.seed = seed
        self.population = population
        self.duration_of = duration_of
        self.config = config
        self.availability = availability or AlwaysOn()
        self.choose = choose
        self.now = 0.0
        self.version = 0
        self._next_task_id = 0
        self._start_serial = 0
        self._retry_at: float | None = None
        self._last_version_time = 0.0
        self._events_since_version = 0
        self._in_flight: dict[int, _InFlight] = {}
        self._busy: set[str] = set()
        self._queue: list[tuple[float, str, int]] = []
        self._pending: list[Arrival] = []
        self._counts = {"started": 0, "dropped": 0, "stale": 0}
        self._fill()

    @property
    def in_flight(self) -> tuple[Task, ...]:
        """The tasks started and not yet arrived or dropped, by task id."""
        return tuple(f.task for _, f in sorted(self._in_flight.items()))

    @property
    def buffered(self) -> tuple[Arrival, ...]:
        """The arrivals waiting in the buffer for the next version."""
        return tuple(self._pending)

    # -- the event loop ---------------------------------------------------------------------------------

    def _start(self, uid: str, offline_at: float) -> None:
        duration = float(self.duration_of(uid))
        if not (math.isfinite(duration) and duration >= 0):
            raise ConfigError(f"user {uid!r}: virtual duration {duration} is not a finite number >= 0")
        task = Task(task_id=self._next_task_id, uid=uid, start_version=self.version, start_time=self.now,
                    finish_time=self.now + duration)
        flight = _InFlight(task=task, drop_time=offline_at if offline_at < task.finish_time else None)
        self._next_task_id += 1
        self._counts["started"] += 1
        self._add(flight)

    def _add(self, flight: _InFlight) -> None:
        self._in_flight[flight.task.task_id] = flight
        self._busy.add(flight.task.uid)
        heapq.heappush(self._queue, (flight.event_time, flight.task.uid, flight.task.task_id))

    def _fill(self) -> None:
        """Starts clients at `now` until C are in flight; when nobody is on-line, retries later."""
        while len(self._in_flight) < self.config.concurrency and len(self._busy) < len(self.population):
            serial = self._start_serial
            self._start_serial += 1
            if self.choose is None:
                found = select_online(self.population, 1, seed=self.seed, purpose="async", index=serial,
                                      availability=self.availability, t=self.now, exclude=self._busy)
            else:
                found = self.choose(serial=serial, version=self.version, t=self.now, exclude=self._busy)
            if not found.uids:
                # one failed search per retry: a night with everyone off-line costs little
                if self._retry_at is None:
                    self._retry_at = self.now + self.config.retry_s
                return
            self._start(found.uids[0], found.online_until[0])

    def _arrive(self, flight: _InFlight) -> None:
        if flight.drop_time is not None:
            self._counts["dropped"] += 1
            return
        staleness = self.version - flight.task.start_version
        if self.config.max_staleness is not None and staleness > self.config.max_staleness:
            self._counts["stale"] += 1
            return
        self._pending.append(Arrival(task=flight.task, staleness=staleness,
                                     weight=staleness_weight(staleness, self.config.staleness_exponent)))

    def next_buffer(self) -> Buffer:
        """Advances virtual time to the next version and returns the buffer that makes it."""
        while True:
            if self._retry_at is not None and (not self._queue or self._retry_at < self._queue[0][0]):
                self.now, self._retry_at = self._retry_at, None
                self._fill()
            else:
                time, _, task_id = heapq.heappop(self._queue)
                self.now = time
                flight = self._in_flight.pop(task_id)
                self._busy.discard(flight.task.uid)
                self._arrive(flight)
                if len(self._pending) == self.config.buffer_size:
                    self.version += 1
                    buffer = Buffer(version=self.version, time=self.now, arrivals=tuple(self._pending),
                                    **self._counts)
                    self._pending = []
                    self._counts = {"started": 0, "dropped": 0, "stale": 0}
                    self._last_version_time, self._events_since_version = self.now, 0
                    self._fill()
                    return buffer
                self._fill()
            self._events_since_version += 1
            if (self.now - self._last_version_time > self.config.max_idle_s
                    or self._events_since_version > MAX_EVENTS_PER_VERSION):
                raise ConfigError(
                    f"asynchronous schedule: no new version for {self.now - self._last_version_time:.0f} virtual "
                    f"seconds after version {self.version} ({self._counts['started']} tasks started, "
                    f"{self._counts['dropped']} dropped out, {self._counts['stale']} too stale, "
                    f"{len(self._pending)} of {self.config.buffer_size} arrivals buffered): are phones on-line long "
                    f"enough to finish a task?")

    # -- checkpoints ------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        # the idle limit may change on resume: it only decides when to give up
        settings = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "max_idle_s"}
        return {"seed": self.seed, "population": len(self.population), **settings}

    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain JSON-able data: clock, version, in-flight set, buffer, counters."""
        return {
            "format": STATE_FORMAT, **self._settings(),
            "now": self.now, "version": self.version, "next_task_id": self._next_task_id,
            "start_serial": self._start_serial, "retry_at": self._retry_at,
            "last_version_time": self._last_version_time, "events_since_version": self._events_since_version,
            "in_flight": [[f.task.task_id, f.task.uid, f.task.start_version, f.task.start_time,
                           f.task.finish_time, f.drop_time] for _, f in sorted(self._in_flight.items())],
            "pending": [[a.task.task_id, a.task.uid, a.task.start_version, a.task.start_time,
                         a.task.finish_time, a.staleness] for a in self._pending],
            "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from `state_dict()`'s output; a state of other settings is refused (ConfigError)."""
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"asynchronous schedule state of format {state.get('format')!r}, expected "
                              f"{STATE_FORMAT}")
        saved = {k: state.get(k) for k in self._settings()}
        if saved != self._settings():
            changed = sorted(k for k in saved if saved[k] != self._settings()[k])
            raise ConfigError(f"asynchronous schedule state was made with other settings ({', '.join(changed)})")
        self.now, self.version = float(state["now"]), int(state["version"])
        self._next_task_id, self._start_serial = int(state["next_task_id"]), int(state["start_serial"])
        self._retry_at = None if state["retry_at"] is None else float(state["retry_at"])
        self._last_version_time = float(state["last_version_time"])
        self._events_since_version = int(state["events_since_version"])
        self._in_flight, self._busy, self._queue = {}, set(), []
        for task_id, uid, version, start, finish, drop in state["in_flight"]:
            task = Task(task_id=int(task_id), uid=str(uid), start_version=int(version), start_time=float(start),
                        finish_time=float(finish))
            self._add(_InFlight(task=task, drop_time=None if drop is None else float(drop)))
        self._pending = [Arrival(task=Task(task_id=int(t), uid=str(u), start_version=int(v), start_time=float(s),
                                           finish_time=float(f)),
                                 staleness=int(st), weight=staleness_weight(int(st), self.config.staleness_exponent))
                         for t, u, v, s, f, st in state["pending"]]
        self._counts = {k: int(state["counts"][k]) for k in ("started", "dropped", "stale")}


class PendingBuffers(Generic[Result]):
    """Buffers made ahead of real training, kept until their results are in and they are applied.

    The scheduler hands out `trainable(depth)` tasks to any rank, `complete`s their results in whatever real
    order they come, and `pop_ready` gives back the next version's buffer with its results in the buffer's
    order, strictly one version after another. `state_dict()` is the schedule's state as of the last
    applied version (results of buffers not yet applied are not in it: after a resume those tasks train
    again, from the same versions, to the same results)."""

    def __init__(self, schedule: AsyncSchedule) -> None:
        self.schedule = schedule
        self.applied = schedule.version
        self._applied_state = schedule.state_dict()
        self._ahead: deque[tuple[Buffer, dict[str, Any]]] = deque()
        self._results: dict[int, Result] = {}
        self._versions_of: dict[int, int] = {}    # task id -> the version its buffer makes

    def _make_through(self, version: int) -> None:
        while self.applied + len(self._ahead) < version:
            buffer = self.schedule.next_buffer()
            self._ahead.append((buffer, self.schedule.state_dict()))
            for arrival in buffer.arrivals:
                self._versions_of[arrival.task.task_id] = buffer.version

    def buffer(self, version: int) -> Buffer:
        """The buffer that makes `version` (> the applied version), running the schedule ahead as needed."""
        if version <= self.applied:
            raise ValueError(f"version {version} is already applied (applied: {self.applied})")
        self._make_through(version)
        return self._ahead[version - self.applied - 1][0]

    def trainable(self, depth: int = 1) -> list[Task]:
        """Tasks of the next `depth` versions' buffers that can train now (their start version is applied)
        and have no result yet, in version then arrival order."""
        self._make_through(self.applied + depth)
        return [a.task for buffer, _ in list(self._ahead)[:depth] for a in buffer.arrivals
                if a.task.start_version <= self.applied and a.task.task_id not in self._results]

    def complete(self, task_id: int, result: Result) -> None:
        """A task's result, in any real order; unknown and duplicate tasks are refused."""
        if task_id not in self._versions_of:
            raise RefusedError(f"task {task_id} is in no pending buffer")
        if task_id in self._results:
            raise RefusedError(f"task {task_id}: duplicate result")
        self._results[task_id] = result

    def pop_ready(self) -> tuple[Buffer, list[Result]] | None:
        """The next version's buffer and its results in arrival order once all are in (and marks it
        applied); None while some are missing."""
        if not self._ahead:
            return None
        buffer, state = self._ahead[0]
        if any(a.task.task_id not in self._results for a in buffer.arrivals):
            return None
        self._ahead.popleft()
        results = [self._results.pop(a.task.task_id) for a in buffer.arrivals]
        for arrival in buffer.arrivals:
            del self._versions_of[arrival.task.task_id]
        self.applied, self._applied_state = buffer.version, state
        return buffer, results

    def oldest_needed_version(self) -> int:
        """The oldest version a task still to train starts from: parameters older than it can be freed."""
        waiting = [a.task.start_version for buffer, _ in self._ahead for a in buffer.arrivals
                   if a.task.task_id not in self._results]
        waiting += [t.start_version for t in self.schedule.in_flight]
        waiting += [a.task.start_version for a in self.schedule.buffered]
        return min(waiting, default=self.applied)

    def checkpoint_versions(self) -> range:
        """The versions whose parameters a checkpoint at the applied version must hold: a resumed run
        trains again every task in flight or buffered at that point, from its own start version."""
        starts = [row[2] for row in self._applied_state["in_flight"]]
        starts += [row[2] for row in self._applied_state["pending"]]
        return range(min(starts, default=self.applied), self.applied + 1)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state at the applied version (for a checkpoint that holds the parameters of
        `checkpoint_versions()`)."""
        return copy.deepcopy(self._applied_state)
