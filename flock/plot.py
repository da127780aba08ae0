"""Learning curves and per-user fairness of one or more runs, to a PNG.

    python -m flock.plot RUN_DIR [RUN_DIR ...] [--out plot.png]

Panels: the main evaluation metric against rounds (solid: over all samples; dashed: mean over users),
training loss against rounds, and the distribution of the per-user metric at each run's last evaluation
(from RUN_DIR/eval_users.json). Runs are labelled by their folder names.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flock.common.errors import DataError
from flock.common.recorder import read_metrics, train_loss


def load(run_dir: Path) -> tuple[list[dict], dict | None]:
    try:
        records = read_metrics(run_dir)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    users = run_dir / "eval_users.json"
    return records, json.loads(users.read_text()) if users.is_file() else None


def x_of(record: dict, x: str) -> float:
    """The record's place on the x axis: its round, or its simulated hours (runs with phones)."""
    if x == "round":
        return record["round"]
    if "sim_time" not in record:
        raise SystemExit("error: --x hours needs runs with a virtual clock (--device-profiles): no sim_time")
    return record["sim_time"] / 3600


def plot(run_dirs: list[Path], out: Path, x: str = "round") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_metric, ax_loss, ax_users) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run_dir in enumerate(run_dirs):
        records, users = load(run_dir)
        color, label = colors[i % len(colors)], run_dir.name
        evals = [r for r in records if r["kind"] == "eval"]
        metric = (users or {}).get("metric") or next((k for k in ("top1", "accuracy") if evals and k in evals[0]), None)
        if metric and evals:
            rounds = [x_of(r, x) for r in evals]
            ax_metric.plot(rounds, [100 * r.get(metric, float("nan")) for r in evals], "-o", ms=3, color=color,
                           label=f"{label}")
            ax_metric.plot(rounds, [100 * r.get(f"{metric}_user_mean", float("nan")) for r in evals], "--",
                           color=color, label=f"{label} (user mean)")
        train = [r for r in records if r["kind"] == "train" and train_loss(r) is not None]
        ax_loss.plot([x_of(r, x) for r in train], [train_loss(r) for r in train], color=color, lw=1, label=label)
        if users and users.get("users"):
            values = [100 * v for v in users["users"].values()]
            ax_users.hist(values, bins=20, range=(0, 100), alpha=0.5, color=color,
                          label=f"{label}, round {users['round']} ({len(values)} users)")
    xlabel = "round" if x == "round" else "simulated hours"
    ax_metric.set(xlabel=xlabel, ylabel="test metric (%)", title="evaluation")
    ax_loss.set(xlabel=xlabel, ylabel="training loss", title="local training loss")
    ax_users.set(xlabel="per-user metric (%)", ylabel="users", title="per-user metric, last evaluation")
    for ax in (ax_metric, ax_loss, ax_users):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flock.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/plot.png of the first run)")
    p.add_argument("--x", choices=["round", "hours"], default="round",
                   help="x axis: rounds, or simulated hours (runs with --device-profiles)")
    args = p.parse_args(argv)
    print(plot(args.run_dirs, args.out or args.run_dirs[0] / "plot.png", args.x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
