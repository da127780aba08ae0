"""A day's user ids without a Python object per user.

LEAF Reddit has 1,660,820 users; as a tuple of str plus a dict of positions and one of counts they cost
about 400 MB in every process that reads a day. `UserIds` keeps them as one fixed-width array of UTF-8
bytes in file order and a sorted copy with each id's position (memory-mapped from the reader's cache, so
only the pages a lookup touches are resident); a lookup is a binary search, an id is decoded when asked
for. `UserCounts` is the user -> sample count mapping over it, `UserSubset` a selection of its positions
(e.g. the users that have samples).
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence, overload

import numpy as np

CHUNK = 65_536


def encode_ids(users: Sequence[str]) -> np.ndarray:
    """Fixed-width UTF-8 bytes of `users` (an id may not contain NUL: the width pads with it)."""
    return fixed_width([u.encode("utf-8") for u in users])


def fixed_width(raw: Sequence[bytes]) -> np.ndarray:
    """One fixed-width bytes array of the encoded ids `raw`."""
    width = max((len(b) for b in raw), default=1) or 1
    return np.array(raw, dtype=f"S{width}")


class UserIds(Sequence[str]):
    """User ids in file order. `ids`: fixed-width UTF-8 bytes; `sorted_ids` the same sorted and
    `sorted_positions` where each sorted id sits in `ids` (see `sort_ids`)."""

    def __init__(self, ids: np.ndarray, sorted_ids: np.ndarray, sorted_positions: np.ndarray) -> None:
        self._ids = ids
        self._sorted = sorted_ids
        self._positions = sorted_positions
        self._width = ids.dtype.itemsize

    @classmethod
    def from_list(cls, users: Sequence[str]) -> "UserIds":
        return cls(*sort_ids(encode_ids(users)))

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [b.decode("utf-8") for b in self._ids[i].tolist()]
        return self._ids[i].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self._ids), CHUNK):
            yield from self[start:start + CHUNK]

    def position(self, uid: str) -> int | None:
        """Where `uid` is in file order, or None."""
        key = uid.encode("utf-8")
        if len(key) > self._width or not len(self._sorted):
            return None
        i = int(np.searchsorted(self._sorted, key))
        if i < len(self._sorted) and self._sorted[i] == key:
            return int(self._positions[i])
        return None

    def positions(self, uids: Sequence[str]) -> np.ndarray:
        """Where each of `uids` is in file order (-1: not a user), in one vectorized search."""
        keys = [u.encode("utf-8") for u in uids]
        fits = np.array([len(k) <= self._width for k in keys], dtype=bool)
        found = np.full(len(keys), -1, dtype=np.int64)
        if not len(self._sorted) or not fits.any():
            return found
        wanted = np.array([k for k, ok in zip(keys, fits) if ok], dtype=self._sorted.dtype)
        at = np.minimum(np.searchsorted(self._sorted, wanted), len(self._sorted) - 1)
        hit = self._sorted[at] == wanted
        found[np.flatnonzero(fits)[hit]] = self._positions[at[hit]]
        return found

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, str) and self.position(uid) is not None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UserIds):
            return np.array_equal(self._ids, other._ids)
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(repr(u) for u in self[:3])
        return f"UserIds({len(self)} users: {shown}{', ...' if len(self) > 3 else ''})"


def sort_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, ids sorted, the file position of each sorted id)."""
    positions = np.argsort(ids, kind="stable")
    return ids, ids[positions], positions


def first_duplicate(sorted_ids: np.ndarray) -> str | None:
    """An id that occurs twice in a sorted id array, or None."""
    same = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    return sorted_ids[same[0]].decode("utf-8") if len(same) else None


class UserCounts(Mapping[str, int]):
    """user -> sample count over a `UserIds` table and its counts array (no dict of every user)."""

    def __init__(self, users: UserIds, counts: np.ndarray) -> None:
        self._users = users
        self._counts = counts

    def __getitem__(self, uid: str) -> int:
        i = self._users.position(uid) if isinstance(uid, str) else None
        if i is None:
            raise KeyError(uid)
        return int(self._counts[i])

    def __contains__(self, uid: object) -> bool:
        return uid in self._users

    def __iter__(self) -> Iterator[str]:
        return iter(self._users)

    def many(self, uids: Sequence[str]) -> list[int]:
        """The counts of `uids` in one vectorized lookup (a round's cohort); KeyError for a stranger."""
        found = self._users.positions(uids)
        if (found < 0).any():
            raise KeyError(uids[int(np.flatnonzero(found < 0)[0])])
        return self._counts[found].tolist()

    def __len__(self) -> int:
        return len(self._users)


class UserSubset(Sequence[str]):
    """The users of `base` at `positions` (in that order)."""

    def __init__(self, base: Sequence[str], positions: np.ndarray) -> None:
        self._base = base
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._base[int(p)] for p in self._positions[i]]
        return self._base[int(self._positions[i])]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self._positions), CHUNK):
            yield from self[start:start + CHUNK]


def counts_for(counts: Mapping[str, int], uids: Sequence[str]) -> list[int]:
    """`[counts[u] for u in uids]`, in one vectorized lookup when `counts` is a UserCounts table."""
    return counts.many(uids) if isinstance(counts, UserCounts) else [counts[u] for u in uids]
