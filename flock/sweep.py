"""Hyper-parameter sweeps: every combination of a grid, for each seed, then one summary.

    python -m flock.sweep BASE_CONFIG --grid 'lr=0.1,0.05' --grid 'server-opt=fedavg,fedadam' \
        --seeds 0,1,2 --np 2 --out SWEEP_DIR [--target top1=0.9] [--metric top1]

BASE_CONFIG is a file `--config` takes (naming the data as `data-dir`). Each run goes to
SWEEP_DIR/<combination>-seed<s>/ (`flock.run.launch` on --np ranks, or `simulate` in this process with
--np 1). Every combination's options are built by the CLI's own parser before anything runs, so a bad grid
value is one `error:` line and exit status 2. A second invocation skips the finished runs (metrics.jsonl
holds the final evaluation, or the one that reached --target); a half-finished run is resumed from its
checkpoint, or restarted when it has none. Then SWEEP_DIR gets summary.csv, summary.md and summary.png
(`summarise`).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from flock.common.config import FIELDS, Config, _flag, parse_options
from flock.common.errors import ConfigError, FlockError
from flock.common.recorder import read_metrics

log = logging.getLogger("flock")
NOT_GRIDDED = ("seed", "run_dir", "resume", "config", "token", "data_dir", "private", "tracker")


@dataclass(frozen=True)
class Run:
    """One run of the sweep: a combination (option -> value as given), a seed, its folder and options."""

    combo: tuple[tuple[str, str], ...]
    seed: int
    run_dir: Path
    config: Config
    given: dict[str, str]


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`--grid name=v1,v2` -> [(field name, [v1, v2])], in the order given; names as the long options."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        name, sep, values = item.partition("=")
        field = name.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected OPTION=VALUE[,VALUE...]")
        if field not in FIELDS:
            raise ConfigError(f"--grid {item!r}: unknown option {name.strip()!r}")
        if field in NOT_GRIDDED:
            raise ConfigError(f"--grid {item!r}: {_flag(field)} cannot be swept"
                              + (" (use --seeds)" if field == "seed" else ""))
        if field in dict(grid):
            raise ConfigError(f"--grid {item!r}: {_flag(field)} is already in the grid")
        grid.append((field, [v.strip() for v in values.split(",")]))
    return grid


def combo_name(combo: Sequence[tuple[str, str]]) -> str:
    """A combination as a folder name: 'lr=0.1_server-opt=fedadam' ('base' for an empty grid)."""
    text = "_".join(f"{name.replace('_', '-')}={value}" for name, value in combo) or "base"
    return "".join(c if c.isalnum() or c in "=.-_+" else "-" for c in text)


def option_argv(name: str, value: str) -> list[str]:
    """One grid value as the command line would give it (booleans: --flag / --no-flag)."""
    if isinstance(FIELDS[name].default, bool):
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"{_flag(name)} takes true or false in a grid, got {value!r}")
        return [_flag(name) if value.lower() == "true" else "--no-" + _flag(name)[2:]]
    return [_flag(name), value]


def plan_runs(base: str, grid: list[tuple[str, list[str]]], seeds: Sequence[int], out: Path,
              target: str = "") -> list[Run]:
    """Every combination x seed, its options built and checked as the CLI's (`parse_options`): the first bad
    value or combination raises ConfigError before anything runs."""
    runs = []
    names = [name for name, _ in grid]
    for values in itertools.product(*(vals for _, vals in grid)):
        combo = tuple(zip(names, values))
        for seed in seeds:
            run_dir = out / f"{combo_name(combo)}-seed{seed}"
            argv = ["--config", base, "--seed", str(seed), "--run-dir", str(run_dir), "--quiet",
                    *(["--target", target] if target else []),
                    *(arg for name, value in combo for arg in option_argv(name, value))]
            config, given = parse_options(argv)
            if not config.data_dir:
                raise ConfigError(f"{base}: name the data folder as data-dir")
            runs.append(Run(combo=combo, seed=seed, run_dir=run_dir, config=config, given=given))
    return runs


def finished(run_dir: Path, rounds: int) -> bool:
    """Whether a run's metrics.jsonl holds its final evaluation (or the one that reached its target)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return False
    try:
        records = read_metrics(run_dir)
    except FlockError:
        return False
    return any(r.get("kind") == "eval" and (r.get("round") == rounds or "target_reached" in r) for r in records)


def as_resumed(run: Run) -> Config:
    """The run's options as its job would resolve them (the trainer's defaults where the sweep set nothing),
    naming its folder as the run to continue."""
    from flock.common.task_defaults import with_task_defaults

    config, _ = with_task_defaults(run.config, run.given)
    return replace(config, resume=str(run.run_dir), run_dir=str(run.run_dir))


def check_existing(runs: Sequence[Run], out: Path) -> None:
    """Runs already in `out` must have been made with the options the sweep now asks for (only --rounds,
    --eval-every and --checkpoint-every may differ: such a run is continued to them); a ConfigError names
    the first run and options that differ, before anything runs."""
    from flock.common.config import resumed_config
    from flock.run import holds_a_run

    for run in runs:
        if holds_a_run(run.run_dir) and (run.run_dir / "config.json").is_file():
            try:
                resumed_config(as_resumed(run))
            except ConfigError as e:
                raise ConfigError(f"--out {out}: {run.run_dir.name} was run with other settings ({e}); give "
                                  f"another --out, or remove that run") from None


def execute(run: Run, np: int) -> str:
    """Runs (or skips, resumes, restarts) one run; returns what was done, in words."""
    from flock.common.config import resumed_config
    from flock.run import holds_a_run, launch, simulate

    if finished(run.run_dir, run.config.rounds):
        return "finished already: skipped"
    if holds_a_run(run.run_dir) and (run.run_dir / "checkpoint.npz").is_file():
        # the saved options, with this sweep's --rounds (check_existing found nothing else differing)
        resume = resumed_config(as_resumed(run))
        if np == 1:
            simulate(resume)
        else:
            launch(replace(resume, run_dir=str(run.run_dir)), np=np)
        return "resumed from its last checkpoint"
    restarted = run.run_dir.exists() and any(run.run_dir.iterdir())
    if restarted:           # a start that left records but no checkpoint: nothing to continue from
        shutil.rmtree(run.run_dir)
    if np == 1:
        simulate(run.config, given=run.given)
    else:
        launch(run.config, np=np, given=run.given)
    return "restarted (no checkpoint to resume from)" if restarted else "ran"


@dataclass
class Row:
    """One combination's summary over its seeds."""

    combo: tuple[tuple[str, str], ...]
    finals: list[float]
    rounds: list[int]
    curves: list[list[tuple[int, float]]]
    reached_rounds: list[int]
    reached_hours: list[float]
    sim_hours: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finals) if self.finals else math.nan

    @property
    def std(self) -> float:
        """The sample standard deviation over seeds (NaN, an empty cell, with fewer than two: one seed has
        no spread to show, not a spread of 0)."""
        return statistics.stdev(self.finals) if len(self.finals) > 1 else math.nan


def summarise(runs: Sequence[Run], metric: str) -> list[Row]:
    """Each combination's final `metric` (its last evaluation) over the seeds' runs that finished."""
    rows: dict[tuple, Row] = {}
    for run in runs:
        row = rows.setdefault(run.combo, Row(run.combo, [], [], [], [], [], []))
        if not finished(run.run_dir, run.config.rounds):
            continue
        evals = [r for r in read_metrics(run.run_dir) if r.get("kind") == "eval"]
        if metric not in evals[-1]:
            shown = ", ".join(k for k, v in evals[-1].items() if isinstance(v, float))
            raise ConfigError(f"--metric {metric}: {run.run_dir} reports no such metric (its evaluations: {shown})")
        row.finals.append(float(evals[-1][metric]))
        row.rounds.append(int(evals[-1]["round"]))
        row.curves.append([(int(r["round"]), float(r[metric])) for r in evals])
        if "sim_time" in evals[-1]:
            row.sim_hours.append(evals[-1]["sim_time"] / 3600)
        reached = evals[-1].get("target_reached")
        if reached:
            row.reached_rounds.append(int(reached["round"]))
            if "sim_time" in reached:
                row.reached_hours.append(reached["sim_time"] / 3600)
    return list(rows.values())


def table(rows: Sequence[Row], metric: str, target: str) -> list[dict[str, str]]:
    """The summary's rows as text cells (summary.csv and summary.md show the same)."""
    def num(x: float | None) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"

    def mean(xs: Sequence[float]) -> float | None:
        return statistics.fmean(xs) if xs else None

    out = []
    for row in rows:
        cells = {name.replace("_", "-"): value for name, value in row.combo}
        cells.update({f"{metric}_mean": num(row.mean), f"{metric}_std": num(row.std), "n": str(len(row.finals)),
                      "rounds": num(mean(row.rounds))})
        if any(r.sim_hours for r in rows):
            cells["sim_hours_mean"] = num(mean(row.sim_hours))
        if target:
            cells["reached"] = f"{len(row.reached_rounds)}/{len(row.finals)}"
            cells["rounds_to_target_mean"] = num(mean(row.reached_rounds))
            if any(r.sim_hours for r in rows):
                cells["hours_to_target_mean"] = num(mean(row.reached_hours))
        out.append(cells)
    return out


def write_summary(out: Path, rows: Sequence[Row], metric: str, target: str) -> None:
    """SWEEP_DIR/summary.csv, summary.md and summary.png."""
    cells = table(rows, metric, target)
    header = list(cells[0]) if cells else []
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in cells]
    note = (f"\n{metric}: the final evaluation's value, mean and sample standard deviation over the n seeds "
            f"that finished; rounds: the rounds those runs trained.\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n" + note, encoding="utf-8")
    plot(out / "summary.png", rows, metric)


def plot(path: Path, rows: Sequence[Row], metric: str) -> None:
    """One band per combination: mean +- std over seeds of `metric` at each evaluated round that every
    seed's run has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if not row.curves:
            continue
        by_round = [dict(curve) for curve in row.curves]
        rounds = sorted(set.intersection(*(set(c) for c in by_round)))
        means = [statistics.fmean(c[r] for c in by_round) for r in rounds]
        stds = [statistics.stdev(c[r] for c in by_round) if len(by_round) > 1 else 0.0 for r in rounds]
        label = combo_name(row.combo) + f" (n={len(by_round)})"
        line, = ax.plot(rounds, means, marker="o", ms=3, label=label)
        ax.fill_between(rounds, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reason(output: str) -> str:
    """The line of a failed run's output that says why: flock's `error:` line, else the exception's."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for pattern in (r"^error: ", r"^[\w.]+(Error|Exception)\b"):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[-1]
    return lines[-1] if lines else ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flock.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("base", metavar="BASE_CONFIG", help="a config file (TOML, YAML or JSON) naming data-dir")
    p.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2",
                   help="an option and its values; repeatable (every combination runs)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each combination runs once per seed")
    p.add_argument("--np", type=int, default=1, help="MPI ranks per run (1: in this process, no mpirun)")
    p.add_argument("--out", required=True, metavar="SWEEP_DIR", help="the sweep's folder")
    p.add_argument("--target", default="", metavar="METRIC=VALUE",
                   help="each run stops at the first evaluation reaching it; the summary says when")
    p.add_argument("--metric", default="", help="the metric summarised (default: --target's, else top1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metric = args.metric or (args.target.partition("=")[0] if args.target else "top1")
    out = Path(args.out)
    try:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds {args.seeds!r}: give distinct seeds")
        if args.np < 1:
            raise ConfigError(f"--np must be at least 1, got {args.np}")
        grid = parse_grid(args.grid)
        runs = plan_runs(args.base, grid, seeds, out, args.target)
        check_existing(runs, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"argv": sys.argv[1:] if argv is None else list(argv),
                                                "grid": grid, "seeds": seeds, "np": args.np}, indent=1))
    failed = 0
    for i, run in enumerate(runs, 1):
        try:
            done = execute(run, args.np)
        except (FlockError, RuntimeError) as e:
            failed += 1
            done = f"FAILED: {reason(str(e)) or type(e).__name__}"
        print(f"[{i}/{len(runs)}] {run.run_dir.name}: {done}", flush=True)
    try:
        rows = summarise(runs, metric)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_summary(out, rows, metric, args.target)
    print(f"summary: {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'summary.png'}"
          + (f"; {failed} run(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

