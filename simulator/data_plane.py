"""How a step's bulk bytes move: the global parameters out to the ranks (float32, once per version) and the
ranks' float64 update sums in. The control plane (plans, every rank's weight and metric sums, evaluation
sums) always goes through the scheduler client; the data plane is pluggable:

- `SchedulerDataPlane`: the bulk bytes go through the scheduler client as well: gRPC streams for a
  scheduler that is not one of the job's ranks (or with `--data-plane grpc`), in-process calls on the rank
  that hosts it.
- `MPIDataPlane`: rank 0 hosts the scheduler and the ranks move the bytes among themselves over MPI.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Protocol, Sequence

import numpy as np

from common.domain import RankUpdate
from scheduler.client import LocalSchedulerClient, SchedulerClient
from simulator.comm import Comm, Request

log = logging.getLogger(__name__)
EMPTY = np.zeros(0, dtype=np.float64)
READY, PRESENT, DONE, VERSION = range(4)   # each rank's flag words in its node's shared memory
CHUNK = 1 << 19                            # float64 elements per message between nodes (4 MiB)
BLOCK = 1 << 17                            # float64 elements a rank sums over all slots at a time (1 MiB)
MAX_PAUSE_S = 5e-4                         # the longest sleep between two looks at what a rank waits for


class DataPlane(Protocol):
    def params(self, version: int, timeout: float) -> np.ndarray:
        """The global shared parameters of `version` (float32, read-only; the same array while the
        version is current). Every rank asks for every step's version, in step order."""

    def update_buffer(self, size: int) -> np.ndarray:
        """A float64 array of `size` where this rank may build its round's sum of n_k * delta_k (reused:
        the rank's own until it pushes; the data plane may then add other ranks' sums into it)."""

    def push_update(self, update: RankUpdate, timeout: float) -> None:
        """This rank's training update, waiting at most `timeout` seconds for the other ranks' (TimeoutError
        naming the ranks it waited for)."""

    def close(self) -> None:
        """Releases the plane's memory (every rank at the end of the run)."""


class SchedulerDataPlane:
    """The bulk bytes go through the scheduler client, like the control plane."""

    def __init__(self, client: SchedulerClient | LocalSchedulerClient) -> None:
        self.client = client
        self._buffer: np.ndarray | None = None

    def params(self, version: int, timeout: float) -> np.ndarray:
        return self.client.get_params(version)[1]

    def update_buffer(self, size: int) -> np.ndarray:
        if self._buffer is None or self._buffer.size != size:   # reused: no 50 MB page-in a round
            self._buffer = np.empty(size, dtype=np.float64)
        return self._buffer

    def push_update(self, update: RankUpdate, timeout: float) -> None:
        self.client.push_update(update)

    def close(self) -> None:
        pass


def wait_until(done: Callable[[], bool], deadline: float, waiting_for: Callable[[], str]) -> None:
    """Polls `done` with short sleeps until it is true, or raises TimeoutError(waiting_for()) once
    time.monotonic() passes `deadline`. Never a busy wait: the ranks still training share the cores."""
    pause = 1e-5
    while not done():
        if time.monotonic() >= deadline:
            raise TimeoutError(waiting_for())
        time.sleep(pause)
        pause = min(2 * pause, MAX_PAUSE_S)


def slice_bounds(size: int, parts: int, align: int = 512) -> list[int]:
    """`parts` + 1 boundaries that cut range(size) into contiguous slices starting on multiples of `align`
    (whole 4 KiB pages of float64: two ranks never write into the same page)."""
    return [size if i == parts else size * i // parts // align * align for i in range(parts + 1)]


def tree_pairs(n: int) -> list[tuple[int, int]]:
    """The additions that sum n node ranks' slots, level by level: slot i += slot j for each pair, in this
    order, which gives ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)) for 8 ranks and the binomial tree for
    other n (5: ((0 + 1) + (2 + 3)) + 4). A pair can be added as soon as its ranks are in, whatever the
    others do: after the last rank comes in, at most log2(n) additions are left. The last pair is the root."""
    pairs, step = [], 1
    while step < n:
        pairs += [(i, i + step) for i in range(0, n - step, 2 * step)]
        step *= 2
    return pairs


class MPIDataPlane:
    """The ranks of one MPI job, whose rank 0 hosts the scheduler, move the bulk bytes among themselves.

    Parameters: rank 0's scheduler writes each new version into its node's shared memory (MPI-3
    `Win_allocate_shared`) in its server step's one pass (and the current one when the plane starts); the
    first rank of every other node receives it into its node's (Bcast among the nodes' first ranks). Every
    rank's shards read that one array: no copy per rank or shard.

    Updates: every rank builds its float64 sum in its own slot of the node's shared memory. The node's first
    ranks, as many as it has cores, each sum one slice of the vector over the node's slots, in a fixed tree
    over the node's ranks (`tree_pairs`: ((0 + 1) + (2 + 3)) + ...), each pair as soon as its ranks are in:
    ranks that finished early are added while later ones still train, whatever the order they come in, and
    after the last one at most log2(ranks) additions are left (no copies, the work spread over the cores).
    On a single node the root's addition is left out: rank 0 hands the two halves' sums to its scheduler
    (`RankUpdate.more`), whose one pass adds them, which saves a pass over the 50 MB sum. The nodes'
    sums then meet in a binomial tree among the nodes' first ranks (point-to-point, the lower node's sum
    first) that ends in rank 0's slot: a fixed order for a given world and placement of ranks on nodes.
    Rank 0 pushes the total to its scheduler in-process; every other rank pushes its weight and metric sums
    over the control plane meanwhile (`reduced` updates).

    Every wait polls with short sleeps, up to the round timeout, and names the ranks it waited for: a rank
    inside a blocking MPI call can neither time out nor leave its core to the ranks still training. The one
    blocking call is the Bcast among nodes, which their first ranks enter together, each just given the
    step's plan.
    """

    def __init__(self, comm: Comm, client: SchedulerClient | LocalSchedulerClient, size: int) -> None:
        self.rank = comm.rank
        self.client = client
        self.size = size
        self.node, self.leaders = comm.split_node()
        self._members: list[int] = self.node.bcast(self.node.gather(comm.rank))   # world rank of each node rank
        self._nodes: list[list[int]] = (self.leaders.bcast(self.leaders.gather(self._members))
                                        if self.leaders is not None else [])
        first = self.node.rank == 0
        self._params = self.node.allocate_shared(size if first else 0, np.float32)
        self._slots = self.node.allocate_shared(size, np.float64)
        self._flags = self.node.allocate_shared(4, np.int64)
        self._flags.of(self.node.rank)[:] = 0
        self._sync()
        self.node.barrier()
        self._view = self._params.of(0).view()
        self._view.flags.writeable = False
        # as many ranks sum slices as the node has cores (more would only queue for them); rank 0 is one
        cores = self.node.gather(os.sched_getaffinity(0))
        self._summers: int = self.node.bcast(min(self.node.size, len(set().union(*cores))) if cores else None)
        self._bounds = slice_bounds(size, self._summers)
        # the node's additions; on a single node the root's is left to the scheduler's pass, which adds its two
        # halves while it reads them anyway: one pass over the 50 MB sum less
        one_node = self.node.bcast(len(self._nodes) == 1 if first else None)
        self._pairs = tree_pairs(self.node.size)
        self._root = self._pairs.pop() if one_node and self._pairs else None
        self._version: int | None = None
        self._received: np.ndarray | None = None    # a child node's sum, on first ranks that have children
        self._control = ThreadPoolExecutor(1, thread_name_prefix="control") if self.rank != 0 else None
        if self.rank == 0:
            client.on_version(self._publish, mirror=self._params.of(0))
            log.info("data plane: MPI, %d rank(s) on this node (shared memory), %d node(s)", self.node.size,
                     len(self._nodes))

    def _sync(self) -> None:
        for arrays in (self._params, self._slots, self._flags):
            arrays.sync()

    def _publish(self, version: int, params: np.ndarray) -> None:
        """Rank 0, called by its scheduler as it makes `version`, whose parameters its server step has
        just written into the node's shared memory (the scheduler's mirror): announces them at once, so
        that the node's ranks need not wait for rank 0's loop to ask for them (in asynchronous mode that
        loop may be in the middle of a long task). No rank still read the old version when the step wrote
        over it: a version is made only once every rank has pushed what it trained from the one before
        (asynchronous ranks copy each version when its plan comes, before they push)."""
        self._params.sync()
        self._flags.of(0)[VERSION] = version + 1

    def params(self, version: int, timeout: float) -> np.ndarray:
        if version == self._version:
            return self._view
        shared, flags = self._params.of(0), self._flags.of(0)
        if self.leaders is not None:      # rank 0's node memory holds every version from the start (the mirror)
            if self.leaders.size > 1:
                self.leaders.Bcast(shared, root=0)
            self._sync()
            flags[VERSION] = version + 1
        else:
            wait_until(lambda: flags[VERSION] == version + 1, time.monotonic() + timeout,
                       lambda: f"rank {self.rank}: the parameters of version {version} did not come from rank "
                               f"{self._members[0]} within {timeout:.0f} s (--round-timeout)")
            self._sync()
        self._version = version
        return self._view

    def update_buffer(self, size: int) -> np.ndarray:
        if size != self.size:
            raise ValueError(f"update of {size} values, the data plane holds {self.size}")
        return self._slots.of(self.node.rank)

    def push_update(self, update: RankUpdate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        header = None
        if self.rank != 0:     # the weight and sums, while the values take the data plane
            header = self._control.submit(self.client.push_update, replace(update, delta_sum=EMPTY, reduced=True))
        me = self.node.rank
        slot, flags = self._slots.of(me), self._flags.of(me)
        present = update.delta_sum.size > 0
        if present and update.delta_sum.ctypes.data != slot.ctypes.data:
            np.copyto(slot, update.delta_sum)          # built elsewhere than in update_buffer()
        token = update.step + 1
        flags[PRESENT] = present
        self._sync()
        flags[READY] = token
        if me < self._summers:
            where = self._sum_node(token, deadline, update.step, timeout)
            have = where[0] is not None
            self._sync()
            flags[DONE] = token
        if self.leaders is not None:
            self._wait_node(DONE, token, range(self._summers), deadline, update.step, timeout)
            # a rank stalled on another node is named by its own node first: waits between nodes allow twice
            have = self._sum_nodes(have, deadline + timeout, update.step, timeout)
        if self.rank == 0:
            if self._root is None:
                parts = [self._slots.of(0)] if have else []
            else:       # the halves' sums, for the scheduler to add
                parts = [self._slots.of(where[i]) for i in self._root if where[i] is not None]
            self.client.push_update(replace(update, delta_sum=parts[0] if parts else EMPTY, more=tuple(parts[1:])))
        if header is not None:
            header.result()

    def _sum_node(self, token: int, deadline: float, step: int, timeout: float) -> list[int | None]:
        """This rank's slice of the node's sum (`tree_pairs`, less the root when the scheduler adds it), in
        the slots themselves: each pair as soon as its ranks are in, block by block (a block's sum stays in
        cache), while other ranks may still train; the additions do not depend on when ranks came in. A rank
        that brought nothing drops out of its pairs. Returns where each subtree's sum is (the slot, of one
        of its ranks; None: no values); without a root left over, the node's sum ends in its first slot."""
        lo, hi, n = self._bounds[self.node.rank], self._bounds[self.node.rank + 1], self.node.size
        where: list[int | None] = [None] * n
        ready = [False] * n
        todo = list(self._pairs)
        while True:
            came = [r for r in range(n) if not ready[r] and self._flags.of(r)[READY] == token]
            self._sync()
            for r in came:
                ready[r], where[r] = True, r if self._flags.of(r)[PRESENT] else None
            for i, j in [(i, j) for i, j in todo if all(ready[i:2 * j - i])]:    # the pair's ranks: [i, 2j - i)
                if where[i] is not None and where[j] is not None:
                    into, part = self._slots.of(where[i]), self._slots.of(where[j])
                    for a in range(lo, hi, BLOCK):
                        b = min(a + BLOCK, hi)
                        into[a:b] += part[a:b]
                elif where[i] is None:
                    where[i] = where[j]
                todo.remove((i, j))
            if all(ready) or (not todo and self.node.rank != 0):    # rank 0 says where the halves are
                break
            self._wait_node(READY, token, [r for r in range(n) if not ready[r]], deadline, step, timeout, any_of=True)
        if self._root is None and where[0] not in (None, 0):     # the node's sum goes on from its first slot
            np.copyto(self._slots.of(0)[lo:hi], self._slots.of(where[0])[lo:hi])
            where[0] = 0
        return where

    def _wait_node(self, word: int, token: int, ranks: Sequence[int], deadline: float, step: int, timeout: float,
                   *, any_of: bool = False) -> None:
        """Until the node's `ranks` (or, `any_of`, one of them) have set their flag `word` to `token`."""
        flags = [self._flags.of(r) for r in ranks]
        test = any if any_of else all
        wait_until(lambda: test(f[word] == token for f in flags), deadline, lambda: self._late(
            step, timeout, [self._members[r] for r, f in zip(ranks, flags) if f[word] != token]))
        self._sync()

    def _late(self, step: int, timeout: float, ranks: list[int]) -> str:
        return (f"rank {self.rank}: step {step} did not complete within {timeout:.0f} s (--round-timeout): "
                f"waiting for ranks {ranks}")

    def _wait_requests(self, requests: list[Request], deadline: float, step: int, timeout: float,
                       peer: int) -> None:
        wait_until(lambda: all(r.test() for r in requests), deadline,
                   lambda: self._late(step, timeout, self._nodes[peer]))

    def _sum_nodes(self, have: bool, deadline: float, step: int, timeout: float) -> bool:
        """The binomial tree over the nodes' first ranks: adds the sums of the nodes below into this node's
        (its first rank's slot), then hands it up. Returns whether the slot holds values (rank 0: the total)."""
        leaders, me = self.leaders, self.leaders.rank
        total = self._slots.of(0)
        chunks = [(a, min(a + CHUNK, self.size)) for a in range(0, self.size, CHUNK)]
        bit = 1
        while bit < leaders.size:
            if me & bit:
                parent = me - bit
                requests = [leaders.Isend(np.array([have], dtype=np.int64), parent)]
                if have:
                    requests += [leaders.Isend(total[a:b], parent) for a, b in chunks]
                self._wait_requests(requests, deadline, step, timeout, parent)
                return have
            child = me + bit
            if child < leaders.size:
                flag = np.zeros(1, dtype=np.int64)
                self._wait_requests([leaders.Irecv(flag, child)], deadline, step, timeout, child)
                if flag[0]:
                    if have and self._received is None:
                        self._received = np.empty(self.size, dtype=np.float64)
                    into = self._received if have else total
                    requests = [leaders.Irecv(into[a:b], child) for a, b in chunks]
                    for (a, b), request in zip(chunks, requests):
                        self._wait_requests([request], deadline, step, timeout, child)
                        if have:
                            total[a:b] += into[a:b]    # chunk by chunk, while it is in cache
                    have = True
            bit *= 2
        return have

    def close(self) -> None:
        if self.rank == 0:     # the scheduler must not write into memory about to be freed
            self.client.on_version(lambda version, params: None, mirror=None)
        if self._control is not None:
            self._control.shutdown()
        for arrays in (self._params, self._slots, self._flags):
            arrays.free()


def make_data_plane(kind: str, comm: Comm, client: SchedulerClient | LocalSchedulerClient, size: int) -> DataPlane:
    """"mpi": `MPIDataPlane` when the job has more than one rank (its rank 0 hosting the scheduler), else (or
    "grpc") `SchedulerDataPlane`. Every rank calls it at the same point (it allocates shared memory)."""
    if kind == "mpi" and comm.size > 1:
        return MPIDataPlane(comm, client, size)
    return SchedulerDataPlane(client)
