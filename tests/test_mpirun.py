"""Real jobs: `mpirun -np N python application.py` on tiny generated data."""
import json
import sqlite3
import time

import pytest

from common.domain import home_rank
from tests.helpers import make_lm_data, read_metrics, run_app

ARGS = ("--rounds", "3", "--clients-per-round", "4", "--eval-every", "2", "--seed", "3")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm_data"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    out = {}
    for np_ in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"np{np_}")
        proc = run_app(np_, data, run_dir, *ARGS)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out[np_] = (run_dir, proc)
    return out


def test_two_ranks_write_config_and_metrics(runs):
    run_dir, proc = runs[2]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and config["rounds"] == 3 and config["server_lr"] == 1.85
    records = read_metrics(run_dir)
    assert [(r["kind"], r["round"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                                                          ("eval", 3)]
    for r in records:
        if r["kind"] == "train":
            assert r["clients"] == 4 and r["samples"] > 0 and r["loss"] > 0 and r["seconds"] > 0
        else:
            assert r["users"] == 12 and r["tokens"] > 0 and 0 <= r["top1"] <= 1 and 0 <= r["top1_user_mean"] <= 1
    assert "round 3/3" in proc.stdout and "eval @ round 3" in proc.stdout


def test_same_seed_same_metrics_at_one_and_two_ranks(runs):
    one, two = read_metrics(runs[1][0]), read_metrics(runs[2][0])
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for key in ("loss", "top1", "top1_user_mean", "samples", "clients", "users", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert one[-1]["top1"] > 0.05          # the model learned something on the users' favourite words


def test_private_params_stay_on_their_home_rank(data, tmp_path):
    proc = run_app(2, data, tmp_path, *ARGS, "--private", "decoder.bias", "--data-server", "sqlite")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["private_params"] == ["decoder.bias"]
    stored = {}
    for rank in (0, 1):
        with sqlite3.connect(tmp_path / "private" / f"rank{rank}.sqlite") as conn:
            stored[rank] = [u for (u,) in conn.execute("SELECT uid FROM private")]
    assert stored[0] or stored[1]
    for rank, users in stored.items():
        assert all(home_rank(u, 2) == rank for u in users), (rank, users)
    assert len(read_metrics(tmp_path)) == 5


def test_a_raising_rank_ends_the_job_quickly(data, tmp_path):
    started = time.monotonic()
    proc = run_app(2, data, tmp_path, *ARGS, "--trainer", "tests.faulty:FailOnRank1", timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - started < 30
    assert "injected failure on rank 1" in proc.stderr
    assert "rank 1" in proc.stderr


def test_contradictory_options_exit_2_with_the_option_named(data, tmp_path):
    proc = run_app(2, data, tmp_path, "--clients-per-round", "50", timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--clients-per-round 50 is more than the 12 users" in proc.stdout + proc.stderr


def test_a_missing_data_dir_is_built_from_popquotes(tmp_path):
    data = tmp_path / "lm_data"
    proc = run_app(2, data, tmp_path / "run", "--rounds", "1", "--clients-per-round", "2", "--eval-users", "4",
                   timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "building it once from the popquotes corpus" in proc.stdout
    assert (data / "20200101" / "train_data.json").is_file() and (data / "20200102" / "test_data.json").is_file()
    vocab = json.loads((data / "vocab.json").read_text())
    assert vocab["size"] == 10_000 and len(vocab["vocab"]) == 10_000
    ev = read_metrics(tmp_path / "run")[-1]
    assert ev["kind"] == "eval" and ev["users"] == 4
