"""Aggregators: what the server makes of a round's client updates, as plug-ins that declare a capability.

- `linear` (FedAvg): the weighted mean of the updates, which needs only their weighted sum; the ranks,
  the node sums, secure aggregation and DP noise all work on that sum (today's fast path, untouched).
- `per-client`: the rule needs every client's update. The ranks keep their clients' updates and exchange
  coordinate slices (`simulator/per_client.py`), so each rank holds one slice of every update and runs
  `aggregate` on it, with a `Reducer` for the few whole-vector sums (distances, norms); the arithmetic is
  `scheduler/robust.py`'s.

`--aggregator NAME` picks a built-in, or `module:Class` a user's own (a class with `capability =
"per-client"`, a keyword-only constructor taking the run's `Config`, and `aggregate(updates, weights, *,
reducer)`: (K, S) float32 slice and (K,) weights in, (S,) float64 out, the same bits for any slicing).
Every server optimizer then applies to the aggregate, as to FedAvg's mean.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from common.errors import ConfigError
from scheduler import robust

if TYPE_CHECKING:
    from common.config import Config

LINEAR, PER_CLIENT = "linear", "per-client"


class Aggregator(Protocol):
    capability: ClassVar[str]

    def check(self, clients: int) -> None:
        """ConfigError naming the option when a round of `clients` clients is too small for the rule."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray, *, reducer: robust.Reducer) -> np.ndarray:
        """(K, S) float32 slice of the K clients' updates and their (K,) weights -> (S,) float64."""


class _Rule:
    capability: ClassVar[str] = PER_CLIENT

    def __init__(self, *, config: Config) -> None:
        self.config = config

    def check(self, clients: int) -> None:
        if clients < 1:
            raise ConfigError(f"--aggregator {self.config.aggregator}: no client update in the round")


class Median(_Rule):
    """Coordinate-wise median (unweighted, as Flower's FedMedian)."""

    def aggregate(self, updates, weights, *, reducer):
        return robust.coordinate_median(updates, reducer=reducer)


class TrimmedMean(_Rule):
    """Coordinate-wise mean of the values left after cutting int(beta K) at each end (Flower's FedTrimmedAvg)."""

    def __init__(self, *, config: Config) -> None:
        super().__init__(config=config)
        robust.check_trim(config.trim_fraction)

    def aggregate(self, updates, weights, *, reducer):
        return robust.trimmed_mean(updates, beta=self.config.trim_fraction, reducer=reducer)


class Krum(_Rule):
    """Krum (m = 1) and Multi-Krum (the weighted mean of the m best; m = --krum-m, or K - f when 0)."""

    multi: ClassVar[bool] = False

    def _m(self, clients: int) -> int:
        return (self.config.krum_m or max(1, clients - self.config.krum_f)) if self.multi else 1

    def check(self, clients: int) -> None:
        robust.check_krum(self.config.krum_f, self._m(clients), clients)

    def aggregate(self, updates, weights, *, reducer):
        return robust.krum(updates, weights, f=self.config.krum_f, m=self._m(len(updates)), reducer=reducer)


class MultiKrum(Krum):
    multi = True


class Bulyan(_Rule):
    """Bulyan over Krum (El Mhamdi et al. 2018; Flower's Bulyan): needs K >= 4f + 3."""

    def check(self, clients: int) -> None:
        robust.check_bulyan(self.config.krum_f, clients)

    def aggregate(self, updates, weights, *, reducer):
        return robust.bulyan(updates, f=self.config.krum_f, reducer=reducer)


class GeometricMedian(_Rule):
    """RFA: the weighted geometric median by smoothed Weiszfeld (Pillutla, Kakade, Harchaoui 2022)."""

    def __init__(self, *, config: Config) -> None:
        super().__init__(config=config)
        robust.check_geometric_median(config.geomed_nu, config.geomed_max_iter, config.geomed_tol)

    def aggregate(self, updates, weights, *, reducer):
        return robust.geometric_median(updates, weights, nu=self.config.geomed_nu, max_iter=self.config.geomed_max_iter,
                                       tol=self.config.geomed_tol, reducer=reducer).median


class NormBounded(_Rule):
    """Norm bounding (Sun et al. 2019): each update clipped to L2 norm M, then the weighted mean."""

    def __init__(self, *, config: Config) -> None:
        super().__init__(config=config)
        robust.check_norm_bound(config.norm_bound)

    def aggregate(self, updates, weights, *, reducer):
        return robust.norm_bounded_mean(updates, weights, max_norm=self.config.norm_bound, reducer=reducer)


class WeightedMean(_Rule):
    """FedAvg's weighted mean computed on the per-client path (what `fedavg` becomes under an attack that
    needs every client's update)."""

    def aggregate(self, updates, weights, *, reducer):
        return robust.chosen_mean(updates, weights)


BUILTIN: dict[str, type | None] = {"fedavg": None, "median": Median, "trimmed-mean": TrimmedMean, "krum": Krum,
                                   "multi-krum": MultiKrum, "bulyan": Bulyan, "geomed": GeometricMedian,
                                   "norm-bound": NormBounded}


def make_aggregator(config: Config) -> Any | None:
    """The run's per-client aggregator, or None for FedAvg's linear path. A `module:Class` is loaded and
    checked (capability, aggregate); a bad name is a ConfigError naming --aggregator."""
    name = config.aggregator
    if name in BUILTIN:
        cls = BUILTIN[name]
    else:
        from common.plugins import resolve

        cls = resolve("aggregator", name)
    if cls is None:
        return None
    capability = getattr(cls, "capability", None)
    if capability == LINEAR:
        raise ConfigError(f"--aggregator {name}: a linear aggregator is FedAvg's sum; only per-client ones plug in")
    if capability != PER_CLIENT:
        raise ConfigError(f"--aggregator {name}: declares capability {capability!r}; expected {PER_CLIENT!r}")
    try:
        aggregator = cls(config=config)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"--aggregator {name}: its constructor must take config= keyword ({e})") from None
    aggregator.check(config.clients_per_round)
    return aggregator
