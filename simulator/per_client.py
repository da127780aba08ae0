"""The per-client path of a training round: every rank keeps its clients' updates, the ranks exchange
coordinate slices so that rank r holds slice r of every update, the aggregator runs on each slice, and the
slices of the aggregate meet at rank 0, which pushes it to the scheduler as the round's mean.

Slices are whole blocks of `BLOCK` coordinates (rank r holds blocks [r B / W, (r + 1) B / W) of the B blocks),
the K clients' rows are in the order of their user ids, and the rules' whole-vector sums add per-block
partials in block order (`MPIReducer`): the aggregate is the same bits at any number of ranks. Memory per rank
is about K x P x 4 / W bytes for the slices, beside its own clients' updates (P x 4 bytes each) until the
exchange. Waits poll the non-blocking collectives with sleeps (the ranks still training keep the cores) and
time out with the round.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch

from flock.common.errors import ConfigError
from scheduler.aggregate import BLOCK
from scheduler.robust import ordered_sum
from simulator.comm import Comm, Request
from simulator.data_plane import wait_until

log = logging.getLogger(__name__)


class ClientUpdate:
    """Where a shard puts one client's update (in place of its running sum): delta = theta_k - theta_global
    as float32, computed in float64, and the client's weight. The interface of `shard.Accumulator`."""

    def __init__(self, global_flat: torch.Tensor) -> None:
        self.global_flat = global_flat
        self.delta: np.ndarray | None = None
        self.weight = 0.0

    def add(self, params: list[torch.Tensor], alpha: float, samples: float) -> None:
        delta = torch.empty(self.global_flat.numel(), dtype=torch.float32)
        at = 0
        for p in params:        # a tensor at a time: no float64 copy of the whole vector per client
            n = p.numel()
            delta[at:at + n] = p.detach().reshape(-1).double().sub_(self.global_flat[at:at + n].double()).cpu()
            at += n
        self.delta = delta.numpy()
        self.weight = samples

    def add_update(self, base: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float, samples: float) -> None:
        """A transformed update (the channel's: clipped, compressed) on the exact global parameters."""
        self.delta = torch.cat([d.detach().reshape(-1) for d in deltas]).float().cpu().numpy()
        self.weight = samples


def slice_of(rank: int, world: int, size: int, block: int = BLOCK) -> tuple[int, int]:
    """[lo, hi): the coordinates rank `rank` of `world` holds of a `size`-long vector, whole blocks."""
    blocks = -(-size // block)
    return min(size, rank * blocks // world * block), min(size, (rank + 1) * blocks // world * block)


class MPIReducer:
    """The rules' whole-vector sums over the ranks' slices: every rank's per-block partials, gathered, in
    rank order (which is block order), summed one after another (`robust.ordered_sum`)."""

    def __init__(self, comm: Comm, block: int = BLOCK) -> None:
        self.comm = comm
        self.block = block

    def total(self, per_block: np.ndarray) -> np.ndarray:
        return ordered_sum(np.concatenate(self.comm.allgather(per_block)))


class PerClientRound:
    """One rank's side of the per-client path (`run` is collective: every rank calls it every round)."""

    def __init__(self, comm: Comm, size: int, aggregator: Any, *, timeout: float, block: int = BLOCK,
                 attack: Any = None, loss_ratio: tuple[str, str] | None = None) -> None:
        self.comm = comm
        # an aggregator that weighs clients by their training loss (q-FedAvg) gets each client's
        # loss_ratio[0] / loss_ratio[1] of its training sums
        self.needs_loss = bool(getattr(aggregator, "needs_loss", False))
        if self.needs_loss and loss_ratio is None:
            raise ConfigError(f"{type(aggregator).__name__} weighs clients by their training loss: the trainer "
                              f"reports none")
        self.loss_ratio = loss_ratio
        self.attack = attack        # simulator/attacks.py's ClientAttack: what the malicious clients send instead
        self.size = size
        self.aggregator = aggregator
        self.timeout = timeout
        self.block = block
        self.bounds = [slice_of(r, comm.size, size, block) for r in range(comm.size)]

    def _wait(self, request: Request, what: str, step: int) -> None:
        """Waits for the ranks with sleeps (those still training keep the cores), up to the round timeout."""
        wait_until(request.test, time.monotonic() + self.timeout,
                   lambda: f"rank {self.comm.rank}: step {step}: no rank came in for {self.timeout:.0f} s while {what}")

    def _finish(self, request: Request, what: str, step: int) -> None:
        """Drives a collective every rank has entered (after the barrier): MPI moves its bytes only while it
        is called, so no sleeps here (a sleeping rank would hold up the transfer), still bounded in time."""
        deadline = time.monotonic() + self.timeout
        while not request.test():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.comm.rank}: step {step}: {what} took over {self.timeout:.0f} s")

    def client_loss(self, uid: str, sums: dict[str, float]) -> float:
        """The training loss of client `uid` from its sums (0.0 when the aggregator needs none)."""
        if not self.needs_loss:
            return 0.0
        num, den = self.loss_ratio
        if sums.get(den, 0) <= 0 or num not in sums:
            raise ValueError(f"user {uid!r}: the aggregator weighs clients by their training loss, but the user's "
                             f"training reported no {num!r} over {den!r} (its sums: {sorted(sums)})")
        return float(sums[num]) / float(sums[den])

    def run(self, mine: Sequence[tuple[str, float, np.ndarray, float]], step: int,
            round_index: int = 0) -> tuple[np.ndarray | None, int, str]:
        """This rank's clients' (uid, weight, float32 update, training loss) -> (rank 0: the aggregate as
        float64 (P,), or None when the round's clients are too few for the rule; others: None), the round's
        client count, and why nothing was aggregated ("" when it was)."""
        comm = self.comm
        self._wait(comm.Ibarrier(), "waiting for the ranks to finish training", step)
        listed = comm.allgather([(uid, weight, loss) for uid, weight, _, loss in mine])
        order = sorted((uid, r, weight, loss) for r, entries in enumerate(listed) for uid, weight, loss in entries)
        k = len(order)
        try:
            self.aggregator.check(k)
        except ConfigError as e:      # every rank sees the same K: all skip alike, and the round applies nothing
            return None, k, str(e)
        lo, hi = self.bounds[comm.rank]
        mine_sorted = sorted(mine, key=lambda entry: entry[0])
        send = np.empty(len(mine_sorted) * self.size, np.float32)
        at, send_counts = 0, []
        for a, b in self.bounds:             # for each rank: its slice of every one of my clients, in uid order
            for _, _, delta, _ in mine_sorted:
                send[at:at + b - a] = delta[a:b]
                at += b - a
            send_counts.append((b - a) * len(mine_sorted))
        counts = [len(entries) for entries in listed]
        recv = np.empty(k * (hi - lo), np.float32)
        self._finish(comm.Ialltoallv(send, send_counts, recv, [c * (hi - lo) for c in counts]),
                   "exchanging the clients' slices", step)
        del send
        # rows as received (rank by rank, each in uid order) -> rows in the round's global uid order
        received = [(uid, row) for r, entries in enumerate(listed)
                    for row, (uid, _, _) in enumerate(sorted(entries), start=sum(counts[:r]))]
        position = {uid: row for uid, row in received}
        rows = recv.reshape(k, hi - lo)
        updates = rows[[position[uid] for uid, _, _, _ in order]]
        weights = np.array([weight for _, _, weight, _ in order], np.float64)
        if self.attack is not None:
            updates = self.attack.updates(updates, [uid for uid, _, _, _ in order], round_index, start=lo,
                                          block=self.block)
        extra = {"losses": np.array([loss for _, _, _, loss in order], np.float64)} if self.needs_loss else {}
        part = np.ascontiguousarray(self.aggregator.aggregate(updates, weights, reducer=MPIReducer(comm, self.block),
                                                              **extra), dtype=np.float64)
        if part.shape != (hi - lo,):
            raise ValueError(f"the aggregator returned {part.shape} values for a slice of {hi - lo}")
        full = np.empty(self.size, np.float64) if comm.rank == 0 else None
        self._finish(comm.Igatherv(part, full, [b - a for a, b in self.bounds]), "gathering the aggregate", step)
        if full is not None and not np.isfinite(full).all():
            raise ValueError(f"step {step}: the aggregator's result is not finite")
        return full, k, ""
