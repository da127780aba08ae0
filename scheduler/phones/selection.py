"""On-line candidates drawn lazily from a population, never by a scan of it.

A selection walks a seeded random order of the population's positions (a pure function of the seed, the
caller's purpose and an index: the round, or the asynchronous start) and asks the availability model only
about the users it meets, until it has enough or has made `max_probes` lookups (default 1,000 + 100 per
wanted candidate, so that a population almost wholly off-line costs a bounded search and the round goes on
with whom it found). The order draws distinct positions uniformly, with a set of those seen, while fewer
than half the population is seen, then shuffles the rest at once; every prefix is a uniform sample
without replacement, and the work is proportional to the positions visited: picking 100 phones among
1.66 million costs a few blocks of 64 random integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Iterator, Sequence

import numpy as np

from flock.common import streams
from scheduler.phones.availability import Availability

BLOCK = 64


def candidate_order(rng: np.random.Generator, population: int) -> Iterator[int]:
    """The positions 0..population-1 in a random order drawn from `rng`, produced lazily. The order depends
    only on `rng`'s state and `population`, not on how much of it a caller reads."""
    seen: set[int] = set()
    while 2 * len(seen) < population:
        for position in rng.integers(0, population, size=BLOCK).tolist():
            if position not in seen:
                seen.add(position)
                yield position
    if len(seen) < population:
        rest = np.setdiff1d(np.arange(population, dtype=np.int64), np.fromiter(seen, dtype=np.int64, count=len(seen)))
        yield from rng.permutation(rest).tolist()


@dataclass(frozen=True)
class Candidates:
    """On-line users in the order they were drawn, when each goes off-line, and the lookups it took."""

    uids: tuple[str, ...]
    online_until: tuple[float, ...]
    probes: int


def default_max_probes(count: int) -> int:
    """How many availability lookups a selection of `count` candidates may make."""
    return 1000 + 100 * count


def select_online(users: Sequence[str], count: int, *, seed: int, purpose: str, index: int,
                  availability: Availability, t: float, draw: int | None = None, exclude: Container[str] = (),
                  max_probes: int | None = None) -> Candidates:
    """Up to `count` distinct users of `users` on-line at virtual time `t`, skipping those in `exclude`
    (e.g. already training), drawn from the order of (seed, purpose, index). `draw` keys per-selection
    availability coins (default `index`). Pure: the same arguments give the same candidates."""
    if count < 0:
        raise ValueError(f"cannot select {count} candidates")
    limit = default_max_probes(count) if max_probes is None else max_probes
    draw = index if draw is None else draw
    uids: list[str] = []
    until: list[float] = []
    probes = 0
    if count == 0:
        return Candidates(uids=(), online_until=(), probes=0)
    for position in candidate_order(streams.candidate_rng(seed, purpose, index), len(users)):
        if probes >= limit:
            break
        uid = users[position]
        if uid in exclude:
            continue
        probes += 1
        end = availability.online_until(uid, t, draw)
        if end is not None and end > t:
            uids.append(uid)
            until.append(end)
            if len(uids) == count:
                break
    return Candidates(uids=tuple(uids), online_until=tuple(until), probes=probes)


def count_online(users: Sequence[str], *, availability: Availability, t: float, draw: int) -> int:
    """How many of `users` are on-line at virtual time `t` (for selection `draw`): a scan of the population,
    for the privacy accountant's per-round rate (one availability lookup per user)."""
    return sum(1 for uid in users if (end := availability.online_until(uid, t, draw)) is not None and end > t)
