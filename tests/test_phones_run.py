"""The virtual clock in real runs: synchronous rounds on phones (profiles, availability, over-selection,
deadline, quorum) give the same metrics at any -np, resume exactly, and fail rounds instead of hanging."""
import json

import pytest

from flock import Config, simulate
from flock.common.errors import RunFailed
from tests.helpers import (
    fail_at_round_3_then_resume,
    make_lm_data,
    read_metrics,
    records_at_np_1_and_2,
    run_app,
    stable,
)

PHONES = dict(device_profiles="builtin", over_select=1.5, deadline=40.0, min_clients=2)
SMALL = dict(rounds=6, clients_per_round=4, eval_every=3, seed=5, checkpoint_every=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """30 users, and a trace (FedScale's form, as JSON) of short on-line sessions: phones go off-line mid-task."""
    root = make_lm_data(tmp_path_factory.mktemp("lm"), users=30)
    trace = {str(c): {"active": [0, 35 + c], "inactive": [22 + 3 * c, 95 + c], "finish_time": 100}
             for c in range(7)}
    (root / "trace.json").write_text(json.dumps(trace))
    PHONES["availability"] = f"trace:{root / 'trace.json'}"
    return root


def test_a_synchronous_run_on_phones_reports_its_clock(data, tmp_path):
    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path), **SMALL, **PHONES))
    train = history.train
    times = [r["sim_time"] for r in history.records]
    assert times == sorted(times) and times[0] > 0
    for r in train:
        assert r["selected"] <= 6 and r["completed"] + r["dropped"] + r["stale"] + r["voided"] == r["selected"]
        assert r["clients"] == (0 if r["failed"] else r["completed"]) and r["round_s"] <= 40.0 + 1e-9
        assert r["bytes_down"] == r["selected"] * 4 * json.loads((tmp_path / "config.json").read_text())["shared_params"]
    assert sum(r["stale"] for r in train) > 0 and sum(r["compute_saved_s"] for r in train) > 0
    assert sum(r["dropped"] for r in train) > 0 and sum(r["failed"] for r in train) < len(train)


def test_no_phone_meets_the_deadline_every_round_fails_and_the_run_stops(data, tmp_path):
    with pytest.raises(RunFailed, match="no round was applied: all 3 training rounds failed"):
        simulate(Config(data_dir=str(data), run_dir=str(tmp_path), **{**SMALL, "rounds": 3},
                        device_profiles="builtin", deadline=0.01))
    rows = read_metrics(tmp_path)
    assert [r["kind"] for r in rows] == ["train"] * 3         # no evaluation of the untrained model
    assert [r["failed"] for r in rows] == [1, 1, 1]
    assert [r["clients"] for r in rows] == [0, 0, 0]
    assert [round(r["sim_time"], 6) for r in rows] == [0.01, 0.02, 0.03]


def test_resume_continues_the_clock_exactly(data, tmp_path, monkeypatch):
    whole, cut, resumed = fail_at_round_3_then_resume(data, tmp_path, monkeypatch, **SMALL, **PHONES)
    assert stable(read_metrics(cut)) == stable(whole.records)
    assert resumed.records[0]["round"] == 3 and resumed.records[0]["sim_time"] > whole.records[1]["sim_time"]


@pytest.mark.mpi
def test_phones_give_the_same_metrics_at_any_number_of_ranks(data, tmp_path):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, **PHONES}.items()]
    pairs = records_at_np_1_and_2(data, tmp_path, args)
    for a, b in pairs:
        assert a["sim_time"] == b["sim_time"]    # the clock is the scheduler's alone: exactly
    assert sum(a.get("dropped", 0) for a, _ in pairs if a["kind"] == "train") > 0, "no phone went off-line"


@pytest.mark.mpi
def test_a_broken_profile_file_is_one_message_at_np_2(data, tmp_path):
    bad = tmp_path / "profiles.json"
    bad.write_text('{"user00": {"seconds_per_sample": -1}}')
    proc = run_app(2, data, tmp_path / "run", "--device-profiles", str(bad), timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and out.count("error: ") == 1 and str(bad) in out, out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("option", ["--over-select=1.5", "--deadline=30", "--min-clients=2", "--availability=round:0.5"])
def test_phone_options_need_profiles(option, capsys):
    from application import main

    assert main(["data", option]) == 2
    assert "need phones: give --device-profiles" in capsys.readouterr().err


def test_plot_draws_accuracy_against_simulated_hours(data, tmp_path):
    from flock.plot import main as plot_main

    simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), **{**SMALL, "rounds": 3}, **PHONES))
    assert plot_main([str(tmp_path / "run"), "--x", "hours", "--out", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").stat().st_size > 10_000
