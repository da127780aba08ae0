"""The update channel: what happens to a client's update between its training and the server's optimizer
step, and to the model on its way down, as an ordered list of stages (`base.Stage`), one mechanism a file:

    accounting.Accountant   epsilon of the rounds released so far (dp-accounting), calibration
    clip.Clip               clipping to C (fixed, or adaptive clipping's C_t), each client weighing 1
    central_noise.CentralNoise   the server's Gaussian noise on the round's sum, the fixed denominator
    local_noise.LocalNoise  local DP: each client's noise
    compress.Compress       fp16 / qB / top-k with error feedback up, fp16 / qB down
    secagg.SecAgg           secure aggregation's fixed-point encoding, modular decoding and threshold

Clients apply the stages in this order, the server in the reverse one (a client's last transformation is
the server's first to undo: secure aggregation's decoding, then the noise, then the clipping norm's update,
then the accountant). Each stage builds itself from the run's Config (`from_config`: None when its options
are off), checks the options it cannot run with (`check`), and says its bytes on the wire. A new mechanism
is a new file with one Stage and its line in STAGES. Without any option only the accountant (counting
nothing) runs on the server, and the ranks have no channel: the shard's plain FedAvg path runs untouched.
"""
from __future__ import annotations

import logging
from typing import Sequence

from flock.channel.accounting import Accountant, noise_multiplier_of
from flock.channel.base import Build, ServerChannel, Stage, UpdateChannel
from flock.channel.central_noise import CentralNoise
from flock.channel.clip import Clip
from flock.channel.compress import Compress
from flock.channel.local_noise import LocalNoise
from flock.channel.secagg import SecAgg
from flock.common.errors import ConfigError

log = logging.getLogger(__name__)

STAGES: tuple[type[Stage], ...] = (Accountant, Clip, CentralNoise, LocalNoise, Compress, SecAgg)

# options that mean nothing without clipping: each bounds or noises a clipped update
NEEDS_CLIP = ("dp_noise_multiplier", "dp_target_epsilon", "dp_noise_cohort", "dp_population", "dp_local", "secagg",
              "dp_adaptive_quantile")
CHANNEL_OPTIONS = (*NEEDS_CLIP, "secagg_bits", "secagg_neighbors", "secagg_threshold", "dp_clip_lr",
                   "dp_clip_count_noise", "compress_up", "compress_down")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_stages(config, build: Build) -> list[Stage]:
    """The run's stages for one side, in order (the channels bind them to each other)."""
    return [s for s in (cls.from_config(config, build) for cls in STAGES) if s is not None]


def check_channel_options(config) -> None:
    """The combinations no run can honour, each a ConfigError naming the option: the rules every stage
    shares, then each stage's own."""
    from flock.common.config import FIELDS

    given = [n for n in CHANNEL_OPTIONS if getattr(config, n) != FIELDS[n].default]
    if not given and config.dp_clip == 0:
        return
    needs_clip = [_flag(n) for n in NEEDS_CLIP if getattr(config, n) != FIELDS[n].default]
    if needs_clip and config.dp_clip <= 0:
        raise ConfigError(f"{', '.join(needs_clip)} need(s) --dp-clip C above 0 (the clipping norm), got "
                          f"--dp-clip {config.dp_clip:g}")
    for cls in STAGES:
        cls.check(config)
    if config.async_buffer:
        raise ConfigError("DP, secure aggregation and compression run in synchronous rounds: not with --async-buffer")
    if config.centralized:
        raise ConfigError("DP, secure aggregation and compression are federated: not with --centralized")


def server_channel(config, sizes: Sequence[int], population: int) -> ServerChannel:
    """The scheduler's channel (always: it counts the bytes) from the run's Config; `population` is the
    accountant's (the smallest training day's users)."""
    z = noise_multiplier_of(config, population)
    return ServerChannel(build_stages(config, Build("server", z, population)), sizes)


def update_channel(config) -> UpdateChannel | None:
    """A rank's channel from the run's Config, or None when no stage works on the clients. Local DP with a
    target epsilon calibrates its noise here (the same on every rank: local DP's rate does not depend on the
    data)."""
    z = noise_multiplier_of(config, population=1) if config.dp_local and config.dp_target_epsilon else \
        config.dp_noise_multiplier
    stages = build_stages(config, Build("client", z))
    return UpdateChannel(stages, seed=config.seed) if stages else None


def keeps_user_state(config) -> bool:
    """Whether users keep private channel state across rounds (top-k's residual): they then train on their
    home rank."""
    channel = update_channel(config)
    return channel is not None and channel.error_feedback
