"""The global scheduler as a plain object: shared parameters, the step counter, sampling, the calendar and
aggregation. Thread-safe (one lock); no gRPC here, so tests drive it directly."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from flock.channel import ServerChannel
from flock.common.domain import (
    DONE,
    EVAL,
    TRAIN,
    ParamLayout,
    Plan,
    RankMetrics,
    RankUpdate,
)
from flock.common.errors import ConfigError, RefusedError, RunFailed
from flock.common.metrics import Ratios, add_sums, eval_record, train_record
from reader.base import Reader
from reader.calendar import Calendar
from scheduler.aggregate import all_finite, blockwise, server_step
from scheduler.checkpoint import load_checkpoint, save_checkpoint
from scheduler.optim.base import ServerOptimizer
from scheduler.phones.rounds import PhoneRounds
from scheduler.rounds import RoundPolicy, RoundView, Synchronous, spread
from scheduler.sampling import evaluation_users

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    world_size: int
    rounds: int = 100
    clients_per_round: int = 10
    eval_every: int = 10
    eval_users: int = 0          # 0: every test user
    seed: int = 0
    pin_users: bool = False      # users hold private params: always train/evaluate on their home rank
    checkpoint_every: int = 0    # rounds between checkpoints (and after the last); 0: none
    target: tuple[str, float] | None = None   # (metric, value): the run ends at the first evaluation reaching it

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError("world size must be at least 1")
        if min(self.rounds, self.eval_every, self.eval_users, self.checkpoint_every) < 0 or self.clients_per_round < 1:
            raise ConfigError("rounds, eval_every, eval_users, checkpoint_every must be >= 0 and "
                              "clients_per_round >= 1")

    def checkpoint_due(self, rounds_done: int) -> bool:
        return self.checkpoint_every > 0 and (rounds_done % self.checkpoint_every == 0 or rounds_done == self.rounds)


@dataclass(frozen=True)
class Schedule:
    """The run's steps, (kind, rounds completed before it), computed on demand: train rounds, an evaluation
    every `eval_every` rounds and after the last, then done. No list of steps is built, so a run's length
    costs no memory up front."""

    rounds: int
    eval_every: int

    def _evals_before(self, rounds_done: int) -> int:
        """Evaluations among the steps before training round `rounds_done` (0-based) starts."""
        return rounds_done // self.eval_every if self.eval_every else 0

    def __len__(self) -> int:
        final_eval = 0 if self.eval_every and self.rounds % self.eval_every == 0 else 1
        return self.rounds + self._evals_before(self.rounds) + final_eval + 1

    def __getitem__(self, step: int) -> tuple[str, int]:
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} is outside the run's {len(self)} steps")
        if step == len(self) - 1:
            return DONE, self.rounds
        if step == len(self) - 2:
            return EVAL, self.rounds
        if not self.eval_every:
            return TRAIN, step
        block, place = divmod(step, self.eval_every + 1)
        return (TRAIN, block * self.eval_every + place) if place < self.eval_every else (EVAL, (block + 1) * self.eval_every)

    def train_step(self, rounds_done: int) -> int:
        """The step of training round `rounds_done` (0-based; `rounds` gives the step after the last round's)."""
        return rounds_done + self._evals_before(rounds_done)


def schedule(rounds: int, eval_every: int) -> list[tuple[str, int]]:
    """Every step of a run as a list (for tests and short loops; the scheduler keeps a `Schedule`)."""
    return list(Schedule(rounds, eval_every))


# the hooks `attach` sets, and what each is while unset
HOOKS: dict[str, object] = {"on_record": lambda record: None, "before_checkpoint": lambda: None,
                            "on_version": lambda version, params: None, "mirror": None,
                            "on_plans": lambda step, plans, failure: None}


class Scheduler:
    """Owns the run's global state: the lock, the shared parameters and their versions, the steps and the
    checkpoint. Simulators talk to it through `plan`, `params`, `push_update` and `push_metrics`; the round
    policy (scheduler/rounds.py) says who trains in each round, the channel (flock/channel/) what the
    server does to a round's sum before its optimizer step. Its hooks (`attach`):

    - `on_record(record)`: one dict per finished step (the metrics.jsonl lines; evaluations also carry
      "_per_user": each user's main metric), called under the lock so records and checkpoints are in order;
    - `before_checkpoint()`: e.g. make the records durable first;
    - `on_version(version, params)`: each new version's parameters (not to be written), under the lock,
      before its plans are handed out: rank 0's data plane announces them to its node there and then;
    - `mirror`: an array where each server step also writes the new parameters, in its one pass (rank 0's
      node shared memory); it holds the current parameters, except after a step that failed (partly written:
      the run stops there);
    - `on_plans(step, plans, failure)`: each step's plans as it opens (every rank's, in rank order), or the
      run's failure, under the lock, in the thread that opened the step or failed the run; rank 0's data
      plane posts them to its node's ranks."""

    def __init__(self, config: SchedulerConfig, *, reader: Reader, optimizer: ServerOptimizer,
                 train_ratios: Ratios, eval_ratios: Ratios, main_metric: str = "", rounds: RoundPolicy | None = None,
                 channel: ServerChannel | None = None, checkpoint_path: Path | None = None) -> None:
        self.config = config
        self.reader = reader
        self.optimizer = optimizer
        self.train_ratios = dict(train_ratios)
        self.eval_ratios = dict(eval_ratios)
        self.main_metric = main_metric or next(iter(self.eval_ratios), "")   # per-user values (eval_users.json)
        self.on_record: Callable[[dict], None] = HOOKS["on_record"]
        self.before_checkpoint: Callable[[], None] = HOOKS["before_checkpoint"]
        self.on_version: Callable[[int, np.ndarray], None] = HOOKS["on_version"]
        self.mirror: np.ndarray | None = None
        self.on_plans: Callable[[int, list[Plan] | None, str | None], None] = HOOKS["on_plans"]
        self.checkpoint_path = checkpoint_path
        self.rounds = rounds or Synchronous()
        self.failed_rounds = 0            # training rounds that applied nothing (too few phones, secure aggregation)
        self.channel = channel            # privacy and compression (flock/channel/); None: byte counts only
        self.calendar = Calendar.from_reader(reader)
        self.steps = Schedule(config.rounds, config.eval_every)
        self._indexes: dict[tuple[str, str], tuple[Sequence[str], Mapping[str, int]]] = {}
        for day in sorted(set(self.calendar.train_days)):
            users = self._eligible(day, "train")[0]
            if config.clients_per_round > len(users):
                raise ConfigError(f"--clients-per-round {config.clients_per_round} is more than the {len(users)} "
                                  f"users with training data on day {day}")
        self.rounds.bind(RoundView(world_size=config.world_size, rounds=config.rounds,
                                   clients_per_round=config.clients_per_round, seed=config.seed,
                                   pin_users=config.pin_users, calendar=self.calendar, eligible=self._eligible,
                                   checkpoint_due=lambda v: self.checkpoint_path is not None
                                   and self.config.checkpoint_due(v)))
        self.data_fingerprint = self._fingerprint()
        self._cond = threading.Condition()
        self.layout: ParamLayout | None = None
        self.params: np.ndarray | None = None
        self._total: np.ndarray | None = None     # the mean's float64 work buffer (optimizers without step_block)
        self.version = 0
        self.step = 0
        self.failure: str | None = None
        self._plans: list[Plan] = []
        self._pushed: dict[int, RankUpdate | RankMetrics] = {}
        self._step_started = time.perf_counter()

    def attach(self, **hooks) -> None:
        """Sets hooks by name (see the class's docstring); None restores a hook's default."""
        unknown = set(hooks) - set(HOOKS)
        if unknown:
            raise TypeError(f"unknown scheduler hook(s): {', '.join(sorted(unknown))}; known: {', '.join(HOOKS)}")
        with self._cond:
            for name, hook in hooks.items():
                setattr(self, name, HOOKS[name] if hook is None else hook)

    @property
    def phones(self) -> PhoneRounds | None:
        """The device model (None: every sampled client trains, and no virtual clock runs)."""
        return self.rounds.phones

    @property
    def sim_time(self) -> float:
        """Virtual seconds since the run began (with phones)."""
        return self.rounds.sim_time

    # -- data -------------------------------------------------------------------------------------------

    def _eligible(self, day: str, split: str) -> tuple[Sequence[str], Mapping[str, int]]:
        """The users of a day's split that have samples (file order), and every user's count; read once."""
        key = (day, split)
        if key not in self._indexes:
            index = self.reader.index(day, split)
            counts = index.count_of()
            users = index.with_samples()     # compact for a large day (reader.users): no list of every user
            if len(users) < len(index.users):
                log.warning("day %s %s: %d users without samples are never sampled", day, split,
                            len(index.users) - len(users))
            self._indexes[key] = (users, counts)
        return self._indexes[key]

    def _fingerprint(self) -> str:
        """A digest of the reader's spec and the calendar's user indexes: a checkpoint only resumes on the
        data (and vocabulary) it was made with."""
        h = hashlib.sha1(json.dumps(dict(self.reader.spec()), sort_keys=True).encode())
        days = [(d, "train") for d in self.calendar.train_days] + [(self.calendar.test_day, "test")]
        for day, split in days:
            for piece in self.reader.index(day, split).json_chunks():
                h.update(piece.encode())
        return h.hexdigest()

    def _make_plans(self, step: int) -> list[Plan]:
        kind, done = self.steps[step]
        if kind == DONE:
            return [Plan(step=step, kind=DONE, round=done, version=self.version)] * self.config.world_size
        if kind == TRAIN:
            # the round's clipping norm comes from here (fixed, or adaptive clipping's), the same for every client
            clip = self.channel.round_clip if self.channel is not None else 0.0
            return self.rounds.plans(step, done, self.version, clip)
        day = self.calendar.test_day
        users, counts = self._eligible(day, "test")
        chosen = evaluation_users(self.config.seed, users, self.config.eval_users)
        return spread(self.rounds.view, step=step, kind=EVAL, done=done, day=day, split="test", chosen=chosen,
                      counts=counts, version=self.version, train_day=self.calendar.train_days[-1])

    # -- parameters -------------------------------------------------------------------------------------

    def init_params(self, layout: ParamLayout, flat: np.ndarray) -> None:
        """The initial shared parameters (from rank 0's freshly built model); accepted once."""
        with self._cond:
            if self.params is not None:
                raise RefusedError("initial parameters were already set")
            if flat.dtype != np.float32 or flat.shape != (layout.size,):
                raise RefusedError(f"initial parameters: expected {layout.size} float32 values")
            self.layout, self.params = layout, flat.copy()
            self.rounds.start(layout)
            self._open(0)
            self._step_started = time.perf_counter()

    def current_params(self, version: int) -> tuple[ParamLayout, np.ndarray]:
        """The layout and parameters of `version`, which must be the current one (read-only array)."""
        with self._cond:
            if self.params is None:
                raise RefusedError("no parameters yet")
            params = self.params if version == self.version else self.rounds.params_of(version)
            if params is None:
                raise RefusedError(f"parameters version {version} requested, current is {self.version}")
        params.flags.writeable = False
        return self.layout, params

    def _write_checkpoint(self, rounds_done: int) -> None:
        meta = {"round": rounds_done, "version": self.version, "step": self.step + 1, "seed": self.config.seed,
                "rounds": self.config.rounds, "world_size": self.config.world_size, "data": self.data_fingerprint,
                "sim_time": self.rounds.sim_time, "failed_rounds": self.failed_rounds,
                "privacy": self.channel.state_dict() if self.channel else {},
                **self.rounds.checkpoint_meta(),
                "layout": [[n, list(s)] for n, s in zip(self.layout.names, self.layout.shapes)]}
        save_checkpoint(self.checkpoint_path, params=self.params, meta=meta,
                        optimizer_state=self.optimizer.state_dict(),
                        versions=self.rounds.checkpoint_versions(self.version))
        log.info("checkpoint after round %d: %s", rounds_done, self.checkpoint_path)

    def restore(self, path: Path, layout: ParamLayout) -> int:
        """Continues from the checkpoint at `path`; returns the rounds it had completed. A checkpoint of
        another model, data set, seed or schedule is refused with the reason."""
        params, meta, opt_state = load_checkpoint(path)
        saved = ParamLayout(names=tuple(n for n, _ in meta["layout"]), shapes=tuple(tuple(s) for _, s in meta["layout"]))
        if saved != layout:
            raise ConfigError(f"{path}: checkpoint is of another model ({saved.size} shared parameters in "
                              f"{len(saved.names)} tensors; this model has {layout.size} in {len(layout.names)})")
        if meta["data"] != self.data_fingerprint:
            raise ConfigError(f"{path}: checkpoint was made on other data (user index digest differs)")
        if meta["seed"] != self.config.seed:
            raise ConfigError(f"{path}: checkpoint is of a run with seed {meta['seed']}, not {self.config.seed}")
        if meta["round"] > self.config.rounds:
            raise ConfigError(f"--rounds {self.config.rounds}: the run has done {meta['round']} rounds already "
                              f"(its last checkpoint, {path})")
        self.rounds.check_resume(meta["rounds"], path)
        if meta["rounds"] != self.config.rounds and len(set(self.calendar.train_days)) > 1:
            log.warning("--rounds %d (the run had %d): the rounds still to come spread over the %d training days "
                        "as a %d-round run's would", self.config.rounds, meta["rounds"],
                        len(set(self.calendar.train_days)), self.config.rounds)
        if self.config.pin_users and meta["world_size"] != self.config.world_size:
            raise ConfigError(f"{path}: users' private parameters live on their home ranks of a {meta['world_size']}-"
                              f"rank run; resume with -np {meta['world_size']}")
        with self._cond:
            # the step after the checkpointed round in this run's schedule (--rounds and --eval-every may have changed)
            step = self.steps.train_step(meta["round"] - 1) + 1 if meta["round"] else 0
            self.layout, self.params, self.version, self.step = layout, params, meta["version"], step
            self.failed_rounds = int(meta.get("failed_rounds", 0))
            if self.channel is not None:
                self.channel.load_state_dict(meta.get("privacy"))    # the accountant's rounds, the clipping norm
            self.optimizer.load_state_dict(opt_state)
            self.rounds.start(layout)
            self.rounds.restore(self.version, float(meta.get("sim_time", 0.0)), path, meta)
            self._open(self.step)
            self._step_started = time.perf_counter()
        return int(meta["round"])

    # -- steps ------------------------------------------------------------------------------------------

    def plan(self, rank: int, step: int, timeout: float) -> Plan:
        """Rank `rank`'s plan for `step`, waiting up to `timeout` seconds for the step to open."""
        self._check_rank(rank)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.failure is None and (self.params is None or self.step < step):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"rank {rank}: step {step} did not open within {timeout:.0f} s "
                                       f"(scheduler is at step {self.step}; waiting for ranks "
                                       f"{self._missing_ranks()})")
                self._cond.wait(left)
            if self.failure is not None:
                raise RunFailed(self.failure)
            if step != self.step:
                raise RefusedError(f"rank {rank}: step {step} asked for, but the scheduler is at step {self.step}")
            return self._plans[rank]

    def push_update(self, update: RankUpdate) -> None:
        """One rank's training update for the current step; completes the step when it is the last. A
        `reduced` update brings only its weight and sums: its values are in another rank's delta_sum (a
        data plane summed them there), which may then be non-empty with that rank's own weight 0; an update's
        `more` parts (in-process) follow its delta_sum in the sum. The values are only read (a server
        optimizer without `step_block` may overwrite a single writable delta_sum: its work buffer)."""
        with self._cond:
            self._check_push(update.step, update.rank, TRAIN)
            size = self.layout.size
            if update.weight < 0 or not np.isfinite(update.weight):
                raise RefusedError(f"rank {update.rank}: invalid weight {update.weight}")
            if update.reduced and update.delta_sum.size:
                raise RefusedError(f"rank {update.rank}: a reduced update with {update.delta_sum.size} values")
            if update.weight > 0 and not update.reduced and update.delta_sum.shape != (size,):
                raise RefusedError(f"rank {update.rank}: update has {update.delta_sum.size} values, "
                                   f"the model has {size}")
            if update.weight == 0 and update.delta_sum.size not in (0, size):
                raise RefusedError(f"rank {update.rank}: empty update with {update.delta_sum.size} values")
            if update.more and (update.reduced or any(part.shape != (size,) or part.dtype != np.float64
                                                      for part in update.more)):
                raise RefusedError(f"rank {update.rank}: in-process parts on a reduced update, or of the wrong "
                                   f"size or type")
            self._pushed[update.rank] = update
            self._maybe_finish()

    def push_metrics(self, metrics: RankMetrics) -> None:
        """One rank's evaluation sums for the current step."""
        with self._cond:
            self._check_push(metrics.step, metrics.rank, EVAL)
            self._pushed[metrics.rank] = metrics
            self._maybe_finish()

    @property
    def finished(self) -> bool:
        return self.steps[self.step][0] == DONE

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.config.world_size:
            raise RefusedError(f"rank {rank} is outside the world of {self.config.world_size}")

    def _check_push(self, step: int, rank: int, kind: str) -> None:
        self._check_rank(rank)
        if self.params is None:
            raise RefusedError("no parameters yet")
        if step != self.step:
            raise RefusedError(f"rank {rank}: stale push for step {step}; the scheduler is at step {self.step}")
        if self.steps[step][0] != kind:
            raise RefusedError(f"rank {rank}: step {step} is a {self.steps[step][0]} step, not {kind}")
        if rank in self._pushed:
            raise RefusedError(f"rank {rank}: duplicate push for step {step}")

    def _missing_ranks(self) -> list[int]:
        return [r for r in range(self.config.world_size) if r not in self._pushed]

    def _maybe_finish(self) -> None:
        """Called under the lock: when every rank pushed, applies the step, records it (and checkpoints),
        and opens the next one. A diverged training step fails the run instead (nothing recorded or
        checkpointed for it)."""
        if len(self._pushed) < self.config.world_size:
            return
        kind, done = self.steps[self.step]
        pushed = [self._pushed[r] for r in sorted(self._pushed)]      # rank order: the same whenever they pushed
        self._pushed = {}
        version = self.version
        failure = self._finish_train(done, pushed) if kind == TRAIN else self._finish_eval(done, pushed)
        if failure is not None:       # every rank raises it (RunFailed) from its next plan; rank 0 reports it
            self.failure = failure
            try:
                self.on_plans(self.step, None, failure)
            finally:
                self._cond.notify_all()
        else:
            if self.version != version:
                self.on_version(self.version, self.params)
            self._open(self.step + 1)

    def _open(self, step: int) -> None:
        """Under the lock: makes `step` the current one and hands out its plans."""
        self.step = step
        self._plans = self._make_plans(step)
        try:
            self.on_plans(step, self._plans, None)
        finally:
            self._cond.notify_all()

    def _step_seconds(self) -> float:
        """A step's time runs from the previous step's end to the end of its aggregation; recording and
        checkpointing count in the next step: every second of the run belongs to some step."""
        finished = time.perf_counter()
        seconds, self._step_started = finished - self._step_started, finished
        return seconds

    def _finish_train(self, done: int, pushed: list[RankUpdate]) -> str | None:
        """Applies the server step for training round `done` + 1; returns why the run must stop, if it must."""
        sums: dict[str, float] = {}
        for update in pushed:
            add_sums(sums, update.sums)
        where = f"round {done + 1}"
        if sums.get("diverged", 0) and sums.get("diverged", 0) >= sums.get("clients", 0):
            return (f"{where}: every client's local training gave non-finite or huge parameters ({int(sums['diverged'])} "
                    f"dropped): local training diverges (check --lr, --max-grad-norm and the data); the run stops")
        before = self.params
        # rank order; a data plane may have summed several ranks' values into one part already
        parts = [part for u in pushed for part in (u.delta_sum, *u.more) if part.size]
        weight, link = sum(u.weight for u in pushed), {}
        if self.channel is not None:      # privacy hook: secure aggregation's decoding, DP noise, bytes, epsilon
            parts, weight, link = self.channel.aggregate(done, parts, weight, sums, sampling=self.rounds.sampling())
        applied = bool(parts) and weight > 0
        if len(parts) > 1 and self._total is None and not blockwise(self.optimizer):
            self._total = np.empty(self.layout.size, np.float64)    # reused: no 50 MB page-in a round
        result = server_step(parts, weight, self.params, self.optimizer, work=self._total, mirror=self.mirror)
        if not result.update_finite:
            bad = [u.rank for u in pushed if not all(all_finite(part) for part in (u.delta_sum, *u.more))]
            what = (f"the update pushed by rank(s) {', '.join(map(str, bad))} holds non-finite values (a data plane "
                    f"may have summed several ranks' values into one push)" if bad else
                    "the mean of the finite pushed updates overflowed")
            return f"{where}: {what}; the run stops, the last checkpoint is kept"
        if not result.params_finite:
            return (f"{where}: the server step gave non-finite parameters (check --server-lr and the server "
                    f"optimizer's options); the run stops, the last checkpoint is kept")
        if result.params is not None:
            self.params = result.params
        # each rank's own time on the step's users (training and its local sum): stragglers show here
        work = [round(float(u.sums.get("train_seconds", 0.0)), 4) for u in pushed]
        clock = self.rounds.record(done)
        record = {**train_record(done + 1, sums, self.train_ratios, self._step_seconds()), "rank_work_s": work,
                  **link, **clock}
        if self.rounds.selection is not None:     # the clients' reports (a few numbers each) feed the next selections
            fields, failure = self.rounds.selection.finish(done + 1, [c for u in pushed for c in u.clients])
            if failure is not None:
                return failure
            record.update(fields)
        bad = nonfinite_keys(record)
        if bad:
            return f"{where}: {', '.join(bad)} not finite; the run stops, the last checkpoint is kept"
        self.rounds.applied(done, record, self.version, before)
        self.version += 1
        self.failed_rounds += not applied
        self.on_record(record)
        if self._plans[0].checkpoint:     # after the record: a resumed run's metrics lose nothing
            self.before_checkpoint()
            self._write_checkpoint(done + 1)
        if done + 1 == self.config.rounds and self.failed_rounds == self.config.rounds:
            return (f"no round was applied: all {self.config.rounds} training rounds failed (too few results in time: "
                    f"see --min-clients, --deadline, --availability; or secure aggregation's threshold); the model "
                    f"is the untrained one, so the run stops without evaluating it")
        return None

    def _finish_eval(self, done: int, pushed: list[RankMetrics]) -> str | None:
        sums: dict[str, float] = {}
        per_user: dict[str, float] = {}
        for metrics in pushed:
            add_sums(sums, metrics.sums)
            per_user.update(metrics.per_user)
        record = eval_record(done, sums, self.eval_ratios, self._step_seconds())
        if self.phones is not None:
            record["sim_time"] = self.sim_time        # evaluation takes no virtual time
        if self.failed_rounds:
            record["failed_rounds"] = self.failed_rounds     # of the `round` rounds so far
        if self.channel is not None:
            record.update(self.channel.eval_fields())     # privacy hook: epsilon spent so far
        bad = nonfinite_keys(record)
        if bad:
            return f"evaluation after round {done}: {', '.join(bad)} not finite; the run stops"
        if self.config.target is not None and target_reached(self.config.target, record):
            metric, value = self.config.target
            record["target_reached"] = {"metric": metric, "value": value, "round": done,
                                        **({"sim_time": self.sim_time} if "sim_time" in record else {})}
            # the schedule of a run of `done` rounds: its next step is "done" (this evaluation ends every block)
            self.steps = Schedule(done, self.config.eval_every)
            log.info("target %s=%g reached at round %d: the run ends", metric, value, done)
        self.on_record({**record, "_per_user": {"metric": self.main_metric, "users": dict(sorted(per_user.items()))}})
        return None


def target_reached(target: tuple[str, float], record: dict) -> bool:
    """Whether an evaluation record reaches --target: a metric named *loss* at or below the value, any other
    at or above it."""
    metric, value = target
    got = record.get(metric)
    if not isinstance(got, (int, float)):
        return False
    return got <= value if "loss" in metric else got >= value


def nonfinite_keys(record: dict) -> list[str]:
    """The record's numbers that are NaN or infinite (never written: metrics.jsonl holds strict JSON)."""
    return [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
