"""FL-mobile's Reddit LSTM benchmark: federated vs centralized on the same data, model, optimizer and
batch size, side by side.

    python bench/lm_benchmark.py [DATA_DIR] [--np 2] [--out DIR] [-- extra application options]

Runs (a) `mpirun -np N python application.py DATA_DIR` (10 users per round, 1 local epoch in order,
client lr 1.0, server lr 1.85, batch 5, clip 5, 100 rounds unless overridden) and (b) the same with
`--centralized` (one model on the pooled training data, the same sample visits per round), then prints
one table of top-1 after each evaluation, writes it as Markdown (`table.md`) and the learning curves as a
PNG (`curves.png`) into the output folder.
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

from launch import app_command, run, split_extra, write_table

from flock.common.recorder import read_metrics


def evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "eval"]


def table(fed: list[dict], cen: list[dict]) -> list[str]:
    rows = ["| round | federated top1 | centralized top1 | gap | federated user-mean top1 | "
            "centralized user-mean top1 | gap |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for f, c in zip(fed, cen):
        assert f["round"] == c["round"]
        rows.append(f"| {f['round']} | {f['top1']:.2%} | {c['top1']:.2%} | {100 * (f['top1'] - c['top1']):+.2f} pt | "
                    f"{f['top1_user_mean']:.2%} | {c['top1_user_mean']:.2%} | "
                    f"{100 * (f['top1_user_mean'] - c['top1_user_mean']):+.2f} pt |")
    return rows


def plot(fed: list[dict], cen: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for runs, name, style in ((fed, "federated", "-"), (cen, "centralized", "--")):
        rounds = [r["round"] for r in runs]
        ax.plot(rounds, [100 * r["top1"] for r in runs], style, color="tab:blue", marker="o", ms=3,
                label=f"{name}: top-1 over tokens")
        ax.plot(rounds, [100 * r["top1_user_mean"] for r in runs], style, color="tab:orange", marker="s", ms=3,
                label=f"{name}: mean of per-user top-1")
    ax.set_xlabel("round")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default="lm_data")
    p.add_argument("--np", type=int, default=2, help="MPI ranks of the federated run")
    p.add_argument("--out", default=None, help="output folder (default runs/lm_benchmark-<time>)")
    own, extra = split_extra(sys.argv[1:])                # after --: options for both runs
    args = p.parse_args(own)
    out = Path(args.out or f"runs/lm_benchmark-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    fed_s = run(app_command(args.np, args.data_dir, "--run-dir", str(out / "federated"), *extra), "federated")
    cen_s = run(app_command(None, args.data_dir, "--centralized", "--run-dir", str(out / "centralized"), *extra),
                "centralized")
    fed, cen = evals(out / "federated"), evals(out / "centralized")
    config = json.loads((out / "federated" / "config.json").read_text())
    command = shlex.join(["python", "bench/lm_benchmark.py", args.data_dir, "--np", str(args.np),
                          *(["--", *extra] if extra else [])])
    source = Path(args.data_dir) / "SOURCE.json"
    data_note = json.loads(source.read_text())["source"] if source.is_file() else args.data_dir
    header = [
        f"# Reddit LSTM benchmark: federated vs centralized ({data_note})", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"- command: `{command}`",
        f"- settings: {config['rounds']} rounds, {config['clients_per_round']} clients/round, "
        f"{config['local_epochs']} local epoch(s), batch {config['batch_size']}, client lr {config['lr']}, "
        f"server lr {config['server_lr']}, clip {config['max_grad_norm']}, seed {config['seed']}, "
        f"eval users {'all' if not config['eval_users'] else config['eval_users']}",
        f"- wall time: federated {fed_s / 60:.1f} min at -np {args.np}; centralized {cen_s / 60:.1f} min (1 process)",
        "- FL-mobile's reference (real Reddit): federated 11.6% vs centralized 11.1% (per-user mean top-1)", "",
    ]
    lines = header + table(fed, cen)
    write_table(out, lines)
    plot(fed, cen, out / "curves.png", f"Reddit LSTM, {data_note}: federated (-np {args.np}) vs centralized")
    print(f"wrote {out / 'table.md'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
