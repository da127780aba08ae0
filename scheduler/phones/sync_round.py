"""A synchronous round in virtual time, decided before anyone trains.

The scheduler over-selects `ceil(K x over_select)` on-line candidates (`selection.select_online`); each
one's finish time (start + `clock.client_timing`) and the time it goes off-line are known up front. The
round ends at the K-th finisher, or at the deadline, or once every candidate has finished or dropped out,
whichever comes first (ties between finishers go by user id). Then:

- trained: the finishers up to the K-th, on time. Only these need real training.
- discarded: finishers beyond the K-th or after the deadline, whose results would come too late: they are
  not trained at all (the compute saved is theirs).
- dropped: candidates that go off-line before their task ends; nobody hears from them again.
- failed: fewer than `min_clients` would count. A failed round trains nobody (its results would be thrown
  away), advances the clock to its end, and is counted; it never waits for results that cannot come.
  Its finishers that were in time are `voided`: they came in time but count for nothing, which is
  not the same as late.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RoundOutcome:
    """What a synchronous round does; user lists keep the candidates' order."""

    trained: tuple[str, ...]
    discarded: tuple[str, ...]     # finished too late: after the K-th finisher or the deadline
    dropped: tuple[str, ...]
    start_time: float
    end_time: float
    failed: bool
    voided: tuple[str, ...] = ()   # finished in time, thrown away with a failed round

    @property
    def duration_s(self) -> float:
        return self.end_time - self.start_time


def resolve_sync_round(candidates: Sequence[str], durations: Sequence[float], online_until: Sequence[float], *,
                       start_time: float, k: int, deadline_s: float = math.inf,
                       min_clients: int = 1) -> RoundOutcome:
    """Resolves a round started at `start_time`: `durations[i]` is candidate i's virtual duration,
    `online_until[i]` when it goes off-line (math.inf: never). `deadline_s` counts from the start."""
    n = len(candidates)
    if len(durations) != n or len(online_until) != n:
        raise ValueError(f"{n} candidates, {len(durations)} durations, {len(online_until)} off-line times")
    if len(set(candidates)) != n:
        raise ValueError("a candidate appears twice")
    if k < 1 or not 1 <= min_clients <= k:
        raise ValueError(f"need K >= 1 and 1 <= min_clients <= K, got K={k}, min_clients={min_clients}")
    if not deadline_s > 0:
        raise ValueError(f"the deadline must be > 0 seconds, got {deadline_s}")
    if not all(math.isfinite(d) and d >= 0 for d in durations):
        raise ValueError("durations must be finite and >= 0")
    deadline = start_time + deadline_s
    finish = [start_time + d for d in durations]
    dropped = {c for c, f, off in zip(candidates, finish, online_until) if off < f}
    finishers = sorted((f, c) for c, f in zip(candidates, finish) if c not in dropped)
    on_time = [c for f, c in finishers if f <= deadline]
    counted = set(on_time[:k])
    if len(counted) == k:
        end = max(f for f, c in finishers if c in counted)
    else:
        # the server learns of a drop-out when its phone goes: with nobody left to wait for, it stops
        last_event = max((min(f, off) for f, off in zip(finish, online_until)), default=start_time)
        end = min(deadline, last_event) if n else (deadline if math.isfinite(deadline) else start_time)
    failed = len(counted) < min_clients
    voided = counted if failed else set()
    if failed:
        counted = set()
    return RoundOutcome(
        trained=tuple(c for c in candidates if c in counted),
        discarded=tuple(c for c in candidates if c not in counted and c not in dropped and c not in voided),
        dropped=tuple(c for c in candidates if c in dropped),
        start_time=start_time, end_time=end, failed=failed,
        voided=tuple(c for c in candidates if c in voided))
