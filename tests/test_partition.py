"""`python -m flock.partition`: the schemes' statistics against the files written, seeds, bad inputs, and a
federated run on CIFAR-shaped arrays with a plug-in CNN."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flock.common import streams
from flock.partition import main
from reader import partitioners
from reader.arrays import ArrayReader
from tests.helpers import ROOT

N, LABELS = 600, 10


def cifar_like(path: Path, n: int = N, seed: int = 0) -> Path:
    """n random 3x32x32 uint8 images with labels 0..9 (each row unique, so a written row identifies its source)."""
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), y=rng.integers(0, LABELS, n))
    return path


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return cifar_like(tmp_path_factory.mktemp("in") / "cifar.npz")


def partition(npz: Path, out: Path, *args: str) -> dict:
    assert main([str(npz), str(out), *map(str, args)]) == 0
    return json.loads((out / "partition.json").read_text())


def written(out: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    reader = ArrayReader(out)
    day = reader.days()[0 if split == "train" else -1]
    return {uid: (s["x"], s["y"]) for uid in reader.index(day, split).users
            for s in [reader.load(day, split, uid)]}


def counts(y: np.ndarray) -> dict[str, int]:
    values, c = np.unique(y, return_counts=True)
    return {str(int(v)): int(k) for v, k in zip(values, c)}


def check_files_match_record(npz: Path, out: Path, record: dict) -> None:
    """partition.json's per-user label counts are the written arrays' labels; every input sample is written
    once, with its own label."""
    with np.load(npz) as z:
        x, y = z["x"], z["y"]
    source = {row.tobytes(): int(label) for row, label in zip(x, y)}
    seen = 0
    for split, key in (("train", "users"), ("test", "test_users")):
        for uid, (ux, uy) in written(out, split).items():
            assert record[key][uid] == counts(uy), (split, uid)
            assert record["sizes"][split][uid] == len(uy)
            assert [source.pop(row.tobytes()) for row in ux] == uy.tolist()
            seen += len(uy)
    assert seen + sum(record["unassigned"].values()) == N and len(source) == sum(record["unassigned"].values())


def test_dirichlet_counts_match_the_files_and_min_size_holds(npz, tmp_path):
    record = partition(npz, tmp_path / "out", "--scheme", "dirichlet", "--alpha", "0.3", "--users", 20,
                       "--min-partition-size", 15, "--test-fraction", 0.25, "--seed", 1)
    check_files_match_record(npz, tmp_path / "out", record)
    sizes = {u: record["sizes"]["train"][u] + record["sizes"]["test"][u] for u in record["users"]}
    assert len(sizes) == 20 and min(sizes.values()) >= 15 and sum(sizes.values()) == N
    for uid, size in sizes.items():      # round(0.25 x size), half up
        assert record["sizes"]["test"][uid] == math.floor(0.25 * size + 0.5)
    assert record["parameters"] == {"alpha": 0.3, "min_partition_size": 15, "self_balancing": False}
    assert record["dirichlet_draws"] > 1        # this seed's first draws leave a user short: redrawn
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["num_classes"] == 10 and meta["input_shape"] == [3, 32, 32]
    assert len(meta["mean"]) == len(meta["std"]) == 3 and all(abs(m - 0.5) < 0.01 for m in meta["mean"])


def test_dirichlet_min_size_that_cannot_be_met_is_an_error(npz, tmp_path, capsys):
    assert main([str(npz), str(tmp_path / "out"), "--scheme", "dirichlet", "--alpha", "0.01", "--users", "50",
                 "--min-partition-size", "12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --min-partition-size 12:") and "not reached in 11 Dirichlet draws" in err
    assert os.listdir(tmp_path) == []


def test_self_balancing_gives_no_label_to_users_above_the_average():
    labels = np.random.default_rng(1).integers(0, LABELS, 3000)
    part, _ = partitioners.dirichlet(labels, 15, np.random.default_rng(2), alpha=0.2, self_balancing=True)
    average = len(labels) / 15
    for u in range(15):
        per_label = np.bincount(labels[part.user(u)], minlength=LABELS)
        before = np.concatenate(([0], np.cumsum(per_label)[:-1]))      # labels are given in ascending order
        assert not (per_label[before > average]).any(), u
    plain, _ = partitioners.dirichlet(labels, 15, np.random.default_rng(2), alpha=0.2)
    assert part.sizes().max() < plain.sizes().max()


@pytest.mark.parametrize("mode", ["random", "deterministic", "first-deterministic"])
def test_pathological_gives_each_user_its_number_of_labels(npz, tmp_path, mode):
    record = partition(npz, tmp_path / "out", "--scheme", "pathological", "--num-classes-per-partition", 3,
                       "--class-assignment-mode", mode, "--users", 25, "--seed", 2)
    check_files_match_record(npz, tmp_path / "out", record)
    for u, uid in enumerate(record["users"]):
        labels = {int(k) for k in record["users"][uid]} | {int(k) for k in record["test_users"][uid]}
        assert len(labels) == 3, uid
        if mode == "deterministic":
            assert labels == {(u + i) % LABELS for i in range(3)}
        if mode == "first-deterministic":
            assert u % LABELS in labels
    if mode == "random":
        assert record["unassigned"] == {}     # 75 picks of 10 labels leave none out (for this seed)


def test_pathological_leaves_out_labels_no_user_got(npz, tmp_path):
    record = partition(npz, tmp_path / "out", "--scheme", "pathological", "--num-classes-per-partition", 1,
                       "--class-assignment-mode", "deterministic", "--users", 4)
    check_files_match_record(npz, tmp_path / "out", record)
    with np.load(npz) as z:
        y = z["y"]
    assert record["unassigned"] == {str(c): int((y == c).sum()) for c in range(4, LABELS)}


def test_shards_give_each_user_two_label_sorted_shards(npz, tmp_path):
    record = partition(npz, tmp_path / "out", "--scheme", "shards", "--users", 30)
    check_files_match_record(npz, tmp_path / "out", record)
    for uid in record["users"]:
        assert record["sizes"]["train"][uid] + record["sizes"]["test"][uid] == 20     # 2 shards of 10
        assert len(set(record["users"][uid]) | set(record["test_users"][uid])) <= 4


def test_same_seed_same_files_and_another_seed_another_partition(npz, tmp_path):
    args = ("--scheme", "dirichlet", "--alpha", "0.5", "--users", 12, "--min-partition-size", 5)
    partition(npz, tmp_path / "a", *args, "--seed", 7)
    partition(npz, tmp_path / "b", *args, "--seed", 7)
    other = partition(npz, tmp_path / "c", *args, "--seed", 8)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 10      # meta, partition.json, 2 splits x (users, offsets, x, y)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert other["users"] != json.loads((tmp_path / "a" / "partition.json").read_text())["users"]


def test_iid_sizes_constant_and_the_requested_families(npz, tmp_path):
    record = partition(npz, tmp_path / "out", "--users", 20, "--sizes", "constant", "--plot")
    check_files_match_record(npz, tmp_path / "out", record)
    assert {record["sizes"]["train"][u] + record["sizes"]["test"][u] for u in record["users"]} == {30}
    assert (tmp_path / "out" / "partition.png").stat().st_size > 1000
    assert len(partitioners.iid_sizes(603, 20, np.random.default_rng(0))) == 20
    n, users = 10**7, 4000
    log_sizes = np.log(partitioners.iid_sizes(n, users, np.random.default_rng(0), "lognormal", 1.5))
    assert abs(log_sizes.std() - 1.5) < 0.06        # lognormal(0, 1.5) weights: log sizes have sd 1.5
    sizes = partitioners.iid_sizes(n, users, np.random.default_rng(0), "powerlaw", 2.0)
    assert sizes.sum() == n and sizes.min() >= 1
    w = sizes / np.median(sizes) * 2 ** 0.5         # Pareto(2)'s median is sqrt 2: back to weights
    tail = w[w > 2]                                 # its tail above 2 is Pareto too: P(W > w | W > 2) = (2 / w)^2
    assert abs(len(tail) / np.log(tail / 2).sum() - 2.0) < 0.15     # maximum-likelihood exponent
    record = partition(npz, tmp_path / "ln", "--users", 20, "--sizes", "lognormal:1")
    check_files_match_record(npz, tmp_path / "ln", record)
    assert len(set(record["sizes"]["train"].values())) > 5


def test_a_folder_of_npy_files_is_an_input_too(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "x.npy", rng.normal(size=(200, 6)))
    np.save(tmp_path / "in" / "y.npy", rng.integers(0, 3, 200).astype(np.int32))
    record = partition(tmp_path / "in", tmp_path / "out", "--users", 8, "--no-normalisation")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert "mean" not in meta and meta["input_shape"] == [6] and record["num_classes"] == 3
    x, _ = written(tmp_path / "out", "train")["u00000"]
    assert x.dtype == np.float32


def _bad(tmp_path: Path, name: str, **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _truncated(tmp_path: Path) -> Path:
    path = cifar_like(tmp_path / "cut.npz", n=50)
    path.write_bytes(path.read_bytes()[:40_000])
    return path


def _folder_without_y(tmp_path: Path) -> Path:
    (tmp_path / "noy").mkdir()
    np.save(tmp_path / "noy" / "x.npy", np.zeros((10, 2)))
    return tmp_path / "noy"


X = np.zeros((30, 4), np.float32)
BAD_INPUTS = {
    "float labels": (lambda t: _bad(t, "f.npz", x=X, y=np.zeros(30)), "f.npz: labels y have dtype float64"),
    "length mismatch": (lambda t: _bad(t, "m.npz", x=X, y=np.zeros(29, int)), "m.npz: 30 samples in x but 29"),
    "empty": (lambda t: _bad(t, "e.npz", x=X[:0], y=np.zeros(0, int)), "e.npz: empty"),
    "nan": (lambda t: _bad(t, "n.npz", x=np.where(np.arange(120).reshape(30, 4) == 77, np.nan, 0), y=np.zeros(30, int)),
            "n.npz: x has NaN or infinite values (first in sample 19)"),
    "inf": (lambda t: _bad(t, "i.npz", x=np.full((30, 4), np.inf), y=np.zeros(30, int)), "i.npz: x has NaN or inf"),
    "beyond float32": (lambda t: _bad(t, "b.npz", x=np.full((30, 4), 1e300), y=np.zeros(30, int)),
                       "b.npz: x has values beyond float32's range"),
    "objects": (lambda t: _bad(t, "o.npz", x=np.array([[None]] * 30), y=np.zeros(30, int)),
                "o.npz: truncated, or not NumPy arrays (Object arrays cannot be loaded"),
    "negative label": (lambda t: _bad(t, "l.npz", x=X, y=-np.ones(30, int)), "l.npz: labels must be in 0..99999"),
    "no y": (lambda t: _bad(t, "noy.npz", x=X, labels=np.zeros(30, int)), "noy.npz: no array 'y' (it has x, labels)"),
    "scalar samples": (lambda t: _bad(t, "s.npz", x=np.zeros(30), y=np.zeros(30, int)), "s.npz: samples x have shape (30,)"),
    "truncated": (_truncated, "cut.npz: truncated, or not NumPy arrays"),
    "not npz": (lambda t: (np.save(t / "x.npy", X), t / "x.npy")[1], "x.npy: not an .npz file"),
    "folder without y": (_folder_without_y, "noy/y.npy: not found"),
    "missing": (lambda t: t / "nothing.npz", "nothing.npz: not found"),
}
BAD_OPTIONS = {
    "absurd users": (["--users", "1000000000000"], "error: --users must be at most 10000000, got 1000000000000"),
    "users expression": (["--users", "10**12"], "error: argument --users: --users takes an integer, got '10**12'"),
    "more users than samples": (["--users", "601"], "error: --users 601: more users than the 600 samples"),
    "alpha inf": (["--scheme", "dirichlet", "--alpha", "inf"], "error: --alpha must be a finite number"),
    "alpha zero": (["--scheme", "dirichlet", "--alpha", "0"], "error: --alpha must be at least 1e-06"),
    "min size too big": (["--scheme", "dirichlet", "--users", "50", "--min-partition-size", "13"],
                         "error: --users 50: --min-partition-size 13 needs at least 650 samples"),
    "classes per user": (["--scheme", "pathological", "--num-classes-per-partition", "11"],
                         "error: --num-classes-per-partition 11: the data have 10 labels"),
    "test fraction": (["--test-fraction", "0"], "error: --test-fraction must be above 0 and below 1"),
    "sizes": (["--sizes", "lognormal:-1"], "error: --sizes lognormal:-1: SIGMA must be in (0, 10]"),
    "sizes nan": (["--sizes", "powerlaw:nan"], "error: --sizes: 'nan' is not finite"),
    "foreign option": (["--alpha", "0.3"], "error: --scheme iid takes no --alpha (its own: --sizes)"),
    "mean without std": (["--mean", "0.5"], "error: --mean and --std go together"),
    "channels": (["--mean", "1,2", "--std", "1,2"], "error: --mean: 2 values; give one, or one per channel (3)"),
    "scheme": (["--scheme", "noniid"], "error: --scheme must be one of iid, dirichlet, pathological, shards"),
    "seed": (["--seed", "-3"], "error: --seed must be at least 0"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_name_the_file_and_leave_nothing(tmp_path, capsys, case):
    make, expected = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    source = make(tmp_path / "in")
    assert main([str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_name_the_option_and_leave_nothing(npz, tmp_path, capsys, case):
    args, expected = BAD_OPTIONS[case]
    assert main([str(npz), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_an_existing_out_dir_is_refused_and_the_command_exits_2(npz, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    proc = subprocess.run([sys.executable, "-m", "flock.partition", str(npz), str(tmp_path / "out")], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path / 'out'}: already exists; partitions are " \
                                                   f"written to a new folder\n"
    assert os.listdir(tmp_path / "out") == ["mine.txt"]


def test_a_failure_while_writing_leaves_no_folder(npz, tmp_path, monkeypatch, capsys):
    import flock.partition as cli

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cli, "plot", broken)
    with pytest.raises(OSError, match="disk full"):
        main([str(npz), str(tmp_path / "out"), "--plot"])
    assert os.listdir(tmp_path) == []
    partition(npz, tmp_path / "out", "--users", 5)      # a rerun does not trip over anything


# --- end to end: npz -> python -m flock.partition -> a federated run with a plug-in CNN -------------------

def test_cifar_shaped_arrays_partitioned_and_trained(npz, tmp_path):
    from flock import Config, simulate

    out = tmp_path / "cifar"
    proc = subprocess.run([sys.executable, "-m", "flock.partition", str(npz), str(out), "--scheme", "dirichlet",
                           "--alpha", "0.5", "--users", "20", "--test-fraction", "0.2"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["train_samples"] + json.loads(proc.stdout)["test_samples"] == N
    history = simulate(Config(data_dir=str(out), run_dir=str(tmp_path / "run"), reader="arrays",
                              model="tests.cifar_model:SmallCNN", trainer="classifier", rounds=2,
                              clients_per_round=5, eval_every=1, lr=0.05, batch_size=16, server_lr=1.0,
                              max_grad_norm=0.0, seed=1, shards=1))
    assert [r["round"] for r in history.records if r["kind"] == "train"] == [1, 2]
    final = history.evals[-1]
    assert final["round"] == 2 and final["samples"] == json.loads(proc.stdout)["test_samples"]
    assert all(math.isfinite(r[k]) for r in history.records for k in ("loss",) if k in r)
    assert math.isfinite(final["top1"]) and 0 <= final["top1"] <= 1


def test_the_partition_stream_is_its_own():
    a = streams.partition(0).integers(1 << 62, size=4)
    assert not np.array_equal(a, streams.sampling(0, 0).integers(1 << 62, size=4))
    assert not np.array_equal(a, streams.centralized(0).integers(1 << 62, size=4))
