"""flock as a library: `simulate` returns a History, leaves no global state or resource behind (also when
the run fails), `launch` runs the same on MPI ranks, and the notebook example runs."""
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from flock import Config, History, launch, read_metrics, simulate
from flock.common.errors import SharedError
from tests.helpers import ROOT, make_lm_data

SMALL = dict(rounds=3, clients_per_round=4, eval_every=2, seed=3, shards=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


def open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_simulate_returns_the_history_it_wrote(data, tmp_path):
    seen = []
    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path), **SMALL), on_record=seen.append)
    assert isinstance(history, History) and history.run_dir == tmp_path
    assert history.records == read_metrics(tmp_path) == seen
    assert [(r["kind"], r["round"]) for r in history.records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    assert history.metric("top1") == [(2, history.evals[0]["top1"]), (3, history.evals[1]["top1"])]
    with np.load(tmp_path / "checkpoint.npz") as z:          # the final parameters are the checkpoint's
        flat = np.concatenate([p.reshape(-1) for p in history.params.values()])
        assert np.array_equal(flat, z["params"])
    assert "3 rounds, 2 evaluations" in repr(history)


def test_a_failing_run_in_process_twice_leaks_nothing(data, tmp_path):
    root = logging.getLogger()
    before = (set(threading.enumerate()), open_fds(), torch.get_num_threads(), root.handlers[:], root.level)
    for attempt in range(2):
        with pytest.raises(Exception, match="injected failure in round 2"):
            simulate(Config(data_dir=str(data), run_dir=str(tmp_path / f"run{attempt}"), trainer="tests.faulty:FailInRound2",
                            data_server="sqlite", private=("decoder.bias",), **SMALL))
    after = (set(threading.enumerate()), open_fds(), torch.get_num_threads(), root.handlers[:], root.level)
    assert after[0] == before[0], "threads left running"
    assert after[1] == before[1], f"files or sockets left open: {after[1] - before[1]}"
    assert after[2:] == before[2:], "torch threads or logging changed"


def test_set_up_errors_are_flock_errors_in_process(tmp_path):
    with pytest.raises(SharedError, match="--model 'nosuch'"):
        simulate(Config(data_dir=str(tmp_path), model="nosuch"))
    with pytest.raises(SharedError, match="lacks train, evaluate"):
        simulate(Config(data_dir=str(tmp_path), trainer="tests.helpers:ROOT"))


@pytest.mark.mpi
def test_launch_runs_the_same_job_on_mpi_ranks(data, tmp_path):
    one = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "one"), **SMALL))
    two = launch(Config(data_dir=str(data), run_dir=str(tmp_path / "two"), **SMALL), np=2, timeout=240)
    assert [r["round"] for r in two.records] == [r["round"] for r in one.records]
    for a, b in zip(one.evals, two.evals):
        assert b["top1"] == pytest.approx(a["top1"], rel=1e-5)
    for name, p in one.params.items():
        np.testing.assert_allclose(two.params[name], p, rtol=1e-5, atol=1e-6)


def test_the_notebook_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook.py"), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "History(run_dir=" in proc.stdout and "top-1 accuracy by round: [(3, " in proc.stdout
    assert (tmp_path / "fedavg.png").stat().st_size > 10_000
