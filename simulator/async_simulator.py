"""The per-rank loop of asynchronous mode (`--async-buffer`).

Every training plan hands this rank client tasks (`Plan.tasks`), each with the version it starts from
and the server update (target version) its update goes into. The rank trains its tasks lowest target
first, each from its own start version; as soon as it has trained every task of the next update's target
it pushes its part of that update (in a background thread) and goes on with the tasks of the update after
it while the other ranks finish theirs: a rank waits for a straggler only when what it needs next is the
version the straggler holds up.

Once the plan of version v is in, every task of update v + 1 is known, but tasks of update v + 2 still come
with the plan of v + 1. The rank trains only tasks of updates up to v + HORIZON (2): a long task of a
later update, started early, would hold up the next one's push when a shorter task of it arrives (priority
inversion). The scheduler hands tasks out only when they come within that horizon
(`scheduler.phones.asynchronous`), so a task waits in the scheduler, not in one rank's queue.

A task adds w n theta_i into its target's float64 sum, and w n theta_start is taken off once per start
version when the sum is pushed; with the scheduler's exact weights (`scheduler.phones.asynchronous`) the
sums do not depend on which rank trained what, nor in which order.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from flock.common.domain import DONE, EVAL, ClientReport, Plan, RankUpdate, TaskSpec
from flock.common.metrics import add_sums
from flock.common.streams import user_seed
from scheduler.phones.asynchronous import HORIZON
from simulator.data_plane import SchedulerDataPlane
from simulator.shard import Accumulator, drain
from simulator.simulator import Simulator, UserError

log = logging.getLogger(__name__)
POLL_S = 1e-6     # how long a look for the next plan waits while the rank has work of its own: not at all
                  # (a millisecond a look, between every two tasks, was 0.3% of a rank's time; not 0 over
                  # gRPC, where 0 asks for the default wait)
WAIT_S = 1.0      # with nothing to do: the longest wait for the plan before a look at the background push
EMPTY = np.zeros(0, dtype=np.float64)


@dataclass
class _Part:
    """This rank's part of one server update: the sum of w n theta_i, the w n to take off per start
    version, the metric sums, the seconds spent training its tasks and their reports (client selection)."""

    acc: Accumulator
    subtract: dict[int, float] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=lambda: {"clients": 0.0})
    seconds: float = 0.0
    reports: list[ClientReport] = field(default_factory=list)


class AsyncSimulator(Simulator):
    """A `Simulator` that trains asynchronous plans (see the module); evaluation steps as usual. Tasks train
    one at a time on the first shard; evaluations use every shard."""

    def run(self, start_step: int = 0) -> int:
        self._queue: list[TaskSpec] = []          # handed out, not trained; by (target, task id)
        self._versions: dict[int, np.ndarray] = {}
        self._keep: frozenset[int] = frozenset()     # older versions that tasks not yet handed out start from
        self._parts: dict[int, _Part] = {}
        self._spare: list[Accumulator] = []
        self._due: list[Plan] = []                # training plans whose update this rank has not pushed yet
        self._pushing: Future | None = None
        self._horizon = 0                          # the latest update whose tasks the rank trains now
        pusher = ThreadPoolExecutor(1, thread_name_prefix="push")
        if len(self.shards) > 1:
            log.debug("asynchronous mode trains one task at a time per rank: %d shards evaluate only",
                      len(self.shards))
        step = start_step
        try:
            while True:
                plan = self._next_plan(step, wait=not self._can_train() and not self._can_push())
                if plan is not None:
                    step += 1
                    if plan.kind == DONE:
                        self._finish_pushes()
                        return step - 1 - start_step
                    self._take(plan)
                elif self._can_push():
                    self._push(self._due.pop(0), pusher)
                elif self._can_train():
                    self._train(self._queue.pop(0))
        finally:
            pusher.shutdown(wait=True)

    # -- plans ------------------------------------------------------------------------------------------

    def _next_plan(self, step: int, wait: bool) -> Plan | None:
        """The plan of `step`: waits for it when the rank has nothing else to do, else only looks."""
        deadline = time.monotonic() + self.round_timeout
        while True:
            if self._pushing is not None and self._pushing.done():
                self._finish_pushes()          # a failed push raises here
            try:
                return self.data_plane.plan(step, min(WAIT_S, max(deadline - time.monotonic(), POLL_S))
                                            if wait else POLL_S)
            except TimeoutError:
                if not wait or time.monotonic() >= deadline:
                    if wait:
                        raise
                    return None

    def _take(self, plan: Plan) -> None:
        flat = self._fetch(plan.version)
        if plan.kind == EVAL:
            for shard in self.shards:
                shard.set_global(flat, plan.version)
            self.client.push_metrics(self.eval_step(plan))
            return
        self.store.at_round(plan.round + 1)     # writes from now on belong after the checkpoint of round + 1
        self._keep = frozenset(plan.keep)
        for task in plan.tasks:
            if task.start_version not in self._versions:     # only after a resume: the checkpoint's old versions
                self._versions[task.start_version] = self.client.get_params(task.start_version)[1]
        self._queue = sorted(self._queue + list(plan.tasks), key=lambda t: (t.target, t.task_id))
        self._due.append(plan)
        self._day, self._horizon = plan.day, plan.round + HORIZON

    def _fetch(self, version: int) -> np.ndarray:
        """The parameters of the current `version`, kept while tasks of this rank start from it (a copy when
        the data plane reuses its array for the next version)."""
        if version not in self._versions:
            flat = self.data_plane.params(version, self.round_timeout)
            if not isinstance(self.data_plane, SchedulerDataPlane):
                flat = flat.copy()
                flat.flags.writeable = False
            self._versions[version] = flat
        return self._versions[version]

    # -- training ---------------------------------------------------------------------------------------

    def _part(self, target: int) -> _Part:
        if target not in self._parts:
            acc = self._spare.pop() if self._spare else Accumulator(self.shards[0].layout, self.shards[0].device)
            self._parts[target] = _Part(acc=acc)
        return self._parts[target]

    def _train(self, task: TaskSpec) -> None:
        started = time.perf_counter()
        shard, part = self.shards[0], self._part(task.target)
        shard.set_global(self._versions[task.start_version], task.start_version)
        try:
            sums = shard.train_user(task.uid, self.reader.load(self._day, "train", task.uid),
                                    user_seed(self.seed, task.task_id, task.uid, "async"), task.target,
                                    into=part.acc, scale=task.weight)
        except Exception as e:
            raise UserError(f"rank {self.rank}: user {task.uid!r} (asynchronous task {task.task_id}, from version "
                            f"{task.start_version}) on day {self._day}: {type(e).__name__}: {e}") from e
        part.sums["clients"] += 1
        add_sums(part.sums, sums)
        report = (ClientReport.from_sums(task.uid, sums, self.report_loss, task.task_id)
                  if self.report_loss is not None else None)
        if report is not None:
            part.reports.append(report)
        if "diverged" not in sums:
            alpha = float(sums["samples"]) * task.weight
            part.subtract[task.start_version] = part.subtract.get(task.start_version, 0.0) + alpha
        part.seconds += time.perf_counter() - started
        self._forget_versions()

    def _can_train(self) -> bool:
        """Whether the first queued task belongs to an update no later than the one after the next."""
        return bool(self._queue) and self._queue[0].target <= self._horizon

    def _can_push(self) -> bool:
        """Whether the oldest due update has all its tasks trained here."""
        return bool(self._due) and not (self._queue and self._queue[0].target <= self._due[0].round + 1)

    def _push(self, plan: Plan, pusher: ThreadPoolExecutor) -> None:
        """Pushes this rank's part of the update of `plan` (sum of w n (theta_i - theta_start)) in the
        background, after the previous push; the rank trains on meanwhile."""
        part = self._parts.pop(plan.round + 1, None) or _Part(acc=None)
        # the start versions themselves, not their numbers: the rank may let go of them before the push runs
        starts = [(alpha, self._versions[start]) for start, alpha in sorted(part.subtract.items())]
        if plan.checkpoint:   # before the push: the scheduler checkpoints once every rank has pushed
            self.store.commit(plan.round + 1)
        update = RankUpdate(step=plan.step, rank=self.rank, weight=part.acc.weight if part.acc else 0.0,
                            delta_sum=EMPTY, sums={**part.sums, "train_seconds": part.seconds},
                            clients=tuple(part.reports))
        self._finish_pushes()
        self._pushing = pusher.submit(self._push_and_recycle, update, part.acc, starts)
        self._forget_versions()

    def _push_and_recycle(self, update: RankUpdate, acc: Accumulator | None,
                          starts: list[tuple[float, np.ndarray]]) -> None:
        if acc is not None:
            if acc.weight > 0:      # into the plane's buffer, valid until the step is applied; empties the sum
                buffer = self.data_plane.update_buffer(acc.total.numel())
                drain(buffer, [acc], starts)
                update = replace(update, delta_sum=buffer)
            else:
                acc.reset()
            self._spare.append(acc)
        self.data_plane.push_update(update, self.round_timeout)

    def _finish_pushes(self) -> None:
        if self._pushing is not None:
            self._pushing.result()
            self._pushing = None

    def _forget_versions(self) -> None:
        """Drops the parameters that no queued task, unpushed part or task still to be handed out needs (the
        newest version stays)."""
        needed = {t.start_version for t in self._queue} | self._keep
        for part in self._parts.values():
            needed.update(part.subtract)
        newest = max(self._versions, default=None)
        for version in [v for v in self._versions if v not in needed and v != newest]:
            del self._versions[version]
