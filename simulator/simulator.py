"""The per-rank simulator loop: ask the scheduler what to do, do it over the shards, push one result."""
from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from flock.common.domain import DONE, TRAIN, ClientReport, Plan, RankMetrics, RankUpdate, assign_users
from flock.common.metrics import add_sums, add_user_eval
from flock.common.streams import user_seed
from reader.base import Reader
from scheduler.client import LocalSchedulerClient, SchedulerClient
from simulator.attacks import ClientAttack, trigger_test_samples
from simulator.data_plane import DataPlane, SchedulerDataPlane
from simulator.data_server import PrivateStore
from simulator.per_client import ClientUpdate, PerClientRound
from simulator.shard import Shard, drain

log = logging.getLogger(__name__)


class UserError(RuntimeError):
    """A failure while simulating one user; the message names the user, day and rank."""


class Simulator:
    def __init__(self, *, rank: int, client: SchedulerClient | LocalSchedulerClient, reader: Reader, shards: Sequence[Shard],
                 store: PrivateStore, eval_ratios: Mapping[str, tuple[str, str]], seed: int = 0,
                 round_timeout: float = 600.0, data_plane: DataPlane | None = None,
                 per_client: PerClientRound | None = None, attack: ClientAttack | None = None,
                 report_loss: tuple[str, str] | None = None) -> None:
        self.rank = rank
        self.seed = seed
        self.store = store
        self.client = client
        self.data_plane = data_plane or SchedulerDataPlane(client)
        self.per_client = per_client      # None: FedAvg's linear path (one weighted sum per rank)
        self.attack = attack              # None: every client is honest
        # client selection's feedback: each trained client's report, its loss being this training ratio
        # (numerator, denominator); None: no reports (uniform selection)
        self.report_loss = report_loss
        self._global: np.ndarray | None = None      # the step's global parameters (read-only, maybe shared)
        self.reader = reader
        self.shards = list(shards)
        self.eval_ratios = dict(eval_ratios)
        self.round_timeout = round_timeout
        self._count_cache: dict[tuple[str, str], dict[str, int]] = {}
        self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix="shard") if len(self.shards) > 1 else None

    def close(self) -> None:
        """Stops the shard threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def run(self, start_step: int = 0) -> int:
        """Runs steps until the scheduler says done; returns the number of steps run."""
        step = start_step
        while True:
            t0 = time.perf_counter()
            plan = self.data_plane.plan(step, self.round_timeout)
            if plan.kind == DONE:
                return step - start_step
            t1 = time.perf_counter()
            flat = self.data_plane.params(plan.version, self.round_timeout)
            self._global = flat
            for shard in self.shards:
                shard.set_global(flat, plan.version)
            t2 = time.perf_counter()
            result = self.train_step(plan) if plan.kind == TRAIN else self.eval_step(plan)
            t3 = time.perf_counter()
            if plan.kind == TRAIN:
                self.data_plane.push_update(result, self.round_timeout)
            else:
                self.client.push_metrics(result)
            log.debug("step %d (%s, %d users): waited %.3f s, params %.3f s, work %.3f s, push %.3f s", step,
                      plan.kind, len(plan.users), t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)
            step += 1

    def _counts(self, day: str, split: str) -> dict[str, int]:
        """user -> samples of a day's split (kept: the index is asked for every step and user)."""
        key = (day, split)
        if key not in self._count_cache:
            self._count_cache[key] = self.reader.index(day, split).count_of()
        return self._count_cache[key]

    def _per_shard(self, plan: Plan, work: Callable[[Shard, str], dict[str, float]]) -> list[list[tuple[str, dict]]]:
        """Runs `work` for each of the plan's users, spread over the shards by sample count."""
        index = self._counts(plan.day, plan.split)
        groups = assign_users(plan.users, [index[u] for u in plan.users], len(self.shards), pinned=False)

        def run_group(shard: Shard, users: list[str]) -> list[tuple[str, dict]]:
            out = []
            for uid in users:
                try:
                    out.append((uid, work(shard, uid)))
                except Exception as e:
                    raise UserError(f"rank {self.rank}: user {uid!r} on day {plan.day} ({plan.split}): "
                                    f"{type(e).__name__}: {e}") from e
            return out

        if self._pool is None:
            return [run_group(self.shards[0], groups[0])]
        return list(self._pool.map(run_group, self.shards, groups))

    def train_step(self, plan: Plan) -> RankUpdate:
        if self.per_client is not None:
            return self._train_per_client(plan)
        started = time.perf_counter()
        self.store.at_round(plan.round + 1)
        for shard in self.shards:
            shard.reset_sum()
        results = self._per_shard(plan, lambda shard, uid: shard.train_user(
            uid, self._training_samples(plan, uid), user_seed(self.seed, plan.round, uid), plan.round + 1,
            clip=plan.clip))
        sums = self._train_sums(results)
        clients = self._reports(results)
        weight = sum(shard.sum.weight for shard in self.shards)
        if weight > 0:       # sum n_k (theta_k - theta) in float64; the shards' sums are left empty
            delta = self.data_plane.update_buffer(self.shards[0].layout.size)    # pushed before the next round reuses it
            drain(delta, [shard.sum for shard in self.shards], [(weight, self._global)])
        else:
            delta = np.zeros(0, dtype=np.float64)
        if plan.checkpoint:   # before the push: the scheduler checkpoints once every rank has pushed
            self.store.commit(plan.round + 1)
        sums["train_seconds"] = time.perf_counter() - started
        log.debug("step %d: trained %d users in %.2f s", plan.step, len(plan.users), sums["train_seconds"])
        return RankUpdate(step=plan.step, rank=self.rank, weight=weight, delta_sum=delta, sums=sums, clients=clients)

    def _training_samples(self, plan: Plan, uid: str) -> Mapping[str, np.ndarray]:
        samples = self.reader.load(plan.day, plan.split, uid)
        return samples if self.attack is None else self.attack.samples(uid, samples, plan.round)

    def _train_sums(self, results: list[list[tuple[str, dict]]]) -> dict[str, float]:
        """The rank's training sums over its users (with an attack: how many of them were malicious)."""
        sums: dict[str, float] = {"clients": 0.0}
        if self.attack is not None:
            sums["malicious"] = 0.0
        for group in results:
            for uid, user_sums in group:
                sums["clients"] += 1
                add_sums(sums, user_sums)
                if self.attack is not None and uid in self.attack.malicious:
                    sums["malicious"] += 1
        return sums

    def _reports(self, results: list[list[tuple[str, dict]]]) -> tuple[ClientReport, ...]:
        """The clients' reports for client selection (none when the run's selection needs none)."""
        if self.report_loss is None:
            return ()
        found = (ClientReport.from_sums(uid, user_sums, self.report_loss) for group in results
                 for uid, user_sums in group)
        return tuple(report for report in found if report is not None)

    def _train_per_client(self, plan: Plan) -> RankUpdate:
        """The round on the per-client path: each client's update kept apart, the slices exchanged and
        aggregated (`simulator/per_client.py`); rank 0 pushes the aggregate as the round's mean (weight 1),
        the other ranks their metric sums only."""
        started = time.perf_counter()
        self.store.at_round(plan.round + 1)
        with warnings.catch_warnings():    # a read-only array: only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            global_flat = torch.from_numpy(self._global)
        slots = {uid: slot for slot, uid in enumerate(sorted(plan.users))}     # this rank's clients, in uid order
        sink = self.per_client.send_buffer(len(slots))
        updates = {uid: ClientUpdate(global_flat, sink, slot) for uid, slot in slots.items()}
        losses: dict[str, float] = {}

        def train(shard: Shard, uid: str) -> dict[str, float]:
            sums = shard.train_user(uid, self._training_samples(plan, uid), user_seed(self.seed, plan.round, uid),
                                    plan.round + 1, clip=plan.clip, into=updates[uid])
            if updates[uid].written:
                losses[uid] = self.per_client.client_loss(uid, sums)
            return sums

        results = self._per_shard(plan, train)
        sums, clients = self._train_sums(results), self._reports(results)
        if plan.checkpoint:   # before the push: the scheduler checkpoints once every rank has pushed
            self.store.commit(plan.round + 1)
        filled = [uid for uid in sorted(slots) if updates[uid].written]      # a diverged client sends nothing
        sink.compact([slots[uid] for uid in filled])
        mine = [(uid, updates[uid].weight, losses[uid]) for uid in filled]
        sums["train_seconds"] = time.perf_counter() - started
        mean, count, skipped = self.per_client.run(sink, mine, plan.step, plan.round)
        if skipped and self.rank == 0:
            log.warning("round %d: %d client update(s): %s; nothing applied", plan.round + 1, count, skipped)
        if mean is None:
            return RankUpdate(step=plan.step, rank=self.rank, weight=0.0, delta_sum=np.zeros(0), sums=sums,
                              clients=clients)
        buffer = self.data_plane.update_buffer(mean.size)
        buffer[:] = mean
        return RankUpdate(step=plan.step, rank=self.rank, weight=1.0, delta_sum=buffer, sums=sums, clients=clients)

    def _evaluate_user(self, shard: Shard, plan: Plan, uid: str) -> dict[str, float]:
        test = self.reader.load(plan.day, plan.split, uid)
        sums = shard.evaluate_user(uid, test, plan.round)
        if self.attack is not None and self.attack.settings.name == "backdoor":
            triggered = trigger_test_samples(self.attack.settings, test, self.attack.spec)
            if triggered is not None:        # the share of triggered images (not of the target) classed as the target
                hit = shard.evaluate_user(uid, triggered, plan.round)
                sums = {**sums, "backdoor_correct": hit["correct"], "backdoor_samples": hit["samples"]}
        if shard.finetuner is not None:
            if self._counts(plan.train_day, "train").get(uid):
                train = self.reader.load(plan.train_day, "train", uid)
                tuned = shard.finetune_and_evaluate(uid, train, test, user_seed(self.seed, plan.round, uid, "finetune"))
            else:             # nothing to adapt on: the global model is the user's model
                tuned = sums
            sums = {**sums, **{f"ft_{k}": v for k, v in tuned.items()}}
        return sums

    def eval_step(self, plan: Plan) -> RankMetrics:
        results = self._per_shard(plan, lambda shard, uid: self._evaluate_user(shard, plan, uid))
        sums: dict[str, float] = {"users": 0.0}
        main = next(iter(self.eval_ratios.items()), None)
        per_user = {}
        for group in results:
            for uid, user_sums in group:
                add_user_eval(sums, user_sums, self.eval_ratios)
                if main and main[1][0] in user_sums and user_sums.get(main[1][1], 0) > 0:
                    per_user[uid] = user_sums[main[1][0]] / user_sums[main[1][1]]
        return RankMetrics(step=plan.step, rank=self.rank, sums=sums, per_user=per_user)
