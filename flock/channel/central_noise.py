"""Central DP noise (DP-FedAvg, McMahan et al. 2018, user level): the clients' updates are clipped to norm C and
weigh 1 each (`clip.py`); the server adds Gaussian noise of std z*C once to the round's sum, from the round's
seeded stream (the same at any -np), and divides by the expected cohort K (the fixed-denominator estimator:
the number of contributors is not released). With a noise cohort M (pfl's noise-cohort scaling) the sum gets
std z*C*K/M: the mean is as noisy as a deployed round of M users, and the accountant (`accounting.py`) counts
rounds at the deployed rate M/population. Under adaptive clipping C is the round's C_t and z is the update's
multiplier z_delta (the count of unclipped clients takes the rest of the budget).
"""
from __future__ import annotations

from typing import Sequence

from flock.channel.base import Build, ServerRound, Stage
from flock.channel.clip import Clip
from flock.common.errors import ConfigError
from flock.common.streams import privacy_rng


class CentralNoise(Stage):
    """Noise of multiplier `noise_multiplier` (on the update) at `clip`'s round norm, for rounds of
    `clients_per_round` clients scaled to a cohort of `noise_cohort` (0: K)."""

    name = "central-noise"

    @classmethod
    def from_config(cls, config, build: Build) -> CentralNoise | None:
        z = build.noise_multiplier
        if build.side != "server" or config.dp_clip <= 0 or config.dp_local or z <= 0:
            return None
        return cls(None, noise_multiplier=z, seed=config.seed, clients_per_round=config.clients_per_round,
                   noise_cohort=config.dp_noise_cohort)

    @staticmethod
    def check(config) -> None:
        if config.dp_noise_cohort and config.dp_noise_cohort < config.clients_per_round:
            raise ConfigError(f"--dp-noise-cohort {config.dp_noise_cohort} is less than --clients-per-round "
                              f"{config.clients_per_round}: the noise is calibrated for a larger cohort, never a "
                              f"smaller")

    def bind(self, stages: Sequence[Stage]) -> None:
        self.clip = next(s for s in stages if isinstance(s, Clip))
        if self.clip.adaptive is not None:   # the count of unclipped clients takes its share of z: the update's
            self.noise_multiplier = self.clip.update_noise      # multiplier, as the clip stage derived it

    def __init__(self, clip: Clip | None, *, noise_multiplier: float, seed: int, clients_per_round: int,
                 noise_cohort: int = 0) -> None:
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.seed = seed
        self.clients_per_round = clients_per_round
        self.noise_cohort = noise_cohort or clients_per_round

    @property
    def noise_std(self) -> float:
        """The std of the Gaussian noise on the current round's sum of clipped updates."""
        return self.noise_multiplier * self.clip.round_clip * self.clients_per_round / self.noise_cohort

    def server(self, round_: ServerRound) -> None:
        if self.noise_multiplier <= 0 or round_.arrived <= 0 or round_.void:
            return
        parts = round_.parts
        noise = privacy_rng(self.seed, "dp-noise", round_.index).standard_normal(parts[0].size if parts else 0)
        noise *= self.noise_std
        round_.parts = [*parts, noise]
        round_.weight = float(self.clients_per_round)
