"""Rank 0's run output: metrics.jsonl (the source of truth) and one progress line per step."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("flock")


def truncate_metrics(path: Path, rounds_done: int) -> None:
    """Keeps the records a run resumed after `rounds_done` rounds would not write again: training rounds up
    to it, evaluations before it. Rewritten atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:      # a line cut short by the crash
            continue
        if (r.get("kind") == "train" and r["round"] <= rounds_done) or (r.get("kind") == "eval" and r["round"] < rounds_done):
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


class Recorder:
    def __init__(self, run_dir: Path, rounds: int) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rounds = rounds
        self._file = open(self.path, "a", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        log.info(self.describe(record))

    def describe(self, r: dict) -> str:
        if r["kind"] == "train":
            loss = f"{r['loss']:.4f}" if "loss" in r else "n/a"
            return (f"round {r['round']}/{self.rounds}  loss {loss}  clients {r['clients']}  "
                    f"samples {r['samples']}  {r['seconds']:.2f} s  {r['clients_per_s']:.2f} clients/s")
        ratios = "  ".join(f"{k} {v:.4%}" if k.startswith("top") else f"{k} {v:.4f}"
                           for k, v in r.items() if isinstance(v, float) and (k.endswith("_user_mean") or
                                                                              f"{k}_user_mean" in r))
        return f"eval @ round {r['round']}: {ratios}  users {r['users']}  ({r['seconds']:.2f} s)"

    def close(self) -> None:
        self._file.close()
