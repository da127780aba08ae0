"""MPIDataPlane in a real MPI job, with a stand-in for the scheduler: `mpirun -np N python
tests/data_plane_job.py OUT_DIR [--hang-rank R --hang-step STEP --timeout S]`.

Every step brings a new parameter version (rank 0's stand-in scheduler publishes it as the scheduler
does), which every rank checks, and a plan per rank (posted to rank 0's node as the scheduler posts them;
step 2's are too large for the node's board, and the other nodes' ranks ask for theirs), which every
rank checks too; rank 1's header in step 1 is too large to go beside its values; every rank whose turn it is pushes a known float64 update (values spread
over 16 orders of magnitude, so the order of the sum shows in its bits; some ranks, rank 0 included, bring
nothing in some steps). Rank 0 saves each step's total as its scheduler would get it
(OUT_DIR/total<step>.npy); OUT_DIR/headers.json holds what each rank's stand-in was handed (rank 0's: the
headers of its node's ranks too) and OUT_DIR/asked.json the plans each rank asked its stand-in for.
With --hang-rank, that rank stalls in step --hang-step (1) and the others must time out; with --fail-at S, the
stand-in posts a failure instead of step S's plans; with --no-doorbells the ranks wait with short sleeps."""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flock.common.domain import TRAIN, Plan, RankUpdate  # noqa: E402
from flock.common.errors import RunFailed  # noqa: E402
from simulator.comm import MPIComm  # noqa: E402
from simulator.data_plane import EMPTY, MPIDataPlane  # noqa: E402
from simulator.doorbell import Doorbells  # noqa: E402

SIZE = 3 * (1 << 19) + 12345      # several messages between nodes, slices of unequal length
STEPS = 4


def params(version: int) -> np.ndarray:
    return np.arange(SIZE, dtype=np.float32) * np.float32(version + 1)


def plans(step: int, world: int) -> list[Plan]:
    users = 60_000 if step == 2 else 1        # step 2: more than the board holds
    return [Plan(step=step, kind=TRAIN, round=step, users=tuple(f"u{r}-{step}-{i}" for i in range(users)),
                 version=step) for r in range(world)]


def brings_values(rank: int, step: int) -> bool:
    return (rank + step) % 4 != 3      # all in step 0, then one rank out (rank 0 in step 3)


def delta(rank: int, step: int) -> np.ndarray:
    rng = np.random.default_rng([rank, step])
    return rng.normal(size=SIZE) * 10.0 ** rng.integers(-8, 8, size=SIZE)


class StandIn:
    """What the data plane asks of the scheduler client. On rank 0, the total's push makes the next version,
    which the stand-in publishes as the scheduler does (version 0 goes into the mirror when it is registered)."""

    def __init__(self, rank: int, world: int, fail_at: int) -> None:
        self.rank, self.world, self.fail_at = rank, world, fail_at
        self.pushed: list[RankUpdate] = []
        self.asked: list[int] = []
        self.publish = self.mirror = self.post = None

    def get_plan(self, step: int, wait_s: float) -> Plan:
        self.asked.append(step)
        if step == self.fail_at:
            raise RunFailed(f"step {step} failed")
        return plans(step, self.world)[self.rank]

    def on_plans(self, post) -> None:
        self.post = post
        if post is not None:
            self._open(0)

    def _open(self, step: int) -> None:
        if step == self.fail_at:
            self.post(step, None, f"step {step} failed")
        else:
            self.post(step, plans(step, self.world), None)

    def get_params(self, version: int):
        raise AssertionError(f"version {version} is in the mirror: the plane must not ask for it")

    def on_version(self, publish, *, mirror) -> None:
        if mirror is not None:      # as LocalSchedulerClient does: the current version goes in at once
            np.copyto(mirror, params(0))
        self.publish, self.mirror = publish, mirror

    def push_update(self, update: RankUpdate) -> None:
        total = update.delta_sum.copy()
        for part in update.more:        # as the scheduler adds them: after delta_sum, in rank order
            total += part
        self.pushed.append(RankUpdate(step=update.step, rank=update.rank, weight=update.weight,
                                      delta_sum=total, sums=dict(update.sums), reduced=update.reduced))
        if update.rank == 0 and update.step + 1 < STEPS:
            np.copyto(self.mirror, params(update.step + 1))     # as the scheduler's server step writes it
            self.publish(update.step + 1, params(update.step + 1))
            self._open(update.step + 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--hang-rank", type=int, default=-1)
    p.add_argument("--hang-step", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--fail-at", type=int, default=-1)
    p.add_argument("--no-doorbells", action="store_true", help="wait as outside Linux: short sleeps")
    args = p.parse_args()
    if args.no_doorbells:
        Doorbells.for_node = classmethod(lambda cls, node: None)
    comm = MPIComm()
    client = StandIn(comm.rank, comm.size, args.fail_at)
    plane = MPIDataPlane(comm, client, SIZE, timeout=args.timeout)
    try:
        for step in range(STEPS):
            if comm.rank != 0 and plane._at_scheduler:    # a look at a step not open yet: from the board alone
                try:
                    plane.plan(step + 1, 1e-6)
                    raise AssertionError(f"rank {comm.rank}: a plan for step {step + 1} before step {step}")
                except TimeoutError:
                    pass
            if plane.plan(step, args.timeout) != plans(step, comm.size)[comm.rank]:
                raise AssertionError(f"rank {comm.rank}: wrong plan for step {step}")
            got = plane.params(step, args.timeout)
            if not np.array_equal(got, params(step)) or got.flags.writeable:
                raise AssertionError(f"rank {comm.rank}: wrong parameters of version {step}")
            if step == args.hang_step and comm.rank == args.hang_rank:
                time.sleep(60)
            present = brings_values(comm.rank, step)
            buffer = plane.update_buffer(SIZE)
            if present:
                buffer[:] = delta(comm.rank, step)
            plane.push_update(RankUpdate(step=step, rank=comm.rank, weight=float(present),
                                         delta_sum=buffer if present else EMPTY,
                                         sums={"rank": comm.rank, **({f"k{i}": 1.0 for i in range(10_000)}
                                                                     if (comm.rank, step) == (1, 1) else {})}),
                              args.timeout)
    except TimeoutError as e:
        print(f"timeout: {e}", flush=True)
        comm.abort(3)
    except RunFailed as e:
        print(f"rank {comm.rank}: run failed: {e}", flush=True)
        comm.abort(4)
    except Exception:
        traceback.print_exc()
        comm.abort(1)
    out = Path(args.out)
    if comm.rank == 0:
        for update in client.pushed:
            np.save(out / f"total{update.step}.npy", update.delta_sum)
    headers = comm.gather([(u.step, u.rank, u.weight, u.delta_sum.size, u.reduced) for u in client.pushed])
    asked = comm.gather(client.asked)
    if comm.rank == 0:
        (out / "headers.json").write_text(json.dumps(headers))
        (out / "asked.json").write_text(json.dumps(asked))
    plane.close()


if __name__ == "__main__":
    main()
