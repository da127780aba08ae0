"""The clock's records: one dict per synchronous round or asynchronous server update, with flat keys for
metrics.jsonl next to the training record's.

- sim_time: virtual seconds since the run began, at the end of the round / update;
- round_s: virtual seconds the round took (since the previous update, asynchronously);
- selected: clients started (candidates of a round, tasks started since the previous update);
- completed: results that count; dropped: clients that went off-line before finishing;
- stale: results that came too late (after the K-th finisher or the deadline; asynchronously, staler than
  the maximum), none of them trained;
- voided (synchronous): results that came in time but were thrown away because the round failed (none of
  them trained: a failed round trains nobody);
- staleness_mean, staleness_max: over the counted results (0 in synchronous rounds);
- bytes_down: every selected client downloads the model; bytes_up: every client whose upload the server
  receives (synchronously the counted and the voided ones, as the late are cancelled at the round's end;
  asynchronously the counted and the too stale);
- failed (synchronous): 1 when fewer than the minimum number of clients counted.
"""
from __future__ import annotations

from typing import Any

from scheduler.phones.fedbuff import Buffer
from scheduler.phones.sync_round import RoundOutcome


def sync_round_record(outcome: RoundOutcome, *, bytes_down: int, bytes_up: int) -> dict[str, Any]:
    """The clock's record of a synchronous round; `bytes_down`/`bytes_up` are one client's transfers."""
    selected = len(outcome.trained) + len(outcome.discarded) + len(outcome.dropped) + len(outcome.voided)
    return {"sim_time": outcome.end_time, "round_s": outcome.duration_s, "selected": selected,
            "completed": len(outcome.trained), "dropped": len(outcome.dropped), "stale": len(outcome.discarded),
            "voided": len(outcome.voided), "staleness_mean": 0.0, "staleness_max": 0,
            "bytes_down": selected * bytes_down, "bytes_up": (len(outcome.trained) + len(outcome.voided)) * bytes_up,
            "failed": int(outcome.failed)}


def async_update_record(buffer: Buffer, *, previous_time: float, bytes_down: int,
                        bytes_up: int) -> dict[str, Any]:
    """The clock's record of the server update `buffer` makes; `previous_time` is the previous update's
    virtual time (0 for the first)."""
    staleness = [a.staleness for a in buffer.arrivals]
    return {"sim_time": buffer.time, "round_s": buffer.time - previous_time, "selected": buffer.started,
            "completed": len(buffer.arrivals), "dropped": buffer.dropped, "stale": buffer.stale,
            "staleness_mean": sum(staleness) / len(staleness), "staleness_max": max(staleness),
            "bytes_down": buffer.started * bytes_down, "bytes_up": (len(buffer.arrivals) + buffer.stale) * bytes_up}
