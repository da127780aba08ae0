"""The client side of the update channel: what a simulated phone does to its update before sending it, and how
it receives the model. Used by `Shard.train_user` only when a channel is configured (`ChannelSettings.active`);
without one the shard's plain FedAvg path runs untouched.

A user's update is delta = theta_user - theta_received over the shared parameters (private parameters never
leave the device and are neither clipped nor noised). In order:

1. clipping to L2 norm C (DP-FedAvg, McMahan et al. 2018): delta *= min(1, C / ||delta||), C the round's norm
   from the scheduler's plan; the client reports whether it was not clipped (`unclipped`, the bit adaptive
   clipping counts: `scheduler/adaptive_clipping.py`);
2. local DP: Gaussian noise of std z*C per coordinate, from the user's channel stream;
3. compression (`flock/common/codecs.py`): fp16; qB stochastic quantization; top-k of (delta + residual) with
   error feedback, the residual kept as the user's private state on its home rank;
4. secure aggregation's encoding: fixed point with f fractional bits, stochastic rounding, values held to
   [-C, C]; the rank's sum of such values is exact in float64, so the scheduler's modular decoding
   (`scheduler/secagg.py`) sees the bits a real protocol would.

Every random draw comes from the user's channel stream (`flock.common.streams.channel_seed`) or, for the model
broadcast, from the round's stream: the same at any number of ranks.
"""
from __future__ import annotations

import threading
from typing import Mapping

import numpy as np
import torch

from flock.common.channel_config import ChannelSettings
from flock.common.codecs import Codec
from flock.common.streams import privacy_rng

RESIDUAL = "ef/"     # private-state key prefix of a user's error-feedback residual, per shared parameter


def stochastic_levels(x: torch.Tensor, bits: int, uniform: torch.Tensor) -> torch.Tensor:
    """QSGD-style unbiased B-bit quantization of float64 `x`: 2^B levels evenly spanning [-m, m], m = max|x|
    as the float32 scale a client would send; each value rounds to a neighbouring level with the
    probability that keeps its mean (`uniform`: draws in [0, 1), x's shape). Returns the decoded values."""
    m = float(x.abs().max()) if x.numel() else 0.0
    if m == 0.0:
        return torch.zeros_like(x)
    m32 = np.float32(m)
    if float(m32) < m:
        m32 = np.nextafter(m32, np.float32(np.inf))
    levels = 2 ** bits - 1
    step = 2.0 * float(m32) / levels
    t = ((x + float(m32)) / step).clamp_(0, levels)
    index = t.floor()
    index += (uniform < (t - index)).to(x.dtype)
    return index.clamp_(0, levels) * step - float(m32)


def encode(codec: Codec, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """One tensor (float64) through fp16 or qB, decoded as the receiver reads it."""
    if codec.kind == "fp16":
        return x.to(torch.float16).to(x.dtype)
    if codec.kind == "q":
        return stochastic_levels(x, codec.bits, torch.rand(x.shape, generator=rng, dtype=x.dtype))
    return x


class UpdateChannel:
    """One run's channel; shards of a rank share it (thread-safe)."""

    def __init__(self, settings: ChannelSettings, *, seed: int) -> None:
        self.settings = settings
        self.seed = seed
        self._lock = threading.Lock()
        self._received: tuple[int | None, torch.Tensor | None] = (None, None)

    @property
    def uniform_weights(self) -> bool:
        """With clipping every user weighs 1 (DP-FedAvg needs each user's influence bounded), else n_k."""
        return self.settings.clip > 0

    def received_model(self, flat: torch.Tensor, sizes: tuple[int, ...], version: int) -> torch.Tensor | None:
        """The global float32 parameters as every client of `version` receives them (--compress-down), or
        None when they arrive exactly. Computed once per version; the rounding stream is the version's."""
        codec = self.settings.down
        if codec.lossless:
            return None
        with self._lock:
            cached_version, cached = self._received
            if cached_version != version or cached is None:
                rng = torch.Generator().manual_seed(int(privacy_rng(self.seed, "broadcast", version).integers(2**62)))
                parts = [encode(codec, t.double(), rng).float() for t in flat.split(sizes)]
                cached = torch.cat(parts) if parts else flat.clone()
                self._received = (version, cached)
            return cached

    def apply(self, uid: str, deltas: list[torch.Tensor], rng: torch.Generator,
              state: Mapping[str, np.ndarray] | None = None, names: tuple[str, ...] = (), *,
              clip: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Transforms user `uid`'s update in place (`deltas`: float64 tensors, one per shared parameter, named
        `names`); `state`: the user's stored private state (its residuals); `clip`: the round's clipping norm
        from the scheduler's plan (None: the configured one, for callers outside a run). Returns the private
        state to store for it (empty without error feedback) and its sums for the round: with clipping,
        "unclipped" 1.0 when its update's norm was at most the norm, else 0.0."""
        s = self.settings
        sums: dict[str, float] = {}
        if s.clip > 0:
            clip = s.clip if clip is None else clip
            if not clip > 0:
                raise ValueError(f"user {uid!r}: clipping is on, but the round's plan gives clipping norm {clip}")
            norm = float(torch.stack([d.pow(2).sum() for d in deltas]).sum().sqrt()) if deltas else 0.0
            sums["unclipped"] = float(norm <= clip)
            if norm > clip:
                torch._foreach_mul_(deltas, clip / norm)
        if s.local_noise_std > 0:
            for d in deltas:
                d.add_(torch.randn(d.shape, generator=rng, dtype=d.dtype), alpha=s.local_noise_std)
        new_state: dict[str, np.ndarray] = {}
        if s.up.kind == "topk":
            new_state = self._top_k(deltas, state or {}, names)
        elif not s.up.lossless:
            for d in deltas:
                d.copy_(encode(s.up, d, rng))
        if s.secagg_bits:
            scale = float(2 ** s.fraction_bits)
            for d in deltas:
                d.clamp_(-s.clip, s.clip).mul_(scale)
                d.add_(torch.rand(d.shape, generator=rng, dtype=d.dtype)).floor_().div_(scale)
        return new_state, sums

    def _top_k(self, deltas: list[torch.Tensor], state: Mapping[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Top-k of (delta + residual) over the whole update; what is not sent becomes the new residual."""
        for name, d in zip(names, deltas):
            residual = state.get(RESIDUAL + name)
            if residual is not None:
                d.add_(torch.from_numpy(residual).to(d.device, d.dtype).view_as(d))
        flat = torch.cat([d.reshape(-1) for d in deltas])
        keep = torch.topk(flat.abs(), self.settings.up.topk_count(flat.numel()), sorted=False).indices
        sent = torch.zeros_like(flat)
        sent[keep] = flat[keep].float().double()       # values travel as float32
        residual = flat - sent
        out, offset = {}, 0
        for name, d in zip(names, deltas):
            n = d.numel()
            out[RESIDUAL + name] = residual[offset:offset + n].view(d.shape).float().cpu().numpy()
            d.copy_(sent[offset:offset + n].view(d.shape))
            offset += n
        return out


def update_channel(config) -> UpdateChannel | None:
    """This rank's channel from the run's Config, or None when no option asks for one. Local DP with a
    target epsilon calibrates its noise here (the same on every rank: local DP's rate does not depend on
    the data)."""
    from flock.common.channel_config import channel_settings

    if config.dp_local and config.dp_target_epsilon:
        from scheduler.privacy import noise_multiplier_of

        settings = channel_settings(config, noise_multiplier_of(config, population=1))
    else:
        settings = channel_settings(config)
    return UpdateChannel(settings, seed=config.seed) if settings.active else None
