"""Asynchronous aggregation (FedBuff / FedAsync) wired into runs: the plans, the exact sums, the same model
at any -np, kill + resume, and the options' errors."""
import json
import math
import os
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from flock.common.domain import TaskSpec
from scheduler.phones.asynchronous import HORIZON, AsyncRounds, exact_weight
from scheduler.phones.availability import availability_from_option
from scheduler.phones.devices import profiles_from_option
from scheduler.phones.fedbuff import AsyncConfig, staleness_weight
from scheduler.phones.rounds import PhoneRounds
from tests.helpers import ROOT, kill_after_train_rows, make_lm_data, read_metrics, run_app

ASYNC = ("--rounds", "8", "--eval-every", "4", "--eval-users", "0", "--seed", "3", "--async-buffer", "3",
         "--async-concurrency", "6", "--async-max-staleness", "3")
TIMING = {"seconds", "clients_per_s", "rank_work_s", "time"}


def rounds(population=40, *, buffer=3, concurrency=6, rounds_=30, checkpoint_every=0, availability="always",
           max_staleness=None) -> AsyncRounds:
    users = [f"u{i}" for i in range(population)]
    phones = PhoneRounds(profiles=profiles_from_option("builtin", 1), availability=availability_from_option(
        availability, 1), seed=1)
    return AsyncRounds(phones=phones, config=AsyncConfig(concurrency=concurrency, buffer_size=buffer,
                                                         max_staleness=max_staleness),
                       population=users, counts={u: 1 + i % 7 for i, u in enumerate(users)}, rounds=rounds_,
                       bytes_down=4000, bytes_up=4000,
                       checkpoint_due=lambda v: checkpoint_every > 0 and v % checkpoint_every == 0)


def handed_out(plan: AsyncRounds, versions: int) -> list[tuple[int, TaskSpec]]:
    out = []
    for v in range(versions):
        out += [(v, t) for t in plan.tasks_at(v)]
        plan.record(v + 1)
    return out


def test_exact_weight_keeps_eight_significant_bits():
    for s in range(50):
        w = staleness_weight(s)
        got = exact_weight(w)
        assert abs(got - w) <= w * 2 ** -8
        mantissa, _ = math.frexp(got)
        assert (mantissa * 256).is_integer()
        for n, theta in ((1, 0.1234567), (1013, -3.3e-5), ((1 << 20) - 1, 7.25e3)):   # w n theta exact in float64
            theta = float(np.float32(theta))
            assert Fraction(theta * (got * n)) == Fraction(theta) * Fraction(got) * n
    assert exact_weight(1.0) == 1.0 and exact_weight(0.5) == 0.5


def test_every_counted_task_is_handed_out_once_when_it_can_start_and_lands_in_its_buffer():
    plan = rounds(availability="round:0.6", max_staleness=2)
    schedule = rounds(availability="round:0.6", max_staleness=2)._schedule
    buffers = [schedule.next_buffer() for _ in range(30)]
    tasks = handed_out(plan, 30)
    ids = [t.task_id for _, t in tasks]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(a.task.task_id for b in buffers for a in b.arrivals)
    by_id = {a.task.task_id: (b.version, a) for b in buffers for a in b.arrivals}
    for version, task in tasks:
        target, arrival = by_id[task.task_id]
        assert task.start_version == arrival.task.start_version
        # no checkpoints: handed out at its start, or once its target is within the ranks' horizon
        assert version == max(task.start_version, target - HORIZON)
        assert task.target == target > task.start_version
        assert task.weight == exact_weight(arrival.weight)
        assert arrival.staleness == target - 1 - task.start_version <= 2


def test_no_task_of_a_later_version_trains_before_a_checkpoint_and_resume_hands_out_the_same():
    whole = handed_out(rounds(checkpoint_every=4), 20)
    for version, task in whole:
        barrier = max((c for c in range(4, 21, 4) if c < task.target), default=0)
        assert version == max(task.start_version, task.target - HORIZON, barrier)
        assert version >= barrier      # nothing past a checkpoint is trained before it
    resumed = rounds(checkpoint_every=4)
    first = rounds(checkpoint_every=4)
    handed_out(first, 8)
    resumed.restore(8, first._last_time)
    after = [(v, t) for v, t in whole if v >= 8]
    got = []
    for v in range(8, 20):
        got += [(v, t) for t in resumed.tasks_at(v)]
        resumed.record(v + 1)
    assert got == after
    # a checkpoint at 12 (written before the plan of 12) holds the older versions that tasks handed out from
    # 12 on start from
    at12 = rounds(checkpoint_every=4)
    for v in range(12):
        at12.tasks_at(v)
        at12.record(v + 1)
    needed = {t.start_version for v, t in whole if v >= 12 and t.start_version < 12}
    assert needed and at12.needed_versions(12) == needed


def test_restore_refuses_a_schedule_that_does_not_replay_to_the_saved_time():
    from flock.common.errors import ConfigError

    with pytest.raises(ConfigError, match="virtual time"):
        rounds().restore(3, 12345.0)


def async_data(path, users=24):
    """The test data and a trace of short on-line sessions (so that some phones drop out mid-task)."""
    data = make_lm_data(path, users=users)
    trace = {f"user{i:02d}": {"active": [0, 40 + 3 * i], "inactive": [15 + 2 * i, 300], "finish_time": 320}
             for i in range(users)}
    (path / "trace.json").write_text(json.dumps(trace))
    return data, ("--availability", f"trace:{path / 'trace.json'}")


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


@pytest.mark.mpi
def test_asynchronous_runs_give_the_same_model_and_metrics_at_np_1_2_and_4(tmp_path):
    data, trace = async_data(tmp_path / "data")
    runs = {}
    for np_ in (1, 2, 4):
        proc = run_app(np_, data, tmp_path / f"np{np_}", *ASYNC, *trace)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[np_] = tmp_path / f"np{np_}"
    base = _rows(runs[1])
    train = [r for r in base if r["kind"] == "train"]
    assert len(train) == 8 and all(r["clients"] == 3 and r["completed"] == 3 for r in train)
    assert sum(r["dropped"] for r in train) > 0 and max(r["staleness_max"] for r in train) >= 1   # it is asynchronous
    assert all(b["sim_time"] > a["sim_time"] for a, b in zip(train, train[1:]))
    params = np.load(runs[1] / "checkpoint.npz")["params"]
    for np_ in (2, 4):
        rows = _rows(runs[np_])
        assert [r for r in rows if r["kind"] == "train"] == train        # to the bit
        for a, b in zip(base, rows):
            assert a.keys() == b.keys()
            for key in a:     # per-user means are summed in rank order: equal to float64 rounding
                assert b[key] == (pytest.approx(a[key], rel=1e-12) if key.endswith("_user_mean") else a[key]), key
        np.testing.assert_array_equal(np.load(runs[np_] / "checkpoint.npz")["params"], params)


@pytest.mark.mpi
@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_asynchronous_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, store):
    """Private parameters on home ranks, FedAdam's moments, the schedule and the older versions that pending
    tasks start from all come back from the checkpoint."""
    data, trace = async_data(tmp_path / "data")
    args = (*ASYNC, *trace, "--checkpoint-every", "2", "--trainer", "tests.faulty:SlowTrainer", "--private", "decoder.bias",
            "--data-server", store, "--server-opt", "fedadam", "--server-lr", "0.05")
    whole = tmp_path / "whole"
    proc = run_app(2, data, whole, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cut = tmp_path / "cut"
    done = kill_after_train_rows(2, data, cut, *args)
    assert 3 <= done < 8, "the kill came too late"
    resumed = run_app(2, data, cut, "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    assert [r for r in _rows(cut) if r["kind"] == "train"] == [r for r in _rows(whole) if r["kind"] == "train"]
    np.testing.assert_array_equal(np.load(cut / "checkpoint.npz")["params"],
                                  np.load(whole / "checkpoint.npz")["params"])


@pytest.mark.parametrize("extra, message", [
    (("--async-concurrency", "4"), "--async-concurrency need asynchronous mode"),
    (("--async-buffer", "2", "--deadline", "60"), "--deadline are for synchronous rounds"),
    (("--async-buffer", "8", "--async-concurrency", "4"), "--async-buffer 8 is more than"),
    (("--async-buffer", "2", "--staleness-exponent", "nan"), "--staleness-exponent"),
    (("--async-buffer", "2", "--centralized"), "--async-buffer runs flock's own server optimizers"),
])
def test_asynchronous_options_are_checked(tmp_path, extra, message):
    data = make_lm_data(tmp_path / "data")
    proc = subprocess.run([sys.executable, str(ROOT / "application.py"), str(data), "--run-dir",
                           str(tmp_path / "run"), *extra], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_a_rank_keeps_the_versions_that_tasks_handed_out_later_start_from():
    """Plans name the older versions that tasks not yet handed out start from (`Plan.keep`): a rank keeps
    them, so each version is fetched once, when it is current, and a late task trains from the right one."""
    from flock.common.domain import DONE, TRAIN, ParamLayout, Plan
    from simulator.async_simulator import AsyncSimulator
    from simulator.data_server import MemoryStore
    from simulator.shard import Shard

    theta = {v: np.array([1.0, 2.0, 3.0], dtype=np.float32) * (v + 1) for v in range(3)}
    plans = [Plan(step=0, kind=TRAIN, round=0, day="d", split="train", version=0, keep=(), tasks=(
                 TaskSpec(task_id=0, uid="ann", start_version=0, target=1, weight=1.0),)),
             Plan(step=1, kind=TRAIN, round=1, day="d", split="train", version=1, keep=(0,), tasks=(
                 TaskSpec(task_id=1, uid="bob", start_version=1, target=2, weight=1.0),)),
             Plan(step=2, kind=TRAIN, round=2, day="d", split="train", version=2, tasks=(
                 TaskSpec(task_id=2, uid="cy", start_version=0, target=3, weight=0.5),)),
             Plan(step=3, kind=DONE, round=3, version=3)]
    client = _Client(plans, theta)
    store = MemoryStore()
    shard = Shard(torch.nn.Linear(3, 1, bias=False), _Trainer(), ParamLayout(names=("weight",), shapes=((1, 3),)),
                  (), store, {})
    assert AsyncSimulator(rank=0, client=client, reader=_Reader(), shards=[shard], store=store,
                          eval_ratios={}).run() == 3
    assert client.fetched == [0, 1, 2]
    expected = 0.5 * 5 * ((theta[0] + np.float32(_Trainer.steps["cy"])).astype(np.float64) - theta[0])
    np.testing.assert_allclose(client.updates[2][2], expected, rtol=0, atol=1e-12)


def test_an_asynchronous_plan_crosses_the_wire_whole():
    from flock.common.domain import TRAIN, Plan
    from protos.convert import plan_from_proto, plan_to_proto

    plan = Plan(step=5, kind=TRAIN, round=4, day="d", split="train", users=("ann",), version=4, keep=(1, 3),
                tasks=(TaskSpec(task_id=9, uid="ann", start_version=3, target=6, weight=0.71875),))
    assert plan_from_proto(plan_to_proto(plan)) == plan


class _Counts:
    def __init__(self, counts):
        self.counts = counts

    def count_of(self):
        return dict(self.counts)


class _Reader:
    counts = {"ann": 2, "bob": 3, "cy": 5}

    def index(self, day, split):
        return _Counts(self.counts)

    def load(self, day, split, uid):
        return {"uid": uid}


class _Trainer:
    """Moves every shared parameter by a per-user step, so the update is known by hand."""
    steps = {"ann": 0.1, "bob": 0.2, "cy": -0.3}

    def train(self, model, samples, rng=None):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(self.steps[samples["uid"]])
        return {"samples": float(_Reader.counts[samples["uid"]]), "loss_sum": 1.0}


class _Client:
    """Opens step s + 1 once step s's update is in (as the scheduler does), and records the updates."""

    def __init__(self, plans, versions):
        self.plans, self.versions, self.updates, self.fetched = plans, versions, [], []

    def get_plan(self, step, wait_s):
        if step > len(self.updates):
            time.sleep(min(wait_s, 0.01))
            raise TimeoutError("not open")
        return self.plans[step]

    def get_params(self, version):
        self.fetched.append(version)
        return None, self.versions[version]

    def push_update(self, update):
        self.updates.append((update.step, update.weight, np.array(update.delta_sum, copy=True)))


def test_a_ranks_asynchronous_update_is_the_staleness_weighted_sum_of_its_tasks_deltas():
    """Oracle: sum over a target's tasks of w n (theta_i - theta_start), each from its own start version,
    pushed once every task of the target is trained (tasks of a later target wait in their own sum)."""
    from flock.common.domain import DONE, TRAIN, ParamLayout, Plan
    from simulator.async_simulator import AsyncSimulator
    from simulator.data_server import MemoryStore
    from simulator.shard import Shard

    model = torch.nn.Linear(3, 1, bias=False)
    layout = ParamLayout(names=("weight",), shapes=((1, 3),))
    theta = {0: np.array([1.0, 2.0, 3.0], dtype=np.float32), 1: np.array([0.5, -0.5, 0.25], dtype=np.float32)}
    w_bob = exact_weight(staleness_weight(1))
    plans = [Plan(step=0, kind=TRAIN, round=0, day="d", split="train", version=0, tasks=(
                 TaskSpec(task_id=0, uid="ann", start_version=0, target=1, weight=1.0),
                 TaskSpec(task_id=1, uid="bob", start_version=0, target=2, weight=w_bob))),
             Plan(step=1, kind=TRAIN, round=1, day="d", split="train", version=1, tasks=(
                 TaskSpec(task_id=2, uid="cy", start_version=1, target=2, weight=1.0),)),
             Plan(step=2, kind=DONE, round=2, version=2)]
    client = _Client(plans, theta)
    store = MemoryStore()
    shard = Shard(model, _Trainer(), layout, (), store, {})
    sim = AsyncSimulator(rank=0, client=client, reader=_Reader(), shards=[shard], store=store, eval_ratios={})
    assert sim.run() == 2
    (s0, w0, d0), (s1, w1, d1) = client.updates
    assert (s0, w0, s1, w1) == (0, 2.0, 1, 8.0)
    step = {u: np.float32(v) for u, v in _Trainer.steps.items()}
    expected0 = 2 * ((theta[0] + step["ann"]).astype(np.float64) - theta[0])
    expected1 = (w_bob * 3 * ((theta[0] + step["bob"]).astype(np.float64) - theta[0])
                 + 5 * ((theta[1] + step["cy"]).astype(np.float64) - theta[1]))
    np.testing.assert_allclose(d0, expected0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d1, expected1, rtol=0, atol=1e-12)


