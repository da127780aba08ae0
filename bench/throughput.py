"""Throughput of the simulator against the plain-PyTorch floor and Flower, on the LM benchmark's data,
model and hyper-parameters (one run, ratios printed at the end).

    python bench/throughput.py [DATA_DIR] [--rounds 10] [--out DIR]
    python bench/throughput.py [DATA_DIR] --rounds 30 --tiny-only        users of one sequence each, against Flower
    python bench/throughput.py [DATA_DIR] --async-only [--async-buffer 10] [--async-concurrency 20]

- floor: one process, one torch thread, no FL machinery: for each sampled user load the global weights
  into one model, train locally (the same trainer code), add the weighted delta, apply the server step.
- floor_np: N such floors side by side (one per core), summed throughput: the ceiling for N ranks if every
  round's work split evenly over the ranks.
- project: client updates per second of `mpirun -np N python application.py` over its training rounds
  (the scheduler's step times, which cover everything from one aggregation to the next; start-up and
  evaluation excluded; start-up reported separately).
- Flower: the same workload in Flower's simulation engine (bench/flower_lm.py; Ray, 1 CPU per virtual
  client), when the optional extra is installed; also on the users of one sequence each, where the
  per-client cost of moving the 24.7 MB model dominates.
- balance: a synchronous round lasts as long as its slowest rank; sum of mean rank work / sum of slowest
  rank work (from metrics.jsonl's rank_work_s) is the share of floor_np that even a zero-cost simulator
  could reach with these users (one user's training cannot be split).
- dependency bound (asynchronous mode): a task can start only once the model version it starts from exists,
  and a version only once all its K updates are in, so one long task holds up the next versions; the busy
  share of an ideal, zero-cost list schedule of the run's tasks on N workers (duration = the user's samples,
  the ranks' rule of taking tasks of at most `scheduler.phones.asynchronous.HORIZON` updates ahead) is the
  asynchronous analogue of balance.
  It rises with the concurrency C: more tasks in flight, more work that does not wait.
- balanced users: the same with every user cut to its first 15 comments (users with fewer left out), so
  that rounds split evenly: the simulator's own parallel efficiency.
- overhead: round time minus the slowest rank's work (plan, parameter fetch and push, aggregation, server
  step), in the default rounds, and in rounds of users holding one sequence each (the default-sized model).
- fetch: GetParams of the 24.7 MB model over loopback gRPC from another process, MB/s: the first fetch of
  a version (the scheduler serializes it) and the next ranks' fetches (served from those bytes): the path of
  `--data-plane grpc` and of a scheduler outside the job. (By default the ranks of a job get the parameters
  through node-shared memory, and the rank that hosts the scheduler calls it in-process.)
Every variant trains the same users (the same seeded sampler).
"""
from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from launch import ROOT, app_command, run, side_by_side, write_table

from flock.common.recorder import read_metrics


def floor_worker(data_dir: str, rounds: int, seed: int, clients_per_round: int, warmup: int,
                 given: list[list[str]] | None, out: "mp.Queue") -> None:
    from floor import PlainFedAvg

    from scheduler.sampling import sample_clients

    floor = PlainFedAvg(Path(data_dir))
    seconds, clients = 0.0, 0
    for r in range(rounds):
        users = given[r] if given else sample_clients(seed, r, floor.users, clients_per_round)
        started = time.perf_counter()
        floor.round(users)
        if r >= warmup:
            seconds += time.perf_counter() - started
            clients += len(users)
    out.put((clients, seconds))


def floors(data_dir: str, rounds: int, n: int, clients_per_round: int = 10, warmup: int = 0,
           given: list[list[str]] | None = None) -> float:
    """Summed client updates/s of n floor processes running at once (all with seed 0: the same users, or the
    rounds of users `given`), over the rounds after the first `warmup`."""
    results = side_by_side(floor_worker, [(data_dir, rounds, 0, clients_per_round, warmup, given)] * n)
    return sum(c / s for c, s in results)


def project(data_dir: str, rounds: int, np_: int, run_dir: Path, *extra: str, warmup: int = 0) -> dict:
    """A real job's client updates/s over its training rounds (after the first `warmup`), mean round seconds,
    start-up seconds, and from the ranks' work times: the overhead (round minus slowest rank; mean and
    median) and the balance bound."""
    launched = time.time()
    run(app_command(np_, data_dir, "--rounds", str(rounds), "--eval-every", "0", "--eval-users", "1",
                    "--checkpoint-every", "0", "--run-dir", str(run_dir), *extra), f"project -np {np_}", quiet=True)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    startup_s = train[0]["time"] - train[0]["seconds"] - launched
    train = train[warmup:]
    seconds = sum(r["seconds"] for r in train)
    slowest = sum(max(r["rank_work_s"]) for r in train)
    mean_work = sum(sum(r["rank_work_s"]) / len(r["rank_work_s"]) for r in train)
    return {"clients_per_s": sum(r["clients"] for r in train) / seconds, "round_s": seconds / len(train),
            "startup_s": startup_s, "overhead_s": (seconds - slowest) / len(train),
            "overhead_median_s": statistics.median(r["seconds"] - max(r["rank_work_s"]) for r in train),
            "balance": mean_work / slowest,
            "busy": sum(sum(r["rank_work_s"]) for r in train) / (np_ * seconds)}


def async_users(data_dir: str, updates: int, buffer: int, concurrency: int, shared_params: int = 6_182_672):
    """The users an asynchronous run (seed 0, built-in phones, always on-line) trains for each of its server
    updates: the same tasks, computed by the scheduler's own schedule, for the floor to train."""
    from reader.leaf import LeafRedditReader
    from scheduler.phones.asynchronous import AsyncRounds
    from scheduler.phones.availability import AlwaysOn
    from scheduler.phones.clock import model_bytes
    from scheduler.phones.devices import profiles_from_option
    from scheduler.phones.fedbuff import AsyncConfig
    from scheduler.phones.rounds import PhoneRounds

    index = LeafRedditReader(Path(data_dir)).index("20200101", "train")
    counts = index.count_of()
    size = model_bytes(shared_params)
    plan = AsyncRounds(phones=PhoneRounds(profiles=profiles_from_option("builtin", 0), availability=AlwaysOn(), seed=0),
                       config=AsyncConfig(concurrency=concurrency, buffer_size=buffer),
                       population=[u for u in index.users if counts[u]], counts=counts, rounds=updates,
                       bytes_down=size, bytes_up=size)
    by_target: dict[int, list[str]] = {}
    tasks = []
    for v in range(updates):
        for task in plan.tasks_at(v):
            by_target.setdefault(task.target, []).append(task.uid)
            if task.target <= updates:
                tasks.append((plan.handout_version(task), task.target, counts[task.uid]))
        plan.record(v + 1)
    return [by_target[v] for v in range(1, updates + 1)], tasks


def dependency_bound(tasks: list[tuple[int, int, int]], workers: int, lookahead: int) -> float:
    """The asynchronous analogue of the balance bound: busy / (workers x makespan) of an ideal list schedule
    with no overhead, where a task (handout version, target, duration = its samples) can start once its
    handout version exists, version t exists once every task of target t is done, and a free worker takes the
    task of the earliest target among those of targets <= version + `lookahead` (the ranks' rule)."""
    need: dict[int, int] = {}
    for _, target, _ in tasks:
        need[target] = need.get(target, 0) + 1
    pending = sorted(tasks, key=lambda t: (t[1], t[0]))
    running: list[tuple[float, int]] = []
    done: dict[int, int] = {}
    version, now, free, busy = 0, 0.0, workers, 0.0
    while pending or running:
        while free:
            task = next((t for t in pending if t[0] <= version and t[1] <= version + lookahead), None)
            if task is None:
                break
            pending.remove(task)
            heapq.heappush(running, (now + task[2], task[1]))
            free, busy = free - 1, busy + task[2]
        if not running:
            break
        now, target = heapq.heappop(running)
        free, done[target] = free + 1, done.get(target, 0) + 1
        while done.get(version + 1, 0) == need.get(version + 1, -1):
            version += 1
    return busy / (workers * now)


def flower(data_dir: str, rounds: int, out: Path, name: str = "flower") -> dict | None:
    """bench/flower_lm.py's result, or None when flwr is not installed."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        print("[flower] flwr is not installed (pip install -r requirements-extras.txt): no Flower row")
        return None
    path = out / f"{name}.json"
    run([sys.executable, str(ROOT / "bench" / "flower_lm.py"), data_dir, "--rounds", str(rounds), "--json", str(path)],
        name, quiet=True)
    return json.loads(path.read_text())


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


def serve_params(data_dir: str, versions: int, ports: "mp.Queue", stop) -> None:
    """A scheduler holding a 24.7 MB parameter vector, in its own process (as rank 0 serves rank 1)."""
    import numpy as np

    from flock.common.domain import ParamLayout
    from reader.leaf import LeafRedditReader
    from scheduler.optim import make_server_optimizer
    from scheduler.server import create_server
    from scheduler.state import Scheduler, SchedulerConfig

    scheduler = Scheduler(SchedulerConfig(world_size=1, rounds=versions, clients_per_round=1, eval_every=0),
                          reader=LeafRedditReader(Path(data_dir)),
                          optimizer=make_server_optimizer("fedavg", server_lr=1.0), train_ratios={}, eval_ratios={})
    server, port = create_server("127.0.0.1:0", scheduler, run_id="bench", token="t")
    layout = ParamLayout(names=("w",), shapes=((6_182_672,),))
    scheduler.init_params(layout, np.zeros(layout.size, dtype=np.float32))
    ports.put(port)
    stop.wait()
    server.stop(grace=None)


def balanced_data(out: Path, data_dir: Path, comments: int = 15) -> Path:
    """The LM data with every user cut to its first `comments` comments (users with fewer dropped): the
    same model and trainer, but rounds that split evenly over the ranks."""
    if out.exists():
        return out
    train = json.loads((data_dir / "20200101" / "train_data.json").read_text())
    keep = [u for u, n in zip(train["users"], train["num_samples"]) if n >= comments]
    doc = {"users": keep, "num_samples": [comments] * len(keep),
           "user_data": {u: {k: v[:comments] for k, v in train["user_data"][u].items()} for u in keep}}
    (out / "20200101").mkdir(parents=True)
    (out / "20200101" / "train_data.json").write_text(json.dumps(doc))
    for name in ("20200102/test_data.json", "vocab.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes((data_dir / name).read_bytes())
    return out


def fetch_mb_per_s(data_dir: str, versions: int = 8) -> tuple[float, float]:
    """Median MB/s of (the first fetch of each new version, which the scheduler serializes; a second
    fetch of it, as the next ranks get it), client and server in two processes, on a warm channel."""
    import numpy as np

    from flock.common.domain import RankUpdate
    from scheduler.client import SchedulerClient

    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve_params, args=(data_dir, versions + 1, ports, stop))
    server.start()
    client = SchedulerClient(f"127.0.0.1:{ports.get()}", rank=0, world_size=1, token="t")
    first, next_ = [], []
    for step in range(versions + 1):
        plan = client.get_plan(step, 30)
        for times in (first, next_):
            client._cached = None
            started = time.perf_counter()
            _, flat = client.get_params(plan.version)
            times.append(time.perf_counter() - started)
        client.push_update(RankUpdate(step=step, rank=0, weight=0.0, delta_sum=np.zeros(0)))   # a new version
    stop.set()
    server.join()
    mb = flat.size * 4 / 1e6
    return mb / statistics.median(first[1:]), mb / statistics.median(next_[1:])   # [0]: the channel warms up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default="lm_data")
    p.add_argument("--rounds", type=int, default=10, help="rounds (server updates) of every variant")
    p.add_argument("--out", default=None, help="the run folder (default runs/throughput-TIME)")
    p.add_argument("--async-only", action="store_true", help="only the floors, Flower and the asynchronous rows")
    p.add_argument("--tiny-only", action="store_true", help="only the users of one sequence each: flock at -np "
                   "(cores), Flower, flock again (the first round of each is warm-up)")
    p.add_argument("--async-buffer", type=int, default=10, help="FedBuff's K (with --async-only)")
    p.add_argument("--async-concurrency", type=int, default=20, help="FedBuff's C (with --async-only)")
    args = p.parse_args()
    if args.rounds < (2 if args.tiny_only or args.async_only else 1):    # those leave their first round out
        p.error("--rounds must be at least 1, and at least 2 with --tiny-only or --async-only")
    out = Path(args.out or f"runs/throughput-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    if args.async_only:
        return asynchronous(args, out, cores)
    if args.tiny_only:
        return tiny_clients(args, out, cores)
    tiny = tiny_users_data(ROOT / "runs" / "throughput-tiny", Path(args.data_dir))
    rows = {}
    rows["floor (1 process)"] = floors(args.data_dir, args.rounds, 1)
    rows[f"floor_np ({cores} processes)"] = floors(args.data_dir, args.rounds, cores)
    p1 = project(args.data_dir, args.rounds, 1, out / "np1")
    pn = project(args.data_dir, args.rounds, cores, out / f"np{cores}")
    rows["project -np 1"], rows[f"project -np {cores}"] = p1["clients_per_s"], pn["clients_per_s"]
    fl = flower(args.data_dir, args.rounds, out)
    if fl is not None:
        rows[f"Flower {fl['flwr']} simulation (Ray, {fl['cpus']} CPUs, 1 per client)"] = fl["clients_per_s"]
    tiny_run = project(str(tiny), args.rounds, cores, out / "overhead")
    fl_tiny = flower(str(tiny), args.rounds, out, "flower-tiny") if fl is not None else None
    rows[f"users of one sequence each: project -np {cores}"] = tiny_run["clients_per_s"]
    if fl_tiny is not None:
        rows["users of one sequence each: Flower"] = fl_tiny["clients_per_s"]
    balanced = str(balanced_data(ROOT / "runs" / "throughput-balanced", Path(args.data_dir)))
    rows[f"balanced users: floor_np ({cores} processes)"] = floors(balanced, args.rounds, cores)
    pb = project(balanced, args.rounds, cores, out / f"balanced-np{cores}")
    rows[f"balanced users: project -np {cores}"] = pb["clients_per_s"]
    fetch_first, fetch_next = fetch_mb_per_s(args.data_dir)
    floor1, floorn = rows["floor (1 process)"], rows[f"floor_np ({cores} processes)"]
    default_ms = pn["round_s"] * 1000
    flower_head, flower_startup = (" / Flower", f" / {fl['startup_s']:.2f} s") if fl else ("", "")
    lines = [f"# Throughput, LM benchmark setting ({args.rounds} rounds of 10 users)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {cores} cores",
             f"- command: `python bench/throughput.py {args.data_dir} --rounds {args.rounds}`", "",
             "| variant | client updates/s |", "|---|---:|", *[f"| {k} | {v:.3f} |" for k, v in rows.items()], "",
             "| ratio | value |", "|---|---:|",
             f"| project -np 1 / floor | {p1['clients_per_s'] / floor1:.3f} |",
             f"| project -np {cores} / floor_np | {pn['clients_per_s'] / floorn:.3f} |",
             f"| balance bound at -np {cores} (mean / slowest rank work, summed over rounds) | {pn['balance']:.3f} |",
             f"| project -np {cores} / (floor_np x balance bound) | "
             f"{pn['clients_per_s'] / (floorn * pn['balance']):.3f} |",
             f"| balanced users: project -np {cores} / floor_np (balance bound {pb['balance']:.3f}) | "
             f"{pb['clients_per_s'] / rows[f'balanced users: floor_np ({cores} processes)']:.3f} |",
             *([f"| project -np {cores} / Flower | {pn['clients_per_s'] / fl['clients_per_s']:.2f} |",
                f"| users of one sequence each: project -np {cores} / Flower | "
                f"{tiny_run['clients_per_s'] / fl_tiny['clients_per_s']:.2f} |"] if fl else []),
             f"| per-round overhead (round - slowest rank's work) / default round, -np {cores} | "
             f"{pn['overhead_s'] * 1000 / default_ms:.3f} ({pn['overhead_s'] * 1000:.0f} ms of {default_ms:.0f} ms) |",
             f"| same, users of one sequence each (default model) | {tiny_run['overhead_s'] * 1000 / default_ms:.3f} "
             f"({tiny_run['overhead_s'] * 1000:.0f} ms; whole round {tiny_run['round_s'] * 1000:.0f} ms) |",
             f"| parameter fetch, 24.7 MB over loopback gRPC: first / next ranks | {fetch_first:.0f} / "
             f"{fetch_next:.0f} MB/s |",
             f"| start-up, -np 1 / -np {cores}{flower_head} | {p1['startup_s']:.2f} s / {pn['startup_s']:.2f} s"
             f"{flower_startup} |"]
    write_table(out, lines)


def tiny_clients(args, out: Path, cores: int) -> None:
    """Users of one sequence each (the default-sized model): the per-client machinery is nearly all there is.
    flock at -np `cores` just before and just after Flower's simulation engine (the same users, model and
    trainer), so that the machine's drift shows and cancels; the first round of each is warm-up."""
    tiny = str(tiny_users_data(ROOT / "runs" / "throughput-tiny", Path(args.data_dir)))
    before = project(tiny, args.rounds, cores, out / "tiny-before", warmup=1)
    fl = flower(tiny, args.rounds, out, "flower-tiny")
    after = project(tiny, args.rounds, cores, out / "tiny-after", warmup=1)
    flock_rate = (before["clients_per_s"] + after["clients_per_s"]) / 2
    rows = {f"flock -np {cores}: before / after Flower": f"{before['clients_per_s']:.2f} / {after['clients_per_s']:.2f}",
            f"flock -np {cores} (their mean)": f"{flock_rate:.2f}"}
    if fl is not None:
        rows[f"Flower {fl['flwr']} simulation (Ray, {fl['cpus']} CPUs, 1 per client)"] = \
            f"{fl['clients_per_s_after_first']:.2f}"
    lines = [f"# Throughput, users of one sequence each ({args.rounds} rounds of 10, the first one excluded)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {cores} cores",
             f"- command: `python bench/throughput.py {args.data_dir} --rounds {args.rounds} --tiny-only`",
             "- data: 200 users of one comment (\"hello there\") each, the vocabulary of "
             f"{args.data_dir} (the LM benchmark's 6,182,672-parameter model); its trainer and hyper-parameters", "",
             "| variant | client updates/s |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows.items()], "",
             "| ratio | value |", "|---|---:|",
             f"| per-round overhead of flock (round - slowest rank's work), before / after | "
             f"{before['overhead_median_s'] * 1000:.0f} / {after['overhead_median_s'] * 1000:.0f} ms of "
             f"{before['round_s'] * 1000:.0f} / {after['round_s'] * 1000:.0f} ms |"]
    if fl is not None:
        lines.append(f"| **flock -np {cores} / Flower** | **{flock_rate / fl['clients_per_s_after_first']:.2f}** |")
    write_table(out, lines)


def asynchronous(args, out: Path, cores: int) -> None:
    """FedBuff (K = --async-buffer, C = --async-concurrency) at -np `cores` against floor_np training the
    same clients (one server update's K clients per floor round; the floor runs just before and just after
    the project, and the ratio is to their mean), and the ratio to Flower's synchronous simulation (same
    data, model and trainer) in the same run. The first update is warm-up on both sides."""
    from scheduler.phones.asynchronous import HORIZON

    k, c, updates = args.async_buffer, args.async_concurrency, args.rounds
    given, tasks = async_users(args.data_dir, updates, k, c)
    # the floor just before and just after the project, so that the machine's drift shows and cancels
    before = floors(args.data_dir, updates, cores, warmup=1, given=given)
    pa = project(args.data_dir, updates, cores, out / f"async-np{cores}", "--async-buffer", str(k),
                 "--async-concurrency", str(c), warmup=1)
    after = floors(args.data_dir, updates, cores, warmup=1, given=given)
    rows = {f"floor_np ({cores} processes), the asynchronous run's clients: before / after the project":
            f"{before:.3f} / {after:.3f}",
            f"floor_np ({cores} processes), the asynchronous run's clients": (before + after) / 2,
            f"project -np {cores}, FedBuff K={k} C={c}": pa["clients_per_s"]}
    rows[f"floor_np ({cores} processes), synchronous rounds' clients"] = floors(args.data_dir, updates, cores, warmup=1)
    ps = project(args.data_dir, updates, cores, out / f"sync-np{cores}", warmup=1)
    rows[f"project -np {cores}, synchronous rounds of 10"] = ps["clients_per_s"]
    fl = flower(args.data_dir, updates, out)
    if fl is not None:
        rows[f"Flower {fl['flwr']} simulation (Ray, {fl['cpus']} CPUs, 1 per client), synchronous"] = fl["clients_per_s"]
    floor_a = rows[f"floor_np ({cores} processes), the asynchronous run's clients"]
    floor_s = rows[f"floor_np ({cores} processes), synchronous rounds' clients"]
    lines = [f"# Throughput, asynchronous mode (FedBuff) on the LM benchmark setting ({updates} server updates)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {cores} cores",
             f"- command: `python bench/throughput.py {args.data_dir} --rounds {updates} --async-only "
             f"--async-buffer {k} --async-concurrency {c}`",
             "- data: the built-in lm_data (popquotes); model, trainer and hyper-parameters of the LM benchmark; "
             "phones: built-in profiles, always on-line; the first update/round is warm-up on every side", "",
             "| variant | client updates/s |", "|---|---:|",
             *[f"| {k_} | {v if isinstance(v, str) else f'{v:.3f}'} |" for k_, v in rows.items()], "",
             "| ratio | value |", "|---|---:|",
             f"| asynchronous: project -np {cores} / floor_np on the same clients (the floors' mean) | "
             f"{pa['clients_per_s'] / floor_a:.3f} "
             f"(dependency bound {dependency_bound(tasks, cores, HORIZON):.3f}) |",
             f"| asynchronous: ranks' busy share, rank work / ({cores} x wall time) | {pa['busy']:.3f} |",
             f"| synchronous: project -np {cores} / floor_np on the same clients | {ps['clients_per_s'] / floor_s:.3f} "
             f"(balance bound {ps['balance']:.3f}) |",
             *([f"| asynchronous project -np {cores} / Flower (synchronous) | {pa['clients_per_s'] / fl['clients_per_s']:.2f} |",
                f"| synchronous project -np {cores} / Flower | {ps['clients_per_s'] / fl['clients_per_s']:.2f} |"]
               if fl else [])]
    write_table(out, lines)


if __name__ == "__main__":
    main()
