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

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import numpy as np

from flock.common.errors import ConfigError
from scheduler import robust

if TYPE_CHECKING:
    from flock.common.config import Config

LINEAR, PER_CLIENT = "linear", "per-client"


class Aggregator(Protocol):
    capability: ClassVar[str]

    def check(self, clients: int) -> None:
        """ConfigError naming the option when a round of `clients` clients is too small for the rule."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray, *, reducer: robust.Reducer) -> np.ndarray:
        """(K, S) float32 slice of the K clients' updates and their (K,) weights -> (S,) float64."""


class _Rule:
    capability: ClassVar[str] = PER_CLIENT
    option: ClassVar[str] = "--aggregator"

    def check(self, clients: int) -> None:
        if clients < 1:
            raise ConfigError(f"{self.option}: no client update in the round")


class Median(_Rule):
    """Coordinate-wise median (unweighted, as Flower's FedMedian)."""

    def aggregate(self, updates, weights, *, reducer):
        return robust.coordinate_median(updates, reducer=reducer)


class TrimmedMean(_Rule):
    """Coordinate-wise mean of the values left after cutting int(beta K) at each end (Flower's FedTrimmedAvg)."""

    def __init__(self, *, beta: float) -> None:
        robust.check_trim(beta)
        self.beta = beta

    def aggregate(self, updates, weights, *, reducer):
        return robust.trimmed_mean(updates, beta=self.beta, reducer=reducer)


class Krum(_Rule):
    """Krum (m = 1) and Multi-Krum (the weighted mean of the m best; m = 0: K - f)."""

    def __init__(self, *, f: int, m: int = 1) -> None:
        self.f, self.m = f, m

    def _m(self, clients: int) -> int:
        return self.m or max(1, clients - self.f)

    def check(self, clients: int) -> None:
        robust.check_krum(self.f, self._m(clients), clients)

    def aggregate(self, updates, weights, *, reducer):
        return robust.krum(updates, weights, f=self.f, m=self._m(len(updates)), reducer=reducer)


class Bulyan(_Rule):
    """Bulyan (El Mhamdi et al. 2018): needs K >= 4f + 3; `selection` krum (iterated, Flower's aggregate_bulyan)
    or multi-krum (at once, Flower's Message-API Bulyan)."""

    def __init__(self, *, f: int, selection: str = "krum") -> None:
        self.f, self.selection = f, selection

    def check(self, clients: int) -> None:
        robust.check_bulyan(self.f, clients)

    def aggregate(self, updates, weights, *, reducer):
        return robust.bulyan(updates, f=self.f, reducer=reducer, selection=self.selection)


class GeometricMedian(_Rule):
    """RFA: the weighted geometric median by smoothed Weiszfeld (Pillutla, Kakade, Harchaoui 2022)."""

    def __init__(self, *, nu: float, max_iter: int, tol: float) -> None:
        robust.check_geometric_median(nu, max_iter, tol)
        self.nu, self.max_iter, self.tol = nu, max_iter, tol

    def aggregate(self, updates, weights, *, reducer):
        return robust.geometric_median(updates, weights, nu=self.nu, max_iter=self.max_iter, tol=self.tol,
                                       reducer=reducer).median


class NormBounded(_Rule):
    """Norm bounding (Sun et al. 2019): each update clipped to L2 norm M, then the weighted mean."""

    def __init__(self, *, max_norm: float) -> None:
        robust.check_norm_bound(max_norm)
        self.max_norm = max_norm

    def aggregate(self, updates, weights, *, reducer):
        return robust.norm_bounded_mean(updates, weights, max_norm=self.max_norm, reducer=reducer)


class QFedAvg(_Rule):
    """q-FedAvg (q-FFL, Li et al. 2020; Flower's QFedAvg): clients weigh by a power q of their training loss
    (`needs_loss`: the per-client path brings each client's `loss_metric` from its training sums); L = 1 / the
    clients' learning rate."""

    needs_loss = True

    def __init__(self, *, q: float, lr: float, loss_metric: str = "loss") -> None:
        robust.check_qfedavg(q, lr)
        self.q, self.lr, self.loss_metric = q, lr, loss_metric

    def aggregate(self, updates, weights, *, reducer, losses):
        return robust.qfedavg(updates, losses, q=self.q, lr=self.lr, reducer=reducer)


class WeightedMean(_Rule):
    """FedAvg's weighted mean computed on the per-client path (what `fedavg` becomes under an attack that
    changes single updates)."""

    def aggregate(self, updates, weights, *, reducer):
        return robust.chosen_mean(updates, weights)


# the built-ins from the run's options; None: FedAvg's linear path
BUILTIN: dict[str, Callable[[Config], Any] | None] = {
    "fedavg": None,
    "median": lambda config: Median(),
    "trimmed-mean": lambda config: TrimmedMean(beta=config.trim_fraction),
    "krum": lambda config: Krum(f=config.krum_f),
    "multi-krum": lambda config: Krum(f=config.krum_f, m=config.krum_m),
    "bulyan": lambda config: Bulyan(f=config.krum_f),
    "geomed": lambda config: GeometricMedian(nu=config.geomed_nu, max_iter=config.geomed_max_iter,
                                             tol=config.geomed_tol),
    "norm-bound": lambda config: NormBounded(max_norm=config.norm_bound),
    "qfedavg": lambda config: QFedAvg(q=config.qfedavg_q, lr=config.lr),
}


# rules by name with explicit settings (a Flower strategy's, trainer/flower_server.py: per_client_rule)
RULES: dict[str, Callable[..., Any]] = {"median": Median, "trimmed-mean": TrimmedMean, "krum": Krum,
                                        "bulyan": Bulyan, "qfedavg": QFedAvg}


def make_aggregator(config: Config, strategy_rule: tuple[str, dict[str, Any]] | None = None) -> Any | None:
    """The run's per-client aggregator, or None for FedAvg's linear path: `strategy_rule` (the name and settings
    of a Flower ServerApp's robust strategy, with --flower-server), else --aggregator's. A `module:Class` is
    loaded and checked (capability, aggregate); a bad name is a ConfigError naming --aggregator. Checked
    against the run's clients per round."""
    name = config.aggregator
    if strategy_rule is not None:
        rule, settings = strategy_rule
        aggregator = RULES[rule](**settings)
    elif name in BUILTIN:
        make = BUILTIN[name]
        aggregator = make(config) if make is not None else None
    else:
        aggregator = user_aggregator(name, config)
    if aggregator is not None:
        aggregator.check(config.clients_per_round)
    return aggregator


def user_aggregator(name: str, config: Config) -> Any:
    """A `module:Class` aggregator, built with the run's Config."""
    from flock.common.plugins import resolve

    cls = resolve("aggregator", name)
    capability = getattr(cls, "capability", None)
    if capability == LINEAR:
        raise ConfigError(f"--aggregator {name}: a linear aggregator is FedAvg's sum; only per-client ones plug in")
    if capability != PER_CLIENT:
        raise ConfigError(f"--aggregator {name}: declares capability {capability!r}; expected {PER_CLIENT!r}")
    try:
        return cls(config=config)
    except TypeError as e:
        raise ConfigError(f"--aggregator {name}: its constructor must take config= keyword ({e})") from None
