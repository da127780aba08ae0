"""The data plane: the scheduler's side of pre-reduced updates, the plane in one process (SingleComm), and
MPIDataPlane in real MPI jobs on one node and over two "hosts" (bitwise against a hand-made sum in the
plane's documented order), and a stalled rank timing out by name. Whole runs: tests/test_mpirun.py."""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flock.common.domain import ParamLayout, RankUpdate
from flock.common.errors import RefusedError
from protos import convert
from reader.leaf import LeafRedditReader
from scheduler.client import LocalSchedulerClient
from scheduler.optim import make_server_optimizer
from scheduler.state import Scheduler, SchedulerConfig
from simulator.comm import SingleComm
from simulator.data_plane import EMPTY, MPIDataPlane, SchedulerDataPlane, slice_bounds, tree_pairs
from tests.data_plane_job import STEPS, brings_values, delta
from tests.helpers import ROOT, fake_hosts_options, make_lm_data, mpirun

LAYOUT = ParamLayout(names=("w",), shapes=((1000,),))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm_data"))


def scheduler(data, world: int) -> Scheduler:
    s = Scheduler(SchedulerConfig(world_size=world, rounds=2, clients_per_round=3, eval_every=0),
                  reader=LeafRedditReader(data), optimizer=make_server_optimizer("fedavg", server_lr=1.85),
                  train_ratios={}, eval_ratios={})
    s.init_params(LAYOUT, np.linspace(-1, 1, LAYOUT.size, dtype=np.float32))
    return s


def test_slices_cover_the_vector_on_page_boundaries():
    for size, parts in ((10, 3), (6_182_672, 8), (3 * (1 << 19) + 12345, 2), (100, 1)):
        bounds = slice_bounds(size, parts)
        assert bounds[0] == 0 and bounds[-1] == size and bounds == sorted(bounds) and len(bounds) == parts + 1
        assert all(b % 512 == 0 for b in bounds[:-1])


def test_the_node_sum_is_a_fixed_tree_over_the_ranks():
    assert tree_pairs(1) == []
    assert tree_pairs(2) == [(0, 1)]
    assert tree_pairs(3) == [(0, 1), (0, 2)]                                   # (0 + 1) + 2
    assert tree_pairs(5) == [(0, 1), (2, 3), (0, 2), (0, 4)]                   # ((0 + 1) + (2 + 3)) + 4
    assert tree_pairs(8) == [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (4, 6), (0, 4)]
    for n in range(1, 40):       # every rank is added once, into a pair whose left rank holds its subtree
        pairs = tree_pairs(n)
        assert len(pairs) == n - 1 and sorted(j for _, j in pairs) == list(range(1, n))


class _Slots:
    def __init__(self, arrays):
        self.arrays = arrays

    def of(self, rank):
        return self.arrays[rank]


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_the_node_sum_in_batches_has_the_bits_of_the_tree_whatever_order_ranks_come_in(n):
    """`_add_pairs` adds every pair whose ranks are in, in one pass (a sum read only by a later pair of the
    batch in a block buffer): whatever order the ranks come in and whichever bring nothing, the sum in the
    first subtree's slot has the bits of the plain tree."""
    rng = np.random.default_rng(n)
    size = 70_001                        # more than one block, and a ragged last one
    for trial in range(12):
        values = [rng.normal(size=size) * 10.0 ** rng.integers(-8, 8, size=size) for _ in range(n)]
        present = rng.random(n) < 0.75
        plane = MPIDataPlane.__new__(MPIDataPlane)
        plane._slots = _Slots([v.copy() for v in values])
        where = [None] * n
        ready = [False] * n
        todo = tree_pairs(n)
        for r in rng.permutation(n):      # one rank in at a time, or several (the same look)
            ready[r], where[r] = True, int(r) if present[r] else None
            if rng.random() < 0.5 and not all(ready):
                continue
            batch = [(i, j) for i, j in todo if all(ready[i:2 * j - i])]
            plane._add_pairs(batch, where, 0, size)
            todo = [pair for pair in todo if pair not in batch]
        if not all(ready) or todo:
            batch = [(i, j) for i, j in todo if all(ready[i:2 * j - i])]
            plane._add_pairs(batch, where, 0, size)
        sums = [v if p else None for v, p in zip(values, present)]
        for i, j in tree_pairs(n):
            if sums[i] is not None and sums[j] is not None:
                sums[i] = sums[i] + sums[j]
            elif sums[i] is None:
                sums[i] = sums[j]
        if sums[0] is None:
            assert where[0] is None
        else:
            assert np.array_equal(plane._slots.of(where[0]), sums[0]), (trial, present)


def test_reduced_updates_and_a_pre_reduced_total_give_the_plain_result(data):
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=LAYOUT.size) for _ in range(3)]
    weights = [0.0, 2.0, 5.0]         # rank 0 brings nothing: its update holds the others' sum all the same
    plain, reduced = scheduler(data, 3), scheduler(data, 3)
    for rank in range(3):
        plain.push_update(RankUpdate(step=0, rank=rank, weight=weights[rank],
                                     delta_sum=parts[rank] if weights[rank] else EMPTY))
    for rank in (2, 1):
        reduced.push_update(RankUpdate(step=0, rank=rank, weight=weights[rank], delta_sum=EMPTY, reduced=True))
    reduced.push_update(RankUpdate(step=0, rank=0, weight=0.0, delta_sum=parts[1] + parts[2]))
    assert plain.version == reduced.version == 1
    assert np.array_equal(plain.params, reduced.params)
    with pytest.raises(RefusedError, match="a reduced update with 1000 values"):
        reduced.push_update(RankUpdate(step=1, rank=1, weight=1.0, delta_sum=parts[1], reduced=True))
    header = RankUpdate(step=3, rank=2, weight=4.0, delta_sum=EMPTY, sums={"loss": 1.0}, reduced=True)
    back = convert.update_from_chunks(convert.update_chunks(header), expected_size=LAYOUT.size)
    assert back.reduced and back.weight == 4.0 and back.delta_sum.size == 0


def test_mpi_plane_in_one_process_matches_the_scheduler_plane(data):
    results = []
    for make_plane in (SchedulerDataPlane, lambda client: MPIDataPlane(SingleComm(), client, LAYOUT.size)):
        s = scheduler(data, 1)
        plane = make_plane(LocalSchedulerClient(s, rank=0))
        for step in range(2):
            flat = plane.params(s.version, timeout=5)
            assert np.array_equal(flat, s.params) and not flat.flags.writeable
            buffer = plane.update_buffer(LAYOUT.size)
            buffer[:] = np.cos(np.arange(LAYOUT.size) + step)
            plane.push_update(RankUpdate(step=step, rank=0, weight=3.0, delta_sum=buffer), timeout=5)
        plane.close()
        results.append(s.params)
    assert np.array_equal(*results)


def job(out, np_: int, *extra: str, hosts: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [mpirun(), *(fake_hosts_options() if hosts else ()), "-np", str(np_), sys.executable,
           str(ROOT / "tests" / "data_plane_job.py"), str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout)


def tree(ranks: list[int], step: int) -> np.ndarray | None:
    """The given ranks' updates summed over `tree_pairs` (a rank that brings nothing drops out of its pair)."""
    sums = [delta(r, step) if brings_values(r, step) else None for r in ranks]
    for i, j in tree_pairs(len(sums)):
        if sums[i] is not None and sums[j] is not None:
            sums[i] = sums[i] + sums[j]
        elif sums[i] is None:
            sums[i] = sums[j]
    return sums[0]


@pytest.mark.mpi
@pytest.mark.parametrize("np_, hosts, nodes, extra", [
    (3, False, [[0, 1, 2]], ()),              # one node: (0 + 1) by the node, + 2 by the scheduler's pass
    (5, False, [[0, 1, 2, 3, 4]], ()),
    (5, False, [[0, 1, 2, 3, 4]], ("--no-doorbells",)),     # outside Linux
    (4, True, [[0, 2], [1, 3]], ()),          # mpirun places ranks on the two "hosts" in turn
    (3, True, [[0, 2], [1]], ()),
    (6, True, [[0, 2, 4], [1, 3, 5]], ()),    # each node's own tree, root included, then the nodes'
])
def test_mpi_plane_sums_in_its_documented_order(tmp_path, np_, hosts, nodes, extra):
    proc = job(tmp_path, np_, *extra, hosts=hosts)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in range(STEPS):
        node_sums = [s for s in (tree(ranks, step) for ranks in nodes) if s is not None]
        expected = functools.reduce(np.add, node_sums) if node_sums else np.zeros(0)   # nodes: a binomial tree
        assert np.array_equal(np.load(tmp_path / f"total{step}.npy"), expected), step
    headers = json.loads((tmp_path / "headers.json").read_text())
    by_rank0 = {(h[0], h[1]): h for h in headers[0]}
    for step in range(STEPS):
        assert by_rank0[step, 0] == [step, 0, float(brings_values(0, step)),
                                     np.load(tmp_path / f"total{step}.npy").size, False]
    for rank in range(1, np_):     # the other ranks' weights, without values: from beside the values on rank 0's
        for step in range(STEPS):  # node (rank 1's large one of step 1 over the control plane), else over it
            beside = rank in nodes[0] and (rank, step) != (1, 1)
            where = by_rank0 if beside else {(h[0], h[1]): h for h in headers[rank]}
            assert where.pop((step, rank)) == [step, rank, float(brings_values(rank, step)), 0, True]
    assert len(by_rank0) == STEPS and all(not h for r, h in enumerate(headers) if r not in (0, 1)
                                          and r in nodes[0])
    asked = json.loads((tmp_path / "asked.json").read_text())
    for rank in range(np_):        # plans: rank 0 in-process, its node's ranks from the board but step 2's (too
        # large), the other nodes' ranks over the control plane
        assert asked[rank] == (list(range(STEPS)) if rank == 0 or rank not in nodes[0] else [2]), rank


@pytest.mark.mpi
def test_a_failed_run_reaches_the_ranks_that_read_the_board(tmp_path):
    proc = job(tmp_path, 3, "--fail-at", "1", timeout=60)
    assert proc.returncode != 0
    assert "run failed: step 1 failed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("np_, hang, step, hosts", [
    (3, 2, 1, False), (3, 2, 1, True),
    (4, 3, 0, False),      # the first step (the plane's own timeout, not a push's), and ranks that do not sum
])
def test_a_stalled_rank_times_out_by_name(tmp_path, np_, hang, step, hosts):
    proc = job(tmp_path, np_, "--hang-rank", str(hang), "--hang-step", str(step), "--timeout", "2", hosts=hosts,
               timeout=60)
    assert proc.returncode != 0
    timeouts = [line for line in proc.stdout.splitlines() if line.startswith("timeout: ")]
    assert timeouts, proc.stdout + proc.stderr
    for line in timeouts:      # whichever rank said it first
        assert line.endswith(f"step {step} did not complete within 2 s (--round-timeout): waiting for ranks "
                             f"[{hang}]"), line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="doorbells live in Linux's abstract namespace")
def test_a_doorbell_ends_a_sleep_when_rung_and_only_then():
    import threading
    import time

    from simulator.doorbell import MAIN, SUM, Doorbells

    bells = Doorbells.for_node(SingleComm())
    try:
        started = time.monotonic()
        bells.wait(0.2, SUM)                              # nobody rings: the whole timeout
        assert time.monotonic() - started >= 0.19
        bells.ring([0], MAIN)                             # a ring before the sleep ends it at once, once
        started = time.monotonic()
        bells.wait(5, MAIN)
        assert time.monotonic() - started < 1
        threading.Timer(0.1, lambda: bells.ring([0], SUM)).start()     # a ring during the sleep ends it
        started = time.monotonic()
        bells.wait(5, SUM)
        assert 0.05 < time.monotonic() - started < 2
        started = time.monotonic()
        bells.wait(0.1, MAIN)                             # the rings were taken: the next sleep is whole
        assert time.monotonic() - started >= 0.09
    finally:
        bells.close()
    bells.ring([0])                                       # a closed bell: ringing it is harmless
