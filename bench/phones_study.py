"""Heterogeneous phones on the built-in LM data: how long, in simulated hours, FedAvg takes to reach a top-1
target: synchronous without and with over-selection and a deadline, and asynchronous FedBuff (part `clock`:
one table, one PNG); and which clients to train (part `selection`: uniform, Oort, power-of-choice, on the LM
data and on non-IID MNIST; one table, one PNG).

    python bench/phones_study.py [DATA_DIR] [--np 2] [--rounds 100] [--target 0.14] [--part all] [--out DIR]

Every variant runs FL-mobile's Reddit LSTM setting (10 clients per round, 1 local epoch, client lr 1.0,
server lr 1.85, 100 rounds, evaluation every 10 rounds on all test users) with `--device-profiles builtin`
(seeded lognormal phones: 13.6 ms per sample, 20 / 5 Mbit/s down / up, 50 ms latency medians; the 24.7 MB
model moves both ways every round). Variants:

- sync: every selected phone trains; a round lasts until its slowest phone is done.
- sync + over-selection + deadline: 1.3 x 10 phones are selected, the round ends at the 10th finisher or
  after --deadline virtual seconds; the late ones are not trained (their compute is saved).
- FedBuff: 20 phones train at once, every 10 arrivals make a server update (so 100 updates are 1,000
  client updates, as 100 synchronous rounds), staleness weight 1/sqrt(1 + s) rounded to 8 bits.

Part `selection`: synchronous rounds of 10 clients (no over-selection, no deadline) on built-in phones,
the clients chosen by `--selection uniform` (at random), `oort` (FedScale's defaults) or `power-of-choice`
(d = 20). The LM setting is the one above (one seed); MNIST is the 2NN MLP on McMahan's non-IID split (100
users with two label-sorted shards of 300 images, built once into runs/mnist-shards), 1 local epoch, batch
20, client lr 0.1, server lr 1, evaluated on the 10,000 test images every 5 rounds, over --mnist-seeds. Each
row says how many of the selector's picks (with repeats, all rounds) came from the quickest and the slowest
quarter of the training population by duration on the clock (25% each at random).

Virtual time depends only on the seed and the profiles, so the table does not depend on the machine's
load.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from launch import ROOT, app_command, run, write_table

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
    p.add_argument("--part", choices=("clock", "selection", "all"), default="all")
    p.add_argument("--mnist-dir", default=str(ROOT / "runs" / "mnist-shards"))
    p.add_argument("--mnist-rounds", type=int, default=150)
    p.add_argument("--mnist-target", type=float, default=0.9, help="MNIST top-1 target (10,000 test images)")
    p.add_argument("--mnist-seeds", default="0,1,2")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/phones-study-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("clock", "all"):
        clock_study(args, out)
    if args.part in ("selection", "all"):
        selection_study(args, out)


def clock_study(args: argparse.Namespace, out: Path) -> None:
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



# -- part `selection` ------------------------------------------------------------------------------------------

SELECTORS = {"uniform": ("uniform", []), "Oort": ("oort", ["--selection", "oort"]),
             "power-of-choice, d = 20": ("poc", ["--selection", "power-of-choice", "--selection-pool", "20"])}
MNIST = ["--reader", "arrays", "--model", "mlp", "--trainer", "classifier", "--local-epochs", "1", "--batch-size", "20",
         "--lr", "0.1", "--max-grad-norm", "0", "--server-lr", "1", "--eval-every", "5"]


def selection_study(args: argparse.Namespace, out: Path) -> None:
    mnist = Path(args.mnist_dir)
    if not (mnist / "meta.json").exists():
        from reader.mnist import build

        build(mnist, scheme="shards", users=100, seed=0)
    settings = [("LM", args.data_dir, ["--rounds", str(args.rounds)], args.target, [0]),
                ("MNIST", str(mnist), [*MNIST, "--rounds", str(args.mnist_rounds)], args.mnist_target,
                 [int(s) for s in args.mnist_seeds.split(",")])]
    rows, curves = [], {}
    for setting, data_dir, options, target, seeds in settings:
        for seed in seeds:
            for name, (folder, extra) in SELECTORS.items():
                run_dir = out / f"selection-{setting.lower()}-{folder}-seed{seed}"
                if not any(r["kind"] == "eval" and r["round"] == int(options[options.index("--rounds") + 1])
                           for r in (read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else [])):
                    run(app_command(args.np, data_dir, *options, "--seed", str(seed), "--device-profiles", "builtin",
                                    "--checkpoint-every", "0", "--run-dir", str(run_dir), "--quiet", *extra),
                        f"{setting} {name} seed {seed}")
                records = read_metrics(run_dir)
                fast, slow, mean_s = pick_speeds(run_dir, records)
                hours, rnd = hours_to(records, target)
                final = [r for r in records if r["kind"] == "eval"][-1]
                train = [r for r in records if r["kind"] == "train"]
                reached = f"{hours:.2f} ({rnd})" if hours is not None else "not reached"
                rows.append(f"| {setting} | {name} | {seed} | {target:.0%}: {reached} | {train[-1]['sim_time'] / 3600:.2f} "
                            f"| {final['top1']:.2%} | {fast:.0%} | {slow:.0%} | {mean_s:.1f} "
                            f"| {sum(r['samples'] for r in train) / len(train):.0f} |")
                curves.setdefault(setting, {})[(name, seed)] = records
    command = (f"python bench/phones_study.py {args.data_dir} --part selection --np {args.np} --rounds {args.rounds} "
               f"--target {args.target} --mnist-rounds {args.mnist_rounds} --mnist-target {args.mnist_target} "
               f"--mnist-seeds {args.mnist_seeds}")
    lines = ["# Client selection on heterogeneous phones: uniform, Oort, power-of-choice", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, 2 cores",
             f"- command: `{command}`", "",
             "| setting | selection | seed | hours to top-1 target (round) | simulated hours, all rounds | final top-1 "
             "| picks from the fastest quarter | from the slowest quarter | mean duration of a pick (s) "
             "| samples trained a round |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_selection(curves, out / "selection_vs_hours.png", {s: t for s, _, _, t, _ in settings})


def pick_speeds(run_dir: Path, records: list[dict]) -> tuple[float, float, float]:
    """The shares of the run's picks (the selector's choices, every round, with repeats) among the quickest and
    the slowest quarter of the training population by duration on the clock, and a pick's mean duration.
    Uniform runs record no picks: they are replayed from the clock, a pure function of the seed and profiles
    (checked against the run's virtual times)."""
    import json

    from flock.common.config import Config, saved_options
    from flock.common.plugins import resolve
    from flock.run import phone_rounds
    from reader.calendar import Calendar
    from scheduler.phones.clock import client_timing, model_bytes

    saved = json.loads((run_dir / "config.json").read_text())
    config = Config(**saved_options(str(run_dir)))
    phones, size = phone_rounds(config), model_bytes(saved["shared_params"])
    reader = resolve("reader", config.reader)(Path(config.data_dir))
    calendar = Calendar.from_reader(reader)
    train = [r for r in records if r["kind"] == "train"]
    picks, start = [], 0.0
    for index, record in enumerate(train):
        day = calendar.train_day(index, config.rounds)
        users, counts = reader.index(day, "train").with_samples(), reader.index(day, "train").count_of()
        if "selection_users" in record:
            picks.append((day, record["selection_users"]))
            continue
        planned = phones.plan_round(index, users, counts, config.clients_per_round, start_time=start,
                                    shared_params=saved["shared_params"])
        o = planned.outcome
        start = o.end_time
        if abs(start - record["sim_time"]) > 1e-6 * max(1.0, start):
            raise SystemExit(f"{run_dir}: the replayed clock is at {start} s in round {index + 1}, the run at "
                             f"{record['sim_time']} s")
        picks.append((day, [*o.trained, *o.discarded, *o.dropped, *o.voided]))
    fast = slow = total = 0
    seconds = 0.0
    for day in sorted({d for d, _ in picks}):
        counts = reader.index(day, "train").count_of()
        duration = {u: client_timing(phones.profiles.profile(u), samples=config.local_epochs * counts[u],
                                     bytes_down=size, bytes_up=size).total_s
                    for u in reader.index(day, "train").with_samples()}
        ordered = sorted(duration.values())
        quick, slowest = ordered[len(ordered) // 4], ordered[-(len(ordered) // 4) - 1]
        for _, users in (p for p in picks if p[0] == day):
            fast += sum(duration[u] <= quick for u in users)
            slow += sum(duration[u] >= slowest for u in users)
            seconds += sum(duration[u] for u in users)
            total += len(users)
    return fast / total, slow / total, seconds / total


def plot_selection(curves: dict, path: Path, targets: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2))
    colours = {name: f"C{i}" for i, name in enumerate(SELECTORS)}
    for ax, (setting, runs) in zip(list(axes) if len(curves) > 1 else [axes], curves.items()):
        for (name, seed), records in runs.items():     # a colour per selection, a line style per seed
            evals = [r for r in records if r["kind"] == "eval"]
            ax.plot([r["sim_time"] / 3600 for r in evals], [r["top1"] for r in evals], marker=".",
                    color=colours[name], linestyle=("-", "--", ":", "-.")[seed % 4], label=f"{name}, seed {seed}")
        ax.axhline(targets[setting], color="grey", linestyle=":", label=f"target {targets[setting]:.0%}")
        ax.set_xlabel("simulated hours")
        ax.set_ylabel("top-1")
        ax.set_title(f"{setting}: client selection on built-in phones")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
