"""Synchronous rounds on phones: the scheduler's one entry point to the clock (`PhoneRounds.plan_round`),
which picks the round's on-line candidates, times each one's download, training and upload on its device,
and decides before anyone trains which results will count (over-selection, deadline, minimum quorum). A
client selection (`scheduler/selection/`) may choose the candidates instead of the uniform draw."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from flock.common.domain import over_selected
from scheduler.phones.availability import Availability
from scheduler.phones.clock import client_timing, model_bytes
from scheduler.phones.devices import ProfileSource
from scheduler.phones.report import sync_round_record
from scheduler.phones.selection import count_online, select_online
from scheduler.phones.sync_round import RoundOutcome, resolve_sync_round


@dataclass(frozen=True)
class PlannedRound:
    """A round decided in virtual time: who trains, and the round's clock record (sim_time, counts, bytes,
    compute_saved_s: the virtual compute of the candidates that are not trained because their result would
    not count)."""

    outcome: RoundOutcome
    record: Mapping[str, float] = field(default_factory=dict)
    sampling: tuple[int, int] | None = None    # (users on-line, candidates asked for), when counted

    @property
    def trained(self) -> list[str]:
        return list(self.outcome.trained)


@dataclass(frozen=True)
class PhoneRounds:
    """The device model of a run: profiles, availability and the synchronous round's rules."""

    profiles: ProfileSource
    availability: Availability
    seed: int
    local_epochs: int = 1
    over_select: float = 1.0
    deadline_s: float = math.inf       # virtual seconds from a round's start; inf: none
    min_clients: int = 1
    client_bytes: tuple[int, int] | None = None    # (down, up) per client (compression); None: the model each way
    count_online: bool = False     # count the users on-line at each round's start (the DP accountant's rate)

    def plan_round(self, round_index: int, users: Sequence[str], counts: Mapping[str, int], k: int, *,
                   start_time: float, shared_params: int, selection: Any = None) -> PlannedRound:
        """Round `round_index` (0-based) of K clients among `users`, starting at virtual `start_time`;
        `selection` (a `scheduler.selection.Selection`) chooses the candidates (None: uniformly), and is
        told which of them will train."""
        size = model_bytes(shared_params)
        down, up = self.client_bytes or (size, size)
        asked = over_selected(k, self.over_select)
        if selection is None:
            candidates = select_online(users, asked, seed=self.seed, purpose="sync", index=round_index,
                                       availability=self.availability, t=start_time)
        else:
            candidates = selection.choose(
                purpose="sync", index=round_index, round=round_index + 1, users=users, counts=counts, count=asked,
                availability=self.availability, t=start_time, duration_of=lambda u: client_timing(
                    self.profiles.profile(u), samples=self.local_epochs * counts[u], bytes_down=down,
                    bytes_up=up).total_s)
        sampling = None
        if self.count_online:
            online = count_online(users, availability=self.availability, t=start_time, draw=round_index)
            sampling = (online, asked)
        timings = {u: client_timing(self.profiles.profile(u), samples=self.local_epochs * counts[u],
                                    bytes_down=down, bytes_up=up) for u in candidates.uids}
        outcome = resolve_sync_round(candidates.uids, [timings[u].total_s for u in candidates.uids],
                                     candidates.online_until, start_time=start_time, k=k,
                                     deadline_s=self.deadline_s, min_clients=min(self.min_clients, k))
        if selection is not None:
            selection.expect(round_index + 1, [(-1, u) for u in outcome.trained],
                             (*outcome.discarded, *outcome.dropped, *outcome.voided))
        saved = sum(timings[u].compute_s for u in (*outcome.discarded, *outcome.voided))
        record = {**sync_round_record(outcome, bytes_down=down, bytes_up=up), "compute_saved_s": saved}
        return PlannedRound(outcome=outcome, record=record, sampling=sampling)
