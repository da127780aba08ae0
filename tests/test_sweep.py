"""Issue 28: `python -m flock.sweep`: every combination x seed, resumable, summarised."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from flock.common.recorder import read_metrics
from flock.sweep import main
from tests.helpers import make_arrays_data

GRID = ["--grid", "lr=0.1,0.02", "--grid", "server-opt=fedavg,fedadam", "--seeds", "0,1,2", "--np", "1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2 x 2 x 3-seed sweep of 2 rounds on small arrays data, in this process."""
    root = tmp_path_factory.mktemp("sweep")
    data = make_arrays_data(root / "data")
    base = root / "base.toml"
    base.write_text(f'data-dir = "{data}"\nreader = "arrays"\ntrainer = "classifier"\n'
                    f'model = "tests.tiny_models:Linear"\nrounds = 2\nclients-per-round = 4\neval-every = 1\n'
                    f'shards = 1\n')
    assert main([str(base), *GRID, "--out", str(root / "out")]) == 0
    return base, root / "out"


def test_every_combination_and_seed_runs_in_its_own_folder(sweep):
    _, out = sweep
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(runs) == 12 and "lr=0.1_server-opt=fedadam-seed2" in runs
    for run in runs:
        assert [r["round"] for r in read_metrics(out / run) if r["kind"] == "eval"] == [1, 2]


def test_the_summary_is_the_mean_and_std_of_the_runs_final_metric(sweep):
    _, out = sweep
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["lr"], r["server-opt"]) for r in rows] == [("0.1", "fedavg"), ("0.1", "fedadam"),
                                                          ("0.02", "fedavg"), ("0.02", "fedadam")]
    for row in rows:
        finals = [read_metrics(out / f"lr={row['lr']}_server-opt={row['server-opt']}-seed{s}")[-1]["top1"]
                  for s in range(3)]
        assert float(row["top1_mean"]) == pytest.approx(statistics.fmean(finals), rel=1e-5)
        assert float(row["top1_std"]) == pytest.approx(statistics.stdev(finals), rel=1e-5, abs=1e-9)
        assert (row["n"], row["rounds"]) == ("3", "2")
    table = (out / "summary.md").read_text()
    assert table.startswith("| lr | server-opt | top1_mean | top1_std | n | rounds |") and table.count("\n| 0.") == 4
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_invocation_runs_nothing_new(sweep, capsys):
    base, out = sweep
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    assert main([str(base), *GRID, "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished already: skipped") == 12
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")} == stamps


def _same_records(run: Path, full: list[dict]) -> bool:
    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("time", "seconds", "clients_per_s", "rank_work_s")}
                for r in records]
    return strip(read_metrics(run)) == strip(full)


@pytest.mark.parametrize("cut, said", [
    ("final-eval", "resumed from its last checkpoint"),
    ("no-checkpoint", "restarted (no checkpoint to resume from)"),
])
def test_a_half_finished_run_is_resumed_or_restarted(sweep, capsys, cut, said):
    base, out = sweep
    run = out / "lr=0.1_server-opt=fedavg-seed0"
    full = read_metrics(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    if cut == "final-eval":        # killed after the last round's checkpoint, before its evaluation
        (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    else:                          # killed after round 1, no checkpoint written
        (run / "checkpoint.npz").unlink()
        (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert main([str(base), *GRID, "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"lr=0.1_server-opt=fedavg-seed0: {said}" in shown and shown.count("skipped") == 11
    assert _same_records(run, full)


@pytest.mark.parametrize("grid, message", [
    ("lr=0.1,-1", "error: --lr must be above 0"),
    ("server-opt=fedavg,sgd", "error: --server-opt must be one of"),
    ("rounds=2,two", "error: argument --rounds: --rounds takes an integer, got 'two'"),
    ("lr", "error: --grid 'lr': expected OPTION=VALUE"),
    ("seed=1,2", "error: --grid 'seed=1,2': --seed cannot be swept (use --seeds)"),
])
def test_a_bad_grid_value_exits_2_before_anything_runs(sweep, tmp_path, capsys, grid, message):
    base, _ = sweep
    assert main([str(base), "--grid", grid, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_sweep_with_a_target_says_when_each_combination_reached_it(sweep, tmp_path):
    base, _ = sweep
    out = tmp_path / "out"
    assert main([str(base), "--grid", "lr=0.1", "--seeds", "0,1", "--target", "top1=0.0", "--out", str(out)]) == 0
    with open(out / "summary.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert (row["reached"], row["rounds_to_target_mean"], row["rounds"]) == ("2/2", "1", "1")
    assert read_metrics(Path(out) / "lr=0.1-seed0")[-1]["target_reached"]["round"] == 1


@pytest.mark.mpi
def test_runs_of_two_ranks_give_what_one_process_gives(sweep, tmp_path):
    base, out = sweep
    assert main([str(base), "--grid", "lr=0.1", "--grid", "server-opt=fedadam", "--seeds", "1", "--np", "2",
                 "--out", str(tmp_path / "out")]) == 0
    def main_numbers(run: Path) -> list[tuple]:      # per-user means may differ in the last bit (sum order)
        return [(r["kind"], r["round"], r.get("top1"), r.get("loss")) for r in read_metrics(run)]

    name = "lr=0.1_server-opt=fedadam-seed1"
    assert main_numbers(tmp_path / "out" / name) == main_numbers(out / name)


def test_a_sweep_folder_made_with_other_settings_is_refused_and_more_rounds_continue_it(sweep, tmp_path, capsys):
    """A changed base config does not pass for the old runs (their results would be reported as the new
    settings'); more --rounds continue the runs to them."""
    base, _ = sweep
    out = tmp_path / "out"
    assert main([str(base), "--grid", "lr=0.1", "--seeds", "0", "--out", str(out)]) == 0
    changed = tmp_path / "changed.toml"
    changed.write_text(base.read_text() + "local-epochs = 3\n")
    capsys.readouterr()
    assert main([str(changed), "--grid", "lr=0.1", "--seeds", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "--local-epochs 3 (saved: 1)" in err
    longer = tmp_path / "longer.toml"
    longer.write_text(base.read_text().replace("rounds = 2", "rounds = 3"))
    assert main([str(longer), "--grid", "lr=0.1", "--seeds", "0", "--out", str(out)]) == 0
    assert [r["round"] for r in read_metrics(out / "lr=0.1-seed0") if r["kind"] == "train"] == [1, 2, 3]


def test_one_seed_shows_no_spread_rather_than_a_spread_of_zero():
    from flock.sweep import Row, table

    one = Row((("lr", "0.1"),), [0.25], [3], [], [], [], [])
    two = Row((("lr", "0.2"),), [0.25, 0.5], [3, 3], [], [], [], [])
    cells = table([one, two], "top1", "")
    assert cells[0]["top1_std"] == "" and cells[0]["n"] == "1"
    assert float(cells[1]["top1_std"]) == pytest.approx(statistics.stdev([0.25, 0.5]), rel=1e-5)   # 6 digits
