"""Rank 0's run output: metrics.jsonl (the source of truth) and one progress line per step."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from flock.common.errors import DataError

log = logging.getLogger("flock")


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records, in order (the one reader of a run's results). A line cut short by a
    crash at the end is skipped; a damaged line elsewhere is a DataError naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: not found (not a flock run directory, or the run wrote no record yet)") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):       # a line cut short by the crash
                break
            raise DataError(f"{path}: line {number} is not JSON") from None
    return records


def train_loss(record: dict) -> float | None:
    """A training record's loss: flock's `loss`, else a Flower app's `train_loss`; None when it has neither."""
    return record.get("loss", record.get("train_loss"))


def truncate_metrics(path: Path, rounds_done: int) -> None:
    """Keeps the records a run resumed after `rounds_done` rounds would not write again: training rounds up
    to it, evaluations before it. Rewritten atomically."""
    if not path.is_file():
        return
    keep = [r for r in read_metrics(path.parent)
            if (r.get("kind") == "train" and r["round"] <= rounds_done) or (r.get("kind") == "eval" and r["round"] < rounds_done)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    os.replace(tmp, path)


class _AboveBar:
    """A stream for logging handlers that prints through tqdm, above its bar."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def write(self, text: str) -> None:
        if text.strip():
            self.bar.write(text.rstrip("\n"))

    def flush(self) -> None:
        pass


def tensorboard_writer(path: Path):
    """A TensorBoard writer when the optional `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard is not installed: no TensorBoard scalars (pip install -r requirements-extras.txt)")
        return None
    return SummaryWriter(str(path))


def _epsilon(record: dict) -> str:
    return f"  epsilon {record['epsilon']:.3g}" if "epsilon" in record else ""


class Recorder:
    """Appends each record to metrics.jsonl (flushed; fsynced by `sync`, which the scheduler calls before
    each checkpoint, so the records a checkpoint covers survive a machine crash too) and shows progress:
    `mode` "bar" (a tqdm bar over the rounds with loss, last top-1 and clients/s; evaluations as lines
    above it), "lines" (one log line per step, for files and CI) or "quiet" (only the final evaluation)."""

    def __init__(self, run_dir: Path, rounds: int, *, mode: str = "lines", done: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rounds = rounds
        self.mode = mode
        self.last_eval: dict | None = None
        self._diverged_told = False
        self._file = open(self.path, "a", encoding="utf-8")
        self._bar = None
        self._tb = tensorboard_writer(Path(run_dir) / "tensorboard")
        self._streams: list[tuple[logging.StreamHandler, object]] = []
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=rounds, initial=done, unit="round", dynamic_ncols=True, file=sys.stdout)
            for handler in logging.getLogger().handlers:     # log lines go above the bar, not through it
                if isinstance(handler, logging.StreamHandler):
                    self._streams.append((handler, handler.setStream(_AboveBar(self._bar))))

    def __call__(self, record: dict) -> None:
        per_user = record.pop("_per_user", None)
        if per_user is not None:       # the latest evaluation's per-user values (fairness plots)
            path = self.path.with_name("eval_users.json")
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"round": record["round"], **per_user}))
            os.replace(tmp, path)
        record["time"] = round(time.time(), 3)        # when the step finished (unix seconds)
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("round", "time"):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["round"])
        self._file.write(json.dumps(record, allow_nan=False) + "\n")   # strict JSON: the scheduler stops on NaN
        self._file.flush()       # in the OS from here: a killed process loses nothing; see sync()
        if record["kind"] == "eval":
            self.last_eval = record
        if record.get("diverged") and not self._diverged_told:       # once a run: the round lines count them
            self._diverged_told = True
            log.warning("round %d: %d client(s) diverged (a non-finite or huge parameter after local training) and "
                        "were dropped from the round; each round's line counts them (`diverged` in metrics.jsonl), "
                        "--log-level DEBUG names the users", record["round"], record["diverged"])
        if self.mode == "lines":
            log.info(self.describe(record))
        elif self._bar is not None:
            if record["kind"] == "train":
                loss = train_loss(record)
                shown = {"loss": f"{float('nan') if loss is None else loss:.3f}", "clients/s": f"{record['clients_per_s']:.2f}"}
                if self.last_eval and "top1" in self.last_eval:
                    shown["top1"] = f"{self.last_eval['top1']:.2%}"
                self._bar.set_postfix(shown, refresh=False)
                self._bar.update(1)
            else:
                self._bar.write(self.describe(record))

    def describe(self, r: dict) -> str:
        if r["kind"] == "train":
            loss = "n/a" if train_loss(r) is None else f"{train_loss(r):.4f}"
            staleness = f", staleness {r['staleness_mean']:.1f}" if r.get("staleness_max") else ""
            voided = f", {r['voided']} in time" if r.get("voided") else ""
            phones = (f"  sim {r['sim_time'] / 3600:.3f} h (+{r['round_s']:.0f} s, {r['dropped']} off-line, "
                      f"{r['stale']} late{voided}{staleness}{', FAILED' if r.get('failed') else ''})"
                      if "sim_time" in r else "")
            diverged = f" ({r['diverged']} diverged)" if r.get("diverged") else ""
            return (f"round {r['round']}/{self.rounds}  loss {loss}  clients {r['clients']}{diverged}  "
                    f"samples {r['samples']}  {r['seconds']:.2f} s  {r['clients_per_s']:.2f} clients/s{phones}"
                    f"{_epsilon(r)}")
        ratios = "  ".join(f"{k} {v:.4%}" if k.startswith("top") else f"{k} {v:.4f}"
                           for k, v in r.items() if isinstance(v, float) and (k.endswith("_user_mean") or
                                                                              f"{k}_user_mean" in r))
        failed = f"  ({r['failed_rounds']} of {r['round']} rounds failed: nothing applied)" if r.get("failed_rounds") else ""
        return (f"eval @ round {r['round']}: {ratios}  users {r['users']}{_epsilon(r)}  ({r['seconds']:.2f} s)"
                f"{failed}")

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.sync()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            for handler, stream in self._streams:
                handler.setStream(stream)
            self._bar.close()
        if self.mode == "quiet" and self.last_eval is not None:
            print(self.describe(self.last_eval), flush=True)
