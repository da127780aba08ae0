"""Robust aggregation rules (`scheduler/robust.py`): against Flower's own functions on the same inputs,
the same bits at any slicing into whole blocks (slices simulated by threads whose reducers meet at a
barrier), the geometric median against hand-checkable answers and a plain Weiszfeld, and the refusals."""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pytest

from flock.common.errors import ConfigError
from scheduler import robust
from scheduler.aggregate import BLOCK
from scheduler.robust import WholeVector, ordered_sum

SHAPES = [(4, 6), (3, 2, 3), (5,)]          # a model of three tensors: P = 24 + 18 + 5 = 47
P = sum(math.prod(s) for s in SHAPES)
SMALL = 8                                   # the tests' block: P is 6 blocks, the last one short (7)
U32 = 2.0 ** -24                            # float32's unit roundoff


def clients(k: int, outliers: int, seed: int, p: int = P) -> tuple[np.ndarray, np.ndarray]:
    """(K, p) float32 updates, the first `outliers` of them far off (shifted and scaled), and K integer
    weights (num_examples)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (k, p))
    x[:outliers] = 30.0 + 10.0 * rng.normal(0.0, 1.0, (outliers, p))
    return x.astype(np.float32), rng.integers(1, 60, k).astype(np.float64)


def as_flower(updates: np.ndarray, weights: np.ndarray) -> list[tuple[list[np.ndarray], int]]:
    """Flower's form: per client, its tensors (views into its row, float32) and num_examples."""
    out = []
    for row, n in zip(updates, weights):
        cuts = np.cumsum([math.prod(s) for s in SHAPES])[:-1]
        out.append(([part.reshape(s).copy() for part, s in zip(np.split(row, cuts), SHAPES)], int(n)))
    return out


def flat(tensors: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([t.ravel() for t in tensors])


def assert_within_float32_sum(ours: np.ndarray, theirs: np.ndarray, updates: np.ndarray, terms: int) -> None:
    """Flower sums `terms` float32 values in float32 (and divides once): each coordinate is within
    (terms + 1) float32 roundings of the largest magnitude summed of our float64 value."""
    assert theirs.dtype == np.float32
    bound = (terms + 1) * U32 * np.abs(updates).max(axis=0)
    assert (np.abs(ours - theirs) <= bound).all(), np.abs(ours - theirs).max()


# ------------------------------------------------------------------------------------- against Flower

aggregate = pytest.importorskip("flwr.server.strategy.aggregate",
                                reason="flwr is an optional extra: pip install -r requirements-extras.txt")


@pytest.mark.parametrize("k", [7, 10])        # odd and even counts (np.median's mean of the middle two)
def test_median_is_flowers_bit_for_bit(k):
    # Ours is float64; an even count's mean of two float32 values rounded to float32 is Flower's
    # float32 (a + b) / 2 exactly (float64 holds the float32 sum with room for one correct rounding).
    x, n = clients(k, outliers=3, seed=k)
    ours = robust.coordinate_median(x, reducer=WholeVector(SMALL))
    theirs = flat(aggregate.aggregate_median(as_flower(x, n)))
    assert ours.dtype == np.float64
    assert np.array_equal(ours.astype(np.float32), theirs)


@pytest.mark.parametrize("k, beta", [(10, 0.1), (10, 0.25), (11, 0.3), (7, 0.0), (9, 0.49)])
def test_trimmed_mean_is_flowers_to_float32_rounding(k, beta):
    # The same cut (int(beta * K) at each end) and no weights; Flower adds the kept float32 values in
    # float32 in np.partition's order, ours in float64 in value order: equal to Flower's float32 sum.
    x, n = clients(k, outliers=2, seed=int(100 * beta) + k)
    ours = robust.trimmed_mean(x, beta=beta, reducer=WholeVector(SMALL))
    theirs = flat(aggregate.aggregate_trimmed_avg(as_flower(x, n), beta))
    assert_within_float32_sum(ours, theirs, x, k - 2 * int(beta * k))


@pytest.mark.parametrize("k, f", [(8, 1), (12, 3), (5, 0)])
def test_krum_is_flowers_bit_for_bit(k, f):
    # Krum returns one client's update: the same client (the scores differ by float32 rounding only, far
    # below the gaps between them here), so the same bits.
    x, n = clients(k, outliers=f, seed=10 + k)
    ours = robust.krum(x, n, f=f, reducer=WholeVector(SMALL))
    theirs = flat(aggregate.aggregate_krum(as_flower(x, n), f, 0))
    assert np.array_equal(ours.astype(np.float32), theirs)
    assert robust.krum_select(robust.squared_distances(x, WholeVector()), f=f)[0] >= f   # not an outlier


@pytest.mark.parametrize("k, f, m", [(9, 2, 3), (12, 3, 9), (6, 1, 6)])
def test_multi_krum_is_flowers_to_float32_rounding(k, f, m):
    # Multi-Krum averages the m best weighted by num_examples in both; Flower multiplies and sums in
    # float32 (m terms), ours in float64.
    x, n = clients(k, outliers=f, seed=20 + k)
    ours = robust.krum(x, n, f=f, m=m, reducer=WholeVector(SMALL))
    theirs = flat(aggregate.aggregate_krum(as_flower(x, n), f, m))
    assert_within_float32_sum(ours, theirs, x, 2 * m)


@pytest.mark.parametrize("k, f", [(7, 1), (11, 2), (15, 3), (3, 0)])
def test_bulyan_is_flowers_to_float32_rounding(k, f):
    # Flower's Bulyan with its only accepted inner rule, Krum (to_keep=0). The same clients are kept and
    # the same values are nearest each median (no near ties in random data); Flower averages them in
    # float32 (theta - 2f terms).
    x, n = clients(k, outliers=f, seed=30 + k)
    ours = robust.bulyan(x, f=f, reducer=WholeVector(SMALL))
    theirs = flat(aggregate.aggregate_bulyan(as_flower(x, n), f, aggregate.aggregate_krum, to_keep=0))
    assert_within_float32_sum(ours, theirs, x, k - 4 * f)
    kept = robust.bulyan_select(robust.squared_distances(x, WholeVector()), f=f)
    assert len(kept) == k - 2 * f and not set(kept.tolist()) & set(range(f))


def test_norm_bounding_is_flowers_clipping_then_mean():
    # Flower's clipping (its DP module's clip_inputs_inplace: scale by min(1, M / norm)) of each client,
    # then its weighted `aggregate`; Flower computes the norms and the sum in float32.
    clip = pytest.importorskip("flwr.supercore.differential_privacy")
    x, n = clients(9, outliers=2, seed=40)
    results = as_flower(x, n)
    for tensors, _ in results:
        clip.clip_inputs_inplace(tensors, 7.0)
    ours = robust.norm_bounded_mean(x, n, max_norm=7.0, reducer=WholeVector(SMALL))
    theirs = flat(aggregate.aggregate(results))
    assert_within_float32_sum(ours, theirs, x, 2 * 9 + P)      # + P: the float32 norm's own rounding
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert (norms > 7.0).sum() >= 3 and (norms < 7.0).sum() >= 3   # both sides of the bound are exercised


@pytest.mark.parametrize("q", [0.0, 0.2, 1.0, 2.5])
def test_qfedavg_is_flowers_qfedavg(q):
    # Flower's QFedAvg.aggregate_train on replies holding each client's model (global + update) and its
    # train_loss; Flower works in the arrays' float32, flock in float64 from the float32 updates
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import QFedAvg

    from trainer.flower_server import FlockGrid, flower_calls

    x, n = clients(8, outliers=1, seed=41)
    x *= 0.01
    losses = np.random.default_rng(41).uniform(0.2, 3.0, len(x))
    global_ = np.random.default_rng(42).normal(0.0, 1.0, P).astype(np.float32)
    strategy = QFedAvg(client_learning_rate=0.05, q=q)
    cuts = np.cumsum([math.prod(s) for s in SHAPES])[:-1]

    def record(vector):
        return ArrayRecord({f"t{i}": Array(part.reshape(s).copy())
                            for i, (part, s) in enumerate(zip(np.split(vector, cuts), SHAPES))})

    with flower_calls():
        sent = next(iter(strategy.configure_train(1, record(global_), ConfigRecord(), FlockGrid(10))))
        replies = [Message(RecordDict({"arrays": record((global_ + row).astype(np.float32)),
                                       "metrics": MetricRecord({"num-examples": int(w), "train_loss": float(f)})}),
                           reply_to=sent) for row, w, f in zip(x, n, losses)]
        theirs = flat([a.numpy() for a in strategy.aggregate_train(1, replies)[0].values()])
    # Flower's model from float32 local models (global + update rounded): compare with the same rounding
    rounded = (global_[None, :] + x).astype(np.float32).astype(np.float64) - global_
    ours = global_ + robust.qfedavg(rounded.astype(np.float32), losses, q=q, lr=0.05, reducer=WholeVector(SMALL))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6 * max(1.0, float(np.abs(theirs).max())))
    assert not np.allclose(theirs, global_)


def test_qfedavg_weighs_clients_by_their_loss_to_the_q():
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    fair = robust.qfedavg(x, np.array([1.0, 4.0]), q=1.0, lr=1.0, reducer=WholeVector(SMALL))
    # by hand: L = 1, ||Delta_k||^2 = 1, h_k = q F_k^(q-1) * 1 + F_k^q = 1 + F_k (q = 1): h = 2 + 5 = 7
    np.testing.assert_allclose(fair, [(1 + 1e-10) / 7, (4 + 1e-10) / 7], rtol=1e-9)
    plain = robust.qfedavg(x, np.array([1.0, 4.0]), q=0.0, lr=1.0, reducer=WholeVector(SMALL))
    np.testing.assert_allclose(plain, [0.5, 0.5], rtol=1e-12)          # q = 0: the unweighted mean
    with pytest.raises(ValueError, match="one finite training loss"):
        robust.qfedavg(x, np.array([1.0, np.nan]), q=1.0, lr=1.0, reducer=WholeVector(SMALL))


# ----------------------------------------------------------------------------------- slicing invariance


class Slices:
    """A vector's blocks dealt to n slices (block ids, ascending in each slice), run as n threads: each
    thread's reducer posts its per-block partials, and at a barrier every thread sums all slices'
    partials put back in global block order (what an MPI reducer does with a gather)."""

    def __init__(self, groups: list[list[int]], block: int, p: int):
        self.groups, self.block, self.p = groups, block, p
        self.posted: list[np.ndarray | None] = [None] * len(groups)
        self.barrier = threading.Barrier(len(groups), timeout=30)
        self.order = np.argsort(np.array(sum(groups, []), dtype=int), kind="stable")   # posted -> global

    def columns(self, i: int) -> np.ndarray:
        return np.concatenate([np.arange(b * self.block, min((b + 1) * self.block, self.p))
                               for b in self.groups[i]] + [np.zeros(0, int)])

    def total(self, i: int, per_block: np.ndarray) -> np.ndarray:
        assert len(per_block) == len(self.groups[i])
        self.posted[i] = per_block
        self.barrier.wait()
        total = ordered_sum(np.concatenate(self.posted)[self.order])
        self.barrier.wait()                 # every slice has read before any posts its next partials
        return total

    def run(self, updates: np.ndarray, rule: Callable[[np.ndarray, robust.Reducer], object]) -> list[object]:
        """rule(slice's updates, slice's reducer) on every slice at once: the results in slice order."""
        def one(i: int) -> object:
            reducer = SliceReducer(self, i)
            try:
                return rule(updates[:, self.columns(i)], reducer)
            except BaseException:
                self.barrier.abort()
                raise

        with ThreadPoolExecutor(len(self.groups)) as pool:
            futures = [pool.submit(one, i) for i in range(len(self.groups))]
            return [f.result() for f in futures]

    def assemble(self, parts: list[np.ndarray]) -> np.ndarray:
        """The slices' (S_i,) results put back into one (p,) vector."""
        out = np.full(self.p, np.nan)
        for i, part in enumerate(parts):
            out[self.columns(i)] = part
        return out


class SliceReducer:
    def __init__(self, slices: Slices, index: int):
        self.slices, self.index, self.block = slices, index, slices.block

    def total(self, per_block: np.ndarray) -> np.ndarray:
        return self.slices.total(self.index, per_block)


def slicings(blocks: int) -> list[list[list[int]]]:
    """Contiguous runs over 2, 3 and 5 slices, one slice more than blocks (an empty slice), and blocks
    dealt round-robin over 3 slices."""
    ids = list(range(blocks))
    contiguous = [[g.tolist() for g in np.array_split(ids, n)] for n in (2, 3, 5, blocks + 1)]
    return contiguous + [[ids[r::3] for r in range(3)]]


PS = 6 * SMALL + 3                          # 7 blocks of SMALL, the last of 3
RULES: dict[str, Callable[[np.ndarray, np.ndarray, robust.Reducer], np.ndarray]] = {
    "median": lambda x, n, r: robust.coordinate_median(x, reducer=r),
    "trimmed": lambda x, n, r: robust.trimmed_mean(x, beta=0.2, reducer=r),
    "krum": lambda x, n, r: robust.krum(x, n, f=2, reducer=r),
    "multi-krum": lambda x, n, r: robust.krum(x, n, f=2, m=5, reducer=r),
    "bulyan": lambda x, n, r: robust.bulyan(x, f=2, reducer=r),
    "geomed": lambda x, n, r: robust.geometric_median(x, n, tol=1e-10, reducer=r).median,
    "norm-bound": lambda x, n, r: robust.norm_bounded_mean(x, n, max_norm=5.0, reducer=r),
    "qfedavg": lambda x, n, r: robust.qfedavg(x, np.log1p(n), q=0.7, lr=0.3, reducer=r),
}


@pytest.mark.parametrize("name", RULES)
def test_every_rule_gives_the_same_bits_at_any_slicing(name):
    x, n = clients(11, outliers=2, seed=50, p=PS)
    rule = RULES[name]
    whole = rule(x, n, WholeVector(SMALL))
    assert whole.shape == (PS,) and whole.dtype == np.float64 and np.isfinite(whole).all()
    assert np.array_equal(rule(np.asfortranarray(x), n, WholeVector(SMALL)), whole)    # memory layout
    for groups in slicings(-(-PS // SMALL)):
        slices = Slices(groups, SMALL, PS)
        sliced = slices.assemble(slices.run(x, lambda part, reducer: rule(part, n, reducer)))
        assert np.array_equal(sliced, whole), (name, groups)


def test_whole_vector_quantities_are_the_same_bits_at_any_slicing():
    x, _ = clients(11, outliers=2, seed=52, p=PS)
    point = np.random.default_rng(52).normal(0.0, 1.0, PS)
    distances = robust.squared_distances(x, WholeVector(SMALL))
    to_point = robust.distances_to(point, x, WholeVector(SMALL))
    for groups in slicings(-(-PS // SMALL)):
        slices = Slices(groups, SMALL, PS)
        for part in slices.run(x, lambda part, r: robust.squared_distances(part, r)):
            assert np.array_equal(part, distances)
        for part in slices.run(x, lambda part, r: robust.distances_to(point[r.slices.columns(r.index)], part, r)):
            assert np.array_equal(part, to_point)


def test_geometric_median_takes_the_same_steps_at_any_slicing():
    x, n = clients(11, outliers=3, seed=51, p=PS)
    whole = robust.geometric_median(x, n, tol=1e-9, reducer=WholeVector(SMALL))
    slices = Slices([[0, 1], [2, 3, 4], [5, 6]], SMALL, PS)
    for part in slices.run(x, lambda part, r: robust.geometric_median(part, n, tol=1e-9, reducer=r)):
        assert (part.iterations, part.converged, part.objective) == (whole.iterations, True, whole.objective)


def test_the_default_block_is_the_data_planes():
    # 65536 coordinates of the flat vector; two full blocks and a short one, split 1 + 2.
    assert WholeVector().block == BLOCK == 65536
    p = 2 * BLOCK + 5
    x, n = clients(5, outliers=1, seed=53, p=p)
    whole = robust.geometric_median(x, n, max_iter=3, tol=0.0, reducer=WholeVector())
    slices = Slices([[0], [1, 2]], BLOCK, p)
    parts = slices.run(x, lambda part, r: robust.geometric_median(part, n, max_iter=3, tol=0.0, reducer=r))
    assert np.array_equal(slices.assemble([part.median for part in parts]), whole.median)


# ------------------------------------------------------------------------------------ geometric median


def plain_weiszfeld(x: np.ndarray, w: np.ndarray, nu: float, steps: int) -> np.ndarray:
    """Weiszfeld on whole vectors as the paper writes it, `steps` smoothed steps from the weighted mean."""
    x = x.astype(np.float64)
    alpha = w / w.sum()
    v = alpha @ x
    for _ in range(steps):
        beta = alpha / np.maximum(nu, np.linalg.norm(x - v, axis=1))
        v = beta @ x / beta.sum()
    return v


def objective(v: np.ndarray, x: np.ndarray, w: np.ndarray) -> float:
    return float(w @ np.linalg.norm(x.astype(np.float64) - v, axis=1) / w.sum())


def collinear(t: list[float], p: int = PS, seed: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Points t_k * u for a direction u of entries +-1 (exact in float32), and u."""
    u = np.random.default_rng(seed).choice([-1.0, 1.0], p)
    return (np.outer(t, u)).astype(np.float32), u


def test_geometric_median_of_collinear_points_is_the_middle_one():
    # On a line the geometric median is the (weighted) median of the positions: t = 2 here, however
    # far the point at 1000 (the mean is at 201.2).
    x, u = collinear([0.0, 1.0, 2.0, 3.0, 1000.0])
    result = robust.geometric_median(x, np.ones(5), tol=1e-12, max_iter=200, reducer=WholeVector(SMALL))
    assert result.converged
    assert np.linalg.norm(result.median - 2.0 * u) <= 1e-5 * np.linalg.norm(u)
    # Weights 5 of 9 on the far point: a weighted majority, so the median is that point.
    result = robust.geometric_median(x, np.array([1.0, 1, 1, 1, 5]), tol=1e-12, max_iter=200,
                                     reducer=WholeVector(SMALL))
    assert np.linalg.norm(result.median - 1000.0 * u) <= 1e-5 * np.linalg.norm(1000.0 * u)


def test_geometric_median_stays_near_the_cluster_whatever_the_outlier():
    # With a fraction a < 1/2 of the weight on outliers, the geometric median is within
    # 2 (1 - a) / (1 - 2 a) times the cluster's radius r of the cluster's centre (Minsker 2015, Lemma
    # 2.1): 2.25 r for one outlier of ten, whether it sits at 1e3 or 1e6.
    rng = np.random.default_rng(61)
    centre = rng.normal(0.0, 1.0, PS)
    cluster = centre + rng.normal(0.0, 0.1, (9, PS))
    radius = np.linalg.norm(cluster - centre, axis=1).max()
    for far in (1e3, 1e6):
        x = np.vstack([cluster, centre + far]).astype(np.float32)
        result = robust.geometric_median(x, np.ones(10), reducer=WholeVector(SMALL))
        assert np.linalg.norm(result.median - centre) <= 2.25 * radius
        assert np.linalg.norm(x.mean(axis=0) - centre) > 50 * radius    # where the mean went


def test_geometric_median_is_a_plain_weiszfelds():
    # The same steps as a plain whole-vector Weiszfeld (tol 0: max_iter steps in both); they differ in
    # summation order only (BLAS dot products there, per-block sums here).
    x, n = clients(12, outliers=4, seed=62, p=PS)
    for steps in (1, 3, 10):
        result = robust.geometric_median(x, n, nu=1e-6, max_iter=steps, tol=0.0, reducer=WholeVector(SMALL))
        assert result.iterations == steps and not result.converged
        np.testing.assert_allclose(result.median, plain_weiszfeld(x, n, 1e-6, steps), rtol=1e-12, atol=1e-12)
        assert result.objective == pytest.approx(objective(result.median, x, n), rel=1e-12)


def test_geometric_median_converges_within_its_tolerance():
    # It stops once a step moves the objective by at most tol of it, well before max_iter, at an
    # objective that far more steps no longer lower beyond that tolerance.
    x, n = clients(12, outliers=4, seed=63, p=PS)
    result = robust.geometric_median(x, n, tol=1e-8, max_iter=1000, reducer=WholeVector(SMALL))
    assert result.converged and 1 < result.iterations < 1000
    best = objective(plain_weiszfeld(x, n, 1e-6, 5000), x, n)
    assert best <= result.objective <= best * (1 + 1e-6)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("call, option", [
    (lambda x, n, r: robust.krum(x, n, f=4, reducer=r), "--krum-f"),            # K = 10 needs f <= 3
    (lambda x, n, r: robust.krum(x, n, f=-1, reducer=r), "--krum-f"),
    (lambda x, n, r: robust.krum(x, n, f=1, m=0, reducer=r), "--krum-m"),
    (lambda x, n, r: robust.krum(x, n, f=1, m=11, reducer=r), "--krum-m"),
    (lambda x, n, r: robust.bulyan(x, f=2, reducer=r), "--krum-f"),          # K = 10 needs f <= 1
    (lambda x, n, r: robust.bulyan(x, f=-1, reducer=r), "--krum-f"),
    (lambda x, n, r: robust.trimmed_mean(x, beta=0.5, reducer=r), "--trim-fraction"),
    (lambda x, n, r: robust.trimmed_mean(x, beta=-0.1, reducer=r), "--trim-fraction"),
    (lambda x, n, r: robust.geometric_median(x, n, nu=0.0, reducer=r), "--geomed-nu"),
    (lambda x, n, r: robust.geometric_median(x, n, max_iter=0, reducer=r), "--geomed-max-iter"),
    (lambda x, n, r: robust.geometric_median(x, n, tol=float("nan"), reducer=r), "--geomed-tol"),
    (lambda x, n, r: robust.norm_bounded_mean(x, n, max_norm=0.0, reducer=r), "--norm-bound"),
    (lambda x, n, r: robust.norm_bounded_mean(x, n, max_norm=float("inf"), reducer=r), "--norm-bound"),
])
def test_impossible_parameters_name_their_option(call, option):
    x, n = clients(10, outliers=0, seed=70)
    with pytest.raises(ConfigError, match=option):
        call(x, n, WholeVector(SMALL))


def test_the_limits_themselves_are_accepted():
    x, n = clients(10, outliers=0, seed=71)
    robust.krum(x, n, f=3, m=10, reducer=WholeVector(SMALL))      # K = 2f + 4 > 2f + 2
    robust.bulyan(clients(11, 0, 71)[0], f=2, reducer=WholeVector(SMALL))   # K = 4f + 3
    assert robust.trimmed_mean(x[:1], beta=0.49, reducer=WholeVector(SMALL)).tolist() == x[0].tolist()


@pytest.mark.parametrize("name", RULES)
def test_a_non_finite_value_names_its_client_on_every_slice(name):
    x, n = clients(11, outliers=2, seed=80, p=PS)
    x[7, PS - 2] = np.nan                  # in the last block: one slice only holds it
    x[9, 3] = np.inf
    with pytest.raises(ValueError, match=r"client 7's update has 1 non-finite value\(s\) \(2 of 11"):
        RULES[name](x, n, WholeVector(SMALL))
    slices = Slices([[0, 1, 2], [3, 4], [5, 6]], SMALL, PS)
    messages = []

    def rule(part: np.ndarray, reducer: robust.Reducer) -> None:
        try:
            RULES[name](part, n, reducer)
        except ValueError as e:
            messages.append(str(e))

    slices.run(x, rule)
    assert len(messages) == 3 and len(set(messages)) == 1 and "client 7" in messages[0]
