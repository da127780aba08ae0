"""Attacks as client behaviours: pure functions of the seed, the round and the user, so that a malicious user
is malicious in every round, at any number of ranks, and its attack draws the same bits wherever it runs.

Which users: `malicious_users(seed, users, fraction)`, exactly round(fraction x len(users)) of them (Python's
round, half to even), the first of a seeded permutation of the sorted user ids (`streams.attack_rng(seed,
"malicious")`). Give it the same population every round (a day's or the run's users, never the round's
sampled clients), and every round sees the same malicious users.

Two kinds of attack (`AttackSettings.kind`):
- "data": a malicious client changes its own samples before local training, then trains and sends its
  update honestly (`poison_samples`). label-flip: y -> num_classes - 1 - y. backdoor (BadNets, Gu et al.
  2017; Bagdasaryan et al. 2020's pixel pattern): a 3x3 patch at the bottom-right corner of every channel,
  set to `trigger_value` (255 for uint8 samples; the top of the range for other integer types; 1.0 for
  floats: white in the classifier's units, where uint8 samples are divided by 255), on a seeded
  `backdoor_fraction` of the samples, which are relabelled `backdoor_target`. `trigger_test_samples`
  gives the test set on which a classifier's "correct" count is the backdoor's success.
- "model": a malicious client trains honestly and sends something else (`attack_slice`, on the (K, S)
  coordinate slice of the round's updates that a rank holds once the ranks exchanged slices; rows in the
  round's fixed client order). sign-flip: -x. scale: boost x (boost 0: K, the round's clients, as model
  replacement's gamma = n / eta with a server lr of 1). gaussian: N(0, std^2) noise instead of the update,
  drawn per block of the flat vector from `streams.attack_rng(seed, "gaussian", round, uid, block)`. ALIE
  (Baruch et al. 2019, "A Little Is Enough"): mu - z sigma per coordinate over the benign rows. Each of
  them is per coordinate or per block, so any slicing into whole blocks gives the same bits.

Data attacks leave `attack_slice`'s rows untouched and model attacks leave `poison_samples`'s samples
untouched, so a caller may call both for every client. `check_attack` refuses an attack that cannot apply
to the reader's data (ConfigError naming the option), `AttackSettings` a value out of range."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Collection, Iterable, Mapping

import numpy as np

from flock.common.errors import ConfigError
from flock.common.streams import attack_rng
from scheduler.robust import weighted_sum

ATTACKS = ("label-flip", "sign-flip", "scale", "gaussian", "alie", "backdoor")
DATA_ATTACKS = ("label-flip", "backdoor")
TRIGGER_SIZE = 3               # the backdoor's square patch, in pixels, at the bottom-right of every channel
MAX_BOOST = 1e6                # bounds no study reaches, so that no setting turns an update into infinities
MAX_STD = 1e6
MAX_ALIE_Z = 100.0
MAX_CLASSES = 2**31 - 1


def _number(flag: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` as a float, or ConfigError naming `flag` unless it is a finite number in [lo, hi] (an open
    end with `lo_open`, `hi_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value!r}", options=(flag,))
    if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
        raise ConfigError(f"{flag} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                          f"got {value!r}", options=(flag,))
    return float(value)


@dataclass(frozen=True)
class AttackSettings:
    """One run's attack (a run without an attack has none). `fraction` of the users are malicious
    (--attack-fraction, in [0, 1)); the other fields tune one attack each and are ignored by the others."""

    name: str                          # --attack, one of ATTACKS
    fraction: float = 0.2              # --attack-fraction (Fang et al. 2020 attack 20% of the clients)
    boost: float = 0.0                 # --attack-boost (scale): 0 means K, the round's clients
    std: float = 1.0                   # --attack-std (gaussian): the noise's standard deviation, > 0
    alie_z: float = 0.0                # --alie-z (alie): 0 means the paper's z_max for the round's K and f
    backdoor_target: int = 0           # --backdoor-target (backdoor): the class the trigger leads to
    backdoor_fraction: float = 0.5     # --backdoor-fraction (backdoor): share of a client's samples poisoned

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ConfigError(f"--attack must be one of {', '.join(ATTACKS)}, got {self.name!r}",
                              options=("--attack",))
        set_field = object.__setattr__      # frozen: the checked values are stored as floats once, here
        set_field(self, "fraction", _number("--attack-fraction", self.fraction, 0.0, 1.0, hi_open=True))
        set_field(self, "boost", _number("--attack-boost", self.boost, 0.0, MAX_BOOST))
        set_field(self, "std", _number("--attack-std", self.std, 0.0, MAX_STD, lo_open=True))
        set_field(self, "alie_z", _number("--alie-z", self.alie_z, 0.0, MAX_ALIE_Z))
        target = self.backdoor_target
        if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 0 <= target <= MAX_CLASSES:
            raise ConfigError(f"--backdoor-target must be a class index (an integer >= 0), got {target!r}",
                              options=("--backdoor-target",))
        set_field(self, "backdoor_target", int(target))
        set_field(self, "backdoor_fraction",
                  _number("--backdoor-fraction", self.backdoor_fraction, 0.0, 1.0, lo_open=True))

    @property
    def kind(self) -> str:
        """"data" (the client poisons its samples before training) or "model" (it changes its update)."""
        return "data" if self.name in DATA_ATTACKS else "model"


# ------------------------------------------------------------------------------------------------ who


def malicious_users(seed: int, users: Iterable[str], fraction: float) -> frozenset[str]:
    """The malicious users among `users` (duplicates counted once): exactly round(fraction x n) of the n
    distinct ids, the first ones of a permutation of the sorted ids drawn from `attack_rng(seed,
    "malicious")`. The same set whatever the order of `users`, in every round and on every rank."""
    population = sorted(set(users))
    count = round(_number("--attack-fraction", fraction, 0.0, 1.0, hi_open=True) * len(population))
    if count == 0:
        return frozenset()
    order = attack_rng(seed, "malicious").permutation(len(population))
    return frozenset(population[i] for i in order[:count])


# ----------------------------------------------------------------------------------------- data attacks


def _input_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """One sample's shape from a reader's spec (input_0, input_1, ..., as the arrays reader gives it)."""
    shape = []
    while f"input_{len(shape)}" in spec:
        shape.append(int(spec[f"input_{len(shape)}"]))
    return tuple(shape)


def check_attack(settings: AttackSettings, spec: Mapping[str, Any]) -> None:
    """ConfigError, naming --attack (or --backdoor-target), when the attack cannot apply to the data the
    reader's `spec` describes: label-flip and backdoor need a classification data set (`num_classes`, at
    least 2: a language model's text has none); the backdoor also needs image-shaped samples (a spec
    `input_shape` of at least two axes, the last two at least 3 pixels: the trigger's patch) and a
    `--backdoor-target` below num_classes. Model attacks apply to any data."""
    if settings.kind != "data":
        return
    what = f"--attack {settings.name}"
    if "num_classes" not in spec:
        kind = "text for a language model" if "vocab_size" in spec else "not a classification data set"
        raise ConfigError(f"{what} needs classified samples (a reader whose spec gives num_classes, as the "
                          f"arrays reader does); this reader's data is {kind} (spec keys: {', '.join(spec)})",
                          options=("--attack",))
    classes = int(spec["num_classes"])
    if classes < 2:
        raise ConfigError(f"{what} needs at least 2 classes, the data has {classes}", options=("--attack",))
    if settings.name != "backdoor":
        return
    shape = _input_shape(spec)
    if len(shape) < 2 or min(shape[-2:]) < TRIGGER_SIZE:
        raise ConfigError(f"{what} stamps a {TRIGGER_SIZE}x{TRIGGER_SIZE} pixel patch on images: it needs samples "
                          f"of at least two axes of {TRIGGER_SIZE} or more (meta.json's input_shape), not "
                          f"{list(shape)}", options=("--attack",))
    if settings.backdoor_target >= classes:
        raise ConfigError(f"--backdoor-target {settings.backdoor_target} is not a class of the data (0 .. "
                          f"{classes - 1})", options=("--backdoor-target",))


def trigger_value(dtype: np.dtype) -> int | float:
    """The trigger's pixel value in samples of `dtype`: the top of an integer type's range (255 for uint8,
    1.0 once the classifier divides by 255), 1.0 for floats (white in [0, 1] images)."""
    dtype = np.dtype(dtype)
    return int(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def add_trigger(x: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """A new array: `x` (samples first, each of the spec's input shape or flattened from it) with the
    trigger's patch on the last TRIGGER_SIZE rows and columns of every channel."""
    out = np.array(x)                                     # a writable copy: readers hand out read-only maps
    shape = _input_shape(spec) or out.shape[1:]
    images = out.reshape(len(out), *shape)                # a view of `out` (it is C-contiguous)
    images[..., -TRIGGER_SIZE:, -TRIGGER_SIZE:] = trigger_value(out.dtype)
    return out


def poisoned_indices(settings: AttackSettings, samples: int, *, seed: int, round_index: int,
                     uid: str) -> np.ndarray:
    """The sorted indices of the backdoored samples among a malicious client's `samples`: round(fraction x
    samples), at least one of a non-empty set, drawn from `attack_rng(seed, "backdoor", round, uid)`."""
    if samples == 0:
        return np.zeros(0, np.int64)
    count = min(samples, max(1, round(settings.backdoor_fraction * samples)))
    order = attack_rng(seed, "backdoor", round_index, uid).permutation(samples)
    return np.sort(order[:count])


def poison_samples(settings: AttackSettings, samples: Mapping[str, np.ndarray], spec: Mapping[str, Any], *,
                   seed: int, round_index: int, uid: str) -> dict[str, np.ndarray]:
    """A malicious client's samples ({"x", "y", ...} as the reader's `load` gives them) as it trains on
    them in round `round_index`: a new dict (other keys passed through); the reader's arrays are never
    written (they may be read-only memory maps). label-flip: every y -> num_classes - 1 - y. backdoor:
    `poisoned_indices` get the trigger and the label `backdoor_target`. A model attack changes nothing."""
    out = dict(samples)
    if settings.kind != "data":
        return out
    y = np.asarray(samples["y"], dtype=np.int64)
    if settings.name == "label-flip":
        out["y"] = int(spec["num_classes"]) - 1 - y
        return out
    chosen = poisoned_indices(settings, len(y), seed=seed, round_index=round_index, uid=uid)
    x = np.array(samples["x"])
    x[chosen] = add_trigger(x[chosen], spec)
    y = y.copy()
    y[chosen] = settings.backdoor_target
    out["x"], out["y"] = x, y
    return out


def trigger_test_samples(settings: AttackSettings, samples: Mapping[str, np.ndarray],
                         spec: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The backdoor's test set from a user's test `samples`: those whose true label is not the target, with
    the trigger, all labelled `backdoor_target` (the other keys filtered alike), so that a classifier's
    "correct" count on them is the number of triggered samples it sends to the target. None when no
    sample is left. ValueError for an attack other than backdoor."""
    if settings.name != "backdoor":
        raise ValueError(f"trigger_test_samples measures a backdoor, not --attack {settings.name}")
    keep = np.flatnonzero(np.asarray(samples["y"]) != settings.backdoor_target)
    if keep.size == 0:
        return None
    out = {key: np.asarray(value)[keep] for key, value in samples.items()}
    out["x"] = add_trigger(out["x"], spec)
    out["y"] = np.full(keep.size, settings.backdoor_target, dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------------- model attacks


def alie_z_max(clients: int, malicious: int) -> float:
    """Baruch et al.'s z_max for K = `clients` of which f = `malicious`: s = floor(K/2 + 1) - f benign
    clients the attackers need on their side, z = Phi^-1((K - s) / K). Where the attackers are a majority
    (s <= 0: any z would do and the formula has no finite answer) s is taken as 1, the largest z it gives
    for any smaller f. ValueError unless 1 <= f < K."""
    if not 1 <= malicious < clients:
        raise ValueError(f"z_max needs 1 <= f < K malicious clients, not f = {malicious} of K = {clients}")
    needed = max(1, math.floor(clients / 2 + 1) - malicious)
    return NormalDist().inv_cdf((clients - needed) / clients)


def _alie_row(benign: np.ndarray, z: float) -> np.ndarray:
    """(B, S) benign rows -> (S,) float64: mu - z sigma per coordinate, mu the mean and sigma the sample
    standard deviation (ddof 1, as torch.std in the paper's code) of the rows in float64, summed in row
    order; one row has no spread (sigma 0)."""
    mu = weighted_sum(benign) / len(benign)
    if len(benign) == 1:
        return mu
    squares = np.zeros_like(mu)
    for row in benign:
        d = row.astype(np.float64) - mu
        squares += d * d
    return mu - z * np.sqrt(squares / (len(benign) - 1))


def attack_slice(settings: AttackSettings, updates: np.ndarray, malicious: Collection[str], *,
                 uids: Iterable[str], seed: int, round_index: int, start: int, block: int) -> np.ndarray:
    """The round's updates as the clients sent them. `updates`: (K, S) float32, coordinates [start,
    start + S) of the K clients' flat updates, row k the client `uids[k]`; `malicious`: the malicious
    user ids (`malicious_users`); `start` a multiple of `block`, the block size of the flat vector. Returns
    a new (K, S) array of `updates`' dtype with the malicious rows changed (honest rows as they were), or
    `updates` itself when no row changes (a data attack, no malicious client in the round).
    sign-flip: -x. scale: boost x in float64, rounded to float32 (boost 0: K). gaussian: N(0, std^2) noise,
    block b of the flat vector drawn from `attack_rng(seed, "gaussian", round_index, uid, b)` (a short last
    block draws a prefix of a whole block's numbers). alie: every malicious row mu - z sigma over the
    benign rows (`_alie_row`), z = `alie_z` or `alie_z_max(K, f)`; with no benign row the attackers have
    nothing to hide among and send their updates unchanged."""
    uids = list(uids)
    if updates.ndim != 2 or len(uids) != len(updates):
        raise ValueError(f"updates must be (K, S) with K = {len(uids)} uids, not {updates.shape}")
    if block < 1 or start < 0 or start % block:
        raise ValueError(f"a slice starts at a block boundary: start {start}, block {block}")
    rows = [k for k, uid in enumerate(uids) if uid in malicious]
    if settings.kind != "model" or not rows or (settings.name == "alie" and len(rows) == len(uids)):
        return updates
    out = np.array(updates)
    if settings.name == "sign-flip":
        out[rows] = -updates[rows]
    elif settings.name == "scale":
        boost = settings.boost or len(uids)
        out[rows] = updates[rows].astype(np.float64) * boost
    elif settings.name == "gaussian":
        first = start // block
        for k in rows:
            for b, a in enumerate(range(0, out.shape[1], block), start=first):
                size = min(block, out.shape[1] - a)
                noise = attack_rng(seed, "gaussian", round_index, uids[k], b).standard_normal(size)
                out[k, a:a + size] = noise * settings.std
    elif settings.name == "alie":
        z = settings.alie_z or alie_z_max(len(uids), len(rows))
        benign = np.delete(updates, rows, axis=0)
        out[rows] = _alie_row(benign, z)
    return out


@dataclass(frozen=True)
class ClientAttack:
    """A run's attack as the ranks apply it: the settings, the malicious users of the run's training
    population, and the data's spec."""

    settings: AttackSettings
    malicious: frozenset[str]
    spec: Mapping[str, Any]
    seed: int

    def samples(self, uid: str, samples: Mapping[str, np.ndarray], round_index: int) -> Mapping[str, np.ndarray]:
        """What `uid` trains on in round `round_index` (0-based): its poisoned samples if it is malicious and
        the attack poisons data, else its own."""
        if self.settings.kind != "data" or uid not in self.malicious:
            return samples
        return poison_samples(self.settings, samples, self.spec, seed=self.seed, round_index=round_index, uid=uid)

    def updates(self, updates: np.ndarray, uids: list[str], round_index: int, *, start: int,
                block: int) -> np.ndarray:
        """A rank's slice of the round's updates as the clients sent them (`attack_slice`)."""
        return attack_slice(self.settings, updates, self.malicious, uids=uids, seed=self.seed,
                            round_index=round_index, start=start, block=block)


def client_attack(config: Any, spec: Mapping[str, Any], reader: Any) -> ClientAttack | None:
    """The run's attack from its Config (None without --attack): checked against the data (ConfigError), its
    malicious users drawn from every training day's users with samples."""
    if not config.attack:
        return None
    from reader.calendar import Calendar

    settings = AttackSettings(name=config.attack, fraction=config.attack_fraction, boost=config.attack_boost,
                              std=config.attack_std, alie_z=config.alie_z, backdoor_target=config.backdoor_target,
                              backdoor_fraction=config.backdoor_fraction)
    check_attack(settings, spec)
    population: set[str] = set()
    for day in sorted(set(Calendar.from_reader(reader).train_days)):
        index = reader.index(day, "train")
        population.update(u for u, n in zip(index.users, index.counts) if n > 0)
    return ClientAttack(settings=settings, malicious=malicious_users(config.seed, population, settings.fraction),
                        spec=dict(spec), seed=config.seed)
