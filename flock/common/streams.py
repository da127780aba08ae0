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
| `device_rng(seed, uid)` | [seed, PHONES, crc32("device"), crc32(uid)] | a user's built-in device profile |
| `online_coin(seed, draw, uid)` | [seed, PHONES, crc32("online"), draw, crc32(uid)] | `--availability round:P` |
| `hourly_coin(seed, hour, uid)` | [seed, PHONES, crc32("daily"), hour, crc32(uid)] | `--availability daily:...` |
| `candidate_rng(seed, purpose, index)` | [seed, PHONES, crc32("candidates/" + purpose), index] | on-line candidates of a round or start |
| `selection_rng(seed, purpose, index)` | [seed, PHONES, crc32("selection/" + purpose), index] | a selector's own draws (`--selection`) in a round ("sync") or at an asynchronous start ("async") |
| `privacy_rng(seed, purpose, round)` | [seed, PRIVACY, crc32(purpose), round] | the server's DP noise ("dp-noise"), the model broadcast's quantization ("broadcast") |
| `clip_count_rng(seed, round)` | [seed, PRIVACY, crc32("dp-clip-count"), round] | adaptive clipping's noise on the count of unclipped clients |
| `secagg_rng(seed, round, a, b)` | [seed, PRIVACY, crc32("secagg"), round, crc32(a), crc32(b)] | simulated secure aggregation's masks |
| `channel_seed(user_seed)` | [user_seed, PRIVACY, crc32("channel")] | a client's clipping noise, quantization and fixed-point rounding |
| `attack_rng(seed, purpose, round, uid, block)` | [seed, ATTACK, crc32(purpose), round, crc32(uid), block] | attacks (`simulator/attacks.py`): "malicious" (the malicious users; round, uid and block unused: 0, "", 0), "backdoor" (a malicious user's poisoned samples in a round), "gaussian" (a malicious user's noise, per block of the flat update) |
| `partition(seed)` | [seed, DATA, crc32("partition")] | `python -m flock.partition`: the partition, then the per-user test split |
| `mnist_partition(seed)` | [seed] | `python -m reader.mnist`'s partition and test split (kept from before this module: [seed] draws what `sampling(seed, 0)` draws, harmless for a data set built once, and its folders stay as they were) |

PHONES (crc32 of "flock.phones"), PRIVACY (crc32 of "flock.privacy"), DATA (crc32 of "flock.data") and ATTACK
(crc32 of "flock.attack") sit where the older streams put a round index or a small constant, which
no round count reaches. SeedSequence pads short entropy with zeros (`[a, b]` draws what `[a, b, 0, 0]`
draws), so every stream of one shape has its own purpose word. A user's streams depend on crc32(uid), so a
phone is the same in every round and at any number of ranks; two ids with the same crc32 (about 320 pairs
among 1.66 million) share their phone, as they share `user_seed`.
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


PHONES = _word("flock.phones")
_TWO_32 = float(2**32)


def _phone_sequence(seed: int, purpose: str, *words: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, PHONES, _word(purpose), *words])


def device_rng(seed: int, uid: str) -> np.random.Generator:
    """The generator that draws `uid`'s built-in device profile."""
    return np.random.default_rng(_phone_sequence(seed, "device", _word(uid)))


def online_coin(seed: int, draw: int, uid: str) -> float:
    """A uniform number in [0, 1) for `uid` at draw `draw` (a round, or an asynchronous start)."""
    return float(_phone_sequence(seed, "online", draw, _word(uid)).generate_state(1)[0]) / _TWO_32


def hourly_coin(seed: int, hour: int, uid: str) -> float:
    """A uniform number in [0, 1) for `uid` in virtual hour `hour` (the daily availability pattern)."""
    return float(_phone_sequence(seed, "daily", hour, _word(uid)).generate_state(1)[0]) / _TWO_32


def candidate_rng(seed: int, purpose: str, index: int) -> np.random.Generator:
    """The generator of one candidate order: `purpose` names the caller ("sync" per round, "async" per
    start), `index` the round or the start."""
    return np.random.default_rng(_phone_sequence(seed, f"candidates/{purpose}", index))


def selection_rng(seed: int, purpose: str, index: int) -> np.random.Generator:
    """The generator a selector (`scheduler/selection/`) draws from when it chooses among candidates: `purpose`
    "sync" per round, "async" per asynchronous start, `index` the round or the start."""
    return np.random.default_rng(_phone_sequence(seed, f"selection/{purpose}", index))


PRIVACY = _word("flock.privacy")


def privacy_rng(seed: int, purpose: str, round_index: int) -> np.random.Generator:
    """The generator of one round's server-side randomness: `purpose` "dp-noise" (the Gaussian noise on the
    round's sum) or "broadcast" (the stochastic rounding of a compressed model, the same for every client)."""
    return np.random.default_rng([seed, PRIVACY, _word(purpose), round_index])


def clip_count_rng(seed: int, round_index: int) -> np.random.Generator:
    """Adaptive clipping: the noise on round `round_index`'s count of clients whose update was not clipped."""
    return privacy_rng(seed, "dp-clip-count", round_index)


def channel_seed(user_seed_value: int) -> int:
    """A client's channel seed (local DP noise, quantization, fixed-point rounding), derived from its training
    seed for the round, so that it differs from the training stream and is the same on any rank."""
    return int(np.random.SeedSequence([user_seed_value, PRIVACY, _word("channel")]).generate_state(1)[0])


def secagg_rng(seed: int, round_index: int, a: str, b: str) -> np.random.Generator:
    """Simulated secure aggregation: the mask two users `a` and `b` agree on in a round (`a` == `b`: a's
    self mask)."""
    return np.random.default_rng([seed, PRIVACY, _word("secagg"), round_index, _word(a), _word(b)])


DATA = _word("flock.data")


def partition(seed: int) -> np.random.Generator:
    """`python -m flock.partition`'s one generator: the scheme's draws, then the per-user test split."""
    return np.random.default_rng([seed, DATA, _word("partition")])


def mnist_partition(seed: int) -> np.random.Generator:
    """`python -m reader.mnist`'s generator, as it always was (its partitions stay what they were)."""
    return np.random.default_rng(seed)


ATTACK = _word("flock.attack")


def attack_rng(seed: int, purpose: str, round_index: int = 0, uid: str = "", block: int = 0) -> np.random.Generator:
    """The generator of one attack draw: `purpose` "malicious" (which users are malicious, the same in every
    round: round, uid and block left at 0, "", 0), "backdoor" (which of `uid`'s samples carry the trigger in
    round `round_index`) or "gaussian" (`uid`'s noise in round `round_index` on block `block` of the flat
    update). Always six words, so the purpose word alone keeps the purposes apart."""
    return np.random.default_rng([seed, ATTACK, _word(purpose), round_index, _word(uid), block])
