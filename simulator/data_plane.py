"""How a step's plans and bulk bytes reach the ranks: the plans and global parameters out (float32, once per
version) and the ranks' float64 update sums in. Every rank's weight and metric sums and the evaluation sums
always go through the scheduler client; the data plane is pluggable:

- `SchedulerDataPlane`: everything goes through the scheduler client: gRPC for a scheduler that is not one
  of the job's ranks (or with `--data-plane grpc`), in-process calls on the rank that hosts it.
- `MPIDataPlane`: rank 0 hosts the scheduler and the ranks move the bytes among themselves over MPI; the
  ranks on rank 0's node read their plans from the node's shared memory.
"""
from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Protocol, Sequence

import numpy as np

from flock.common.domain import Plan, RankUpdate
from flock.common.errors import RunFailed
from scheduler.client import LocalSchedulerClient, SchedulerClient
from simulator.comm import Comm, Request
from simulator.doorbell import MAIN, SUM, Doorbells

log = logging.getLogger(__name__)
EMPTY = np.zeros(0, dtype=np.float64)
# each rank's flag words in its node's shared memory
READY, PRESENT, DONE, VERSION, POSTED, POST_BYTES, HEADER_BYTES = range(7)
FAILED = 1 << 62                           # POSTED when the board holds the run's failure
BOARD_BYTES = 1 << 20                      # the plans posted to rank 0's node: larger ones are asked for over gRPC
HEADER_SPACE = 1 << 16                     # a rank's update header in rank 0's node: a larger one goes over gRPC
CHUNK = 1 << 19                            # float64 elements per message between nodes (4 MiB)
BLOCK = 1 << 17                            # float64 elements a rank sums over all slots at a time (1 MiB)
SUM_BLOCK = 1 << 15                        # the same for the node's sum, whose passes hold a few blocks (256 KiB)
MAX_PAUSE_S = 5e-4                         # the longest sleep between two looks at what a rank waits for
RUNG_PAUSE_S = 0.1                         # the same, when the rank is rung as it changes (a safety net only)
IDLE_PAUSE_S = 5e-3                        # a node-sum thread's, between pushes, when there are no doorbells


class DataPlane(Protocol):
    def plan(self, step: int, timeout: float) -> Plan:
        """This rank's plan of `step`, waiting at most `timeout` seconds for the step to open (TimeoutError);
        RunFailed when the run failed. Every rank asks for every step, in step order."""

    def params(self, version: int, timeout: float) -> np.ndarray:
        """The global shared parameters of `version` (float32, read-only; the same array while the
        version is current). Every rank asks for every step's version, in step order."""

    def update_buffer(self, size: int) -> np.ndarray:
        """A float64 array of `size` where this rank may build its round's sum of n_k * delta_k (reused:
        the rank's own until it pushes; the data plane may then add other ranks' sums into it)."""

    def push_update(self, update: RankUpdate, timeout: float) -> None:
        """This rank's training update; TimeoutError naming the ranks it waited for once `timeout` seconds
        pass with none of them coming in."""

    def stop(self) -> None:
        """Stops the plane's threads, alone (any rank, on any exit; again is harmless)."""

    def close(self) -> None:
        """Stops the plane and releases its memory (every rank together, at the end of the run)."""


class SchedulerDataPlane:
    """The bulk bytes go through the scheduler client, like the control plane."""

    def __init__(self, client: SchedulerClient | LocalSchedulerClient) -> None:
        self.client = client
        self._buffer: np.ndarray | None = None

    def plan(self, step: int, timeout: float) -> Plan:
        return self.client.get_plan(step, timeout)

    def params(self, version: int, timeout: float) -> np.ndarray:
        return self.client.get_params(version)[1]

    def update_buffer(self, size: int) -> np.ndarray:
        if self._buffer is None or self._buffer.size != size:   # reused: no 50 MB page-in a round
            self._buffer = np.empty(size, dtype=np.float64)
        return self._buffer

    def push_update(self, update: RankUpdate, timeout: float) -> None:
        self.client.push_update(update)

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


def wait_until(done: Callable[[], bool], deadline: float, waiting_for: Callable[[], str],
               bell: Callable[[float], None] | None = None, *, longest: float = MAX_PAUSE_S) -> None:
    """Looks at `done` until it is true, or raises TimeoutError(waiting_for()) once time.monotonic() passes
    `deadline`; in between it sleeps on `bell`
    (a sleep of at most the seconds given, which whoever makes `done` true cuts short: a doorbell, whose
    old rings it takes first), or without one for ever longer short sleeps, up to `longest`. Never a busy
    wait: the ranks still training share the cores."""
    pause, longest = 1e-5, (longest if bell is None else RUNG_PAUSE_S)
    if bell is not None:
        bell(0.0)
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(waiting_for())
        (bell or time.sleep)(min(pause, left))
        pause = min(2 * pause, longest)


def _unpickle(space: np.ndarray, length: int):
    """What a rank of the node pickled into the first `length` bytes of `space` (the job's own memory)."""
    return pickle.loads(space[:length].tobytes())


class _Closing(Exception):
    """The plane is closing while its node-sum thread waits."""


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
    over the node's ranks (`tree_pairs`: ((0 + 1) + (2 + 3)) + ...), each pair as soon as its ranks are in,
    in a thread of their own: ranks that finished early are added while later ones, the summing ranks
    included, still train, whatever the order they come in, and after the last one at most log2(ranks)
    additions are left, in one pass (no copies, the work spread over the cores).
    On a single node the root's addition is left out: rank 0 hands the two halves' sums to its scheduler
    (`RankUpdate.more`), whose one pass adds them, which saves a pass over the 50 MB sum. The nodes'
    sums then meet in a binomial tree among the nodes' first ranks (point-to-point, the lower node's sum
    first) that ends in rank 0's slot: a fixed order for a given world and placement of ranks on nodes.
    Rank 0 pushes the total to its scheduler in-process; every other rank pushes its weight and metric sums
    over the control plane meanwhile (`reduced` updates).

    Control: on rank 0's node no rank calls rank 0's gRPC server in a training round. Rank 0's scheduler
    posts every step's plans for the node's ranks to the node's shared memory as the step opens
    (`Scheduler.on_plans`, in the thread that completed the step); each rank leaves its update's header
    (weight and metric sums) beside its values, and rank 0 hands the headers to its scheduler in-process
    with the node's sum. The post is overwritten only when the next step opens, after every rank has
    pushed, so after every rank has read it; the run's failure is posted the same way. Plans and headers
    too large for their space (`BOARD_BYTES`, `HEADER_SPACE`), and the ranks of other nodes, use gRPC.

    Every wait for another rank of the node sleeps on the rank's doorbell (`simulator.doorbell`, on
    Linux; elsewhere short sleeps), which that rank rings as it sets the flag waited for, until no rank
    has come in for the round timeout, and names the ranks it waited for; waits for other nodes poll MPI with short sleeps: a rank inside a blocking MPI call can neither
    time out nor leave its core to the ranks still training. The one
    blocking call is the Bcast among nodes, which their first ranks enter together, each just given the
    step's plan.
    """

    def __init__(self, comm: Comm, client: SchedulerClient | LocalSchedulerClient, size: int, *,
                 timeout: float = 600.0) -> None:
        if not comm.threads:
            raise RuntimeError("the MPI data plane calls MPI from several threads, and this MPI was started "
                               "without MPI_THREAD_MULTIPLE: use --data-plane grpc")
        self.rank = comm.rank
        self.client = client
        self.size = size
        self.node, self.leaders = comm.split_node()
        self._members: list[int] = self.node.bcast(self.node.gather(comm.rank))   # world rank of each node rank
        self._nodes: list[list[int]] = (self.leaders.bcast(self.leaders.gather(self._members))
                                        if self.leaders is not None else [])
        first = self.node.rank == 0
        # the ranks of rank 0's node read their plans from its board and leave their headers beside their values
        self._at_scheduler: bool = self.node.bcast(self.rank == 0 if first else None)
        self._params = self.node.allocate_shared(size if first else 0, np.float32)
        self._slots = self.node.allocate_shared(size, np.float64)
        self._flags = self.node.allocate_shared(HEADER_BYTES + 1, np.int64)
        self._board = self.node.allocate_shared(BOARD_BYTES if self.rank == 0 else 0, np.uint8)
        self._headers = self.node.allocate_shared(HEADER_SPACE if self._at_scheduler else 0, np.uint8)
        self._flags.of(self.node.rank)[:] = 0
        self._bells = Doorbells.for_node(self.node)
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
        # a summing rank's slice of the node's sum, each push's as its ranks come in (`_sum_loop`)
        self._timeout = timeout                # the round timeout (the latest push's)
        self._token = 0                        # the latest push's
        self._closing = False
        self._summed: queue.Queue = queue.Queue()
        self._summer: threading.Thread | None = None
        if self.node.rank < self._summers:
            self._summer = threading.Thread(target=self._sum_loop, name="node-sum", daemon=True)
            self._summer.start()
        if self.rank == 0:
            client.on_version(self._publish, mirror=self._params.of(0))
            client.on_plans(self._post)
            log.info("data plane: MPI, %d rank(s) on this node (shared memory), %d node(s)", self.node.size,
                     len(self._nodes))

    def _ring(self, ranks: Sequence[int], bell: int = MAIN) -> None:
        """Wakes the thread `bell` of the node's `ranks`, after a flag it may wait for was set."""
        if self._bells is not None:
            self._bells.ring(ranks, bell)

    def _bell(self, bell: int = MAIN) -> Callable[[float], None] | None:
        """The sleep of this rank's thread `bell` (None: no doorbells, short sleeps)."""
        return None if self._bells is None else lambda seconds: self._bells.wait(seconds, bell)

    def _sync(self) -> None:
        for arrays in (self._params, self._slots, self._flags, self._board, self._headers):
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
        self._ring(range(1, self.node.size))

    def _post(self, step: int, plans: list[Plan] | None, failure: str | None) -> None:
        """Rank 0, called by its scheduler: posts the node's ranks' plans of `step` (or the run's failure) to
        the node's board. Plans that do not fit post None instead: the ranks ask the scheduler for them."""
        posted = failure[:BOARD_BYTES // 8] if plans is None else [plans[r] for r in self._members]
        entry = pickle.dumps(posted, pickle.HIGHEST_PROTOCOL)
        if len(entry) > BOARD_BYTES:
            entry = pickle.dumps(None)
        board, flags = self._board.of(0), self._flags.of(0)
        board[:len(entry)] = np.frombuffer(entry, dtype=np.uint8)
        flags[POST_BYTES] = len(entry)
        self._sync()
        flags[POSTED] = FAILED if plans is None else step + 1
        self._ring(range(1, self.node.size))

    def plan(self, step: int, timeout: float) -> Plan:
        if self.rank == 0 or not self._at_scheduler:
            return self.client.get_plan(step, timeout)
        flags = self._flags.of(0)
        try:
            wait_until(lambda: flags[POSTED] >= step + 1, time.monotonic() + timeout,
                       lambda: f"rank {self.rank}: step {step} did not open within {timeout:g} s", self._bell())
        except TimeoutError:
            if timeout < self._timeout:   # a look, or a part of a longer wait: the caller's to judge
                raise
            late = [self._members[r] for r in range(self.node.size) if self._flags.of(r)[READY] != self._token]
            if self._token and late:      # the node's sum waits for them
                raise TimeoutError(self._late(self._token - 1, timeout, late)) from None
            return self.client.get_plan(step, min(timeout, 5.0))     # the scheduler says what it waits for
        self._sync()
        posted = flags[POSTED]
        entry = _unpickle(self._board.of(0), flags[POST_BYTES])
        if posted == FAILED:
            raise RunFailed(entry)
        if posted != step + 1 or entry is None:     # too large for the board (or not this step: the scheduler says why)
            return self.client.get_plan(step, timeout)
        return entry[self.node.rank]

    def params(self, version: int, timeout: float) -> np.ndarray:
        if version == self._version:
            return self._view
        shared, flags = self._params.of(0), self._flags.of(0)
        if self.leaders is not None:      # rank 0's node memory holds every version from the start (the mirror)
            if self.leaders.size > 1:
                self.leaders.Bcast(shared, root=0)
            self._sync()
            flags[VERSION] = version + 1
            self._ring(range(1, self.node.size))
        else:
            wait_until(lambda: flags[VERSION] == version + 1, time.monotonic() + timeout,
                       lambda: f"rank {self.rank}: the parameters of version {version} did not come from rank "
                               f"{self._members[0]} within {timeout:.0f} s (--round-timeout)", self._bell())
            self._sync()
        self._version = version
        return self._view

    def update_buffer(self, size: int) -> np.ndarray:
        if size != self.size:
            raise ValueError(f"update of {size} values, the data plane holds {self.size}")
        return self._slots.of(self.node.rank)

    def push_update(self, update: RankUpdate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._timeout = timeout
        me = self.node.rank
        slot, flags = self._slots.of(me), self._flags.of(me)
        header = None
        self._token = update.step + 1
        if self.rank != 0:     # the weight and sums: beside the values for rank 0, or over gRPC meanwhile
            reduced = replace(update, delta_sum=EMPTY, reduced=True, weight=float(update.weight),   # as gRPC has them
                              sums={key: float(value) for key, value in update.sums.items()})
            entry = pickle.dumps(reduced, pickle.HIGHEST_PROTOCOL) if self._at_scheduler else b""
            flags[HEADER_BYTES] = len(entry) if 0 < len(entry) <= HEADER_SPACE else 0
            if flags[HEADER_BYTES]:
                self._headers.of(me)[:len(entry)] = np.frombuffer(entry, dtype=np.uint8)
            else:
                header = self._control.submit(self.client.push_update, reduced)
        present = update.delta_sum.size > 0
        if present and update.delta_sum.ctypes.data != slot.ctypes.data:
            np.copyto(slot, update.delta_sum)          # built elsewhere than in update_buffer()
        token = update.step + 1
        flags[PRESENT] = present
        self._sync()
        flags[READY] = token
        self._ring(range(self._summers), SUM)
        if me < self._summers:      # its node-sum thread's slice
            summed, where = self._summed.get()      # the thread hands on its slice or what stopped it
            if isinstance(summed, BaseException):
                raise summed
            if summed != token:
                raise RuntimeError(f"rank {self.rank}: the node summed push {summed - 1} in step {update.step}")
            have = where[0] is not None
            deadline = time.monotonic() + timeout       # the node's last rank came in just now, or later
        if self.leaders is not None:
            self._wait_node(DONE, token, range(self._summers), deadline, update.step, timeout)
            # a rank stalled on another node is named by its own node first: waits between nodes allow twice
            have = self._sum_nodes(have, deadline + timeout, update.step, timeout)
        if self.rank == 0:
            for r in range(1, self.node.size):    # every rank of the node is in: their headers are there
                length = self._flags.of(r)[HEADER_BYTES]
                if length:
                    self.client.push_update(_unpickle(self._headers.of(r), length))
            if self._root is None:
                parts = [self._slots.of(0)] if have else []
            else:       # the halves' sums, for the scheduler to add
                parts = [self._slots.of(where[i]) for i in self._root if where[i] is not None]
            self.client.push_update(replace(update, delta_sum=parts[0] if parts else EMPTY, more=tuple(parts[1:])))
        if header is not None:
            header.result()

    def _sum_loop(self) -> None:
        """The node-sum thread of a summing rank: for each push, from the first of the node's ranks to come in
        with it, this rank's slice of the node's sum (`_sum_node`, within the round timeout from then), then
        its DONE flag; hands (token, where) or the exception that ended it to `push_update`."""
        flags, last = [self._flags.of(r) for r in range(self.node.size)], 0

        def next_push_or_closing() -> bool:
            return self._closing or max(f[READY] for f in flags) > last

        while True:
            try:
                wait_until(next_push_or_closing, float("inf"), lambda: "", self._bell(SUM), longest=IDLE_PAUSE_S)
                if self._closing:
                    return
                token, timeout = max(f[READY] for f in flags), self._timeout
                where = self._sum_node(token, token - 1, timeout)
                self._sync()
                self._flags.of(self.node.rank)[DONE] = token
                self._ring([0])
            except _Closing:
                return
            except BaseException as e:       # the push that waits for this raises it
                self._summed.put((e, None))
                return
            self._summed.put((token, where))
            last = token

    def _sum_node(self, token: int, step: int, timeout: float) -> list[int | None]:
        """This rank's slice of the node's sum (`tree_pairs`, less the root when the scheduler adds it), in
        the slots themselves: each pair as soon as its ranks are in, block by block (a block's sum stays in
        cache), while other ranks may still train; the additions do not depend on when ranks came in. A rank
        that brought nothing drops out of its pairs. Returns where each subtree's sum is (the slot, of one
        of its ranks; None: no values); without a root left over, the node's sum ends in its first slot.
        TimeoutError naming the ranks not in once `timeout` seconds pass without one coming in."""
        lo, hi, n = self._bounds[self.node.rank], self._bounds[self.node.rank + 1], self.node.size
        where: list[int | None] = [None] * n
        ready = [False] * n
        todo = list(self._pairs)
        deadline = time.monotonic() + timeout
        while True:
            came = [r for r in range(n) if not ready[r] and self._flags.of(r)[READY] == token]
            if came:
                deadline = time.monotonic() + timeout
            self._sync()
            for r in came:
                ready[r], where[r] = True, r if self._flags.of(r)[PRESENT] else None
            batch = [(i, j) for i, j in todo if all(ready[i:2 * j - i])]    # the pair's ranks: [i, 2j - i)
            self._add_pairs(batch, where, lo, hi)
            todo = [pair for pair in todo if pair not in batch]
            if all(ready) or (not todo and self.node.rank != 0):    # rank 0 says where the halves are
                break
            self._wait_node(READY, token, [r for r in range(n) if not ready[r]], deadline, step, timeout, any_of=True,
                            bell=SUM)
            if self._closing:
                raise _Closing
        if self._root is None and where[0] not in (None, 0):     # the node's sum goes on from its first slot
            np.copyto(self._slots.of(0)[lo:hi], self._slots.of(where[0])[lo:hi])
            where[0] = 0
        return where

    def _add_pairs(self, batch: list[tuple[int, int]], where: list[int | None], lo: int, hi: int) -> None:
        """Adds the pairs of `batch` (in tree order) over [lo, hi) of the slots: slot of i += slot of j, with
        `where` saying which slot holds each subtree's sum (updated). All of them in one pass, a block at a
        time: a sum that only a later pair of the batch reads (after the last rank came in, the path up
        from it) stays in a block buffer, never written: the same additions in the same order, with a pass
        over memory less per level."""
        Place = tuple[str, int]     # ("slot", node rank) or ("temp", k)
        ops: list[tuple[Place, Place, Place | None]] = []    # out = left + right (right None: a copy)
        at: dict[int, Place] = {i: ("slot", where[i]) for pair in batch for i in pair if where[i] is not None}
        for k, (i, j) in enumerate(batch):
            if j not in at:             # nothing in subtree j
                continue
            read_later = any(i in pair for pair in batch[k + 1:])
            if i not in at:             # nothing in subtree i: j's sum is the pair's
                where[i], at[i] = where[j], at.pop(j)
                continue
            out = ("temp", k) if read_later else ("slot", where[i])
            ops.append((out, at[i], at.pop(j)))
            at[i] = out
        # a sum kept for a later pair that then had nothing to add goes into its subtree's slot all the same
        held = {place: i for i, place in at.items() if place[0] == "temp" and where[i] is not None}
        ops += [(("slot", where[i]), place, None) for place, i in held.items()]
        if not ops:
            return
        temps = {key: np.empty(min(SUM_BLOCK, hi - lo)) for out, _, _ in ops for key in [out] if out[0] == "temp"}
        def block(place: Place, a: int, b: int) -> np.ndarray:
            return self._slots.of(place[1])[a:b] if place[0] == "slot" else temps[place][:b - a]

        for a in range(lo, hi, SUM_BLOCK):
            b = min(a + SUM_BLOCK, hi)
            for out, left, right in ops:
                if right is None:
                    np.copyto(block(out, a, b), block(left, a, b))
                else:
                    np.add(block(left, a, b), block(right, a, b), out=block(out, a, b))

    def _wait_node(self, word: int, token: int, ranks: Sequence[int], deadline: float, step: int, timeout: float,
                   *, any_of: bool = False, bell: int = MAIN) -> None:
        """Until the node's `ranks` (or, `any_of`, one of them) have set their flag `word` to `token` (or the
        plane closes, for the node-sum thread: `bell` SUM)."""
        flags = [self._flags.of(r) for r in ranks]
        test = any if any_of else all
        wait_until(lambda: test(f[word] == token for f in flags) or (bell == SUM and self._closing), deadline,
                   lambda: self._late(step, timeout, [self._members[r] for r, f in zip(ranks, flags)
                                                      if f[word] != token]), self._bell(bell))
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

    def stop(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.rank == 0:     # the scheduler must not write into memory about to be freed
            self.client.on_version(lambda version, params: None, mirror=None)
            self.client.on_plans(None)
        if self._control is not None:
            self._control.shutdown()
        if self._summer is not None:     # it must not read the slots once they are freed
            self._ring([self.node.rank], SUM)
            self._summer.join()
        if self._bells is not None:
            self._bells.close()

    def close(self) -> None:
        self.stop()
        for arrays in (self._params, self._slots, self._flags, self._board, self._headers):
            arrays.free()


def make_data_plane(kind: str, comm: Comm, client: SchedulerClient | LocalSchedulerClient, size: int, *,
                    timeout: float = 600.0) -> DataPlane:
    """"mpi": `MPIDataPlane` when the job has more than one rank (its rank 0 hosting the scheduler), else (or
    "grpc") `SchedulerDataPlane`; `timeout`: the round timeout. Every rank calls it at the same point (it
    allocates shared memory)."""
    if kind == "mpi" and comm.size > 1:
        return MPIDataPlane(comm, client, size, timeout=timeout)
    return SchedulerDataPlane(client)
