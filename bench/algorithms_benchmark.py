"""Algorithms side by side on non-IID MNIST (McMahan's 2 shards per user), after the same rounds.

    python bench/algorithms_benchmark.py --suite personalization|optimizers [--rounds 50] [--np 2] [--out DIR]

- personalization: FedAvg, FedAvg + 1 epoch of local fine-tuning before evaluation, FedPer-style private
  output layers, FedEM (3 learners, private mixture weights);
- optimizers: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad (server side) and FedProx (client side).
All use the MLP (McMahan's 2NN), 100 users, 10 per round, E=1, B=50, client lr 0.05. Metrics: each user's
accuracy on its own test images (same label mix as its training images) averaged over users, and the
accuracy over all 10,000 test images. Writes `table.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from launch import ROOT, app_command, run, write_table

from flock.common.recorder import read_metrics
from reader.mnist import build

COMMON = ["--reader", "arrays", "--clients-per-round", "10", "--local-epochs", "1", "--batch-size", "50",
          "--lr", "0.05", "--max-grad-norm", "0"]
MLP = ["--model", "mlp", "--trainer", "classifier"]
SUITES = {
    "personalization": {
        "FedAvg": [*MLP, "--server-lr", "1"],
        "FedAvg + 1 epoch local fine-tuning": [*MLP, "--server-lr", "1", "--finetune-epochs", "1"],
        "FedPer (private output layer)": ["--model", "mlp-personal", "--trainer", "classifier", "--server-lr", "1"],
        "FedEM (3 learners)": ["--model", "fedem-mlp", "--trainer", "fedem", "--server-lr", "1"],
    },
    "optimizers": {
        "FedAvg (server lr 1)": [*MLP, "--server-lr", "1"],
        "FedAvgM (server lr 1, momentum 0.9)": [*MLP, "--server-opt", "fedavgm", "--server-lr", "1"],
        "FedAdam (server lr 0.01)": [*MLP, "--server-opt", "fedadam", "--server-lr", "0.01"],
        "FedYogi (server lr 0.01)": [*MLP, "--server-opt", "fedyogi", "--server-lr", "0.01"],
        "FedAdagrad (server lr 0.01)": [*MLP, "--server-opt", "fedadagrad", "--server-lr", "0.01"],
        "FedProx (mu 0.01)": [*MLP, "--server-lr", "1", "--prox-mu", "0.01"],
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), required=True)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/{args.suite}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = ROOT / "runs" / "mnist-shards"
    if not data.exists():
        print(json.dumps(build(data, scheme="shards", users=100, seed=0)))
    rows = []
    for i, (name, extra) in enumerate(SUITES[args.suite].items()):
        run_dir = out / f"method{i}"
        wall = run(app_command(args.np, str(data), *COMMON, "--rounds", str(args.rounds),
                               "--eval-every", str(max(1, args.rounds // 5)), *extra, "--run-dir", str(run_dir)), name)
        final = read_metrics(run_dir)[-1]
        key = "top1_ft" if "top1_ft" in final else "top1"
        rows.append(f"| {name} | {final[key + '_user_mean']:.2%} | {final[key]:.2%} | {wall / 60:.1f} min |")
    lines = [f"# {args.suite.capitalize()} on non-IID MNIST (2 shards per user), after {args.rounds} rounds", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} cores",
             f"- command: `python bench/algorithms_benchmark.py --suite {args.suite} --rounds {args.rounds} "
             f"--np {args.np}`",
             "- 100 users, 10 per round, E=1, B=50, client lr 0.05, MLP (McMahan's 2NN)", "",
             "| method | per-user accuracy (mean over users) | accuracy over all test images | wall time |",
             "|---|---:|---:|---:|", *rows]
    write_table(out, lines)


if __name__ == "__main__":
    main()
