"""The plain Scheduler object: FedAvg arithmetic against a hand computation, and the refusals."""

import numpy as np
import pytest

from flock.common.domain import DONE, EVAL, TRAIN, ParamLayout, RankMetrics, RankUpdate
from flock.common.errors import ConfigError, RefusedError, RunFailed
from protos import convert
from reader.leaf import LeafRedditReader
from scheduler.optim import make_server_optimizer
from scheduler.state import Scheduler, SchedulerConfig
from tests.helpers import make_lm_data

LAYOUT = ParamLayout(names=("w", "b"), shapes=((2, 3), (4,)))


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> LeafRedditReader:
    return LeafRedditReader(make_lm_data(tmp_path_factory.mktemp("data")))


def make(reader, *, world=2, rounds=3, server_lr=1.85, records=None, **kw) -> Scheduler:
    s = Scheduler(SchedulerConfig(world_size=world, rounds=rounds, clients_per_round=4, eval_every=2, **kw),
                  reader=reader, optimizer=make_server_optimizer("fedavg", server_lr=server_lr),
                  train_ratios={"loss": ("loss_sum", "tokens")}, eval_ratios={"top1": ("correct", "tokens")})
    s.attach(on_record=records.append if records is not None else None)
    s.init_params(LAYOUT, np.arange(10, dtype=np.float32))
    return s


def test_fedavg_step_matches_hand_computation(reader):
    records = []
    s = make(reader, records=records)
    theta = np.arange(10, dtype=np.float64)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=10) for _ in range(3)]
    n = [3.0, 5.0, 2.0]
    # rank 0 trained users 0 and 1, rank 1 trained user 2: each pushes sum n_k delta_k and sum n_k
    s.push_update(RankUpdate(step=0, rank=0, weight=n[0] + n[1], delta_sum=n[0] * deltas[0] + n[1] * deltas[1],
                             sums={"clients": 2, "samples": 8, "loss_sum": 6.0, "tokens": 3.0,
                                   "train_seconds": 0.5}))
    assert s.step == 0 and s.version == 0            # waits for every rank
    s.push_update(RankUpdate(step=0, rank=1, weight=n[2], delta_sum=n[2] * deltas[2],
                             sums={"clients": 1, "samples": 2, "loss_sum": 3.0, "tokens": 3.0,
                                   "train_seconds": 0.25}))
    expected = theta + 1.85 * sum(nk * d for nk, d in zip(n, deltas)) / sum(n)
    layout, params = s.current_params(1)
    np.testing.assert_allclose(params, expected.astype(np.float32), rtol=1e-6)
    assert s.step == 1
    assert records == [{"kind": TRAIN, "round": 1, "loss": 1.5, "clients": 3, "samples": 10,
                        "seconds": records[0]["seconds"], "clients_per_s": records[0]["clients_per_s"],
                        "rank_work_s": [0.5, 0.25]}]   # each rank's own work, in rank order


def test_rank_plans_cover_the_sampled_users_once(reader):
    s = make(reader)
    plans = [s.plan(r, 0, timeout=1) for r in range(2)]
    users = [u for p in plans for u in p.users]
    assert len(users) == len(set(users)) == 4 == plans[0].total_users
    assert all(p.kind == TRAIN and p.day == "20200101" and p.split == "train" for p in plans)


def test_refusals(reader):
    s = make(reader)
    ok = RankUpdate(step=0, rank=0, weight=1.0, delta_sum=np.zeros(10))
    with pytest.raises(RefusedError, match="stale"):
        s.push_update(RankUpdate(step=1, rank=0, weight=1.0, delta_sum=np.zeros(10)))
    with pytest.raises(RefusedError, match="has 9 values"):
        s.push_update(RankUpdate(step=0, rank=0, weight=1.0, delta_sum=np.zeros(9)))
    with pytest.raises(RefusedError, match="outside the world"):
        s.push_update(RankUpdate(step=0, rank=2, weight=1.0, delta_sum=np.zeros(10)))
    with pytest.raises(RefusedError, match="not eval"):
        s.push_metrics(RankMetrics(step=0, rank=0, sums={}))
    s.push_update(ok)
    with pytest.raises(RefusedError, match="duplicate"):
        s.push_update(ok)
    with pytest.raises(RefusedError, match="already set"):
        s.init_params(LAYOUT, np.zeros(10, dtype=np.float32))
    np.testing.assert_array_equal(s.params, np.arange(10, dtype=np.float32))   # nothing refused touched them


def test_a_non_finite_update_stops_the_run_naming_its_rank(reader):
    s = make(reader)
    bad = np.zeros(10)
    bad[7] = np.inf
    s.push_update(RankUpdate(step=0, rank=0, weight=1.0, delta_sum=np.ones(10)))
    s.push_update(RankUpdate(step=0, rank=1, weight=1.0, delta_sum=bad))
    assert s.failure is not None and "round 1: the update pushed by rank(s) 1 holds non-finite values" in s.failure
    assert s.version == 0
    np.testing.assert_array_equal(s.params, np.arange(10, dtype=np.float32))    # the step was not applied
    with pytest.raises(RunFailed, match="rank\\(s\\) 1 holds non-finite"):
        s.plan(0, 1, timeout=1)
    # over gRPC the bytes are refused as they arrive; in-process parts cannot go on the wire at all
    with pytest.raises(RefusedError, match="rank 1: update for step 0 has non-finite values"):
        convert.update_from_chunks(convert.update_chunks(RankUpdate(step=0, rank=1, weight=1.0, delta_sum=bad)), 10)
    with pytest.raises(ValueError, match="in-process parts"):
        list(convert.update_chunks(RankUpdate(step=0, rank=0, weight=1.0, delta_sum=bad, more=(bad,))))


def test_in_process_parts_are_added_after_their_update_in_rank_order(reader):
    rng = np.random.default_rng(3)
    d = [rng.normal(size=10) * 10.0 ** rng.integers(-8, 8, size=10) for _ in range(2)]
    apart, together = make(reader), make(reader)
    apart.push_update(RankUpdate(step=0, rank=0, weight=2.0, delta_sum=d[0].copy()))
    apart.push_update(RankUpdate(step=0, rank=1, weight=3.0, delta_sum=d[1].copy()))
    together.push_update(RankUpdate(step=0, rank=1, weight=3.0, delta_sum=np.zeros(0), reduced=True))
    together.push_update(RankUpdate(step=0, rank=0, weight=2.0, delta_sum=d[0].copy(), more=(d[1].copy(),)))
    np.testing.assert_array_equal(apart.current_params(1)[1], together.current_params(1)[1])
    with pytest.raises(RefusedError, match="in-process parts on a reduced update, or of the wrong size"):
        make(reader).push_update(RankUpdate(step=0, rank=0, weight=2.0, delta_sum=d[0], more=(np.zeros(9),)))


def test_an_empty_rank_and_evaluation_reduce(reader):
    records = []
    s = make(reader, rounds=2, records=records)
    for step in range(2):
        s.push_update(RankUpdate(step=step, rank=0, weight=2.0, delta_sum=np.ones(10) * 2))
        s.push_update(RankUpdate(step=step, rank=1, weight=0.0, delta_sum=np.zeros(0)))
    assert s.plan(0, 2, timeout=1).kind == EVAL
    np.testing.assert_allclose(s.params, np.arange(10) + 2 * 1.85, rtol=1e-6)
    s.push_metrics(RankMetrics(step=2, rank=0, sums={"users": 2, "correct": 3, "tokens": 10,
                                                      "top1@user_sum": 0.5, "top1@users": 2}))
    s.push_metrics(RankMetrics(step=2, rank=1, sums={"users": 1, "correct": 1, "tokens": 10,
                                                      "top1@user_sum": 0.1, "top1@users": 1}))
    ev = records[-1]
    assert ev["kind"] == EVAL and ev["round"] == 2 and ev["users"] == 3 and ev["tokens"] == 20
    assert ev["top1"] == pytest.approx(0.2) and ev["top1_user_mean"] == pytest.approx(0.2)
    assert s.plan(1, 3, timeout=1).kind == DONE and s.finished


def test_plan_waits_then_times_out_naming_missing_ranks(reader):
    s = make(reader)
    s.push_update(RankUpdate(step=0, rank=0, weight=0.0, delta_sum=np.zeros(0)))
    with pytest.raises(TimeoutError, match=r"waiting for ranks \[1\]"):
        s.plan(0, 1, timeout=0.2)


def test_more_clients_than_users_is_a_config_error(reader):
    with pytest.raises(ConfigError, match="--clients-per-round 13 is more than the 12 users"):
        Scheduler(SchedulerConfig(world_size=1, clients_per_round=13), reader=reader,
                  optimizer=make_server_optimizer("fedavg", server_lr=1.0), train_ratios={}, eval_ratios={})
