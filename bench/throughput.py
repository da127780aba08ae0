"""Throughput of the simulator against the plain-PyTorch floor, on the LM benchmark's data, model and
hyper-parameters (one run, ratios printed at the end).

    python bench/throughput.py [DATA_DIR] [--rounds 10] [--out DIR]

- floor: one process, one torch thread, no FL machinery: for each sampled user load the global weights
  into one model, train locally (the same trainer code), add the weighted delta, apply the server step.
- floor_np: N such floors side by side (one per core), summed throughput: the real ceiling for N ranks.
- project: client updates per second of `mpirun -np N python application.py` over its training rounds
  (the scheduler's round times; start-up and evaluation excluded; start-up reported separately).
- overhead: a default-sized model with users holding one sequence each: the round time is then the fixed
  cost (plan, parameter fetch and push, aggregation).
- fetch: GetParams of the 24.7 MB model over loopback gRPC, MB/s.
Every variant trains the same users (the same seeded sampler).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

from launch import ROOT, app_command, run


def floor_worker(data_dir: str, rounds: int, seed: int, out: "mp.Queue") -> None:
    from floor import PlainFedAvg
    from scheduler.sampling import sample_clients

    floor = PlainFedAvg(Path(data_dir))
    started, clients = time.perf_counter(), 0
    for r in range(rounds):
        users = sample_clients(seed, r, floor.users, 10)
        floor.round(users)
        clients += len(users)
    out.put((clients, time.perf_counter() - started))


def floors(data_dir: str, rounds: int, n: int) -> float:
    """Summed client updates/s of n floor processes running at once (all with seed 0: the same users)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=floor_worker, args=(data_dir, rounds, 0, q)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(c / s for c, s in results)


def project(data_dir: str, rounds: int, np_: int, run_dir: Path, *extra: str) -> tuple[float, float, float]:
    """(client updates/s over the training rounds, mean round seconds, start-up seconds) of a real job."""
    launched = time.time()
    run(app_command(np_, data_dir, "--rounds", str(rounds), "--eval-every", "0", "--eval-users", "1",
                    "--checkpoint-every", "0", "--run-dir", str(run_dir), *extra), f"project -np {np_}", quiet=True)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    seconds = sum(r["seconds"] for r in train)
    startup = train[0]["time"] - train[0]["seconds"] - launched
    return sum(r["clients"] for r in train) / seconds, seconds / len(train), startup


def tiny_users_data(out: Path, vocab_from: Path) -> Path:
    """The same vocabulary (so the same 24.7 MB model) with 200 users of one short comment each."""
    from reader.leaf_format import write_day

    if out.exists():
        return out
    out.mkdir(parents=True)
    users = {f"u{i:03d}": [(0, ["hello", "there"])] for i in range(200)}
    write_day(out, "20200101", "train", users)
    write_day(out, "20200102", "test", users)
    (out / "vocab.json").write_bytes((vocab_from / "vocab.json").read_bytes())
    return out


def fetch_mb_per_s(repeats: int = 8) -> float:
    import numpy as np

    from common.domain import ParamLayout
    from reader.leaf import LeafRedditReader
    from scheduler.client import SchedulerClient
    from scheduler.optim import make_server_optimizer
    from scheduler.server import create_server
    from scheduler.state import Scheduler, SchedulerConfig

    data = ROOT / "runs" / "throughput-tiny"
    scheduler = Scheduler(SchedulerConfig(world_size=1, rounds=1, clients_per_round=1), reader=LeafRedditReader(data),
                          optimizer=make_server_optimizer("fedavg", server_lr=1.0), train_ratios={}, eval_ratios={})
    server, port = create_server("127.0.0.1:0", scheduler, run_id="bench", token="t")
    layout = ParamLayout(names=("w",), shapes=((6_182_672,),))
    scheduler.init_params(layout, np.zeros(layout.size, dtype=np.float32))
    client = SchedulerClient(f"127.0.0.1:{port}", rank=0, world_size=1, token="t")
    started = time.perf_counter()
    for _ in range(repeats):
        client._cached = None
        client.get_params(0)
    elapsed = time.perf_counter() - started
    server.stop(grace=None)
    return repeats * layout.size * 4 / 1e6 / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default="lm_data")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/throughput-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    tiny = tiny_users_data(ROOT / "runs" / "throughput-tiny", Path(args.data_dir))
    rows = {}
    rows["floor (1 process)"] = floors(args.data_dir, args.rounds, 1)
    rows[f"floor_np ({cores} processes)"] = floors(args.data_dir, args.rounds, cores)
    p1, round1, start1 = project(args.data_dir, args.rounds, 1, out / "np1")
    pn, roundn, startn = project(args.data_dir, args.rounds, cores, out / f"np{cores}")
    rows["project -np 1"], rows[f"project -np {cores}"] = p1, pn
    _, overhead_round, _ = project(str(tiny), args.rounds, cores, out / "overhead")
    fetch = fetch_mb_per_s()
    floor1, floorn = rows["floor (1 process)"], rows[f"floor_np ({cores} processes)"]
    lines = [f"# Throughput, LM benchmark setting ({args.rounds} rounds of 10 users)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {cores} cores",
             f"- command: `python bench/throughput.py {args.data_dir} --rounds {args.rounds}`", "",
             "| variant | client updates/s |", "|---|---:|", *[f"| {k} | {v:.3f} |" for k, v in rows.items()], "",
             "| ratio | value |", "|---|---:|",
             f"| project -np 1 / floor | {p1 / floor1:.3f} |",
             f"| project -np {cores} / floor_np | {pn / floorn:.3f} |",
             f"| fixed per-round overhead / default round (-np {cores}) | {overhead_round / roundn:.3f} "
             f"({overhead_round * 1000:.0f} ms of {roundn * 1000:.0f} ms) |",
             f"| parameter fetch, 24.7 MB over loopback gRPC | {fetch:.0f} MB/s |",
             f"| start-up, -np 1 / -np {cores} | {start1:.2f} s / {startn:.2f} s |"]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
