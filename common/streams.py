"""Every named random stream of a run, in one place, each a pure function of the seed and its coordinates.

A stream's words are distinct from every other stream's (a purpose word where the shape alone could
collide), so no two streams ever draw the same numbers: a resumed run and a run on any number of ranks
draw exactly what an uninterrupted single-process run would. The words of the streams that existed before
this module are kept as they were, so results are unchanged.

| stream | words | used for |
|---|---|---|
| `sampling(seed, round)` | [seed, round] | the round's clients |
| `evaluation(seed)` | [seed, 2**31 - 1] | the fixed subset of test users (`--eval-users`) |
| `user_seed(seed, round, uid, purpose)` | [seed, round, crc32(uid), crc32(purpose)] | a user's local training, fine-tuning |
| `centralized(seed)` | [seed, crc32("centralized"), 0, 1] | the centralized baseline's data order |
"""
from __future__ import annotations

import zlib

import numpy as np

EVALUATION_WORD = 2**31 - 1       # above any round index


def _word(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def sampling(seed: int, round_index: int) -> np.random.Generator:
    """Client sampling of training round `round_index` (0-based)."""
    return np.random.default_rng([seed, round_index])


def evaluation(seed: int) -> np.random.Generator:
    """The fixed subset of test users evaluated every time."""
    return np.random.default_rng([seed, EVALUATION_WORD])


def user_seed(seed: int, round_index: int, uid: str, purpose: str = "train") -> int:
    """A user's random seed for one round and purpose: the same whichever rank, shard or thread uses it."""
    words = [seed, round_index, _word(uid), _word(purpose)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def centralized(seed: int) -> np.random.Generator:
    """The centralized baseline's shuffling of the pooled data (4 words: no other stream has that shape
    with this purpose word)."""
    return np.random.default_rng([seed, _word("centralized"), 0, 1])
