"""The DP accountant's stage: epsilon for the rounds released so far, from Google's dp-accounting (RDP or PLD),
and the noise multiplier that --dp-target-epsilon calibrates.

Each round is the Gaussian mechanism of the run's multiplier z on a sampled cohort: K of the population,
or with a noise cohort M (pfl's noise-cohort scaling, `central_noise.py`) M of it, the deployed rate. With
phones the rate bounds each user's real chance of being in a round: over-selection asks for c = ceil(K x
over_select) candidates, and every user who contributes is one of them, so with phones always on-line the
rate is c / population (a deadline or a quorum only removes contributors). When phones come and go
(`--availability`), the candidates are c of the m users on-line at the round's start, drawn uniformly, so a
user on-line then is a candidate with probability c / m (at most: the search for on-line users may stop
early) and one off-line is not: each round is accounted at its own rate min(1, c / m), m counted over the
round's population, and the rounds composed. Those rates are known only as the run goes, so such runs
cannot calibrate to a target epsilon. With adaptive clipping (`clip.py`) the accountant still counts rounds
of multiplier z (the count of unclipped clients takes its share of the budget from the update's noise).
Local DP (`local_noise.py`): the user's own report is the mechanism, at rate 1.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from flock.channel.base import Build, ServerRound, Stage
from flock.channel.clip import Clip
from flock.common.errors import ConfigError

log = logging.getLogger(__name__)
MAX_NOISE_MULTIPLIER = 1e3       # calibration's upper end: a target that needs more is unreachable


@contextmanager
def quiet_absl() -> Iterator[None]:
    """The RDP accountant logs (through absl) each fractional order it cannot evaluate and then leaves out,
    which is how it is meant to work: not a warning for the run's log."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


@dataclass(frozen=True)
class DpAccounting:
    """The accountant's view of a run: each round is the Gaussian mechanism with `noise_multiplier`,
    sampled at `sampling_rate` (Poisson, add/remove one user: "rdp", "pld"), or as `cohort` of `population`
    without replacement (replace one user: "rdp-fixed"). `per_round`: each round brings its own (population,
    cohort) (phones that come and go), and `cohort`/`population` are only the run's nominal ones."""

    noise_multiplier: float
    cohort: int
    population: int
    delta: float
    kind: str = "rdp"
    per_round: bool = False

    def __post_init__(self) -> None:
        if self.cohort > self.population:
            raise ConfigError(f"the accountant's cohort of {self.cohort} users per round is more than the "
                              f"population of {self.population} (--dp-noise-cohort, --dp-population)")

    @property
    def sampling_rate(self) -> float:
        return self.cohort / self.population

    def _sampled(self, noise_multiplier: float, population: int, cohort: int):
        """One round: `cohort` of `population` (everyone when the cohort is not smaller)."""
        import dp_accounting as dpa

        gaussian = dpa.GaussianDpEvent(noise_multiplier)
        if cohort >= population:
            return gaussian
        if self.kind == "rdp-fixed":
            return dpa.SampledWithoutReplacementDpEvent(population, cohort, gaussian)
        return dpa.PoissonSampledDpEvent(cohort / population, gaussian)

    def _event(self, noise_multiplier: float, rounds: int):
        import dp_accounting as dpa

        return dpa.SelfComposedDpEvent(self._sampled(noise_multiplier, self.population, self.cohort), rounds)

    def _accountant(self):
        import dp_accounting as dpa
        from dp_accounting import pld, rdp

        if self.kind == "pld":
            return pld.PLDAccountant()
        relation = (dpa.NeighboringRelation.REPLACE_ONE if self.kind == "rdp-fixed"
                    else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
        return rdp.RdpAccountant(neighboring_relation=relation)      # the library's default orders

    def epsilon(self, rounds: int, noise_multiplier: float | None = None) -> float:
        """Epsilon at `delta` after `rounds` rounds (inf without noise; 0 before the first)."""
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        if rounds == 0:
            return 0.0
        if z <= 0:
            return math.inf
        with quiet_absl():
            accountant = self._accountant()
            accountant.compose(self._event(z, rounds))
            return float(accountant.get_epsilon(self.delta))

    def round_by_round(self) -> "RoundByRound":
        """An accountant that composes rounds one at a time, each at its own (population, cohort)."""
        return RoundByRound(self)

    def calibrate(self, target_epsilon: float, rounds: int) -> float:
        """The smallest noise multiplier whose epsilon after `rounds` rounds is at most `target_epsilon`; a
        ConfigError naming --dp-target-epsilon when even MAX_NOISE_MULTIPLIER does not reach it."""
        import dp_accounting as dpa

        if self.per_round:
            raise ConfigError("--dp-target-epsilon: with --availability the accountant's rate is counted in each "
                              "round (candidates / users on-line), known only as the run goes; give "
                              "--dp-noise-multiplier and read epsilon from the run")
        reachable = self.epsilon(rounds, MAX_NOISE_MULTIPLIER)
        if reachable > target_epsilon:
            raise ConfigError(f"--dp-target-epsilon {target_epsilon:g} is unreachable in {rounds} rounds at sampling "
                              f"rate {self.sampling_rate:.4g}: even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives "
                              f"epsilon {reachable:.3g} (raise the target or --dp-delta, or train fewer rounds)")
        with quiet_absl():
            return float(dpa.calibrate_dp_mechanism(
                self._accountant, lambda z: self._event(z, rounds), target_epsilon, self.delta,
                dpa.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER), tol=1e-4))


class RoundByRound:
    """Rounds of a run composed as they are released, each at its own rate (phones that come and go). The
    rounds are kept in order, so a resumed run composes the same events in the same order: the same epsilon."""

    def __init__(self, accounting: DpAccounting) -> None:
        self.accounting = accounting
        with quiet_absl():
            self._accountant = accounting._accountant()
        self.rounds: list[tuple[int, int]] = []      # (population, cohort) of each released round, in order

    def add(self, population: int, cohort: int) -> float:
        """Composes one round; returns epsilon at the accounting's delta after it."""
        a = self.accounting
        self.rounds.append((population, cohort))
        with quiet_absl():
            self._accountant.compose(a._sampled(a.noise_multiplier, population, cohort))
            return float(self._accountant.get_epsilon(a.delta)) if a.noise_multiplier > 0 else math.inf

    def mean_rate(self) -> float:
        return sum(min(1.0, c / p) if p else 1.0 for p, c in self.rounds) / max(len(self.rounds), 1)


def local_accounting(noise_multiplier: float, delta: float) -> DpAccounting:
    """Local DP: the user's own report is the Gaussian mechanism, and the server sees who took part, so no
    amplification by sampling: rate 1, composed over every round (a bound for the most frequent user)."""
    return DpAccounting(noise_multiplier=noise_multiplier, cohort=1, population=1, delta=delta)


class Accountant(Stage):
    """The accountant's stage (always in the channel; without DP noise it counts nothing): after the round's
    noise, it counts each released round and records epsilon (`accounting` None: no DP noise, or clipping
    without noise). It also writes the run's closing privacy line, with `clip`'s norm."""

    name = "accountant"

    def __init__(self, accounting: DpAccounting | None, *, local: bool = False, clip: "Clip | None" = None) -> None:
        self.accounting = accounting
        self.local = local            # local DP: the clients add the noise, rate 1
        self.clip = clip
        self.released = 0            # rounds whose aggregate was released (the accountant's count)
        # rounds at their own rates (phones that come and go); None: every round at the run's rate
        self.by_round = accounting.round_by_round() if accounting is not None and accounting.per_round else None
        self.epsilon = 0.0

    @classmethod
    def from_config(cls, config, build: Build) -> Accountant | None:
        if build.side != "server":
            return None
        return cls(accounting_of(config, build.noise_multiplier, build.population), local=bool(config.dp_local))

    @staticmethod
    def check(config) -> None:
        if config.dp_noise_multiplier > 0 and config.dp_target_epsilon > 0:
            raise ConfigError("--dp-target-epsilon calibrates the noise: give it or --dp-noise-multiplier, not both")
        per_round = [f"--{n.replace('_', '-')}" for n in ("dp_target_epsilon", "dp_population", "dp_noise_cohort")
                     if getattr(config, n)]
        if central_dp_noise(config) and phones_come_and_go(config) and per_round:
            raise ConfigError(f"{', '.join(per_round)}: with --availability {config.availability} the accountant "
                              f"counts each round's own rate (candidates / users on-line), known only as the run "
                              f"goes: not with a population, cohort or target fixed in advance (give "
                              f"--dp-noise-multiplier)")

    def bind(self, stages: Sequence[Stage]) -> None:
        self.clip = next((s for s in stages if isinstance(s, Clip)), None)

    def server(self, round_: ServerRound) -> None:
        if self.accounting is not None and round_.arrived > 0 and not round_.void:
            self.released += 1
            if self.by_round is None:
                self.epsilon = self.accounting.epsilon(self.released)
            else:
                sampling = round_.sampling
                if sampling is None:
                    raise ValueError("per-round accounting needs each round's (population, cohort)")
                self.epsilon = self.by_round.add(*sampling)
                round_.record["dp_sampling_rate"] = min(1.0, sampling[1] / sampling[0]) if sampling[0] else 1.0
        if self.accounting is not None:
            round_.record["epsilon"] = self.epsilon

    def eval_fields(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon} if self.accounting is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """The count of released rounds (epsilon follows from it) and, per round, their rates."""
        return {"released": self.released, "epsilon": self.epsilon,
                **({"rounds_at": [list(r) for r in self.by_round.rounds]} if self.by_round is not None else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.released, self.epsilon = int(state.get("released", 0)), float(state.get("epsilon", 0.0))
        if self.by_round is not None:        # the same rounds composed again, in order: the same epsilon
            self.by_round = self.accounting.round_by_round()
            for population, cohort in state.get("rounds_at", []):
                self.epsilon = self.by_round.add(int(population), int(cohort))

    def run_fields(self) -> dict[str, Any]:
        """The noise multiplier actually used (a calibrated one included) and how the rate was derived."""
        if self.accounting is None:
            return {}
        a = self.accounting
        fields: dict[str, Any] = {"noise_multiplier": a.noise_multiplier, "accountant": a.kind}
        if self.local:
            fields["sampling"] = "local DP: rate 1, every round (a bound for the user who takes part most)"
        elif a.per_round:
            fields["sampling"] = (f"per round: min(1, c / m), c = {a.cohort} candidates asked for (--clients-per-"
                                  f"round x --over-select, rounded up), m = the users on-line at the round's start "
                                  f"(records: dp_sampling_rate)")
        else:
            fields.update(sampling=f"{a.cohort} / {a.population} every round (candidates asked for, or "
                                   f"--dp-noise-cohort; / the smallest training day's users, or --dp-population)",
                          sampling_rate=a.sampling_rate)
        return fields

    def summary(self) -> str:
        if self.accounting is None:
            return ""
        a = self.accounting
        clip = self.clip.describe() if self.clip is not None else "no clipping"
        return (f"epsilon {self.epsilon:.4g} at delta {a.delta:g} after {self.released} rounds "
                f"(noise multiplier {a.noise_multiplier:.4g}, {clip}, "
                f"{'local DP' if self.local else self._rate_text()}, {a.kind} accountant)")

    def _rate_text(self) -> str:
        if self.by_round is None:
            return f"sampling rate {self.accounting.sampling_rate:.4g}"
        return f"per-round sampling rates (candidates / users on-line), mean {self.by_round.mean_rate():.4g}"


def training_population(reader) -> int:
    """The users the sampler draws from: the smallest training day's users with samples (the largest
    sampling rate of the run)."""
    from reader.calendar import Calendar

    days = Calendar.from_reader(reader).train_days
    return min(sum(1 for c in reader.index(day, "train").counts if c > 0) for day in days)


def accounting_of(config, noise_multiplier: float, population: int) -> DpAccounting | None:
    """The run's accountant (None without clipping): local DP's, or the central one at M/population."""
    if config.dp_clip <= 0 or (noise_multiplier <= 0 and not config.dp_target_epsilon):
        return None
    if config.dp_local:
        return local_accounting(noise_multiplier, config.dp_delta)
    from flock.common.domain import over_selected

    # every contributor is one of the candidates asked for: over-selection raises each user's chance
    base, population = config.dp_noise_cohort or config.clients_per_round, config.dp_population or population
    cohort = over_selected(base, config.over_select) if base <= population else base     # too large: refused
    return DpAccounting(noise_multiplier=noise_multiplier, cohort=min(cohort, max(base, population)),
                        population=population, delta=config.dp_delta, kind=config.dp_accountant,
                        per_round=phones_come_and_go(config))


def central_dp_noise(config) -> bool:
    """Whether the server adds DP noise to the round's sum (given or calibrated; local DP's is the clients')."""
    return (config.dp_noise_multiplier > 0 or config.dp_target_epsilon > 0) and not config.dp_local


def phones_come_and_go(config) -> bool:
    """Whether the run's users are on-line only at times (--availability other than always)."""
    return bool(config.device_profiles) and config.availability not in ("", "always")


def noise_multiplier_of(config, population: int) -> float:
    """--dp-noise-multiplier, or the one --dp-target-epsilon calibrates for --rounds rounds (logged)."""
    if not config.dp_target_epsilon:
        return config.dp_noise_multiplier
    accounting = accounting_of(config, 0.0, population)
    z = accounting.calibrate(config.dp_target_epsilon, config.rounds)
    log.info("--dp-target-epsilon %g: noise multiplier %.4f calibrated for %d rounds at %s (delta %g, %s "
             "accountant)", config.dp_target_epsilon, z, config.rounds,
             "local DP" if config.dp_local else f"sampling rate {accounting.sampling_rate:.4g}", config.dp_delta,
             accounting.kind)
    return z
