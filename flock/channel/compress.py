"""Compression (`flock/common/codecs.py`): how clients send their update and receive the model. Up: fp16; qB
stochastic quantization (QSGD-style, unbiased); top-k of (delta + residual) with error feedback, the residual
kept as the user's private state on its home rank. Down (--compress-down): fp16 or qB of the global
parameters, the same for every client of a version (its rounding stream is the version's). Random draws come
from the user's channel stream or, for the model broadcast, from the version's: the same at any -np.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from flock.channel.base import Build, ClientStep, Stage
from flock.common.codecs import Codec, parse_codec
from flock.common.errors import ConfigError
from flock.common.streams import privacy_rng

if TYPE_CHECKING:
    import torch

RESIDUAL = "ef/"     # private-state key prefix of a user's error-feedback residual, per shared parameter


def stochastic_levels(x: torch.Tensor, bits: int, uniform: torch.Tensor) -> torch.Tensor:
    """QSGD-style unbiased B-bit quantization of float64 `x`: 2^B levels evenly spanning [-m, m], m = max|x|
    as the float32 scale a client would send; each value rounds to a neighbouring level with the
    probability that keeps its mean (`uniform`: draws in [0, 1), x's shape). Returns the decoded values."""
    import torch
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
    import torch
    if codec.kind == "fp16":
        return x.to(torch.float16).to(x.dtype)
    if codec.kind == "q":
        return stochastic_levels(x, codec.bits, torch.rand(x.shape, generator=rng, dtype=x.dtype))
    return x


class Compress(Stage):
    """The `up` codec on each client's update, the `down` codec on the model it receives."""

    name = "compress"

    @classmethod
    def from_config(cls, config, build: Build) -> Compress | None:
        up, down = parse_codec(config.compress_up, "--compress-up"), parse_codec(config.compress_down, "--compress-down")
        return None if up.lossless and down.lossless else cls(up, down, seed=config.seed)

    @staticmethod
    def check(config) -> None:
        down = parse_codec(config.compress_down, "--compress-down")
        parse_codec(config.compress_up, "--compress-up")
        if down.kind == "topk":
            raise ConfigError(f"--compress-down {down}: a sparse model is not a model; use fp16 or qB")

    def __init__(self, up: Codec, down: Codec, *, seed: int) -> None:
        self.up, self.down, self.seed = up, down, seed

    @property
    def keeps_state(self) -> bool:
        return self.up.kind == "topk"

    def receive(self, flat: torch.Tensor, sizes: Sequence[int], version: int) -> torch.Tensor | None:
        import torch
        if self.down.lossless:
            return None
        rng = torch.Generator().manual_seed(int(privacy_rng(self.seed, "broadcast", version).integers(2**62)))
        parts = [encode(self.down, t.double(), rng).float() for t in flat.split(list(sizes))]
        return torch.cat(parts) if parts else flat.clone()

    def client(self, step: ClientStep) -> None:
        if self.up.kind == "topk":
            step.new_state.update(self._top_k(step.deltas, step.state, step.names))
        elif not self.up.lossless:
            for d in step.deltas:
                d.copy_(encode(self.up, d, step.rng))

    def bytes(self, down: int, up: int, sizes: Sequence[int]) -> tuple[int, int]:
        return self.down.bytes(sizes), self.up.bytes(sizes)

    def _top_k(self, deltas: list[torch.Tensor], state, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Top-k of (delta + residual) over the whole update; what is not sent becomes the new residual."""
        import torch
        for name, d in zip(names, deltas):
            residual = state.get(RESIDUAL + name)
            if residual is not None:
                d.add_(torch.from_numpy(residual).to(d.device, d.dtype).view_as(d))
        flat = torch.cat([d.reshape(-1) for d in deltas])
        keep = torch.topk(flat.abs(), self.up.topk_count(flat.numel()), sorted=False).indices
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
