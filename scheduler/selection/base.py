"""The client-selection plug-in interface (`--selection MODULE:CLASS`): who trains, chosen among on-line
candidates from what the scheduler knows of each.

Each round (asynchronous mode: each start) the scheduler draws a pool of on-line users uniformly (the
seeded candidate order of `scheduler/phones/selection.py`; `pool_size` says how many, 0: every on-line
user), tells the selector what it knows of each candidate and asks for `count` of them; after the round it
hands over the reports of the clients that trained and names the ones picked that brought nothing (late,
off-line, in a failed round). The decision must be a function of the request and the selector's own state
(draw randomness from `request.rng` only), and the state plain JSON-able data: then a run selects the same
clients at any -np and after kill + --resume.

    class LargestFirst:
        def __init__(self, *, config) -> None: ...            # the run's Config
        def pool_size(self, count: int) -> int:
            return 0                                          # every on-line user
        def select(self, request: SelectionRequest) -> list[str]:
            best = sorted(request.candidates, key=lambda c: -c.samples)
            return [c.uid for c in best[:request.count]]
        def observe(self, round: int, reports, missed) -> None: ...
        def state_dict(self) -> dict: return {}
        def load_state_dict(self, state: dict) -> None: ...

Optional: `record() -> dict[str, float]`, fields for the round's train row (finite numbers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from flock.common.domain import ClientReport


@dataclass(frozen=True)
class Known:
    """What the scheduler knows of a user from its last report."""

    samples: float      # its weight n_k then
    loss: float         # its mean training loss then
    loss_sq: float      # the mean of its squared per-term losses then
    round: int          # the round (asynchronous mode: the server version) that report came in
    reports: int        # how many reports it has made


@dataclass(frozen=True)
class Candidate:
    """An on-line user the selector may pick."""

    uid: str
    samples: int              # its training samples on the round's day
    duration_s: float         # its task's virtual duration: download, local training, upload
    known: Known | None       # None: it has never reported


@dataclass(frozen=True)
class SelectionRequest:
    """One selection: `count` distinct users out of `candidates` (the pool, in its uniform random order)."""

    round: int                # 1-based: the round being selected (asynchronous: the version being built)
    count: int                # how many to return (at most len(candidates))
    candidates: tuple[Candidate, ...]
    population: int           # the users of the round's day, on-line or not
    time: float               # virtual seconds since the run began
    rng: np.random.Generator  # this selection's own stream (seed, round or start)


class Selector(Protocol):
    def pool_size(self, count: int) -> int:
        """How many on-line users to draw as candidates when `count` are wanted (0: every on-line user)."""

    def select(self, request: SelectionRequest) -> Sequence[str]:
        """`request.count` distinct uids of `request.candidates` (fewer only if it must)."""

    def observe(self, round: int, reports: Sequence[ClientReport], missed: Sequence[str]) -> None:
        """After `round`: the reports of the clients that trained (by uid, then task), and the users picked that
        brought nothing (late, dropped out, in a failed round; synchronous rounds only)."""

    def state_dict(self) -> dict[str, Any]:
        """The selector's state as plain JSON-able data (for the checkpoint)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from `state_dict()`'s output."""
