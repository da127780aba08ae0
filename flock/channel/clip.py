"""Clipping, the channel's first stage: each client's update (shared parameters only) is clipped to L2 norm C
and weighs 1 in the mean instead of its sample count (DP-FedAvg, McMahan et al. 2018: each user's influence
bounded); C is --dp-clip, or the round's norm under adaptive clipping, which the scheduler hands the clients
in the round's plan. The client reports whether its update was not clipped (`unclipped`).

Adaptive clipping for DP-FedAvg (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping", NeurIPS): the clipping norm follows a target quantile gamma of the clients' update
norms instead of being fixed before the run.

Each round every client reports one bit, b_i = 1 when its update norm is at most the round's norm C_t (before
clipping). The server releases the noisy fraction b = (sum b_i + N(0, sigma_b^2)) / m, m the round's expected
clients (the update mean's fixed denominator), and moves the norm geometrically:

    C_{t+1} = C_t * exp(-eta * (b - gamma))

so C grows while fewer than gamma of the clients are unclipped and shrinks while more are. The count is a
second Gaussian mechanism; the paper's Theorem 1: a round with noise multiplier z_delta on the update and std
sigma_b on the count is as private as one Gaussian mechanism with multiplier z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2.
So for the run's z (given, or calibrated to a target epsilon) the update gets z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2,
and the accountant keeps counting rounds of multiplier z: the total privacy is unchanged.

With a noise cohort M (pfl's noise-cohort scaling, `central_noise.py`) sigma_b is the deployed round's
(default M / 20, the paper's m / 20) and the simulated round of K clients gets std sigma_b * K / M on its count:
the released fraction is as noisy as the deployed round's, as the update's mean is.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from flock.channel.base import Build, ClientStep, ServerRound, Stage
from flock.common.errors import ConfigError
from flock.common.streams import clip_count_rng


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2: the update's noise multiplier that, with std `count_noise` on
    the count of unclipped clients, spends the privacy of one Gaussian mechanism of multiplier
    `noise_multiplier` (Theorem 1). 0 without noise; a ConfigError naming --dp-clip-count-noise when the
    count alone would spend at least the whole budget (2 sigma_b <= z)."""
    z = noise_multiplier
    if z <= 0:
        return 0.0
    if 2 * count_noise <= z:
        raise ConfigError(f"adaptive clipping: the count's noise sigma_b = {count_noise:g} (--dp-clip-count-noise; "
                          f"default: the cohort / 20) must be more than half the noise multiplier z = {z:.4g}, else "
                          f"the count of unclipped clients spends the whole privacy budget and the update's "
                          f"multiplier (z^-2 - (2 sigma_b)^-2)^-1/2 is undefined: raise --dp-clip-count-noise or "
                          f"lower the noise")
    return (z ** -2 - (2 * count_noise) ** -2) ** -0.5


def next_clip(clip: float, unclipped_fraction: float, *, quantile: float, lr: float) -> float:
    """The geometric update: C_{t+1} = C_t * exp(-lr * (unclipped_fraction - quantile))."""
    return clip * math.exp(-lr * (unclipped_fraction - quantile))


def default_count_noise(cohort: int) -> float:
    """The paper's sigma_b = m / 20 for a round of `cohort` expected clients."""
    return cohort / 20


@dataclass(frozen=True)
class AdaptiveClipping:
    """The run's adaptive clipping: target `quantile` gamma in (0, 1), geometric rate `lr` eta, the count's
    noise std `count_noise` sigma_b (of a round of `noise_cohort` clients), the initial norm `initial_clip` C0,
    and `clients_per_round` K, the denominator m of the released fraction."""

    quantile: float
    lr: float
    count_noise: float
    initial_clip: float
    clients_per_round: int
    noise_cohort: int = 0        # 0: K

    def __post_init__(self) -> None:
        if not 0 < self.quantile < 1 or self.lr <= 0 or self.count_noise < 0 or self.initial_clip <= 0:
            raise ConfigError(f"adaptive clipping needs a quantile in (0, 1), a rate above 0, count noise >= 0 and "
                              f"an initial norm above 0; got {self}")

    @property
    def count_std(self) -> float:
        """The std of the noise on the simulated round's count: sigma_b * K / M."""
        return self.count_noise * self.clients_per_round / (self.noise_cohort or self.clients_per_round)


class AdaptiveClip:
    """The clipping norm C_t of a run: `clip` is the norm clients use in the current round; `release` ends a
    round (noisy fraction, next norm). The count's noise comes from the round's seeded stream, so the norms
    are the same at any number of ranks and after a resume (the norm is in the checkpoint)."""

    def __init__(self, settings: AdaptiveClipping, *, seed: int) -> None:
        self.settings = settings
        self.seed = seed
        self.clip = settings.initial_clip

    def release(self, round_index: int, unclipped: float) -> float:
        """Round `round_index` (0-based) had `unclipped` clients with an update norm <= `clip`: returns the
        released fraction b = (unclipped + N(0, count_std^2)) / K and moves `clip` to the next round's norm."""
        s = self.settings
        noise = float(clip_count_rng(self.seed, round_index).standard_normal()) * s.count_std
        fraction = (unclipped + noise) / s.clients_per_round
        self.clip = next_clip(self.clip, fraction, quantile=s.quantile, lr=s.lr)
        return fraction

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint: the next round's norm (a float: JSON keeps it exactly)."""
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the norm from `state_dict`'s output (the initial norm when it has none)."""
        self.clip = float(state.get("clip", self.settings.initial_clip))


def adaptive_clipping_of(config) -> AdaptiveClipping | None:
    """The run's adaptive clipping from its Config (None unless --dp-adaptive-quantile is given)."""
    if not config.dp_adaptive_quantile:
        return None
    cohort = config.dp_noise_cohort or config.clients_per_round
    return AdaptiveClipping(quantile=config.dp_adaptive_quantile, lr=config.dp_clip_lr,
                            count_noise=config.dp_clip_count_noise or default_count_noise(cohort),
                            initial_clip=config.dp_clip, clients_per_round=config.clients_per_round,
                            noise_cohort=config.dp_noise_cohort)


class Clip(Stage):
    """Clipping to `clip` (fixed), or to adaptive clipping's round norm (`adaptive`). `accounted`: an accountant
    reports the run's privacy (the closing line is then its, with this stage's description)."""

    name = "clip"

    @classmethod
    def from_config(cls, config, build: Build) -> Clip | None:
        if config.dp_clip <= 0:
            return None
        settings = adaptive_clipping_of(config)
        if settings is None or build.side != "server":      # clients clip to the norm in the round's plan
            return cls(config.dp_clip)
        z = 0.0 if config.dp_local else build.noise_multiplier
        stage = cls(config.dp_clip, AdaptiveClip(settings, seed=config.seed),
                    update_noise=update_noise_multiplier(z, settings.count_noise))
        logging.getLogger(__name__).info(
            "adaptive clipping towards quantile %g from C0 = %g: update noise multiplier %.4f of z = %.4f, count "
            "noise %g", settings.quantile, settings.initial_clip, stage.update_noise, z, settings.count_noise)
        return stage

    @staticmethod
    def check(config) -> None:
        check_adaptive_clipping(config)

    def bind(self, stages: Sequence[Stage]) -> None:
        self.accounted = any(getattr(s, "accounting", None) is not None for s in stages)

    def __init__(self, clip: float, adaptive: AdaptiveClip | None = None, *, update_noise: float = 0.0,
                 accounted: bool = False) -> None:
        self.clip = clip
        self.adaptive = adaptive
        self.update_noise = update_noise      # the update's noise multiplier z_delta (adaptive clipping)
        self.accounted = accounted

    @property
    def uniform_weights(self) -> bool:
        return True

    @property
    def round_clip(self) -> float:
        return self.adaptive.clip if self.adaptive is not None else self.clip

    def client(self, step: ClientStep) -> None:
        import torch
        clip = self.clip if step.clip is None else step.clip
        if not clip > 0:
            raise ValueError(f"user {step.uid!r}: clipping is on, but the round's plan gives clipping norm {clip}")
        deltas = step.deltas
        norm = float(torch.stack([d.pow(2).sum() for d in deltas]).sum().sqrt()) if deltas else 0.0
        step.sums["unclipped"] = float(norm <= clip)
        if norm > clip:
            torch._foreach_mul_(deltas, clip / norm)

    def server(self, round_: ServerRound) -> None:
        """Adaptive clipping: records the round's norm and, when results arrived, releases the noisy fraction of
        unclipped clients, which moves the norm for the next round."""
        if self.adaptive is None or round_.void:
            return
        round_.record["dp_clip"] = self.adaptive.clip
        if round_.arrived > 0:
            round_.record["dp_unclipped_fraction"] = self.adaptive.release(round_.index,
                                                                           round_.sums.get("unclipped", 0.0))

    def state_dict(self) -> dict[str, Any]:
        return self.adaptive.state_dict() if self.adaptive is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state)

    def run_fields(self) -> dict[str, Any]:
        if self.adaptive is None or not self.accounted:
            return {}
        return {"update_noise_multiplier": self.update_noise, "count_noise": self.adaptive.settings.count_noise}

    def describe(self) -> str:
        if self.adaptive is None:
            return f"clip {self.clip:g}"
        return (f"adaptive clip {self.adaptive.clip:.4g} towards quantile {self.adaptive.settings.quantile:g}, "
                f"update noise multiplier {self.update_noise:.4g}, count noise {self.adaptive.settings.count_noise:g}")

    def summary(self) -> str:
        return f"no DP noise ({self.describe()})" if self.adaptive is not None and not self.accounted else ""


ADAPTIVE_OPTIONS = ("dp_clip_lr", "dp_clip_count_noise")


def check_adaptive_clipping(config) -> None:
    """Adaptive clipping's options and the mechanisms it cannot join: secure aggregation (its fixed-point
    range and fractional bits are set from --dp-clip before the run, while the norm moves every round) and
    local DP (each client's clipped-or-not bit would reach the server without noise, outside the guarantee).
    An explicit --dp-noise-multiplier must leave the update a share of the budget (a calibrated one is
    checked when it is known, before the run starts)."""
    from flock.common.config import FIELDS

    given = ["--" + n.replace("_", "-") for n in ADAPTIVE_OPTIONS if getattr(config, n) != FIELDS[n].default]
    if given and not config.dp_adaptive_quantile:
        raise ConfigError(f"{', '.join(given)} need(s) --dp-adaptive-quantile GAMMA (adaptive clipping)")
    if not config.dp_adaptive_quantile:
        return
    if config.secagg:
        raise ConfigError("--dp-adaptive-quantile moves the clipping norm every round, but secure aggregation's "
                          "fixed-point range is set from --dp-clip before the run: not with --secagg")
    if config.dp_local:
        raise ConfigError("--dp-adaptive-quantile: each client's clipped-or-not bit would reach the server without "
                          "noise, outside local DP's guarantee: not with --dp-local")
    update_noise_multiplier(config.dp_noise_multiplier, adaptive_clipping_of(config).count_noise)
