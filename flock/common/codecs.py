"""How a simulated phone's transfers are encoded (`--compress-up`, `--compress-down`), and the exact bytes each
encoding sends. Pure arithmetic: the channel's compression stage (`flock/channel/compress.py`) applies them.

| spec | encoding | bytes for a tensor of n values |
|---|---|---|
| `fp32` | float32, as sent today | 4 n |
| `fp16` | IEEE half precision (round to nearest) | 2 n |
| `qB` (B in 1..32) | B-bit unbiased stochastic rounding onto 2^B levels spanning [-m, m], m = max abs of the tensor (QSGD-style, with the max norm as scale) | ceil(n B / 8) + 4 (the float32 scale m) |
| `topk:F` (0 < F <= 1) | the k = ceil(F d) largest-magnitude entries of the whole update (d values), with error feedback | 8 k (float32 value + uint32 index) |

Top-k is per update (all shared tensors together), the others per tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from flock.common.errors import ConfigError

FP32_BYTES, FP16_BYTES, SCALE_BYTES, INDEX_BYTES = 4, 2, 4, 4


@dataclass(frozen=True)
class Codec:
    """One encoding: `kind` is "fp32", "fp16", "q" (with `bits`) or "topk" (with `fraction`)."""

    kind: str = "fp32"
    bits: int = 32
    fraction: float = 1.0

    @property
    def lossless(self) -> bool:
        return self.kind == "fp32"

    def __str__(self) -> str:
        return {"q": f"q{self.bits}", "topk": f"topk:{self.fraction:g}"}.get(self.kind, self.kind)

    def topk_count(self, total: int) -> int:
        """How many of `total` values top-k keeps (at least one)."""
        return min(total, max(1, math.ceil(round(self.fraction * total, 9))))

    def bytes(self, sizes: Sequence[int]) -> int:
        """The exact bytes of one update (or model) whose tensors have `sizes` values."""
        total = sum(sizes)
        if self.kind == "fp32":
            return FP32_BYTES * total
        if self.kind == "fp16":
            return FP16_BYTES * total
        if self.kind == "q":
            return sum(math.ceil(n * self.bits / 8) + SCALE_BYTES for n in sizes if n)
        return (FP32_BYTES + INDEX_BYTES) * self.topk_count(total) if total else 0


def parse_codec(text: str, flag: str) -> Codec:
    """'fp32', 'fp16', 'qB' or 'topk:F' -> Codec; anything else is a ConfigError naming `flag`."""
    spec = text.strip().lower()
    if spec in ("", "fp32", "none"):
        return Codec()
    if spec == "fp16":
        return Codec("fp16", bits=16)
    if spec.startswith("q") and spec[1:].isdigit():
        bits = int(spec[1:])
        if not 1 <= bits <= 32:
            raise ConfigError(f"{flag} {text}: b must be in 1..32 bits, got {bits}")
        return Codec("q", bits=bits)
    if spec.startswith("topk:"):
        try:
            fraction = float(spec[5:])
        except ValueError:
            fraction = math.nan
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ConfigError(f"{flag} {text}: topk:F needs a fraction 0 < F <= 1, e.g. topk:0.01")
        return Codec("topk", fraction=fraction)
    raise ConfigError(f"{flag} {text!r}: use fp32, fp16, qB (B in 1..32, e.g. q8) or topk:F (e.g. topk:0.01)")
