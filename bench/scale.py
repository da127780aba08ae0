"""Scale: LEAF Reddit's whole population (1,660,820 users) on one machine, every user with private state.

    python bench/scale.py [--users 10000,100000,1660820] [--clients 10,1000] [--rounds 3] [--np 2]
                          [--root /tmp/reddit_scale] [--rebuild-cache] [--out bench/results/scale_reddit.md]
    python bench/scale.py --resume-check [--users 1660820] [--clients 100] [--rounds 4] [--kill-after 2]

Data: `bench/reddit_scale_data.py` (seed 0), generated into ROOT/data-N when missing; its binary cache is
built by `python -m reader.leaf` (what rank 0 does at a job's first start), timed once per data set
(ROOT/cache-N.json; `--rebuild-cache` times it again). Model: `lstm-personal`, FL-mobile's LSTM with a
private 256-float vector per user. The ranks' SQLite stores start with every user's vector (as after a
long run: 1 KB a user, each on its home rank), copied from ROOT/private-N-npP for each run, so every
sampled user reads and writes its own state.

Measured per (users, clients per round): start-up (from launching mpirun to the first round's start: the
first train record's `time - seconds`), peak RSS per rank (resources.json), the mean round time over all
rounds but the first, the slowest rank's work on its users (metrics.jsonl's rank_work_s: training plus
reading and writing each user's private vector) and the round's overhead beyond it (plan, parameter
fetch and push, aggregation), and the disk of data, cache and private state.

`--resume-check`: a run of `--rounds` rounds with a checkpoint after every round, and the same run killed
(SIGKILL to the whole job) once `--kill-after` rounds are recorded, then resumed with `--resume`: both must
end with the same metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from launch import ROOT, app_command, run

from flock.common.domain import home_rank
from flock.common.recorder import read_metrics
from reader.leaf import CACHE_DIR, LeafRedditReader
from simulator.data_server import SQLiteStore, _flatten

PRIVATE = {"personal": np.zeros(256, dtype=np.float32)}
COMPARED = ("loss", "samples", "clients", "top1", "top1_user_mean", "tokens", "users")


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def ensure_data(root: Path, users: int) -> Path:
    data = root / f"data-{users}"
    if not data.exists():
        run([sys.executable, str(ROOT / "bench" / "reddit_scale_data.py"), str(data), "--users", str(users), "--quiet"],
            f"data {users}", quiet=True)
    return data


def ensure_cache(root: Path, data: Path, users: int, rebuild: bool) -> dict:
    """The data's cache, built by `python -m reader.leaf` (timed, with its peak RSS) unless it was already."""
    record = root / f"cache-{users}.json"
    if rebuild or not record.exists() or not (data / CACHE_DIR).exists():
        shutil.rmtree(data / CACHE_DIR, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "reader.leaf", str(data)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            sys.exit(f"cache build failed:\n{proc.stderr[-3000:]}")
        record.write_text(proc.stdout.strip().splitlines()[-1])
    return json.loads(record.read_text())


def ensure_private(root: Path, data: Path, users: int, world: int) -> tuple[Path, float]:
    """ROOT/private-N-npP: every user's private vector at round 0 in its home rank's store."""
    folder = root / f"private-{users}-np{world}"
    done = folder / "populated.json"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        uids = list(LeafRedditReader(data).index("20200101", "train").users)
        layout, blob = _flatten(PRIVATE)
        for rank in range(world):
            store = SQLiteStore(folder / f"rank{rank}.sqlite")
            conn = store._conn()
            with conn:
                conn.executemany("INSERT INTO private (uid, round, layout, data) VALUES (?, 0, ?, ?)",
                                 ((u, layout, blob) for u in uids if home_rank(u, world) == rank))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            store.close()
        done.write_text(json.dumps({"users": len(uids), "seconds": round(time.perf_counter() - started, 1)}))
    return folder, json.loads(done.read_text())["seconds"]


def app_args(data: Path, run_dir: Path, clients: int, rounds: int, *extra: str) -> list[str]:
    return [str(data), "--model", "lstm-personal", "--data-server", "sqlite", "--clients-per-round", str(clients),
            "--rounds", str(rounds), "--eval-every", "0", "--eval-users", "200", "--run-dir", str(run_dir), *extra]


def fresh_run_dir(run_dir: Path, private: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "private").mkdir(parents=True)
    for db in private.glob("*.sqlite"):
        shutil.copyfile(db, run_dir / "private" / db.name)
    os.sync()       # the copy's write-back must not slow the job that is measured next


def measure(data: Path, private: Path, run_dir: Path, *, users: int, clients: int, rounds: int, world: int) -> dict:
    fresh_run_dir(run_dir, private)
    launched = time.time()
    wall = run(app_command(world, *app_args(data, run_dir, clients, rounds, "--checkpoint-every", "0", "--quiet")),
               f"{users} users, {clients} clients", quiet=True)
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    later = train[1:] or train
    round_s = sum(r["seconds"] for r in later) / len(later)
    slowest = sum(max(r["rank_work_s"]) for r in later) / len(later)
    return {"users": users, "clients": clients, "rounds": rounds, "wall_s": wall,
            "startup_s": train[0]["time"] - train[0]["seconds"] - launched,
            "first_round_s": train[0]["seconds"], "round_s": round_s, "slowest_rank_s": slowest,
            "overhead_s": round_s - slowest,
            "peak_rss_mb": json.loads((run_dir / "resources.json").read_text())["peak_rss_mb"],
            "private_bytes": disk_bytes(run_dir / "private")}


def table(results: list[dict], caches: dict, data_bytes: dict, populate: dict, args) -> list[str]:
    lines = ["# Scale: LEAF Reddit's 1,660,820 users on one machine, every user with private state", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; {platform.machine()}, {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; command: "
             f"`python bench/scale.py --users {args.users} --clients {args.clients} --rounds {args.rounds} "
             f"--short-rounds {args.short_rounds} --np {args.np}`",
             "- data: `bench/reddit_scale_data.py` (Zipf(2.3) comments per user capped at 1,000, mean 2.5; "
             "two days; 10,000 words); model `lstm-personal` (24.7 MB shared, 256 private floats a user, "
             "SQLite stores holding every user); `--eval-users 200`; means over rounds 2.. of each run (runs of "
             f"{args.rounds} rounds, {args.short_rounds} with fewer than 100 clients a round)", "",
             "| users | clients/round | cache build | start-up | peak RSS rank 0 / 1 | round | slowest rank's "
             "work | overhead (round - slowest rank) | data / cache / private on disk |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        n = r["users"]
        c = caches[n]
        lines.append(
            f"| {n:,} | {r['clients']:,} | {c['seconds']:.0f} s ({c['peak_rss_mb']:,} MB) | {r['startup_s']:.1f} s | "
            f"{' / '.join(f'{m:,.0f}' for m in r['peak_rss_mb'])} MB | {r['round_s']:.2f} s | "
            f"{r['slowest_rank_s']:.2f} s | {r['overhead_s'] * 1000:.0f} ms ({r['overhead_s'] / r['round_s']:.1%}) | "
            f"{data_bytes[n]['data'] / 1e9:.2f} / {data_bytes[n]['cache'] / 1e9:.2f} / {r['private_bytes'] / 1e9:.2f} GB |")
    lines += ["", "Cache build: `python -m reader.leaf DATA` once per data set (its peak RSS in brackets); "
              "private stores populated with every user's vector in "
              + ", ".join(f"{s:.0f} s ({n:,} users)" for n, s in populate.items()) + "."]
    return lines


def trained_state(db: Path) -> list[tuple]:
    """A store's versions written by training (round > 0: the populated round-0 vectors left out)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT uid, round, data FROM private WHERE round > 0 ORDER BY uid, round").fetchall()
    finally:
        conn.close()


def resume_check(args, root: Path) -> None:
    users = int(args.users.split(",")[-1])
    clients = int(args.clients.split(",")[0])
    data = ensure_data(root, users)
    ensure_cache(root, data, users, False)
    private, _ = ensure_private(root, data, users, args.np)
    extra = ("--checkpoint-every", "1", "--quiet")
    whole, cut = root / "runs" / "resume-whole", root / "runs" / "resume-cut"
    fresh_run_dir(whole, private)
    run(app_command(args.np, *app_args(data, whole, clients, args.rounds, *extra)), "uninterrupted", quiet=True)
    fresh_run_dir(cut, private)
    job = subprocess.Popen(app_command(args.np, *app_args(data, cut, clients, args.rounds, *extra)), cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    while job.poll() is None:
        done = read_metrics(cut) if (cut / "metrics.jsonl").exists() else []
        if len([r for r in done if r["kind"] == "train"]) >= args.kill_after:
            break
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(60)
    killed_at = len([r for r in read_metrics(cut) if r["kind"] == "train"])
    resumed_s = run(app_command(args.np, str(data), "--resume", str(cut), "--quiet"), "resumed", quiet=True)
    a, b = read_metrics(whole), read_metrics(cut)
    same = [(r["kind"], r["round"]) for r in a] == [(r["kind"], r["round"]) for r in b] and all(
        np.isclose(x[k], y[k], rtol=1e-6, atol=0) for x, y in zip(a, b) for k in COMPARED if k in x)
    final = {k: v for k, v in a[-1].items() if k in COMPARED}
    stores = [[trained_state(run_dir / "private" / f"rank{r}.sqlite") for run_dir in (whole, cut)] for r in range(args.np)]
    same_state = all(x == y for x, y in stores)
    lines = ["", f"## Kill and resume at {users:,} users ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"`python bench/scale.py --resume-check --users {users} --clients {clients} --rounds {args.rounds} "
             f"--kill-after {args.kill_after} --np {args.np}`: {args.rounds} rounds of {clients} clients, a "
             f"checkpoint (and a pruning commit of every rank's private store) after each round; the job was "
             f"killed with SIGKILL after {killed_at} recorded rounds and resumed with `--resume` ({resumed_s:.0f} s).",
             "", f"- uninterrupted final evaluation: {json.dumps(final)}",
             f"- resumed final evaluation:       {json.dumps({k: v for k, v in b[-1].items() if k in COMPARED})}",
             f"- every record's {', '.join(COMPARED)} equal (rtol 1e-6): **{'yes' if same else 'NO'}**",
             f"- the private vectors of the {sum(len(x) for x, _ in stores):,} (user, round) versions written by "
             f"training, after pruning, bit for bit: **{'equal' if same_state else 'DIFFERENT'}**",
             f"- private stores after the run: {disk_bytes(whole / 'private') / 1e9:.2f} GB (uninterrupted), "
             f"{disk_bytes(cut / 'private') / 1e9:.2f} GB (resumed)"]
    append_section(Path(args.out), lines)
    if not (same and same_state):
        sys.exit("the resumed run differs from the uninterrupted one")


def sampling_times(root: Path, populations: list[int], out: Path) -> None:
    """Milliseconds per round of the samplers at each population (in this process, from the caches):
    neither scans the population, so the columns should stay flat."""
    from scheduler.phones.availability import RoundProbability
    from scheduler.phones.selection import select_online
    from scheduler.sampling import evaluation_users, sample_clients

    online = RoundProbability(seed=0, probability=0.3)
    rows = []
    for users in populations:
        reader = LeafRedditReader(ensure_data(root, users))
        eligible = reader.index("20200101", "train").with_samples()
        test = reader.index("20200102", "test").with_samples()
        timed = []
        for draw in (lambda r, e=eligible: sample_clients(0, r, e, 10),
                     lambda r, e=eligible: sample_clients(0, r, e, 1000),
                     lambda r, e=eligible: select_online(e, 1000, seed=0, purpose="sync", index=r, t=0.0,
                                                         availability=online),
                     lambda r, e=test: evaluation_users(r, e, 200)):
            started = time.perf_counter()
            for r in range(5):
                draw(r)
            timed.append((time.perf_counter() - started) / 5 * 1000)
        rows.append(f"| {users:,} | " + " | ".join(f"{t:.1f} ms" for t in timed) + " |")
    lines = ["", f"## Sampling per round ({time.strftime('%Y-%m-%d %H:%M')}, `python bench/scale.py --sampling`)", "",
             "| users | uniform, 10 clients | uniform, 1,000 clients | 1,000 on-line phones (`round:0.3`) | "
             "200 evaluation users |", "|---:|---:|---:|---:|---:|", *rows]
    append_section(out, lines)


def append_section(out: Path, lines: list[str]) -> None:
    """Prints a section and appends it to the results file (when the table is there)."""
    print("\n".join(lines))
    if out.exists():
        out.write_text(out.read_text() + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="10000,100000,1660820")
    p.add_argument("--clients", default="10,1000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--short-rounds", type=int, default=10,
                   help="rounds of the runs with fewer than 100 clients a round (short rounds: a steadier mean)")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--root", default="/tmp/reddit_scale")
    p.add_argument("--rebuild-cache", action="store_true")
    p.add_argument("--resume-check", action="store_true")
    p.add_argument("--kill-after", type=int, default=2)
    p.add_argument("--sampling", action="store_true", help="time the samplers at each population")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_reddit.md"))
    args = p.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.resume_check:
        resume_check(args, root)
        return
    if args.sampling:
        sampling_times(root, [int(u) for u in args.users.split(",")], Path(args.out))
        return
    results, caches, data_bytes, populate = [], {}, {}, {}
    for users in (int(u) for u in args.users.split(",")):
        data = ensure_data(root, users)
        caches[users] = ensure_cache(root, data, users, args.rebuild_cache)
        private, populate[users] = ensure_private(root, data, users, args.np)
        data_bytes[users] = {"data": sum(f.stat().st_size for f in data.rglob("*.json")),
                             "cache": disk_bytes(data / CACHE_DIR)}
        for clients in (int(c) for c in args.clients.split(",")):
            rounds = args.rounds if clients >= 100 else args.short_rounds
            results.append(measure(data, private, root / "runs" / f"{users}-{clients}", users=users, clients=clients,
                                   rounds=rounds, world=args.np))
            print(json.dumps(results[-1]), flush=True)
    (root / "scale_results.json").write_text(json.dumps(results, indent=1))
    text = "\n".join(table(results, caches, data_bytes, populate, args)) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
