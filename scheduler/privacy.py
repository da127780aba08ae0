"""The server side of the update channel: DP-FedAvg's noise and accountant, secure aggregation's decoding and
threshold, and the bytes each client sends and receives. The scheduler calls `ServerChannel.aggregate` once
per training round (before its server optimizer step); without any option it only counts bytes.

DP-FedAvg (McMahan et al. 2018, user level): clients clip their shared-parameter update to norm C and weigh 1
each (`simulator/channel.py`); the server adds Gaussian noise of std z*C once to the round's sum, from the
round's seeded stream (the same at any -np), and divides by the expected cohort K (the fixed-denominator
estimator: the number of contributors is not released). With a noise cohort M (pfl's noise-cohort scaling)
the sum gets std z*C*K/M: the mean is as noisy as a deployed round of M users, and the accountant counts
rounds at the deployed rate M/population. Epsilon comes from Google's dp-accounting (RDP or PLD).

With phones the accountant's rate bounds each user's real chance of being in a round: over-selection asks
for c = ceil(K x over_select) candidates, and every user who contributes is one of them, so with phones
always on-line the rate is c / population (a deadline or a quorum only removes contributors). When phones
come and go (`--availability`), the candidates are c of the m users on-line at the round's start, drawn
uniformly, so a user on-line then is a candidate with probability c / m (at most: the search for on-line
users may stop early) and one off-line is not: each round is accounted at its own rate min(1, c / m), m
counted over the round's population, and the rounds composed. Those rates are known only as the run goes,
so such runs cannot calibrate to a target epsilon.

With adaptive clipping (`scheduler/adaptive_clipping.py`) C is the round's C_t, which the scheduler hands the
clients in the round's plan, the update's noise multiplier is z_delta (the count of unclipped clients takes
the rest of the budget), and the accountant still counts rounds of multiplier z.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from flock.common.channel_config import ChannelSettings, phones_come_and_go
from flock.common.errors import ConfigError
from flock.common.streams import privacy_rng
from scheduler import secagg
from scheduler.adaptive_clipping import AdaptiveClip, adaptive_clipping_of, update_noise_multiplier

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


def client_bytes(settings: ChannelSettings, sizes: Sequence[int], *, secagg_neighbors: int = 0,
                 clients_per_round: int = 1) -> tuple[int, int]:
    """(down, up): the exact bytes one client receives and sends in a round, from the codecs (fp32: 4 bytes
    per shared parameter) and, with secure aggregation, the protocol's messages."""
    down, up = settings.down.bytes(sizes), settings.up.bytes(sizes)
    if settings.secagg_bits:
        neighbors = secagg_neighbors or clients_per_round - 1
        extra_down, up = secagg.client_bytes(size=sum(sizes), bits=settings.secagg_bits, neighbors=neighbors)
        down += extra_down
    return down, up


class ServerChannel:
    """What the scheduler does with a round's sum: decode (secure aggregation), noise, the fixed
    denominator, the accountant, the bytes record. `accounting` None: no DP noise (bytes only, or clipping
    without noise, or local DP's noise which the clients add). `adaptive`: adaptive clipping's norm, which
    then is each round's C, and the update's noise multiplier becomes z_delta (of `noise_multiplier` z)."""

    def __init__(self, *, settings: ChannelSettings, sizes: Sequence[int], seed: int, clients_per_round: int,
                 noise_multiplier: float = 0.0, noise_cohort: int = 0, accounting: DpAccounting | None = None,
                 secagg_neighbors: int = 0, secagg_threshold: float = 0.5, adaptive: AdaptiveClip | None = None) -> None:
        self.settings = settings
        self.seed = seed
        self.clients_per_round = clients_per_round
        self.noise_multiplier = 0.0 if settings.local_noise_std else noise_multiplier     # z, the accountant's
        self.adaptive = adaptive
        self.central_noise = (update_noise_multiplier(self.noise_multiplier, adaptive.settings.count_noise)
                              if adaptive is not None else self.noise_multiplier)          # on the update
        self.noise_cohort = noise_cohort or clients_per_round
        self.accounting = accounting
        self.secagg_threshold = secagg_threshold
        self.bytes_down, self.bytes_up = client_bytes(settings, sizes, secagg_neighbors=secagg_neighbors,
                                                      clients_per_round=clients_per_round)
        self.released = 0            # rounds whose aggregate was released (the accountant's count)
        # rounds at their own rates (phones that come and go); None: every round at the run's rate
        self.by_round = accounting.round_by_round() if accounting is not None and accounting.per_round else None
        self.epsilon = 0.0

    @property
    def round_clip(self) -> float:
        """The clipping norm of the current round (0: no clipping): --dp-clip, or adaptive clipping's C_t."""
        return self.adaptive.clip if self.adaptive is not None else self.settings.clip

    @property
    def noise_std(self) -> float:
        """The std of the Gaussian noise on the current round's sum of clipped updates."""
        return self.central_noise * self.round_clip * self.clients_per_round / self.noise_cohort

    def aggregate(self, round_index: int, parts: list[np.ndarray], weight: float, sums: dict[str, float], *,
                  sampling: tuple[int, int] | None = None) -> tuple[list[np.ndarray], float, dict[str, Any]]:
        """Round `round_index` (0-based): the ranks' `parts` (sums of weighted deltas, float64) and total
        `weight` -> the parts and weight for the mean, and the record's fields (bytes, epsilon, ...). With
        adaptive clipping `sums["unclipped"]` (the clients whose update norm was at most the round's C) moves
        the norm for the next round. `sampling`: the round's own (population, cohort) for the accountant
        (phones that come and go); None: the run's."""
        clients = int(sums.get("clients", 0))
        arrived = clients - int(sums.get("diverged", 0))
        record: dict[str, Any] = {"bytes_down": clients * self.bytes_down, "bytes_up": arrived * self.bytes_up}
        if self.settings.secagg_bits and parts:
            total = parts[0].copy()
            for part in parts[1:]:        # the left fold np.sum(parts, axis=0) makes, without stacking them
                total += part
            total, overflow = secagg.decode_sum(total, fraction_bits=self.settings.fraction_bits,
                                                bits=self.settings.secagg_bits)
            record.update(secagg_overflow=overflow, secagg_dropped=clients - arrived)
            if arrived < math.ceil(self.secagg_threshold * clients):
                log.warning("round %d: secure aggregation failed: %d of %d clients survived, the threshold is %d; "
                            "nothing applied", round_index + 1, arrived, clients,
                            math.ceil(self.secagg_threshold * clients))
                record["secagg_failed"] = 1
                return [], 0.0, self._privacy_fields(record)
            parts = [total]
        if self.settings.clip > 0 and self.central_noise > 0 and arrived > 0:
            noise = privacy_rng(self.seed, "dp-noise", round_index).standard_normal(parts[0].size if parts else 0)
            noise *= self.noise_std
            parts = [*parts, noise]
            weight = float(self.clients_per_round)
        if self.adaptive is not None:
            record["dp_clip"] = self.adaptive.clip
            if arrived > 0:
                record["dp_unclipped_fraction"] = self.adaptive.release(round_index, sums.get("unclipped", 0.0))
        if self.accounting is not None and arrived > 0:
            self.released += 1
            if self.by_round is None:
                self.epsilon = self.accounting.epsilon(self.released)
            else:
                if sampling is None:
                    raise ValueError("per-round accounting needs each round's (population, cohort)")
                self.epsilon = self.by_round.add(*sampling)
                record["dp_sampling_rate"] = min(1.0, sampling[1] / sampling[0]) if sampling[0] else 1.0
        return parts, weight, self._privacy_fields(record)

    def _privacy_fields(self, record: dict[str, Any]) -> dict[str, Any]:
        if self.accounting is not None:
            record["epsilon"] = self.epsilon
        return record

    def eval_fields(self) -> dict[str, Any]:
        """Fields of an evaluation record: the epsilon spent so far (with DP)."""
        return {"epsilon": self.epsilon} if self.accounting is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint: the accountant's count of released rounds (epsilon follows from it) and the
        next round's adaptive clipping norm."""
        return {"released": self.released, "epsilon": self.epsilon,
                **({"rounds_at": [list(r) for r in self.by_round.rounds]} if self.by_round is not None else {}),
                **(self.adaptive.state_dict() if self.adaptive is not None else {})}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.released, self.epsilon = int(state.get("released", 0)), float(state.get("epsilon", 0.0))
        if self.by_round is not None:        # the same rounds composed again, in order: the same epsilon
            self.by_round = self.accounting.round_by_round()
            for population, cohort in state.get("rounds_at", []):
                self.epsilon = self.by_round.add(int(population), int(cohort))
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state)

    def run_fields(self) -> dict[str, Any]:
        """What config.json records beside the options (with DP noise): the noise multipliers actually used,
        a calibrated one included."""
        if self.accounting is None:
            return {}
        a = self.accounting
        fields: dict[str, Any] = {"noise_multiplier": a.noise_multiplier, "accountant": a.kind}
        if self.settings.local_noise_std:
            fields["sampling"] = "local DP: rate 1, every round (a bound for the user who takes part most)"
        elif a.per_round:
            fields["sampling"] = (f"per round: min(1, c / m), c = {a.cohort} candidates asked for (--clients-per-"
                                  f"round x --over-select, rounded up), m = the users on-line at the round's start "
                                  f"(records: dp_sampling_rate)")
        else:
            fields.update(sampling=f"{a.cohort} / {a.population} every round (candidates asked for, or "
                                   f"--dp-noise-cohort; / the smallest training day's users, or --dp-population)",
                          sampling_rate=a.sampling_rate)
        if self.adaptive is not None:
            fields.update(update_noise_multiplier=self.central_noise, count_noise=self.adaptive.settings.count_noise)
        return {"privacy": fields}

    def summary(self) -> str:
        """One line for the end of the run."""
        if self.adaptive is None:
            clip = f"clip {self.settings.clip:g}"
        else:
            clip = (f"adaptive clip {self.adaptive.clip:.4g} towards quantile {self.adaptive.settings.quantile:g}, "
                    f"update noise multiplier {self.central_noise:.4g}, count noise {self.adaptive.settings.count_noise:g}")
        if self.accounting is None:
            return f"privacy: no DP noise ({clip})" if self.adaptive is not None else ""
        a = self.accounting
        return (f"privacy: epsilon {self.epsilon:.4g} at delta {a.delta:g} after {self.released} rounds "
                f"(noise multiplier {a.noise_multiplier:.4g}, {clip}, "
                f"{'local DP' if self.settings.local_noise_std else self._rate_text()}, "
                f"{a.kind} accountant)")


    def _rate_text(self) -> str:
        if self.by_round is None:
            return f"sampling rate {self.accounting.sampling_rate:.4g}"
        return f"per-round sampling rates (candidates / users on-line), mean {self.by_round.mean_rate():.4g}"


def training_population(reader) -> int:
    """The users the sampler draws from: the smallest training day's users with samples (the largest
    sampling rate of the run)."""
    from scheduler.calendar import Calendar

    days = Calendar.from_reader(reader).train_days
    return min(sum(1 for c in reader.index(day, "train").counts if c > 0) for day in days)


def accounting_of(config, noise_multiplier: float, population: int) -> DpAccounting | None:
    """The run's accountant (None without clipping): local DP's, or the central one at M/population."""
    if config.dp_clip <= 0 or (noise_multiplier <= 0 and not config.dp_target_epsilon):
        return None
    if config.dp_local:
        return local_accounting(noise_multiplier, config.dp_delta)
    from scheduler.phones.sync_round import over_selected

    # every contributor is one of the candidates asked for: over-selection raises each user's chance
    base, population = config.dp_noise_cohort or config.clients_per_round, config.dp_population or population
    cohort = over_selected(base, config.over_select) if base <= population else base     # too large: refused
    return DpAccounting(noise_multiplier=noise_multiplier, cohort=min(cohort, max(base, population)),
                        population=population, delta=config.dp_delta, kind=config.dp_accountant,
                        per_round=phones_come_and_go(config))



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


def server_channel(config, sizes: Sequence[int], population: int) -> ServerChannel:
    """The run's ServerChannel (always: it counts the bytes) from its Config."""
    from flock.common.channel_config import channel_settings

    z = noise_multiplier_of(config, population)
    accounting = accounting_of(config, z, population)
    adaptive = adaptive_clipping_of(config)
    channel = ServerChannel(settings=channel_settings(config, z), sizes=sizes, seed=config.seed,
                         clients_per_round=config.clients_per_round,
                         noise_multiplier=z, noise_cohort=config.dp_noise_cohort,
                         accounting=accounting,
                         secagg_neighbors=config.secagg_neighbors, secagg_threshold=config.secagg_threshold,
                         adaptive=AdaptiveClip(adaptive, seed=config.seed) if adaptive is not None else None)
    if adaptive is not None:
        log.info("adaptive clipping towards quantile %g from C0 = %g: update noise multiplier %.4f of z = %.4f, "
                 "count noise %g", adaptive.quantile, adaptive.initial_clip, channel.central_noise, z,
                 adaptive.count_noise)
    return channel
