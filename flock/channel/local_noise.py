"""Local DP (--dp-local): each client adds Gaussian noise of std z*C to every coordinate of its clipped update
before it leaves the phone, from the user's channel stream; the server adds none. The accountant
(`accounting.py`) counts the user's own report as the mechanism, at rate 1: the server sees who took part."""
from __future__ import annotations

from flock.channel.base import Build, ClientStep, Stage
from flock.common.errors import ConfigError


class LocalNoise(Stage):
    """Noise of std `std` per coordinate on each client's update."""

    name = "local-noise"

    @classmethod
    def from_config(cls, config, build: Build) -> LocalNoise | None:
        std = build.noise_multiplier * config.dp_clip if config.dp_local else 0.0
        return cls(std) if build.side == "client" and std > 0 else None

    @staticmethod
    def check(config) -> None:
        if config.dp_local and config.dp_noise_cohort:
            raise ConfigError("--dp-noise-cohort scales the server's noise: not with --dp-local")

    def __init__(self, std: float) -> None:
        self.std = std

    def client(self, step: ClientStep) -> None:
        import torch
        for d in step.deltas:
            d.add_(torch.randn(d.shape, generator=step.rng, dtype=d.dtype), alpha=self.std)
