"""Real jobs: `mpirun -np N python application.py` on tiny generated data."""
import json
import re
import sqlite3
import time

import numpy as np
import pytest

from flock.common.domain import home_rank
from tests.helpers import make_lm_data, read_metrics, run_app
from tests.launcher import launcher

pytestmark = pytest.mark.mpi   # every test here starts mpirun

ARGS = ("--rounds", "3", "--clients-per-round", "4", "--eval-every", "2", "--seed", "3")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm_data"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    out = {}
    for np_ in (1, 2, 4):
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


@pytest.mark.parametrize("np_", [2, 4])
def test_same_seed_same_metrics_at_any_number_of_ranks(runs, np_):
    one, other = read_metrics(runs[1][0]), read_metrics(runs[np_][0])
    assert len(one) == len(other)
    for a, b in zip(one, other):
        for key in ("loss", "top1", "top1_user_mean", "samples", "clients", "users", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert one[-1]["top1"] > 0.05          # the model learned something on the users' favourite words


def test_checkpoints_are_bitwise_equal_at_any_number_of_ranks_and_data_plane(data, runs, tmp_path):
    """On one node the MPI data plane sums in the scheduler's rank order: the bits of the gRPC plane. Across
    -np the float64 sums differ in their last bits only, which the float32 parameters do not show here."""
    proc = run_app(4, data, tmp_path, *ARGS, "--data-plane", "grpc")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    params = {}
    for name, run_dir in (("grpc 4", tmp_path), *((f"mpi {n}", runs[n][0]) for n in (1, 2, 4))):
        with np.load(run_dir / "checkpoint.npz") as z:
            params[name] = z["params"]
    assert all(np.array_equal(params["mpi 1"], p) for p in params.values())


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


def test_a_killed_rank_ends_the_job_and_its_pid_maps_to_the_rank(data, tmp_path):
    started = time.monotonic()
    proc = run_app(2, data, tmp_path, *ARGS, "--trainer", "tests.faulty:DieOnRank1", timeout=60)
    assert proc.returncode != 0 and time.monotonic() - started < 30
    pid = proc.stdout.split("ranks: ")[1].split()[1].split("=")[1].split("@")[0]   # "0=pid@host 1=pid@host"
    for pattern in launcher().killed_rank_report(rank=1, pid=int(pid)):
        assert re.search(pattern, proc.stdout + proc.stderr), (pattern, proc.stdout + proc.stderr)


@pytest.mark.parametrize("plane, message", [("mpi", "rank 0: step 0 did not complete within 3 s"),
                                            ("grpc", "rank 0: step 1 did not open within 3 s")])
def test_a_stuck_rank_fails_the_round_after_the_timeout(data, tmp_path, plane, message):
    started = time.monotonic()
    proc = run_app(2, data, tmp_path, *ARGS, "--trainer", "tests.faulty:HangOnRank1", "--round-timeout", "3",
                   "--data-plane", plane, timeout=60)
    assert proc.returncode != 0 and time.monotonic() - started < 30
    assert message in proc.stdout + proc.stderr
    assert "waiting for ranks [1]" in proc.stdout + proc.stderr


@pytest.mark.parametrize("option, message", [
    (("--clients-per-round", "50"), "--clients-per-round 50 is more than the 12 users"),
    (("--model", "nosuch.models:Net"), "--model 'nosuch.models:Net': cannot import module 'nosuch.models'"),
    (("--trainer", "trainer.lm:Missing"), "module 'trainer.lm' has no 'Missing'"),
    (("--batch-size", "0"), "--batch-size must be at least 1"),
])
def test_bad_options_exit_2_naming_the_option(data, tmp_path, option, message):
    proc = run_app(2, data, tmp_path, *option, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr


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
