"""The per-client path of a training round: every rank keeps its clients' updates, the ranks exchange
coordinate slices so that rank r holds slice r of every update, the aggregator runs on each slice, and the
slices of the aggregate meet at rank 0, which pushes it to the scheduler as the round's mean.

Slices are whole blocks of `BLOCK` coordinates (rank r holds blocks [r B / W, (r + 1) B / W) of the B blocks),
the K clients' rows are in the order of their user ids, and the rules' whole-vector sums add per-block
partials in block order (`MPIReducer`): the aggregate is the same bits at any number of ranks. Memory per rank
is about K x P x 4 / W bytes for the slices received, and its own clients' updates (P x 4 bytes each), which
they write straight into the exchange's send buffer, laid out by destination (no packing copy); the received
rows are put in the round's order in place. Waits poll the non-blocking collectives with sleeps (the ranks still training keep the cores) and
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


class SendBuffer:
    """This rank's clients' updates laid out for the exchange: for each rank r in turn, slice r of every slot
    (slot j: the j-th of the rank's clients in uid order). Clients write their update straight into it."""

    def __init__(self, bounds: Sequence[tuple[int, int]], slots: int, storage: np.ndarray | None = None) -> None:
        self.bounds, self.slots = list(bounds), slots
        size = bounds[-1][1] if bounds else 0
        self.data = storage[:slots * size] if storage is not None else np.empty(slots * size, np.float32)
        self._tensor = torch.from_numpy(self.data)

    def write(self, slot: int, at: int, values: torch.Tensor) -> None:
        """Coordinates [at, at + len(values)) of slot `slot`'s update (cast to float32 as they are stored)."""
        end = at + values.numel()
        for a, b in self.bounds:
            lo, hi = max(a, at), min(b, end)
            if lo < hi:
                start = self.slots * a + slot * (b - a) + (lo - a)
                self._tensor[start:start + hi - lo] = values[lo - at:hi - at]

    def compact(self, filled: Sequence[int]) -> None:
        """Moves the rows of the `filled` slots (ascending; the others' clients sent nothing) to the front of
        each rank's segment, in order, so that the segments hold len(filled) rows each."""
        if list(filled) == list(range(len(filled))):
            return
        for a, b in self.bounds:
            width, base = b - a, self.slots * a
            for row, slot in enumerate(filled):
                if row != slot:
                    self.data[base + row * width:base + (row + 1) * width] = \
                        self.data[base + slot * width:base + (slot + 1) * width]

    def segments(self, rows: int) -> tuple[np.ndarray, list[int], list[int]]:
        """(the buffer, counts, displacements) of `rows` rows per destination, for Alltoallv."""
        counts = [rows * (b - a) for a, b in self.bounds]
        return self.data, counts, [self.slots * a for a, _ in self.bounds]


class ClientUpdate:
    """Where a shard puts one client's update (in place of its running sum): delta = theta_k - theta_global,
    computed in float64 a tensor at a time and stored as float32 in its slot of the send buffer, and the
    client's weight. The interface of `shard.Accumulator`."""

    def __init__(self, global_flat: torch.Tensor, sink: SendBuffer, slot: int) -> None:
        self.global_flat = global_flat
        self.sink, self.slot = sink, slot
        self.written = False
        self.weight = 0.0

    def add(self, params: list[torch.Tensor], alpha: float, samples: float) -> None:
        at = 0
        for p in params:        # a tensor at a time: no float64 copy of the whole vector per client
            n = p.numel()
            self.sink.write(self.slot, at, p.detach().reshape(-1).double().sub_(self.global_flat[at:at + n].double()).cpu())
            at += n
        self.written, self.weight = True, samples

    def add_update(self, base: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float, samples: float) -> None:
        """A transformed update (the channel's: clipped, compressed) on the exact global parameters."""
        at = 0
        for d in deltas:
            flat = d.detach().reshape(-1).float().cpu()
            self.sink.write(self.slot, at, flat)
            at += flat.numel()
        self.written, self.weight = True, samples


def permute_rows(rows: np.ndarray, order: Sequence[int]) -> None:
    """In place: row i becomes the former row order[i] (`order` a permutation), with one row of scratch."""
    done = np.zeros(len(order), bool)
    scratch = np.empty(rows.shape[1], rows.dtype)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        scratch[:] = rows[start]
        i = start
        while True:
            done[i] = True
            j = order[i]
            if j == start:
                rows[i] = scratch
                break
            rows[i] = rows[j]
            i = j


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
        self._storage: np.ndarray | None = None      # the send buffer's memory, kept from round to round

    def send_buffer(self, slots: int) -> SendBuffer:
        """Where this round's `slots` clients (this rank's, in uid order) write their updates."""
        if self._storage is None or self._storage.size < slots * self.size:
            self._storage = None        # the old one goes before the new one is made
            self._storage = np.empty(slots * self.size, np.float32)
        return SendBuffer(self.bounds, slots, self._storage)

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

    def run(self, sink: SendBuffer, mine: Sequence[tuple[str, float, float]], step: int,
            round_index: int = 0) -> tuple[np.ndarray | None, int, str]:
        """This rank's clients' (uid, weight, training loss), in uid order, whose updates are the first
        len(mine) rows of `sink` -> (rank 0: the aggregate as float64 (P,), or None when the round's clients
        are too few for the rule; others: None), the round's client count, and why nothing was aggregated
        ("" when it was)."""
        comm = self.comm
        self._wait(comm.Ibarrier(), "waiting for the ranks to finish training", step)
        listed = comm.allgather(list(mine))
        order = sorted((uid, r, weight, loss) for r, entries in enumerate(listed) for uid, weight, loss in entries)
        k = len(order)
        try:
            self.aggregator.check(k)
        except ConfigError as e:      # every rank sees the same K: all skip alike, and the round applies nothing
            return None, k, str(e)
        lo, hi = self.bounds[comm.rank]
        counts = [len(entries) for entries in listed]
        recv = np.empty(k * (hi - lo), np.float32)
        send, send_counts, send_displs = sink.segments(len(mine))
        self._finish(comm.Ialltoallv(send, send_counts, recv, [c * (hi - lo) for c in counts], send_displs),
                     "exchanging the clients' slices", step)
        # rows as received (rank by rank, each in uid order) -> rows in the round's global uid order, in place
        received = [uid for entries in listed for uid, _, _ in entries]
        position = {uid: row for row, uid in enumerate(received)}
        updates = recv.reshape(k, hi - lo)
        permute_rows(updates, [position[uid] for uid, _, _, _ in order])
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
