"""Experiment trackers (--tracker csv|mlflow|wandb): rank 0's record sink hands every metrics record to each
of them. A tracker is an object with `record(dict)` and `close()`; metrics.jsonl stays the source of truth.

- csv: RUN_DIR/metrics.csv, one row per number (round, kind, name, value), so that train and evaluation
  records, whose fields differ, share one header.
- mlflow: a run in the local store (./mlruns, or MLFLOW_TRACKING_URI), experiment "flock": the options
  from config.json as params, every number as a metric `kind/name` with its round as step, PNGs in the run
  folder as artifacts at the end.
- wandb: an offline W&B run (WANDB_MODE=offline unless set) under RUN_DIR/wandb: the same params and metrics.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

from flock.common.errors import ConfigError

log = logging.getLogger("flock")

# the pip extra that brings each optional tracker's package (pyproject.toml's optional-dependencies)
PACKAGES = {"mlflow": ("mlflow", "flock-fl[mlflow]"), "wandb": ("wandb", "flock-fl[wandb]")}


class Tracker(Protocol):
    def record(self, record: dict) -> None:
        """One metrics.jsonl record (train or eval), as written."""

    def close(self) -> None:
        """Flushes and ends the tracker's run."""


def check_trackers(names: tuple[str, ...]) -> None:
    """At start-up: each tracker's optional package imports, else one message naming the pip extra."""
    import importlib

    for name in names:
        if name in PACKAGES:
            module, extra = PACKAGES[name]
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(f"--tracker {name}: the {module} package is not installed ({e}); "
                                  f"pip install '{extra}' (or -r requirements-extras.txt)") from None


def open_trackers(config, run_dir: Path) -> list[Tracker]:
    """The run's trackers (--tracker), opened in order; if one fails to open, those opened are closed."""
    check_trackers(config.tracker)
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(config.tracker):      # each once
            try:
                opened.append({"csv": CsvTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}[name](Path(run_dir)))
            except (ImportError, OSError, ValueError, RuntimeError) as e:   # the package's own errors derive from these
                raise ConfigError(f"--tracker {name}: cannot start ({type(e).__name__}: {e})") from None
            except Exception as e:
                if type(e).__module__.split(".")[0] not in ("mlflow", "wandb"):
                    raise
                raise ConfigError(f"--tracker {name}: cannot start ({type(e).__name__}: {e})") from None
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened


def numbers(record: dict) -> Iterator[tuple[str, float]]:
    """A record's numeric fields other than round and time (lists and texts are not metrics)."""
    for key, value in record.items():
        if key not in ("round", "time", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)


def params(run_dir: Path) -> dict[str, Any]:
    """The run's options as recorded in config.json, flattened to scalars (lists and tables as JSON)."""
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in saved.items()
            if k not in ("argv", "versions", "sources", "token")}


class CsvTracker:
    """RUN_DIR/metrics.csv: round, kind, name, value (long format). Opened once metrics.jsonl is as the run
    continues from (a resumed run's cut back to its checkpoint), and written anew from it: the csv holds
    what metrics.jsonl holds, never a record twice."""

    def __init__(self, run_dir: Path) -> None:
        from flock.common.recorder import read_metrics

        earlier = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        self._file = open(run_dir / "metrics.csv", "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["round", "kind", "name", "value"])
        for record in earlier:
            self.record(record)

    def record(self, record: dict) -> None:
        for name, value in numbers(record):
            self._writer.writerow([record["round"], record["kind"], name, repr(value)])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def mlflow_uri() -> str:
    """MLFLOW_TRACKING_URI, else ./mlruns: a local file store, which MLflow 3 keeps in maintenance mode and
    opens only when MLFLOW_ALLOW_FILE_STORE says so (set here for this default; a database or server store:
    set MLFLOW_TRACKING_URI)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path("mlruns").resolve().as_uri()


class MlflowTracker:
    """An MLflow run through MlflowClient (no global active run: the caller's mlflow state is untouched).
    Like the csv, the MLflow run holds what metrics.jsonl holds: a resumed run (whose metrics.jsonl was cut
    back to its checkpoint) opens a new MLflow run, logs the records it continues from, and deletes the run
    it replaces (MLflow's soft delete: `mlflow runs restore` brings it back); the new run's tag
    `flock.replaces` names it. RUN_DIR/mlflow_run_id holds the current run's id."""

    ID_FILE = "mlflow_run_id"

    def __init__(self, run_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from flock.common.recorder import read_metrics

        self.run_dir = run_dir
        self.client = MlflowClient(tracking_uri=mlflow_uri())
        experiment = self.client.get_experiment_by_name("flock")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("flock")
        replaced = self._replaced(run_dir)
        tags = {"flock.run_dir": str(run_dir.resolve()), **({"flock.replaces": replaced} if replaced else {})}
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        try:
            values = [Param(k, str(v)[:6000]) for k, v in params(run_dir).items()]
            for i in range(0, len(values), 100):        # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=values[i:i + 100])
            earlier = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            metrics = [m for record in earlier for m in self._metrics(record)]
            for i in range(0, len(metrics), 1000):      # and at most 1000 metrics
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
            part = run_dir / (self.ID_FILE + ".part")
            part.write_text(self.run_id + "\n", encoding="utf-8")
            os.replace(part, run_dir / self.ID_FILE)
        except BaseException:
            self.client.set_terminated(self.run_id, "FAILED")
            raise
        if replaced:
            try:
                self.client.delete_run(replaced)
            except Exception as e:        # the new run is whole; the old one stays, and the user is told
                log.warning("mlflow: could not delete the replaced run %s (%s: %s)", replaced, type(e).__name__, e)
        log.info("mlflow: run %s in %s%s", self.run_id, mlflow_uri(),
                 f" (replaces {replaced}, resumed from {len(earlier)} records)" if replaced else "")

    def _replaced(self, run_dir: Path) -> str | None:
        """The id of the MLflow run this run folder wrote before (a resumed run), if that run is in this
        store, not deleted, and of this folder (a copied run folder's id names the original's run)."""
        try:
            earlier = (run_dir / self.ID_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        try:
            run = self.client.get_run(earlier)
        except Exception as e:        # not in this store (another MLFLOW_TRACKING_URI): nothing to replace
            log.info("mlflow: the run folder's earlier run %r is not in %s (%s)", earlier, mlflow_uri(), e)
            return None
        if run.data.tags.get("flock.run_dir") != str(run_dir.resolve()):
            log.info("mlflow: the earlier run %s is another folder's (%s): left as it is", earlier,
                     run.data.tags.get("flock.run_dir"))
            return None
        return earlier if run.info.lifecycle_stage == "active" else None

    @staticmethod
    def _metrics(record: dict) -> list:
        from mlflow.entities import Metric

        stamp = int(record.get("time", time.time()) * 1000)
        return [Metric(f"{record['kind']}/{name}", value, stamp, int(record["round"])) for name, value in numbers(record)]

    def record(self, record: dict) -> None:
        metrics = self._metrics(record)
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        for png in sorted(self.run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(png))
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """An offline W&B run (no network): `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later. A resumed
    run opens a new offline run holding every record metrics.jsonl holds (the earlier ones first); the
    earlier offline run stays, with the rounds it saw (sync only the newest, or the early rounds appear twice)."""

    def __init__(self, run_dir: Path) -> None:
        import wandb

        from flock.common.recorder import read_metrics

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project="flock", name=run_dir.name, dir=str(run_dir), config=params(run_dir),
                              reinit="create_new")
        for record in read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []:
            self.record(record)

    def record(self, record: dict) -> None:
        values = {f"{record['kind']}/{name}": value for name, value in numbers(record)}
        self.run.log({**values, "round": record["round"]})

    def close(self) -> None:
        self.run.finish()
