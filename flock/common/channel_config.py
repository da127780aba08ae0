"""The per-user update channel's settings (DP clipping and noise, secure aggregation, compression), derived
from a Config, and the rules for how those options combine (one `error:` line naming the option, exit 2)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flock.common.codecs import Codec, parse_codec
from flock.common.errors import ConfigError

if TYPE_CHECKING:
    from flock.common.config import Config

NEEDS_CLIP = ("dp_noise_multiplier", "dp_target_epsilon", "dp_noise_cohort", "dp_population", "dp_local", "secagg",
              "dp_adaptive_quantile")
SECAGG_OPTIONS = ("secagg_bits", "secagg_neighbors", "secagg_threshold")
ADAPTIVE_OPTIONS = ("dp_clip_lr", "dp_clip_count_noise")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ChannelSettings:
    """What each client does to its update before sending it, and what it receives.

    `clip` > 0: the update (shared parameters only) is clipped to L2 norm `clip` and weighs 1, not n_k.
    `local_noise_std` > 0: the client adds Gaussian noise of that std to each coordinate (local DP).
    `secagg_bits` > 0: the update is sent in fixed point with `fraction_bits` fractional bits modulo
    2^secagg_bits (stochastic rounding); the range is wide enough that the round's sum cannot wrap.
    """

    clip: float = 0.0
    local_noise_std: float = 0.0
    up: Codec = field(default_factory=Codec)
    down: Codec = field(default_factory=Codec)
    secagg_bits: int = 0
    fraction_bits: int = 0

    @property
    def active(self) -> bool:
        """Whether any transform applies (otherwise the shard's plain FedAvg path runs, untouched)."""
        return self.clip > 0 or not self.up.lossless or not self.down.lossless or self.secagg_bits > 0

    @property
    def error_feedback(self) -> bool:
        """Top-k keeps each user's residual (private state on its home rank)."""
        return self.up.kind == "topk"


def fixed_point_fraction_bits(bits: int, clip: float, clients: int) -> int:
    """Fractional bits f such that the sum of `clients` values in [-clip, clip], each rounded to a multiple
    of 2^-f, stays inside the signed range of `bits`-bit integers: clients * (clip * 2^f + 1) < 2^(bits-1)."""
    room = (2 ** (bits - 1) - 1) / clients - 1
    if room < clip:
        raise ConfigError(f"--secagg-bits {bits}: too few bits for {clients} clients' updates of norm up to "
                          f"--dp-clip {clip:g} (need at least one fractional bit)")
    return math.floor(math.log2(room / clip))


def channel_settings(config: Config, noise_multiplier: float | None = None) -> ChannelSettings:
    """The run's channel; `noise_multiplier` (calibrated from --dp-target-epsilon) overrides the option's."""
    z = config.dp_noise_multiplier if noise_multiplier is None else noise_multiplier
    bits = config.secagg_bits if config.secagg else 0
    return ChannelSettings(clip=config.dp_clip, local_noise_std=z * config.dp_clip if config.dp_local else 0.0,
                           up=parse_codec(config.compress_up, "--compress-up"),
                           down=parse_codec(config.compress_down, "--compress-down"), secagg_bits=bits,
                           fraction_bits=fixed_point_fraction_bits(bits, config.dp_clip, config.clients_per_round)
                           if bits else 0)


def central_dp_noise(config: Config) -> bool:
    """Whether the server adds DP noise to the round's sum (given or calibrated; local DP's is the clients')."""
    return (config.dp_noise_multiplier > 0 or config.dp_target_epsilon > 0) and not config.dp_local


def phones_come_and_go(config: Config) -> bool:
    """Whether the run's users are on-line only at times (--availability other than always)."""
    return bool(config.device_profiles) and config.availability not in ("", "always")


def check_channel_options(config: Config) -> None:
    """The combinations no run can honour, each a ConfigError naming the option."""
    from flock.common.config import FIELDS

    given = [n for n in (*NEEDS_CLIP, *SECAGG_OPTIONS, *ADAPTIVE_OPTIONS, "compress_up", "compress_down")
             if getattr(config, n) != FIELDS[n].default]
    if not given and config.dp_clip == 0:
        return
    up, down = parse_codec(config.compress_up, "--compress-up"), parse_codec(config.compress_down, "--compress-down")
    needs_clip = [_flag(n) for n in NEEDS_CLIP if getattr(config, n) != FIELDS[n].default]
    if needs_clip and config.dp_clip <= 0:
        raise ConfigError(f"{', '.join(needs_clip)} need(s) --dp-clip C above 0 (the clipping norm), got "
                          f"--dp-clip {config.dp_clip:g}")
    if config.dp_noise_multiplier > 0 and config.dp_target_epsilon > 0:
        raise ConfigError("--dp-target-epsilon calibrates the noise: give it or --dp-noise-multiplier, not both")
    if config.dp_noise_cohort and config.dp_noise_cohort < config.clients_per_round:
        raise ConfigError(f"--dp-noise-cohort {config.dp_noise_cohort} is less than --clients-per-round "
                          f"{config.clients_per_round}: the noise is calibrated for a larger cohort, never a smaller")
    if config.dp_local and config.dp_noise_cohort:
        raise ConfigError("--dp-noise-cohort scales the server's noise: not with --dp-local")
    secagg_given = [_flag(n) for n in SECAGG_OPTIONS if getattr(config, n) != FIELDS[n].default]
    if secagg_given and not config.secagg:
        raise ConfigError(f"{', '.join(secagg_given)} need(s) --secagg")
    if config.secagg and not up.lossless:
        raise ConfigError(f"--secagg sends updates in fixed point (--secagg-bits): not with --compress-up {up}")
    if config.secagg and config.secagg_neighbors >= config.clients_per_round:
        raise ConfigError(f"--secagg-neighbors {config.secagg_neighbors} must be less than --clients-per-round "
                          f"{config.clients_per_round}")
    if config.secagg:
        fixed_point_fraction_bits(config.secagg_bits, config.dp_clip, config.clients_per_round)
    accounted = central_dp_noise(config)
    per_round = [_flag(n) for n in ("dp_target_epsilon", "dp_population", "dp_noise_cohort") if getattr(config, n)]
    if accounted and phones_come_and_go(config) and per_round:
        raise ConfigError(f"{', '.join(per_round)}: with --availability {config.availability} the accountant counts "
                          f"each round's own rate (candidates / users on-line), known only as the run goes: not with "
                          f"a population, cohort or target fixed in advance (give --dp-noise-multiplier)")
    check_adaptive_clipping(config)
    if down.kind == "topk":
        raise ConfigError(f"--compress-down {down}: a sparse model is not a model; use fp16 or qB")
    active = given or config.dp_clip > 0
    if active and config.async_buffer:
        raise ConfigError("DP, secure aggregation and compression run in synchronous rounds: not with --async-buffer")
    if active and config.centralized:
        raise ConfigError("DP, secure aggregation and compression are federated: not with --centralized")


def check_adaptive_clipping(config: Config) -> None:
    """Adaptive clipping's options and the mechanisms it cannot join: secure aggregation (its fixed-point
    range and fractional bits are set from --dp-clip before the run, while the norm moves every round) and
    local DP (each client's clipped-or-not bit would reach the server without noise, outside the guarantee).
    An explicit --dp-noise-multiplier must leave the update a share of the budget (a calibrated one is
    checked when it is known, before the run starts)."""
    from flock.common.config import FIELDS
    from scheduler.adaptive_clipping import adaptive_clipping_of, update_noise_multiplier

    given = [_flag(n) for n in ADAPTIVE_OPTIONS if getattr(config, n) != FIELDS[n].default]
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
