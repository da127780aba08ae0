"""Tiny generated data and a real mpirun launcher for the tests."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from flock.common.recorder import read_metrics  # the tests' one reader of a run
from flock.run import find_mpirun
from reader.leaf_format import write_day
from reader.vocab import BOS, EOS, build_vocab, save_json_atomic
from tests.launcher import launcher

ROOT = Path(__file__).resolve().parent.parent
FAKE_HOSTS = ("127.0.0.2", "127.0.0.3")     # two "hosts" of this machine, reached through tests/fake_ssh.sh
WORDS = [f"w{i}" for i in range(40)]


def make_lm_data(data_dir: Path, *, users: int = 12, seed: int = 0) -> Path:
    """A small LEAF Reddit dataset: each user prefers its own few words (non-IID), a train and a test day."""
    rng = random.Random(seed)
    train, test = {}, {}
    for u in range(users):
        favourite = rng.sample(WORDS, 6)
        comments = [(t, [rng.choice(favourite if rng.random() < 0.7 else WORDS) for _ in range(rng.randint(3, 14))])
                    for t in range(rng.randint(5, 12))]
        cut = int(0.8 * len(comments))
        train[f"user{u:02d}"], test[f"user{u:02d}"] = comments[:cut], comments[cut:]
    write_day(data_dir, "20200101", "train", train)
    write_day(data_dir, "20200102", "test", test)
    tokens = [t for cs in train.values() for _, toks in cs for t in [BOS, *toks, EOS]]
    save_json_atomic(data_dir / "vocab.json", build_vocab(tokens, 48))
    return data_dir


mpirun = find_mpirun      # the tests' name for it


def fake_hosts_options() -> tuple[str, ...]:
    """mpirun options that place the ranks on the two FAKE_HOSTS in turn (one hydra proxy or Open MPI daemon
    each, started through a stand-in for ssh): a multi-node job on one machine."""
    return launcher().hosts_options(FAKE_HOSTS, ROOT / "tests" / "fake_ssh.sh")


def run_app(np_: int, data_dir: Path, run_dir: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`mpirun -np N python application.py DATA_DIR --run-dir RUN_DIR ...` in the repository root."""
    cmd = [mpirun(), "-np", str(np_), sys.executable, str(ROOT / "application.py"), str(data_dir),
           "--run-dir", str(run_dir), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)



def kill_after_train_rows(np_: int, data_dir: Path, run_dir: Path, *extra: str, rows: int = 3,
                          timeout: float = 120) -> int:
    """Starts `mpirun -np N python application.py ...`, SIGKILLs the whole job once metrics.jsonl has
    `rows` train rows, and returns how many it had then."""
    import signal
    import time

    job = subprocess.Popen([mpirun(), "-np", str(np_), sys.executable, str(ROOT / "application.py"), str(data_dir),
                            "--run-dir", str(run_dir), *extra], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout

    def train_rows() -> int:
        if not (run_dir / "metrics.jsonl").exists():
            return 0
        return len([r for r in read_metrics(run_dir) if r["kind"] == "train"])

    while time.monotonic() < deadline and train_rows() < rows:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(30)
    return train_rows()


def kill_then_resume(np_: int, data_dir: Path, run_dir: Path, *extra: str) -> tuple[int, subprocess.CompletedProcess]:
    """Kills a job after 3 train rows (`kill_after_train_rows`), resumes it with `--resume RUN_DIR`; returns
    the train rows it had when killed and the resumed job."""
    done = kill_after_train_rows(np_, data_dir, run_dir, *extra)
    return done, run_app(np_, data_dir, run_dir, "--resume", str(run_dir))


def make_arrays_data(data_dir: Path, *, users: int = 12, classes: int = 3, features: int = 4, seed: int = 0) -> Path:
    """A small arrays data set (`--reader arrays`): Gaussian blobs, one per class, a train and a test day."""
    import json

    import numpy as np

    from reader.arrays import write_split

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, features)).astype(np.float32)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "meta.json").write_text(json.dumps({"num_classes": classes, "input_shape": [features]}))
    for day, split, n in (("20200101", "train", 12), ("20200102", "test", 6)):
        ys = [rng.integers(0, classes, n) for _ in range(users)]
        xs = [(centres[y] + rng.normal(0, 1, (n, features))).astype(np.float32) for y in ys]
        write_split(data_dir, day, split, [f"u{i}" for i in range(users)], xs, ys)
    return data_dir


TIMING = {"seconds", "clients_per_s", "rank_work_s", "time"}      # a record's fields that measure time


def untimed_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics records without their timing fields: what two runs of one setting agree on bitwise."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


def fail_at_round_3_then_resume(data: Path, tmp_path: Path, monkeypatch, **options):
    """A whole run and the same run failed at round 3 (tests.faulty's trainer) then resumed in place: returns
    (the whole run's History, the cut run's folder, the resumed History)."""
    import pytest

    from flock import Config, simulate

    trainer = dict(trainer="tests.faulty:FailFromRound3IfAsked")
    whole = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "whole"), **options, **trainer))
    cut = tmp_path / "cut"
    monkeypatch.setenv("FLOCK_TEST_FAIL", "1")
    with pytest.raises(Exception, match="injected failure from round 3"):
        simulate(Config(data_dir=str(data), run_dir=str(cut), **options, **trainer))
    monkeypatch.delenv("FLOCK_TEST_FAIL")
    assert [r["round"] for r in read_metrics(cut)][:2] == [1, 2]
    return whole, cut, simulate(Config(resume=str(cut)))


VOLATILE = ("seconds", "time", "clients_per_s", "rank_work_s")     # a record's timings: never equal twice


def stable(records):
    """The records without their timings."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def records_at_np_1_and_2(data: Path, tmp_path: Path, args) -> list[tuple[dict, dict]]:
    """The application run with `args` at -np 1 and 2: their records (without timings), paired; every pair
    is checked to hold the same keys and numbers, floats to 1e-9 (sums over ranks add in another order)."""
    import pytest

    runs = []
    for np_ in (1, 2):
        proc = run_app(np_, data, tmp_path / f"np{np_}", *args, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs.append(stable(read_metrics(tmp_path / f"np{np_}")))
    pairs = list(zip(runs[0], runs[1], strict=True))
    for a, b in pairs:
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    return pairs
