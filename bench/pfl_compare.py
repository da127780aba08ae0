"""flock against pfl-research on pfl's own CIFAR-10 benchmark setting, one contestant after another in one run;
ratios printed at the end, and where one client's time goes in each (`--profile`).

    python bench/pfl_compare.py [--rounds 10] [--pfl-python PYTHON] [--profile-rounds 3] [--out DIR]

The setting is pfl-research's benchmarks/image_classification/configs/baseline.yaml: 1,000 users of 50
images (3 x 32 x 32; synthetic: standard normal pixels and uniform labels, seed 0, written once to
runs/pfl-compare-data in flock's `arrays` layout), cohort 50, 1 local epoch of batches of 10, local SGD lr
0.1, central lr 1.0 (FedAvg), its `simple_cnn` (1,626,442 parameters), no evaluation. Every contestant uses
one torch thread per process; the first round of each is warm-up and excluded.

- loop: one process, no FL framework: pfl's `simple_cnn` (bench/pfl_worker.py) on (H, W, C) images, as pfl
  runs it; per client: load the global weights, a new torch.optim.SGD, 5 steps, add n * theta into a float64
  sum; then the server step. loop_np: one such loop per core at once, summed (the ceiling for N processes).
- pfl: pfl 0.6.0's FederatedAveraging with SimulatedBackend (bench/pfl_worker.py), one process, and one worker
  per core under `torchrun --standalone` (pfl's multi-process simulation, gloo on the CPU).
- flock: `mpirun -np N python application.py DATA --reader arrays --model simple-cnn --trainer classifier ...`
  at -np 1 with one shard (one process, one thread, as the loop) and at -np N (client updates/s from the
  scheduler's step times, as bench/throughput.py).

pfl pins dp-accounting < 0.6 and flock pins 0.6, so pfl lives in a venv of its own; `--pfl-python` names its
Python (default: .venv-pfl/bin/python), made once with:

    python -m venv .venv-pfl && .venv-pfl/bin/pip install -r requirements-pfl.txt

Without it the pfl rows are left out (said so in the table).

--profile: one client's life, phase by phase, in one process each (wall ms per client, over the clients of
`--profile-rounds` rounds after a warm-up round): the loop, flock's Shard (the object a rank trains its users
with; the same trainer and model as the job) and pfl's FederatedAveraging (its methods wrapped with timers).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from launch import ROOT, side_by_side, write_table
from pfl_worker import Phases, simple_cnn
from throughput import project

USERS, PER_USER, COHORT, BATCH, LOCAL_LR = 1000, 50, 50, 10, 0.1
FLOCK_FLAGS = ("--reader", "arrays", "--model", "simple-cnn", "--trainer", "classifier", "--lr", str(LOCAL_LR),
               "--batch-size", str(BATCH), "--local-epochs", "1", "--server-lr", "1", "--max-grad-norm", "0",
               "--clients-per-round", str(COHORT), "--quiet")


def synthetic_cifar(out: Path, users: int = USERS, per_user: int = PER_USER, seed: int = 0) -> Path:
    """CIFAR-10's shapes with synthetic content, in flock's arrays layout (written once, then reused)."""
    import numpy as np

    from reader.arrays import write_columns

    if (out / "meta.json").exists():
        return out
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((users * per_user, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, users * per_user)
    ids = [f"u{i:04d}" for i in range(users)]
    write_columns(out, "20200101", "train", ids, x, y, np.arange(users + 1) * per_user)
    write_columns(out, "20200102", "test", ids[:20], x[:200], y[:200], np.arange(21) * 10)
    (out / "meta.json").write_text(json.dumps({"num_classes": 10, "input_shape": [3, 32, 32],
                                               "source": f"synthetic CIFAR-10 shapes, seed {seed}"}))
    return out


class PlainLoop:
    """FedAvg with no framework: pfl's model on (H, W, C) images held in memory, as pfl holds them."""

    def __init__(self, data_dir: Path, seed: int = 0) -> None:
        import numpy as np
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(seed)
        day = data_dir / "20200101" / "train_data"
        self.x = torch.from_numpy(np.ascontiguousarray(np.load(day / "x.npy").transpose(0, 2, 3, 1)))
        self.y = torch.from_numpy(np.load(day / "y.npy"))
        self.offsets = np.load(day / "offsets.npy")
        self.model = simple_cnn(tuple(self.x.shape[1:]), 10)
        self.params = list(self.model.parameters())
        self.global_ = [p.detach().clone() for p in self.params]
        self.total = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        self.rng = np.random.default_rng(seed)
        self.phases = Phases()

    def client(self, user: int) -> float:
        import torch
        import torch.nn.functional as F

        clock, started = self.phases, time.perf_counter()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.global_)
        t1 = time.perf_counter()
        x, y = self.x[self.offsets[user]:self.offsets[user + 1]], self.y[self.offsets[user]:self.offsets[user + 1]]
        t2 = time.perf_counter()
        sgd = torch.optim.SGD(self.params, lr=LOCAL_LR)
        t3 = time.perf_counter()
        self.model.train()
        for i in range(0, len(x), BATCH):
            sgd.zero_grad()
            F.cross_entropy(self.model(x[i:i + BATCH]), y[i:i + BATCH]).backward()
            sgd.step()
        t4 = time.perf_counter()
        with torch.no_grad():
            for acc, p in zip(self.total, self.params):
                acc.add_(p, alpha=float(len(x)))
        t5 = time.perf_counter()
        for phase, a, b in (("global parameters in", started, t1), ("reading", t1, t2), ("optimizer", t2, t3),
                            ("training", t3, t4), ("accumulate", t4, t5)):
            clock.add(phase, b - a)
        clock.clients += 1
        return float(len(x))

    def round(self) -> float:
        import torch

        started = time.perf_counter()
        for t in self.total:
            t.zero_()
        weight = sum(self.client(int(u)) for u in self.rng.choice(len(self.offsets) - 1, COHORT, replace=False))
        with torch.no_grad():
            for g, t in zip(self.global_, self.total):
                g.copy_((t / weight).float())        # server lr 1.0: the new model is the clients' mean
        return time.perf_counter() - started


def loop_worker(data_dir: str, rounds: int, out: "mp.Queue") -> None:
    loop = PlainLoop(Path(data_dir))
    seconds = [loop.round() for _ in range(rounds)]
    out.put((COHORT * (rounds - 1), sum(seconds[1:])))


def loops(data_dir: Path, rounds: int, n: int) -> float:
    """Summed client updates/s of n plain loops running at once (rounds after the first)."""
    return sum(c / s for c, s in side_by_side(loop_worker, [(str(data_dir), rounds)] * n))


def pfl(python: str, data_dir: Path, rounds: int, workers: int, out: Path, profile: bool = False) -> dict:
    """pfl_worker.py's timings: client updates/s over the rounds after the first, and the phases."""
    path = out / f"pfl-{workers}{'-profile' if profile else ''}.json"
    worker = [str(ROOT / "bench" / "pfl_worker.py"), str(data_dir), "--rounds", str(rounds), "--json", str(path)]
    launcher = [] if workers == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers)]
    cmd = [python, *launcher, *worker, *(["--profile"] if profile else [])]
    print(f"[pfl x{workers}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"[pfl x{workers}] failed with exit code {proc.returncode}\n{proc.stderr[-3000:]}")
    r = json.loads(path.read_text())
    r["clients_per_s"] = r["cohort"] * (len(r["round_s"]) - 1) / sum(r["round_s"][1:])
    return r


def pfl_version(python: str) -> str | None:
    """pfl's version under `python`, or None when that Python has no pfl."""
    if not Path(python).exists():
        return None
    proc = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('pfl'))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def flock_profile(data_dir: Path, rounds: int) -> dict[str, float]:
    """Phases of flock's per-client path: a Shard training users of the job's reader, trainer and model."""
    import numpy as np
    import torch

    import simulator.shard as shard_module
    import trainer.classifier as classifier
    from flock.common.domain import ParamLayout
    from flock.common.memory import keep_freed_memory
    from flock.common.streams import user_seed
    from model.cifar import SimpleCNN
    from reader.arrays import ArrayReader
    from simulator.data_server import MemoryStore
    from simulator.shard import Shard, ring_slots
    from trainer.base import TrainConfig

    keep_freed_memory()          # as a job's ranks do (flock/common/memory.py)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reader = ArrayReader(data_dir)
    spec = reader.spec()
    model = SimpleCNN.build(spec)
    named = dict(model.named_parameters())
    layout = ParamLayout(names=tuple(named), shapes=tuple(tuple(p.shape) for p in named.values()))
    trainer = classifier.ClassifierTrainer(TrainConfig(lr=LOCAL_LR, batch_size=BATCH, max_grad_norm=0.0), spec)
    shard = Shard(model, trainer, layout, (), MemoryStore(), {}, slots=ring_slots(layout.size, 1))   # as -np N has it
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().copy()
    users = reader.index("20200101", "train").users
    phases = Phases()
    for owner, name, phase in ((reader, "load", "reading"), (trainer, "inputs", "data"), (trainer, "train", "training"),
                               (shard, "_load_user", "global parameters in"), (shard.sum, "stage", "accumulate"),
                               (shard.sum, "flush", "accumulate"), (shard_module, "drain", "accumulate"),
                               (classifier, "LocalSGD", "optimizer")):
        phases.wrap(owner, name, phase)
    rng = np.random.default_rng(0)
    delta = np.empty(layout.size)
    for r in range(rounds + 1):
        if r == 1:                                       # the first round is warm-up
            phases.seconds.clear()
            started = time.perf_counter()
        shard.set_global(flat, r)
        for u in rng.choice(len(users), COHORT, replace=False):
            uid = users[int(u)]
            shard.train_user(uid, reader.load("20200101", "train", uid), user_seed(0, r + 1, uid), r + 1)
        weight = shard.sum.weight
        shard_module.drain(delta, [shard.sum], [(weight, flat)])      # the rank's sum n_k (theta_k - theta)
        flat = (flat + delta / weight).astype(np.float32)
    phases.clients = rounds * COHORT
    return {**phases.per_client_ms(), "total": (time.perf_counter() - started) * 1000 / phases.clients}


def loop_profile(data_dir: Path, rounds: int) -> dict[str, float]:
    loop = PlainLoop(data_dir)
    loop.round()
    loop.phases = Phases()
    started = time.perf_counter()
    for _ in range(rounds):
        loop.round()
    return {**loop.phases.per_client_ms(), "total": (time.perf_counter() - started) * 1000 / loop.phases.clients}


def profile_table(data_dir: Path, rounds: int, python: str | None, out: Path) -> list[str]:
    """One client's life in each contestant (wall ms per client, one process, one thread, one after another)."""
    columns = {"plain loop": loop_profile(data_dir, rounds), "flock (Shard)": flock_profile(data_dir, rounds)}
    if python:
        r = pfl(python, data_dir, rounds + 1, 1, out, profile=True)
        clients = r["cohort"] * rounds
        columns["pfl 0.6.0"] = {**{k: v * 1000 / clients for k, v in r["phases_s"].items()},
                                "total": sum(r["round_s"][1:]) * 1000 / clients}
    for c in columns.values():        # the training row: the local steps with their optimizer and tensors
        c["all training"] = c.get("training", 0.0) + c.get("optimizer", 0.0) + c.get("data", 0.0)
    phases = {"global parameters in": "loading the global parameters",
              "reading": "reading the user's samples (pfl: in the rest)",
              "all training": "local training, of which:", "optimizer": "- making the optimizer",
              "data": "- samples to tensors", "delta": "the delta (theta_k - theta)",
              "accumulate": "weighting and accumulation (flock: the rank's sum and its end-of-round pass)"}
    lines = ["| phase (ms per client) | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for phase, label in phases.items():
        lines.append(f"| {label} | " + " | ".join(f"{c.get(phase, 0.0):.2f}" for c in columns.values()) + " |")
    rest = {name: c["total"] - sum(c.get(p, 0.0) for p in phases if p not in ("data", "optimizer")) for name, c in
            columns.items()}
    lines.append("| the rest (checks, sampling, the server step) | " + " | ".join(f"{v:.2f}" for v in rest.values()) + " |")
    lines.append("| **whole client** | " + " | ".join(f"**{c['total']:.2f}**" for c in columns.values()) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="rounds per contestant, the first one warm-up")
    p.add_argument("--pfl-python", default=str(ROOT / ".venv-pfl" / "bin" / "python"),
                   help="a Python with pfl 0.6.0 (see above; without one the pfl rows are left out)")
    p.add_argument("--profile-rounds", type=int, default=3, help="rounds of each one-process profile")
    p.add_argument("--no-profile", action="store_true", help="only the client updates/s and their ratios")
    p.add_argument("--out", default=None, help="the run folder (default runs/pfl-compare-TIME)")
    args = p.parse_args()
    if args.rounds < 2 or args.profile_rounds < 1:
        p.error("--rounds must be at least 2 and --profile-rounds at least 1")
    out = Path(args.out or f"runs/pfl-compare-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = synthetic_cifar(ROOT / "runs" / "pfl-compare-data")
    cores = len(os.sched_getaffinity(0))
    version = pfl_version(args.pfl_python)
    if version is None:
        print(f"[pfl] no pfl under {args.pfl_python}: the pfl rows are left out (see --help)", flush=True)
    rows: dict[str, float] = {}
    rows["loop (1 process)"] = loops(data, args.rounds, 1)
    rows[f"loop_np ({cores} processes at once)"] = loops(data, args.rounds, cores)
    if version:
        rows[f"pfl {version}, 1 process"] = pfl(args.pfl_python, data, args.rounds, 1, out)["clients_per_s"]
        rows[f"pfl {version}, {cores} worker processes (torchrun)"] = pfl(args.pfl_python, data, args.rounds,
                                                                         cores, out)["clients_per_s"]
    rows["flock -np 1 --shards 1"] = project(str(data), args.rounds, 1, out / "np1", *FLOCK_FLAGS, "--shards", "1",
                                             warmup=1)["clients_per_s"]
    rows[f"flock -np {cores}"] = project(str(data), args.rounds, cores, out / f"np{cores}", *FLOCK_FLAGS,
                                         warmup=1)["clients_per_s"]
    loop1, loopn = rows["loop (1 process)"], rows[f"loop_np ({cores} processes at once)"]
    ratios = [("flock -np 1 --shards 1 / loop (one process each)", rows["flock -np 1 --shards 1"] / loop1),
              (f"flock -np {cores} / loop_np", rows[f"flock -np {cores}"] / loopn)]
    if version:
        pfl1, pfln = rows[f"pfl {version}, 1 process"], rows[f"pfl {version}, {cores} worker processes (torchrun)"]
        ratios += [(f"**flock -np {cores} / pfl with {cores} workers**", rows[f"flock -np {cores}"] / pfln),
                   ("flock -np 1 --shards 1 / pfl with 1 process", rows["flock -np 1 --shards 1"] / pfl1),
                   ("pfl 1 process / loop", pfl1 / loop1), (f"pfl {cores} workers / loop_np", pfln / loopn)]
    command = f"python bench/pfl_compare.py --rounds {args.rounds} --profile-rounds {args.profile_rounds}"
    lines = [f"# flock and pfl-research on pfl's CIFAR-10 benchmark setting ({args.rounds} rounds of {COHORT}, "
             "the first one excluded)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {cores} cores; "
             f"torch {__import__('torch').__version__}, one thread per process",
             f"- command: `{command}`" + ("" if version else " (no pfl installed: its rows are missing)"),
             f"- data: {USERS} users x {PER_USER} synthetic 3 x 32 x 32 images; simple_cnn (1,626,442 parameters); "
             f"cohort {COHORT}, 1 epoch, batch {BATCH}, local lr {LOCAL_LR}, central lr 1.0", "",
             "| contestant | client updates/s |", "|---|---:|", *[f"| {k} | {v:.2f} |" for k, v in rows.items()], "",
             "| ratio | value |", "|---|---:|", *[f"| {k} | {v:.3f} |" for k, v in ratios]]
    if not args.no_profile:
        lines += ["", f"One client's life (wall ms per client over {args.profile_rounds} rounds of {COHORT} after "
                  "a warm-up round, one process each, one after another):", "",
                  *profile_table(data, args.profile_rounds, args.pfl_python if version else None, out)]
    write_table(out, lines)


if __name__ == "__main__":
    main()
