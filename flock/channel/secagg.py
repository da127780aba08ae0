"""Simulated secure aggregation: the arithmetic of SecAgg (Bonawitz et al. 2017) with SecAgg+'s sparse masking
graph (Bell et al. 2020), without the cryptography, so that its effects on the numbers, its failure modes and
its costs can be studied.

- Encoding: a client's clipped update (every value in [-C, C]) in fixed point with f fractional bits,
  stochastic rounding, as integers modulo 2^b. `fixed_point_fraction_bits` picks f so
  that a round's sum cannot leave the signed range; `wrap_signed` still reports every value that did.
- Masks: every pair (u, v) of neighbours in the round's masking graph shares a seeded pseudo-random mask
  m_uv (u adds it, v subtracts it) and every user adds a self mask b_u; modulo 2^b the pairwise masks cancel
  to the bit in the sum, the server removes the survivors' self masks (their seeds, recovered from shares).
- Dropouts after masking: the server recovers a dropped user's pairwise seeds from its neighbours' shares
  and removes the masks its surviving neighbours added; with fewer than `threshold` survivors the shares
  cannot be reconstructed and the round fails (`SecAggFailed`).
- Costs: bytes per client from the protocol's messages (`client_bytes`) and the pseudo-random values each
  party expands (`SecAggResult.prg_values`).

In a flock run (`--secagg`, the channel's `SecAgg` stage) the clients' encoding happens on the ranks, each rank
sums its users' fixed-point values exactly (multiples of 2^-f in float64), and the scheduler decodes the sum
modulo 2^b (`decode_sum`) and enforces the threshold on the users that dropped after training. The pairwise
masks cancel exactly in that sum (tested here), so the run does not expand them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from flock.channel.base import Build, ClientStep, ServerRound, Stage
from flock.common.codecs import parse_codec
from flock.common.errors import ConfigError
from flock.common.streams import secagg_rng

log = logging.getLogger(__name__)

KEY_BYTES, SIGNATURE_BYTES = 32, 64          # X25519 public keys, Ed25519 signatures
NONCE_BYTES, TAG_BYTES = 12, 16              # AES-GCM of the shares
SHARE_BYTES = 2 * 32                         # one Shamir share of the self-mask seed and of the key
ID_BYTES = 4


class SecAggFailed(RuntimeError):
    """Fewer users survived to the unmasking than the threshold: nothing can be recovered."""


def client_bytes(*, size: int, bits: int, neighbors: int) -> tuple[int, int]:
    """(down, up) bytes of one client's protocol run for an update of `size` values in `bits`-bit fixed point
    with `neighbors` masking partners: advertise keys (2 public keys + signature, and the partners' in
    return), share keys (one encrypted share pair per partner, each way), the masked input, and the
    unmasking (a share per partner up; the list of survivors down)."""
    advertised = 2 * KEY_BYTES + SIGNATURE_BYTES
    share = SHARE_BYTES + NONCE_BYTES + TAG_BYTES + 2 * ID_BYTES
    up = advertised + neighbors * share + math.ceil(size * bits / 8) + neighbors * (32 + ID_BYTES)
    down = neighbors * advertised + neighbors * share + neighbors * ID_BYTES
    return down, up


def masking_graph(users: Sequence[str], neighbors: int) -> dict[str, list[str]]:
    """Each user's masking partners: every other user (`neighbors` 0 or >= len(users) - 1), or SecAgg+'s
    sparse graph: the users in sorted order on a ring, each joined to the ceil(k/2) next on either side."""
    order = sorted(users)
    n = len(order)
    if neighbors <= 0 or neighbors >= n - 1:
        return {u: [v for v in order if v != u] for u in order}
    half = math.ceil(neighbors / 2)
    graph: dict[str, set[str]] = {u: set() for u in order}
    for i, u in enumerate(order):
        for j in range(1, half + 1):
            for v in (order[(i + j) % n], order[(i - j) % n]):
                if v != u:
                    graph[u].add(v)
                    graph[v].add(u)
    return {u: sorted(vs) for u, vs in graph.items()}


def encode_fixed_point(values: np.ndarray, *, fraction_bits: int, bits: int, clip: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Float values -> integers modulo 2^bits: held to [-clip, clip], times 2^f, stochastically rounded."""
    scaled = np.clip(values, -clip, clip) * 2.0 ** fraction_bits
    ints = np.floor(scaled + rng.random(values.shape)).astype(np.int64)
    return np.mod(ints, 2 ** bits).astype(np.uint64)


def wrap_signed(ints: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Integers (int64, or float64 holding integers) read modulo 2^bits in the signed range
    [-2^(bits-1), 2^(bits-1)); returns them and how many values wrapped (overflowed)."""
    half = 2 ** (bits - 1)
    wrapped = np.mod(ints + half, 2 ** bits) - half
    return wrapped, int(np.count_nonzero(wrapped != ints))


def decode_sum(total: np.ndarray, *, fraction_bits: int, bits: int) -> tuple[np.ndarray, int]:
    """A sum of fixed-point values (float64 multiples of 2^-f, exact) as the protocol's modular sum would
    decode it: wrapped into the signed range of `bits` bits, back in float64; and the overflow count."""
    ints = np.rint(total * 2.0 ** fraction_bits)
    wrapped, overflow = wrap_signed(ints, bits)
    return wrapped * 2.0 ** -fraction_bits, overflow


@dataclass(frozen=True)
class SecAggResult:
    total: np.ndarray           # the survivors' encoded inputs summed modulo 2^bits (uint64)
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    prg_values: int             # pseudo-random values expanded by the clients and the server


class SecAggRound:
    """One round of the protocol among `users`, on vectors of `size` values modulo 2^`bits`."""

    def __init__(self, *, seed: int, round_index: int, users: Sequence[str], size: int, bits: int,
                 neighbors: int = 0, threshold: int = 1) -> None:
        if not 1 <= bits <= 62:
            raise ValueError(f"bits must be in 1..62, got {bits}")
        self.seed, self.round_index, self.size, self.bits = seed, round_index, size, bits
        self.modulus = 2 ** bits
        self.graph = masking_graph(users, neighbors)
        self.threshold = threshold
        self.prg_values = 0

    def _mask(self, a: str, b: str) -> np.ndarray:
        self.prg_values += self.size
        return secagg_rng(self.seed, self.round_index, a, b).integers(0, self.modulus, self.size, dtype=np.uint64)

    def _pair(self, u: str, v: str) -> np.ndarray:
        """What u adds for its partner v: +m_uv if u < v, else -m_vu (modulo 2^bits)."""
        m = self._mask(min(u, v), max(u, v))
        return m if u < v else (self.modulus - m) % self.modulus

    def masked_input(self, uid: str, encoded: np.ndarray) -> np.ndarray:
        """What client `uid` sends: its encoded input plus its self mask and its pairwise masks."""
        out = (encoded.astype(np.uint64) + self._mask(uid, uid)) % self.modulus
        for v in self.graph[uid]:
            out = (out + self._pair(uid, v)) % self.modulus
        return out

    def unmask(self, received: Mapping[str, np.ndarray]) -> SecAggResult:
        """The server's sum of what it `received` (uid -> masked input) with the masks removed: the
        survivors' self masks, and the pairwise masks their partners that dropped out would have cancelled."""
        survivors = tuple(sorted(received))
        dropped = tuple(sorted(u for u in self.graph if u not in received))
        if len(survivors) < self.threshold:
            raise SecAggFailed(f"{len(survivors)} of {len(self.graph)} users survived, the threshold is "
                               f"{self.threshold}")
        total = np.zeros(self.size, dtype=np.uint64)
        for uid in survivors:
            total = (total + received[uid]) % self.modulus
        for uid in survivors:
            total = (total + self.modulus - self._mask(uid, uid)) % self.modulus
        for gone in dropped:
            for v in self.graph[gone]:
                if v in received:
                    total = (total + self.modulus - self._pair(v, gone)) % self.modulus
        return SecAggResult(total=total, survivors=survivors, dropped=dropped, prg_values=self.prg_values)


def fixed_point_fraction_bits(bits: int, clip: float, clients: int) -> int:
    """Fractional bits f such that the sum of `clients` values in [-clip, clip], each rounded to a multiple
    of 2^-f, stays inside the signed range of `bits`-bit integers: clients * (clip * 2^f + 1) < 2^(bits-1)."""
    room = (2 ** (bits - 1) - 1) / clients - 1
    if room < clip:
        raise ConfigError(f"--secagg-bits {bits}: too few bits for {clients} clients' updates of norm up to "
                          f"--dp-clip {clip:g} (need at least one fractional bit)")
    return math.floor(math.log2(room / clip))


class SecAgg(Stage):
    """The channel's last client stage and first server one: clients send their clipped update in `bits`-bit
    fixed point with `fraction_bits` fractional bits (values held to [-clip, clip]); the server decodes the
    round's sum modulo 2^bits and fails the round when fewer than `threshold` of its clients survived."""

    name = "secagg"
    OPTIONS = ("secagg_bits", "secagg_neighbors", "secagg_threshold")

    @classmethod
    def from_config(cls, config, build: Build) -> SecAgg | None:
        if not config.secagg:
            return None
        return cls(bits=config.secagg_bits, clip=config.dp_clip, clients_per_round=config.clients_per_round,
                   neighbors=config.secagg_neighbors, threshold=config.secagg_threshold)

    @classmethod
    def check(cls, config) -> None:
        from flock.common.config import FIELDS

        given = ["--" + n.replace("_", "-") for n in cls.OPTIONS if getattr(config, n) != FIELDS[n].default]
        if given and not config.secagg:
            raise ConfigError(f"{', '.join(given)} need(s) --secagg")
        if not config.secagg:
            return
        up = parse_codec(config.compress_up, "--compress-up")
        if not up.lossless:
            raise ConfigError(f"--secagg sends updates in fixed point (--secagg-bits): not with --compress-up {up}")
        if config.secagg_neighbors >= config.clients_per_round:
            raise ConfigError(f"--secagg-neighbors {config.secagg_neighbors} must be less than --clients-per-round "
                              f"{config.clients_per_round}")
        fixed_point_fraction_bits(config.secagg_bits, config.dp_clip, config.clients_per_round)

    def __init__(self, *, bits: int, clip: float, clients_per_round: int, neighbors: int = 0,
                 threshold: float = 0.5) -> None:
        self.bits, self.clip, self.threshold = bits, clip, threshold
        self.fraction_bits = fixed_point_fraction_bits(bits, clip, clients_per_round)
        self.neighbors = neighbors or clients_per_round - 1

    def client(self, step: ClientStep) -> None:
        import torch
        scale = float(2 ** self.fraction_bits)
        for d in step.deltas:
            d.clamp_(-self.clip, self.clip).mul_(scale)
            d.add_(torch.rand(d.shape, generator=step.rng, dtype=d.dtype)).floor_().div_(scale)

    def bytes(self, down: int, up: int, sizes: Sequence[int]) -> tuple[int, int]:
        extra_down, up = client_bytes(size=sum(sizes), bits=self.bits, neighbors=self.neighbors)
        return down + extra_down, up

    def server(self, round_: ServerRound) -> None:
        if not round_.parts:
            return
        total = round_.parts[0].copy()
        for part in round_.parts[1:]:        # the left fold np.sum(parts, axis=0) makes, without stacking them
            total += part
        total, overflow = decode_sum(total, fraction_bits=self.fraction_bits, bits=self.bits)
        clients, arrived = round_.clients, round_.arrived
        round_.record.update(secagg_overflow=overflow, secagg_dropped=clients - arrived)
        if arrived < math.ceil(self.threshold * clients):
            log.warning("round %d: secure aggregation failed: %d of %d clients survived, the threshold is %d; "
                        "nothing applied", round_.index + 1, arrived, clients, math.ceil(self.threshold * clients))
            round_.record["secagg_failed"] = 1
            round_.parts, round_.weight, round_.void = [], 0.0, True
            return
        round_.parts = [total]
