"""The phones' named random streams, each a pure function of the seed and plain integers.

Every stream is `numpy.random.SeedSequence([seed, PHONES, crc32(purpose), ...])`, like
`simulator/shard.py:user_seed` (crc32 of the user id, a word per purpose). Why these words:

- `PHONES` (crc32 of "flock.phones", 3,818,887,326) sits where the other streams of flock put a round
  index (`[seed, round]` for sampling, `[seed, round, crc32(uid), crc32(purpose)]` for a user's training)
  or a small constant (`[seed, 7]`, `[seed, 2**31 - 1]`); no round count reaches it, so no phone stream
  equals one of those.
- SeedSequence pads short entropy with zeros (`[a, b]` draws what `[a, b, 0, 0]` draws), so each purpose
  has a distinct third word and a fixed number of words: two purposes never meet.

A user's streams depend on crc32(uid) only, so a phone is the same in every round and at any number of
ranks. Two user ids with the same crc32 (about 320 pairs among 1.66 million ids) share their phone and
coins; harmless for a simulation, and the price of matching `user_seed`.
"""
from __future__ import annotations

import zlib

import numpy as np

PHONES = zlib.crc32(b"flock.phones")
_TWO_32 = float(2**32)


def _word(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _sequence(seed: int, purpose: str, *words: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, PHONES, _word(purpose), *words])


def device_rng(seed: int, uid: str) -> np.random.Generator:
    """The generator that draws `uid`'s built-in device profile."""
    return np.random.default_rng(_sequence(seed, "device", _word(uid)))


def online_coin(seed: int, draw: int, uid: str) -> float:
    """A uniform number in [0, 1) for `uid` at draw `draw` (a round, or an asynchronous start)."""
    return float(_sequence(seed, "online", draw, _word(uid)).generate_state(1)[0]) / _TWO_32


def hourly_coin(seed: int, hour: int, uid: str) -> float:
    """A uniform number in [0, 1) for `uid` in virtual hour `hour` (the daily availability pattern)."""
    return float(_sequence(seed, "daily", hour, _word(uid)).generate_state(1)[0]) / _TWO_32


def candidate_rng(seed: int, purpose: str, index: int) -> np.random.Generator:
    """The generator of one candidate order: `purpose` names the caller ("sync" per round, "async" per
    start), `index` the round or the start."""
    return np.random.default_rng(_sequence(seed, f"candidates/{purpose}", index))
