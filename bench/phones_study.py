"""Heterogeneous phones on the built-in LM data: how long, in simulated hours, FedAvg takes to reach a top-1
target: synchronous without and with over-selection and a deadline, and asynchronous FedBuff (one table,
one PNG).

    python bench/phones_study.py [DATA_DIR] [--np 2] [--rounds 100] [--target 0.14] [--out DIR]

Every variant runs FL-mobile's Reddit LSTM setting (10 clients per round, 1 local epoch, client lr 1.0,
server lr 1.85, 100 rounds, evaluation every 10 rounds on all test users) with `--device-profiles builtin`
(seeded lognormal phones: 13.6 ms per sample, 20 / 5 Mbit/s down / up, 50 ms latency medians; the 24.7 MB
model moves both ways every round). Variants:

- sync: every selected phone trains; a round lasts until its slowest phone is done.
- sync + over-selection + deadline: 1.3 x 10 phones are selected, the round ends at the 10th finisher or
  after --deadline virtual seconds; the late ones are not trained (their compute is saved).
- FedBuff: 20 phones train at once, every 10 arrivals make a server update (so 100 updates are 1,000
  client updates, as 100 synchronous rounds), staleness weight 1/sqrt(1 + s) rounded to 8 bits.

Virtual time depends only on the seed and the profiles, so the table does not depend on the machine's
load.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from launch import app_command, run, write_table

from flock.common.recorder import read_metrics

VARIANTS = {   # name: (run folder, options; the deadline variant also gets --deadline)
    "sync": ("sync", []),
    "sync, over-select 1.3, deadline": ("sync-deadline", ["--over-select", "1.3"]),
    "FedBuff K=10, C=20": ("fedbuff", ["--async-buffer", "10", "--async-concurrency", "20"]),
}


def saved(train: list[dict]) -> str:
    """Phone-hours of compute not simulated because the results would not count (synchronous rounds);
    asynchronous records count those tasks (dropped, too stale) but do not time them."""
    if "compute_saved_s" not in train[0]:
        return "n/a"
    return f"{sum(r['compute_saved_s'] for r in train) / 3600:.2f}"


def hours_to(records: list[dict], target: float) -> tuple[float | None, int | None]:
    """Simulated hours and rounds at the first evaluation whose top-1 reaches `target`."""
    for r in records:
        if r["kind"] == "eval" and r["top1"] >= target:
            return r["sim_time"] / 3600, r["round"]
    return None, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default="lm_data")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--target", type=float, default=0.14, help="top-1 target (all test tokens)")
    p.add_argument("--deadline", type=float, default=120.0, help="virtual seconds, for the deadline variant")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/phones-study-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (folder, extra) in VARIANTS.items():
        if "--over-select" in extra:
            extra = [*extra, "--deadline", str(args.deadline)]
        run_dir = out / folder
        run(app_command(args.np, args.data_dir, "--rounds", str(args.rounds), "--device-profiles", "builtin",
                        "--run-dir", str(run_dir), "--quiet", *extra), name)
        results[name] = (extra, read_metrics(run_dir))

    lines = [f"# Heterogeneous phones: synchronous FedAvg and FedBuff ({args.rounds} rounds or server updates, "
             "`--device-profiles builtin`)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, 2 cores",
             f"- command: `python bench/phones_study.py {args.data_dir} --np {args.np} --rounds {args.rounds} "
             f"--target {args.target} --deadline {args.deadline:g}`", "",
             f"| variant | hours to top-1 {args.target:.0%} (round) | simulated hours, all rounds | final top-1 "
             "| dropped | late or too stale (not trained) | staleness mean / max | failed rounds "
             "| compute saved (phone-hours) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (_, records) in results.items():
        train = [r for r in records if r["kind"] == "train"]
        final = [r for r in records if r["kind"] == "eval"][-1]
        hours, rnd = hours_to(records, args.target)
        reached = f"{hours:.2f} ({rnd})" if hours is not None else "not reached"
        lines.append(f"| {name} | {reached} | {train[-1]['sim_time'] / 3600:.2f} | {final['top1']:.2%} | "
                     f"{sum(r['dropped'] for r in train)} | {sum(r['stale'] for r in train)} | "
                     f"{sum(r['staleness_mean'] for r in train) / len(train):.2f} / "
                     f"{max(r['staleness_max'] for r in train)} | {sum(r.get('failed', 0) for r in train)} | "
                     f"{saved(train)} |")
    write_table(out, lines)
    plot(results, out / "accuracy_vs_hours.png", args.target)


def plot(results: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (_, records) in results.items():
        evals = [r for r in records if r["kind"] == "eval"]
        ax.plot([r["sim_time"] / 3600 for r in evals], [r["top1"] for r in evals], marker="o", label=name)
    ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.0%}")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("top-1 (all test tokens)")
    ax.set_title("FL-mobile's Reddit LSTM setting on heterogeneous phones")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
