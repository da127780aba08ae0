"""Client sampling as a pure function of (seed, round): a resumed run samples what an uninterrupted one
would, whatever the number of ranks."""
from __future__ import annotations

from typing import Sequence

from flock.common import streams


def sample_clients(seed: int, round_index: int, users: Sequence[str], k: int) -> list[str]:
    """k distinct users drawn uniformly without replacement. numpy draws k of n without a permutation of
    n when k < n / 50 (Floyd's algorithm): a round among 1.66 million users costs its k draws."""
    if k > len(users):
        raise ValueError(f"cannot sample {k} clients from {len(users)} users")
    rng = streams.sampling(seed, round_index)
    return [users[i] for i in rng.choice(len(users), size=k, replace=False)]


def evaluation_users(seed: int, users: Sequence[str], limit: int) -> list[str]:
    """All users (limit 0), or a fixed seeded subset of `limit` of them, in file order (work in `limit`,
    not in the population)."""
    if limit <= 0 or limit >= len(users):
        return list(users)
    rng = streams.evaluation(seed)
    return [users[i] for i in sorted(rng.choice(len(users), size=limit, replace=False).tolist())]
