"""Partitions of a labelled data set over users: pure functions of the labels, the options and a numpy
`Generator`, each returning a `Partition` (every user's sample indices, ascending). `flock/partition.py`
is the command line around them; `reader/mnist.py` uses them for MNIST.

Schemes (the options are the command line's, Flower Datasets' names where it has them):
- `iid`: a uniform permutation of the samples cut into per-user runs; sizes from `iid_sizes`.
- `dirichlet`: Flower Datasets' `DirichletPartitioner` (Yurochkin et al. 2019): label by label, each
  label's samples go to the users in proportions p ~ Dir(alpha, ..., alpha); with `self_balancing`, a user
  already holding more than n / users samples gets no more (p set to 0, the rest renormalised); the whole
  draw is repeated until every user has at least `min_partition_size` samples.
- `pathological`: Flower Datasets' `PathologicalPartitioner` (Li et al. 2021): every user gets exactly
  `num_classes_per_partition` labels, chosen per `class_assignment_mode`, and each label's samples are split
  evenly (sizes differ by at most one) over the users that have it.
- `shards`: McMahan et al. (2017): samples sorted by label (stably), cut into 2 x users equal shards, 2
  random shards per user.

Where this differs from Flower Datasets (same names, so say it):
- labels are taken in ascending order (Flower: order of first appearance in the data), so
  `deterministic` gives user u the labels sorted[(u + i) % K] and `first-deterministic` starts user u with
  sorted[u % K] (Flower takes the label *value* u % K, the same when labels are 0..K-1);
- each label's samples are permuted before they are cut (Flower cuts them in data order), so a user's
  share does not depend on how the file was ordered;
- each user's indices are returned ascending, not shuffled (flock's trainers reshuffle every epoch);
- `alpha` is one number (Flower also takes a vector, one per partition);
- with `self_balancing`, a label whose proportions all fall on users above the average (possible only when
  the remaining ones draw exactly 0) keeps its unbalanced proportions instead of dividing by zero, and a
  user at proportion 0 gets none of the label (in Flower the last partition takes the leftover of cut
  points that round short of the total, so it can get a sample at proportion 0);
- the Dirichlet draw is tried at most 11 times, as Flower's (its first draw and 10 more), and the failure
  is an error naming `--min-partition-size`, not a warning per retry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flock.common.errors import ConfigError

DIRICHLET_DRAWS = 11        # Flower Datasets' DirichletPartitioner: the first draw and 10 more
SHARDS_PER_USER = 2         # McMahan et al.
CLASS_ASSIGNMENT_MODES = ("random", "deterministic", "first-deterministic")
SIZE_LAWS = ("constant", "lognormal", "powerlaw")


@dataclass(frozen=True)
class Partition:
    """User u owns samples `indices[offsets[u]:offsets[u + 1]]` (ascending); samples of no user are left out."""

    indices: np.ndarray     # int64
    offsets: np.ndarray     # int64, users + 1

    @classmethod
    def from_owner(cls, owner: np.ndarray, users: int) -> "Partition":
        """From `owner[i]`, the user of sample i (-1: none)."""
        order = np.argsort(owner, kind="stable")            # by user, ascending within each
        sizes = np.bincount(owner[owner >= 0], minlength=users)
        offsets = np.zeros(users + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return cls(order[len(owner) - int(offsets[-1]):].astype(np.int64), offsets)

    @property
    def users(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user(self, u: int) -> np.ndarray:
        return self.indices[self.offsets[u]:self.offsets[u + 1]]

    def parts(self) -> list[np.ndarray]:
        """One index array per user (for a few hundred users; large partitions use indices and offsets)."""
        return [self.user(u) for u in range(self.users)]


def _owners(cut_sizes: np.ndarray) -> np.ndarray:
    """[0, 0, 1, 2, 2, ...]: the user of each position of a run cut into consecutive pieces of these sizes."""
    return np.repeat(np.arange(len(cut_sizes)), cut_sizes)


def _cut(total: int, weights: np.ndarray, exact_zeros: bool = False) -> np.ndarray:
    """Sizes of `total` items cut in proportion to `weights` (summing to 1) at floor(total * cumulative
    share), the cut rule of Flower's DirichletPartitioner (they sum to `total` exactly). The last user gets
    the rest, so a rounding short of 1 gives it an item even at weight 0; `exact_zeros` divides the
    cumulative shares by their last instead, so weight 0 means no item."""
    cumulative = np.cumsum(weights)
    if exact_zeros:
        cumulative = cumulative / cumulative[-1]
    cuts = np.minimum((cumulative * total).astype(int)[:-1], total)
    return np.diff(np.concatenate(([0], cuts, [total])))


def _even(total: int, parts: int) -> np.ndarray:
    """numpy's array_split sizes: total // parts each, one more for the first total % parts."""
    sizes = np.full(parts, total // parts, dtype=np.int64)
    sizes[:total % parts] += 1
    return sizes


def _check_users(n: int, users: int, per_user: int, why: str) -> None:
    if users < 1:
        raise ConfigError(f"--users must be at least 1, got {users}")
    if users > n:
        raise ConfigError(f"--users {users}: more users than the {n} samples")
    if users * per_user > n:
        raise ConfigError(f"--users {users}: {why} needs at least {users * per_user} samples, the data have {n}")


def iid_sizes(n: int, users: int, rng: np.random.Generator, law: str = "constant", param: float = 0.0) -> np.ndarray:
    """Per-user sample counts summing to n.

    - constant: n // users each, one more for the first n % users users (numpy's array_split);
    - lognormal:SIGMA: weights w_u ~ LogNormal(0, SIGMA), i.i.d.;
    - powerlaw:A: weights w_u = 1 + numpy's pareto(A), i.e. Pareto type I with x_m = 1 and density
      A w^-(A+1) for w >= 1 (smaller A: heavier tail).
    With weights, every user gets 1 sample and the remaining n - users are cut in proportion to the weights
    (user u's share ends at floor((n - users) * (w_1 + ... + w_u) / sum(w))), so no user is empty.
    """
    _check_users(n, users, 1, "one sample per user")
    if law == "constant":
        return _even(n, users)
    if law == "lognormal":
        weights = rng.lognormal(0.0, param, users)
    elif law == "powerlaw":
        weights = 1.0 + rng.pareto(param, users)
    else:
        raise ConfigError(f"--sizes {law!r}: constant, lognormal:SIGMA or powerlaw:A")
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:
        raise ConfigError(f"--sizes {law}:{param:g}: the drawn weights overflow; give a milder law")
    return 1 + _cut(n - users, weights / total)


def iid(n: int, users: int, rng: np.random.Generator, law: str = "constant", param: float = 0.0) -> Partition:
    """A uniform permutation of the n samples cut into runs of `iid_sizes` (drawn first)."""
    sizes = iid_sizes(n, users, rng, law, param)
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = _owners(sizes)
    return Partition.from_owner(owner, users)


def dirichlet(labels: np.ndarray, users: int, rng: np.random.Generator, *, alpha: float,
              min_partition_size: int = 0, self_balancing: bool = False) -> tuple[Partition, int]:
    """Flower's DirichletPartitioner (differences in the module docstring); returns the partition and how
    many draws it took. Per label, ascending: its samples permuted, then p ~ Dir(alpha) over the users."""
    n = len(labels)
    _check_users(n, users, min_partition_size, f"--min-partition-size {min_partition_size}")
    by_label = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    average = n / users
    concentration = np.full(users, float(alpha))
    owner = np.empty(n, dtype=np.int64)
    for draw in range(1, DIRICHLET_DRAWS + 1):
        sizes = np.zeros(users, dtype=np.int64)
        for members in by_label:
            members = rng.permutation(members)
            p = rng.dirichlet(concentration)
            if self_balancing and (balanced := np.where(sizes > average, 0.0, p)).sum() > 0:
                counts = _cut(len(members), balanced, exact_zeros=True)
            else:
                counts = _cut(len(members), p)
            owner[members] = _owners(counts)
            sizes += counts
        if sizes.min() >= min_partition_size:
            return Partition.from_owner(owner, users), draw
    raise ConfigError(f"--min-partition-size {min_partition_size}: not reached in {DIRICHLET_DRAWS} Dirichlet draws "
                      f"(alpha {alpha:g}, {users} users, {n} samples; the last one's smallest user had "
                      f"{int(sizes.min())}); raise --alpha, or lower --users or --min-partition-size")


def class_assignment(num_labels: int, users: int, per_user: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """[users, per_user] positions into the ascending labels, as Flower's PathologicalPartitioner assigns them."""
    if not 1 <= per_user <= num_labels:
        raise ConfigError(f"--num-classes-per-partition {per_user}: the data have {num_labels} labels")
    if mode == "deterministic":
        return (np.arange(users)[:, None] + np.arange(per_user)[None, :]) % num_labels
    chosen = np.empty((users, per_user), dtype=np.int64)
    for u in range(users):
        if mode == "random":
            chosen[u] = rng.choice(num_labels, size=per_user, replace=False)
        elif mode == "first-deterministic":
            picked = [u % num_labels]
            while len(picked) < per_user:
                label = int(rng.choice(num_labels, size=1)[0])
                if label not in picked:
                    picked.append(label)
            chosen[u] = picked
        else:
            raise ConfigError(f"--class-assignment-mode {mode!r}: one of {', '.join(CLASS_ASSIGNMENT_MODES)}")
    return chosen


def pathological(labels: np.ndarray, users: int, rng: np.random.Generator, *, num_classes_per_partition: int,
                 class_assignment_mode: str = "random") -> Partition:
    """Flower's PathologicalPartitioner (differences in the module docstring). Samples of a label no user
    got are left out, as Flower's (its warning is the caller's: compare the sizes)."""
    n = len(labels)
    values, counts = np.unique(labels, return_counts=True)
    if not 1 <= num_classes_per_partition <= len(values):
        raise ConfigError(f"--num-classes-per-partition {num_classes_per_partition}: the data have {len(values)} labels")
    _check_users(n, users, num_classes_per_partition, f"--num-classes-per-partition {num_classes_per_partition}")
    chosen = class_assignment(len(values), users, num_classes_per_partition, class_assignment_mode, rng)
    holders = np.bincount(chosen.ravel(), minlength=len(values))
    short = np.flatnonzero(holders > counts)
    if len(short):
        c = short[0]
        raise ConfigError(f"--num-classes-per-partition {num_classes_per_partition}: label {values[c]} goes to "
                          f"{holders[c]} users but has {counts[c]} samples; lower --users or "
                          f"--num-classes-per-partition, or try --class-assignment-mode deterministic")
    by_label = np.argsort(chosen.ravel(), kind="stable")     # (label, user) pairs, by label then user
    user_of_pair = by_label // num_classes_per_partition
    pair_offsets = np.concatenate(([0], np.cumsum(holders)))
    owner = np.full(n, -1, dtype=np.int64)
    for c, value in enumerate(values):
        if holders[c] == 0:
            continue
        members = rng.permutation(np.flatnonzero(labels == value))
        owner[members] = np.repeat(user_of_pair[pair_offsets[c]:pair_offsets[c + 1]], _even(len(members), holders[c]))
    return Partition.from_owner(owner, users)


def shards(labels: np.ndarray, users: int, rng: np.random.Generator) -> Partition:
    """McMahan et al.: sorted by label (stably), 2 x users shards (sizes differ by at most one), 2 random
    shards per user."""
    n = len(labels)
    _check_users(n, users, SHARDS_PER_USER, "two shards of at least one sample per user")
    count = SHARDS_PER_USER * users
    picks = rng.permutation(count)
    shard_owner = np.empty(count, dtype=np.int64)
    shard_owner[picks] = np.arange(count) // SHARDS_PER_USER
    owner = np.empty(n, dtype=np.int64)
    owner[np.argsort(labels, kind="stable")] = np.repeat(shard_owner, _even(n, count))
    return Partition.from_owner(owner, users)


def test_sizes(sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Each user's test count: round(fraction x size), half up, but at most size - 1 (every user with
    samples keeps one to train on)."""
    return np.minimum(np.floor(fraction * sizes + 0.5).astype(np.int64), np.maximum(sizes - 1, 0))


def split_per_user(partition: Partition, fraction: float, rng: np.random.Generator) -> tuple[Partition, Partition]:
    """(train, test): each user's `test_sizes` test samples drawn uniformly from its own samples."""
    sizes = partition.sizes()
    tests = test_sizes(sizes, fraction)
    user_of = _owners(sizes)
    shuffled = np.lexsort((rng.random(len(partition.indices)), user_of))    # by user, random within
    rank_in_user = np.arange(len(shuffled)) - np.repeat(partition.offsets[:-1], sizes)
    is_test = np.zeros(len(shuffled), dtype=bool)
    is_test[shuffled[rank_in_user < np.repeat(tests, sizes)]] = True

    def part(mask: np.ndarray, counts: np.ndarray) -> Partition:
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return Partition(partition.indices[mask], offsets)

    return part(~is_test, sizes - tests), part(is_test, tests)
