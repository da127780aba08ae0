"""Scale: 100,000 users that each hold a private output bias (10,000 floats) in the ranks' SQLite data
servers, 1,000 clients sampled per round; peak resident memory per rank and per-round overhead.

    python bench/scale.py [--users 100000] [--clients 1000] [--rounds 2] [--np 2] [--out DIR]

Data: synthetic LEAF Reddit users with two short comments each (words drawn from the built-in corpus's
vocabulary, so the model is the full 24.7 MB LSTM). The private stores start populated for every user
(as after a long run: 100,000 x 40 KB = 4 GB of SQLite over the ranks, each user on its home rank), so
every sampled user reads and writes its own bias. The per-round overhead is the round time minus the
slowest rank's work on its users (metrics.jsonl's rank_work_s: training plus reading and writing each
user's private bias): plan, parameter fetch and push, aggregation.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from launch import ROOT, app_command, run, write_table

from common.domain import home_rank
from common.recorder import read_metrics
from reader.leaf_format import write_day
from simulator.data_server import SQLiteStore


def make_data(out: Path, users: int, vocab_from: Path) -> Path:
    if out.exists():
        return out
    vocab = json.loads((vocab_from / "vocab.json").read_text())
    words = [w for w in vocab["vocab"] if not w.startswith("<")][:5000]
    rng = random.Random(0)
    train = {f"u{i:06d}": [(t, rng.choices(words, k=rng.randint(3, 8))) for t in range(2)] for i in range(users)}
    test = {u: [(2, rng.choices(words, k=5))] for u in train}
    tmp = out.with_name(out.name + ".tmp")
    write_day(tmp, "20200101", "train", train)
    write_day(tmp, "20200102", "test", test)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    tmp.rename(out)
    return out


def populate(run_dir: Path, users: int, world: int, size: int) -> float:
    started = time.perf_counter()
    stores = [SQLiteStore(run_dir / "private" / f"rank{r}.sqlite") for r in range(world)]
    bias = np.zeros(size, dtype=np.float32)
    for r, store in enumerate(stores):
        conn = store._conn()
        layout = json.dumps([["decoder.bias", [size]]])
        blob = bias.tobytes()
        with conn:
            conn.executemany("INSERT OR REPLACE INTO private (uid, round, layout, data) VALUES (?, 0, ?, ?)",
                             ((f"u{i:06d}", layout, blob) for i in range(users) if home_rank(f"u{i:06d}", world) == r))
        store.close()
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/scale-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    data = make_data(ROOT / "runs" / f"scale-data-{args.users}", args.users, ROOT / "lm_data")
    populate_s = populate(out, args.users, args.np, 10_000)
    store_gb = sum(f.stat().st_size for f in (out / "private").glob("*.sqlite*")) / 1e9
    wall = run(app_command(args.np, str(data), "--private", "decoder.bias", "--data-server", "sqlite",
                           "--clients-per-round", str(args.clients), "--rounds", str(args.rounds), "--eval-every", "0",
                           "--eval-users", "200", "--checkpoint-every", "0", "--run-dir", str(out)), "scale")
    records = read_metrics(out)
    rounds = [r for r in records if r["kind"] == "train"]
    peak = json.loads((out / "resources.json").read_text())["peak_rss_mb"]
    round_s = sum(r["seconds"] for r in rounds) / len(rounds)
    slowest = sum(max(r["rank_work_s"]) for r in rounds) / len(rounds)
    work = sum(sum(r["rank_work_s"]) for r in rounds) / len(rounds)
    lines = [f"# Scale: {args.users:,} users with private parameters, {args.clients:,} clients per round", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; 2-core x86_64; command: `python bench/scale.py "
             f"--users {args.users} --clients {args.clients} --rounds {args.rounds} --np {args.np}`",
             f"- private stores: {store_gb:.2f} GB of SQLite over {args.np} ranks, populated in {populate_s:.0f} s", "",
             "| measure | value |", "|---|---:|",
             f"| peak resident memory per rank | {', '.join(f'rank {i}: {m:.0f} MB' for i, m in enumerate(peak))} |",
             f"| round time ({args.clients} clients, -np {args.np}) | {round_s:.2f} s |",
             f"| slowest rank's work on its users (training, private bias read and written) | {slowest:.2f} s "
             f"({work / args.clients * 1000:.1f} ms a user, summed over ranks) |",
             f"| per-round overhead: round - slowest rank's work | {(round_s - slowest) * 1000:.0f} ms "
             f"({(round_s - slowest) / round_s:.1%} of the round) |",
             f"| whole job, including start-up and a 200-user evaluation | {wall:.0f} s |"]
    write_table(out, lines)


if __name__ == "__main__":
    main()
