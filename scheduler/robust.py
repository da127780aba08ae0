"""Robust aggregation rules as pure arithmetic over one coordinate slice of every client's update.

At scale a rank holds `updates`, a (K, S) float32 array: its slice of each of the K clients' flat updates,
never the whole K x P matrix. Coordinate-wise rules (median, trimmed mean, Bulyan's last step) run on the
slice alone. Quantities over whole vectors (distances between clients, distances to the geometric
median's estimate, each client's norm) are sums of per-block partials: each slice computes one partial
per block of `reducer.block` coordinates (`BLOCK` of the flat vector; a slice is a union of whole blocks,
starting at a block's start; only the vector's last block may be short), and the `Reducer` sums them over
all blocks of all slices in global block order. So every rule gives the same bits whatever the slicing
(any number of ranks), and every slice takes the same decisions (which clients Krum keeps, the
geometric median's weights and stop) or raises the same error.

The float32 inputs are read in float64: every result is a float64 (S,) array (medians of an even count and
means are not float32 values), and partials, distances and weights are float64. Sums over clients run in
a fixed order per coordinate and scalar sums over clients are `math.fsum`, so no BLAS call and no thread
count enters a result. Parameters the user chose are checked here and refused with `ConfigError` naming
the option (the `check_*` functions, for the configuration to call as well); a client's non-finite value
is refused with `ValueError` naming the client's index in `updates`.

Flower's `flwr/server/strategy/aggregate.py` is the reference for median, trimmed mean, (Multi-)Krum and
Bulyan; where these differ (float64 arithmetic, tie-breaking) their docstrings say so."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from flock.common.errors import ConfigError
from scheduler.aggregate import BLOCK

# ---------------------------------------------------------------------------------------------- reduction


class Reducer(Protocol):
    """Sums per-block partials over every slice: what the rules' whole-vector quantities go through."""

    block: int  # coordinates per block of the flat parameter vector (the last block may be short)

    def total(self, per_block: np.ndarray) -> np.ndarray:
        """`per_block`: this slice's partials, one per block in the slice's order, stacked on axis 0
        ((B_local, ...) float64, B_local may be 0). Returns the sum over all blocks of all slices in
        global block order ((...) float64), the same bits on every slice. Collective: every slice calls
        it, the same number of times, with the same trailing shape."""
        ...


def ordered_sum(per_block: np.ndarray) -> np.ndarray:
    """((B, ...) float64) -> (...) float64: ((p[0] + p[1]) + p[2]) + ..., the one order every reducer
    must use (zeros when B is 0)."""
    total = np.zeros(per_block.shape[1:], np.float64)
    for part in per_block:
        total += part
    return total


@dataclass(frozen=True)
class WholeVector:
    """The reducer of one process holding every coordinate: the slice is the whole vector."""

    block: int = BLOCK

    def total(self, per_block: np.ndarray) -> np.ndarray:
        """The ordered sum of `per_block` over axis 0 (there are no other slices)."""
        return ordered_sum(per_block)


def block_partials(columns: int, block: int, partial: Callable[[slice], np.ndarray]) -> np.ndarray:
    """`partial(cols)` for each block `cols` of a slice of `columns` coordinates, in order, stacked on
    axis 0: (B_local, ...) float64. With no column, an empty stack of `partial`'s shape on no column."""
    parts = [partial(slice(a, min(a + block, columns))) for a in range(0, columns, block)]
    return np.stack(parts) if parts else partial(slice(0, 0))[np.newaxis][:0]


def _block64(updates: np.ndarray, cols: slice) -> np.ndarray:
    """The block's columns of every client as a new C-ordered float64 (K, b) array: its rows are summed
    along contiguous memory, so in the same order whatever the layout of `updates` (a slice gathered
    from other ranks may be column-major)."""
    return np.array(updates[:, cols], dtype=np.float64, order="C")


def check_finite(updates: np.ndarray, reducer: Reducer) -> None:
    """Raises ValueError naming the first client (its index in `updates`, (K, S)) with a NaN or an
    infinity in any slice; every slice raises the same error (the counts go through `reducer`)."""
    def block_counts(cols: slice) -> np.ndarray:
        return (~np.isfinite(updates[:, cols])).sum(axis=1, dtype=np.float64)

    counts = reducer.total(block_partials(updates.shape[1], reducer.block, block_counts))
    bad = np.flatnonzero(counts)
    if bad.size:
        raise ValueError(f"client {bad[0]}'s update has {int(counts[bad[0]])} non-finite value(s) "
                         f"({bad.size} of {len(counts)} clients have some)")


def squared_distances(updates: np.ndarray, reducer: Reducer) -> np.ndarray:
    """(K, S) -> (K, K) float64: squared L2 distances between the clients' whole updates (symmetric,
    zero diagonal), from per-block sums of squared float64 differences."""
    def block_distances(cols: slice) -> np.ndarray:
        x = _block64(updates, cols)
        upper = np.zeros((len(x), len(x)))
        for i in range(len(x) - 1):
            d = x[i + 1:] - x[i]
            upper[i, i + 1:] = np.square(d, out=d).sum(axis=1)
        return upper + upper.T

    return reducer.total(block_partials(updates.shape[1], reducer.block, block_distances))


def distances_to(point: np.ndarray, updates: np.ndarray, reducer: Reducer) -> np.ndarray:
    """`point` (S,) float64, `updates` (K, S) -> (K,) float64: each client's L2 distance to the whole
    point (this slice is `point`'s slice)."""
    def block_sums(cols: slice) -> np.ndarray:
        d = _block64(updates, cols)
        d -= point[cols]
        return np.square(d, out=d).sum(axis=1)

    return np.sqrt(reducer.total(block_partials(updates.shape[1], reducer.block, block_sums)))


def norms(updates: np.ndarray, reducer: Reducer) -> np.ndarray:
    """(K, S) -> (K,) float64: each client's whole update's L2 norm."""
    return distances_to(np.zeros(updates.shape[1]), updates, reducer)


# ---------------------------------------------------------------------------------------- shared helpers


def weighted_sum(rows: np.ndarray, coefficients: np.ndarray | None = None) -> np.ndarray:
    """(N, S) -> (S,) float64: sum_i c_i * rows[i] (c_i = 1 without `coefficients`), each row read in
    float64 and added in row order, so a coordinate's value does not depend on the slice around it."""
    total = np.zeros(rows.shape[1], np.float64)
    for i, row in enumerate(rows):
        total += row if coefficients is None else float(coefficients[i]) * row.astype(np.float64)
    return total


def chosen_mean(updates: np.ndarray, weights: np.ndarray, chosen: np.ndarray | None = None) -> np.ndarray:
    """(K, S), (K,) weights -> (S,) float64: sum w_k x_k / sum w_k over the `chosen` clients (all without
    it), summed in increasing client index whatever the order of `chosen`."""
    chosen = np.arange(len(updates)) if chosen is None else np.sort(chosen)
    w = np.asarray(weights, np.float64)[chosen]
    return weighted_sum(updates[chosen], w) / math.fsum(w)


def _sorted_median(ordered: np.ndarray) -> np.ndarray:
    """(N, S) sorted along axis 0 -> (S,) float64: the middle value, or the mean of the two middle
    values of an even count (NumPy's median)."""
    n = len(ordered)
    return (ordered[(n - 1) // 2].astype(np.float64) + ordered[n // 2]) / 2


def _check_clients(updates: np.ndarray, weights: np.ndarray | None = None) -> None:
    """Refuses a malformed call (a programming error, not the user's): no client, updates not (K, S),
    weights not K finite values >= 0 with a positive sum."""
    if updates.ndim != 2 or len(updates) == 0:
        raise ValueError(f"updates must be (K >= 1, S), not {updates.shape}")
    if weights is not None:
        w = np.asarray(weights, np.float64)
        if w.shape != (len(updates),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(updates)} finite values >= 0 with a positive sum, not {w}")


# ------------------------------------------------------------------------------------ coordinate-wise rules


def coordinate_median(updates: np.ndarray, *, reducer: Reducer) -> np.ndarray:
    """(K, S) -> (S,) float64: each coordinate's median over the clients, unweighted; an even count
    gives the mean of the two middle values. Flower's `aggregate_median` (np.median: also unweighted);
    its float32 result is this one rounded to float32, bit for bit."""
    _check_clients(updates)
    check_finite(updates, reducer)
    return _sorted_median(np.sort(updates, axis=0))


def check_trim(beta: float, clients: int | None = None) -> int:
    """The number of clients cut at each end of K = `clients`, int(beta * K) as Flower's `_trim_mean`
    (scipy's trim_mean) cuts; ConfigError (--trim-fraction) unless 0 <= beta < 0.5, which leaves
    K - 2 int(beta * K) >= 1 clients of any K >= 1. With `clients` None, only the range is checked."""
    if not (0.0 <= beta < 0.5):
        raise ConfigError(f"--trim-fraction must be in [0, 0.5) (the fraction cut at each end), not {beta!r}")
    return 0 if clients is None else int(beta * clients)


def trimmed_mean(updates: np.ndarray, *, beta: float, reducer: Reducer) -> np.ndarray:
    """(K, S) -> (S,) float64: each coordinate's mean, unweighted, of the clients' values once the
    int(beta * K) smallest and as many largest are cut. Flower's `aggregate_trimmed_avg` (unweighted, the
    same cut), which sums the kept float32 values in float32 in np.partition's order; this sums them in
    float64 in increasing value order."""
    _check_clients(updates)
    cut = check_trim(beta, len(updates))
    check_finite(updates, reducer)
    kept = np.sort(updates, axis=0)[cut:len(updates) - cut]
    return weighted_sum(kept) / len(kept)


# ----------------------------------------------------------------------------------------- Krum, Bulyan


def check_krum(f: int, m: int, clients: int | None = None) -> None:
    """ConfigError unless f >= 0 (--krum-f) and 1 <= m (--krum-m), and with `clients` = K, unless
    K > 2f + 2 (Krum's assumption: each client scores its K - f - 2 nearest) and m <= K."""
    if f < 0:
        raise ConfigError(f"--krum-f (clients assumed Byzantine) must be >= 0, not {f}")
    if m < 1:
        raise ConfigError(f"--krum-m (clients Multi-Krum averages) must be >= 1, not {m}")
    if clients is not None and clients <= 2 * f + 2:
        raise ConfigError(f"--krum-f {f} needs more than 2f + 2 = {2 * f + 2} clients in a round, not {clients}")
    if clients is not None and m > clients:
        raise ConfigError(f"--krum-m {m} is more than the round's {clients} clients")


def krum_scores(distances: np.ndarray, f: int) -> np.ndarray:
    """(K, K) squared distances -> (K,) float64: each client's sum of squared distances to its
    max(1, K - f - 2) nearest other clients (Flower's count, which Bulyan's late rounds rely on), as
    `math.fsum`."""
    nearest = max(1, len(distances) - f - 2)
    return np.array([math.fsum(np.sort(np.delete(row, i))[:nearest]) for i, row in enumerate(distances)])


def krum_select(distances: np.ndarray, *, f: int, m: int = 1) -> np.ndarray:
    """(K, K) squared distances -> the m clients of lowest Krum score, best first (ties: lower index).
    Flower breaks Multi-Krum's ties by an unstable argsort and Krum's as here (the first minimum)."""
    check_krum(f, m, len(distances))
    return np.argsort(krum_scores(distances, f), kind="stable")[:m]


def krum(updates: np.ndarray, weights: np.ndarray, *, f: int, m: int = 1, reducer: Reducer) -> np.ndarray:
    """(K, S), (K,) weights -> (S,) float64. Krum (m = 1): the update of the client of lowest score,
    exactly (unweighted, as Flower's). Multi-Krum (m > 1): the mean of the m lowest scorers' updates
    weighted by `weights` (Flower weights it by num_examples). Flower scores float32 squared norms and
    averages in float32; this uses float64 (the same choice unless two scores are within float32 rounding)."""
    _check_clients(updates, weights)
    check_krum(f, m, len(updates))
    check_finite(updates, reducer)
    chosen = krum_select(squared_distances(updates, reducer), f=f, m=m)
    return updates[chosen[0]].astype(np.float64) if m == 1 else chosen_mean(updates, weights, chosen)


def check_bulyan(f: int, clients: int | None = None) -> None:
    """ConfigError unless f >= 0 (--krum-f) and, with `clients` = K, K >= 4f + 3 (Bulyan's assumption,
    which Flower checks too)."""
    if f < 0:
        raise ConfigError(f"--krum-f (clients assumed Byzantine) must be >= 0, not {f}")
    if clients is not None and clients < 4 * f + 3:
        raise ConfigError(f"--krum-f {f}: Bulyan needs at least 4f + 3 = {4 * f + 3} clients in a round, not {clients}")


def bulyan_select(distances: np.ndarray, *, f: int) -> np.ndarray:
    """(K, K) squared distances -> the K - 2f clients Bulyan keeps, in the order chosen: Krum (f, one
    client, the first of equal scores) on the clients not chosen yet, K - 2f times (Flower's
    `aggregate_bulyan` with its inner rule `aggregate_krum`, the only one it accepts)."""
    check_bulyan(f, len(distances))
    remaining = list(range(len(distances)))
    chosen: list[int] = []
    for _ in range(len(distances) - 2 * f):
        scores = krum_scores(distances[np.ix_(remaining, remaining)], f)
        chosen.append(remaining.pop(int(np.argmin(scores))))
    return np.array(chosen)


def bulyan(updates: np.ndarray, *, f: int, reducer: Reducer, selection: str = "krum") -> np.ndarray:
    """(K, S) -> (S,) float64, unweighted as Flower's: the theta = K - 2f clients of `bulyan_select`
    (`selection` "krum", as `flwr.server.strategy.aggregate.aggregate_bulyan`), or the theta best Multi-Krum
    scores at once ("multi-krum", as the Message API's `flwr.serverapp.strategy.Bulyan` by default),
    then for each coordinate the mean of the beta = theta - 2f of their values nearest the coordinate's
    median over them (np.median's). Flower measures nearness in float32, picks among equally near
    values by np.argpartition and averages in float32; this measures in float64, prefers the smaller of
    equally near values and sums the kept ones in float64 in order of nearness."""
    _check_clients(updates)
    check_bulyan(f, len(updates))
    check_finite(updates, reducer)
    distances = squared_distances(updates, reducer)
    if selection == "krum":
        chosen = bulyan_select(distances, f=f)
    elif selection == "multi-krum":
        chosen = krum_select(distances, f=f, m=len(updates) - 2 * f)
    else:
        raise ValueError(f"Bulyan's selection is krum or multi-krum, not {selection!r}")
    kept = np.sort(updates[chosen], axis=0)
    beta = len(kept) - 2 * f
    nearness = np.abs(kept - _sorted_median(kept))
    nearest = np.argsort(nearness, axis=0, kind="stable")[:beta]
    return weighted_sum(np.take_along_axis(kept, nearest, axis=0)) / beta


# ---------------------------------------------------------------------------------- geometric median (RFA)


@dataclass(frozen=True)
class GeometricMedian:
    """What `geometric_median` found: the estimate ((S,) float64, this slice's), the smoothed Weiszfeld
    steps taken, whether the objective settled within the tolerance before `max_iter`, and the
    objective sum_k alpha_k ||median - w_k|| (alpha normalised to sum 1)."""

    median: np.ndarray
    iterations: int
    converged: bool
    objective: float


def check_geometric_median(nu: float, max_iter: int, tol: float) -> None:
    """ConfigError unless the smoothing nu > 0 (--geomed-nu), max_iter >= 1 (--geomed-max-iter) and
    tol >= 0 (--geomed-tol), all finite."""
    if not (math.isfinite(nu) and nu > 0):
        raise ConfigError(f"--geomed-nu (the smoothing of the distances) must be finite and > 0, not {nu!r}")
    if max_iter < 1:
        raise ConfigError(f"--geomed-max-iter must be >= 1, not {max_iter}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"--geomed-tol must be finite and >= 0, not {tol!r}")


def geometric_median(updates: np.ndarray, weights: np.ndarray, *, nu: float = 1e-6, max_iter: int = 100,
                     tol: float = 1e-6, reducer: Reducer) -> GeometricMedian:
    """(K, S), (K,) weights -> the weighted geometric median by RFA's smoothed Weiszfeld (Pillutla,
    Kakade, Harchaoui, "Robust Aggregation for Federated Learning", 2022): alpha = weights / sum(weights); v starts at the alpha-weighted
    mean; each step sets beta_k = alpha_k / max(nu, ||v - w_k||) and v = sum beta_k w_k / sum beta_k. It
    stops after `max_iter` steps, or once the objective sum_k alpha_k ||v - w_k|| moved by at most
    `tol` times its value in a step (the `geom_median` package's test). One reduction of K values per
    step, over the distances to the new v, which give both the objective and the next step's weights."""
    _check_clients(updates, weights)
    check_geometric_median(nu, max_iter, tol)
    check_finite(updates, reducer)
    alpha = np.asarray(weights, np.float64) / math.fsum(np.asarray(weights, np.float64))
    median = weighted_sum(updates, alpha) / math.fsum(alpha)
    distances = distances_to(median, updates, reducer)
    objective = math.fsum(alpha * distances)
    for step in range(1, max_iter + 1):
        beta = alpha / np.maximum(nu, distances)
        median = weighted_sum(updates, beta) / math.fsum(beta)
        distances = distances_to(median, updates, reducer)
        previous, objective = objective, math.fsum(alpha * distances)
        if abs(previous - objective) <= tol * objective:
            return GeometricMedian(median, step, True, objective)
    return GeometricMedian(median, max_iter, False, objective)


# --------------------------------------------------------------------------------------- norm bounding


def check_norm_bound(max_norm: float) -> None:
    """ConfigError unless the bound M (--norm-bound) is finite and > 0."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError(f"--norm-bound (the bound on each client's update norm) must be finite and > 0, "
                          f"not {max_norm!r}")


def norm_bounded_mean(updates: np.ndarray, weights: np.ndarray, *, max_norm: float,
                      reducer: Reducer) -> np.ndarray:
    """(K, S), (K,) weights -> (S,) float64: the weighted mean of the updates, each first scaled by
    min(1, M / ||w_k||) so that its whole norm is at most M (Sun et al. 2019's norm bounding). Linear in
    the updates, but it needs each client's norm: one reduction of K sums of squares."""
    _check_clients(updates, weights)
    check_norm_bound(max_norm)
    check_finite(updates, reducer)
    scale = np.array([max_norm / n if n > max_norm else 1.0 for n in norms(updates, reducer)])
    w = np.asarray(weights, np.float64)
    return weighted_sum(updates, w * scale) / math.fsum(w)


# ---------------------------------------------------------------------------------------- q-FedAvg


QFFL_EPS = 1e-10      # added to each loss before its powers (Flower's QFedAvg)


def check_qfedavg(q: float, lr: float) -> None:
    if not (math.isfinite(q) and q >= 0):
        raise ConfigError(f"--qfedavg-q must be a finite number >= 0, got {q}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"q-FedAvg's client learning rate must be above 0, got {lr}")


def qfedavg(updates: np.ndarray, losses: np.ndarray, *, q: float, lr: float, reducer: Reducer) -> np.ndarray:
    """q-FedAvg (Li, Sanjabi, Beirami, Smith, ICLR 2020 "Fair Resource Allocation in Federated Learning"; as
    Flower's QFedAvg): with L = 1 / lr, each client's Delta_k = L (w - w_k) = -L u_k (u_k its update) weighs
    F_k^q (F_k its training loss), h_k = q F_k^(q-1) ||Delta_k||^2 + L F_k^q, and the new model is
    w - sum_k F_k^q Delta_k / sum_k h_k: the returned update is sum_k F_k^q L u_k / sum_k h_k. q = 0 is
    FedAvg's unweighted mean of the updates, at step 1."""
    check_qfedavg(q, lr)
    losses = np.asarray(losses, np.float64)
    if losses.shape != (len(updates),) or not np.isfinite(losses).all() or (losses < 0).any():
        raise ValueError(f"q-FedAvg needs one finite training loss >= 0 per client, got {losses}")
    check_finite(updates, reducer)
    big_l = 1.0 / lr
    squared = norms(updates, reducer) ** 2 * big_l ** 2          # ||Delta_k||^2, the same on every slice
    f_q = np.float_power(losses + QFFL_EPS, q)
    h = q * np.float_power(losses + QFFL_EPS, q - 1) * squared + big_l * f_q
    return weighted_sum(updates, f_q * big_l) / math.fsum(h)
