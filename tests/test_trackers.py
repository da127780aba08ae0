"""Issue 28: experiment trackers hang off rank 0's record sink (--tracker csv|mlflow|wandb), and --target
ends a run at the first evaluation that reaches it."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from flock import launch, simulate
from flock.common.config import Config
from flock.common.errors import ConfigError, SharedError
from tests.helpers import make_lm_data

SMALL = {"rounds": 3, "clients_per_round": 4, "eval_every": 1, "checkpoint_every": 0, "shards": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm") / "data")


def test_the_csv_tracker_writes_every_number_of_every_record(data, tmp_path):
    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), tracker=("csv",), **SMALL))
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [(str(r["round"]), r["kind"], k, float(v)) for r in history.records for k, v in r.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("round", "time")]
    assert [(r["round"], r["kind"], r["name"], float(r["value"])) for r in rows] == expected
    assert {"top1", "loss", "clients"} <= {r["name"] for r in rows}


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is not installed (pip install 'flock-fl[mlflow]')")
def test_mlflows_own_client_reads_back_the_params_and_every_metrics_history(data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flock.common.trackers import mlflow_uri

    monkeypatch.chdir(tmp_path)            # the default store: ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    history = simulate(Config(data_dir=str(data), run_dir="run", tracker=("mlflow",), seed=3, **SMALL))
    assert (tmp_path / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=mlflow_uri())
    runs = client.search_runs([client.get_experiment_by_name("flock").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert params["seed"] == "3" and params["rounds"] == "3" and params["server_lr"] == "1.85"
    top1 = client.get_metric_history(runs[0].info.run_id, "eval/top1")
    assert sorted((m.step, m.value) for m in top1) == history.metric("top1")
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in losses) == history.metric("loss", kind="train")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (pip install 'flock-fl[wandb]')")
def test_the_wandb_tracker_writes_an_offline_run(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), tracker=("wandb",), **SMALL))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_missing_tracker_package_is_one_message_naming_the_extra(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)        # as if not installed: importing it raises
    with pytest.raises(SharedError, match=r"--tracker mlflow: the mlflow package is not installed.*flock-fl\[mlflow\]"):
        simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), tracker=("mlflow",), **SMALL))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_ends_at_the_first_evaluation_reaching_its_target(data, tmp_path):
    full = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "full"), **SMALL))
    top1 = dict(full.metric("top1"))
    goal = top1[2]       # reached at round 2 at the latest
    first = min(r for r, v in top1.items() if v >= goal)
    cut = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "cut"), target=f"top1={goal}", **SMALL))
    assert [r["round"] for r in cut.train] == list(range(1, first + 1))
    assert cut.evals[-1]["target_reached"] == {"metric": "top1", "value": goal, "round": first}
    assert cut.metric("top1") == full.metric("top1")[:first]


def test_a_target_on_a_metric_the_trainer_does_not_report_is_refused(data, tmp_path):
    with pytest.raises(SharedError, match=r"--target accuracy=0.9: the trainer reports no 'accuracy'"):
        simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), target="accuracy=0.9", **SMALL))
    with pytest.raises(ConfigError, match="--target must be METRIC=VALUE"):
        Config(data_dir="d", target="top1")


@pytest.mark.mpi
def test_launch_hands_over_records_as_they_appear(data, tmp_path):
    seen = []
    history = launch(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), tracker=("csv",), **SMALL), np=2,
                     on_record=seen.append)
    assert seen == history.records and len(history.evals) == 3
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["sources"]["rounds"] == "config file" and saved["sources"]["lr"] == "trainer lm"
    assert (tmp_path / "run" / "metrics.csv").is_file()


NEEDS_MLFLOW = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow is not installed (pip install 'flock-fl[mlflow]')")


def _two_rounds_then_resume(root, tracker: str, resume: str = "run"):
    """A run of 2 rounds (checkpoint after each) in ROOT/run with `tracker`, then `resume` (a folder under
    ROOT: the run itself or a copy made here) resumed for a 3rd."""
    import shutil

    from tests.helpers import make_arrays_data

    data = make_arrays_data(root / "data")
    simulate(Config(data_dir=str(data), run_dir=str(root / "run"), rounds=2, reader="arrays", trainer="classifier",
                    model="tests.tiny_models:Linear", clients_per_round=4, eval_every=1, checkpoint_every=1,
                    tracker=(tracker,)))
    first = (root / "run" / "mlflow_run_id").read_text().strip() if tracker == "mlflow" else None
    if resume != "run":
        shutil.copytree(root / "run", root / resume)
    simulate(Config(data_dir=str(data), resume=str(root / resume), rounds=3))
    return first


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch):
    """MLflow's default store, ./mlruns, in the test's folder; its client."""
    from mlflow.tracking import MlflowClient

    from flock.common.trackers import mlflow_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return lambda: MlflowClient(tracking_uri=mlflow_uri())


def test_a_resumed_runs_csv_holds_each_record_once(tmp_path):
    _two_rounds_then_resume(tmp_path, "csv")
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    assert lines[0] == "round,kind,name,value"
    assert sorted({(r[0], r[1]) for r in rows}) == [("1", "eval"), ("1", "train"), ("2", "eval"), ("2", "train"),
                                                   ("3", "eval"), ("3", "train")]
    assert len(rows) == len({(r[0], r[1], r[2]) for r in rows})       # no record twice


@NEEDS_MLFLOW
def test_a_resumed_run_leaves_one_mlflow_run_with_each_record_once(tmp_path, local_mlflow):
    from flock.common.recorder import read_metrics

    first = _two_rounds_then_resume(tmp_path, "mlflow")
    records = read_metrics(tmp_path / "run")
    client = local_mlflow()
    live = client.search_runs([client.get_experiment_by_name("flock").experiment_id])
    assert len(live) == 1 and live[0].info.run_id != first and live[0].info.status == "FINISHED"
    assert live[0].data.tags["flock.replaces"] == first
    assert client.get_run(first).info.lifecycle_stage == "deleted"
    assert (tmp_path / "run" / "mlflow_run_id").read_text().strip() == live[0].info.run_id
    for kind, name in (("eval", "top1"), ("train", "loss")):
        got = client.get_metric_history(live[0].info.run_id, f"{kind}/{name}")
        assert sorted((m.step, m.value) for m in got) == [(r["round"], r[name]) for r in records if r["kind"] == kind]
        assert sorted(m.step for m in got) == [1, 2, 3]


@NEEDS_MLFLOW
def test_resuming_a_copied_run_folder_leaves_the_originals_mlflow_run_alone(tmp_path, local_mlflow):
    original = _two_rounds_then_resume(tmp_path, "mlflow", resume="copy")
    client = local_mlflow()
    assert client.get_run(original).info.lifecycle_stage == "active"
    copy = client.get_run((tmp_path / "copy" / "mlflow_run_id").read_text().strip())
    assert copy.info.run_id != original and "flock.replaces" not in copy.data.tags
    assert sorted(m.step for m in client.get_metric_history(copy.info.run_id, "train/loss")) == [1, 2, 3]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (pip install 'flock-fl[wandb]')")
def test_a_resumed_runs_new_wandb_run_logs_the_earlier_records_first(tmp_path, monkeypatch):
    from flock.common import trackers
    from flock.common.recorder import read_metrics

    logged = []      # (the tracker, the record's round)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(trackers.WandbTracker, "record", lambda self, record: logged.append((self, record["round"])))
    _two_rounds_then_resume(tmp_path, "wandb")
    resumed = logged[-1][0]
    assert [r for t, r in logged if t is resumed] == [r["round"] for r in read_metrics(tmp_path / "run")]
    assert [r for t, r in logged if t is resumed][-1] == 3
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 2
