"""Domain types shared by the scheduler and the simulators. Plain frozen dataclasses: no gRPC, no torch."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

TRAIN, EVAL, DONE = "train", "eval", "done"


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the shared parameters, in the order they sit in the flat float32 vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError("ParamLayout: names and shapes differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("ParamLayout: duplicate parameter names")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        """Elements in the flat vector."""
        return sum(self.sizes)

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of `flat` per parameter, reshaped (no copy)."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has {flat.size} elements, layout needs {self.size}")
        out, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = flat[offset:offset + size].reshape(shape)
            offset += size
        return out

    def flatten(self, tensors: Mapping[str, np.ndarray], dtype=np.float32) -> np.ndarray:
        """One flat vector of `tensors` in layout order; a missing or mis-shaped tensor is an error."""
        flat = np.empty(self.size, dtype=dtype)
        offset = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            value = np.asarray(tensors[name])
            if tuple(value.shape) != shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(value.shape)}, layout says {shape}")
            flat[offset:offset + size] = value.reshape(-1)
            offset += size
        return flat


@dataclass(frozen=True)
class TaskSpec:
    """One asynchronous client task: `uid` trains from `start_version`, and its update, weighted by its
    staleness weight `weight`, goes into the server update that makes version `target`."""

    task_id: int
    uid: str
    start_version: int
    target: int
    weight: float


@dataclass(frozen=True)
class Plan:
    """What one rank does at one step of the run."""

    step: int
    kind: str                  # TRAIN, EVAL or DONE
    round: int                 # training rounds completed before this step
    day: str = ""
    split: str = ""
    users: tuple[str, ...] = ()
    version: int = 0           # version of the shared parameters to use
    total_users: int = 0
    checkpoint: bool = False   # a checkpoint follows this training step
    train_day: str = ""        # evaluation steps: the last training day (for local fine-tuning)
    # asynchronous training steps: the client tasks this rank trains from now on (`users` are theirs);
    # the step's update is the rank's sum over its tasks whose target is round + 1
    tasks: tuple[TaskSpec, ...] = ()
    # synchronous training steps with DP clipping: the L2 norm every client clips its update to this round,
    # the scheduler's (--dp-clip, or adaptive clipping's norm of the round); 0: no clipping
    clip: float = 0.0
    # asynchronous training steps: older versions that tasks not yet handed out start from; every rank keeps
    # them (it cannot know which of them its later tasks will need)
    keep: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClientReport:
    """What one client tells the scheduler about its local training, for client selection (`--selection`):
    a few numbers, never its update. `loss` is the trainer's training-loss ratio over the client's loss
    terms (tokens, samples), `loss_sq` the mean of the squared per-term losses (Oort's statistical utility
    is samples x sqrt(loss_sq)), `samples` its FedAvg weight n_k."""

    uid: str
    samples: float
    loss: float
    loss_sq: float
    task_id: int = -1          # asynchronous: the task it trained; -1 in synchronous rounds

    @classmethod
    def from_sums(cls, uid: str, sums: Mapping[str, float], loss_ratio: tuple[str, str],
                  task_id: int = -1) -> ClientReport | None:
        """The report of a client whose training returned `sums`, its loss being `loss_ratio` (numerator,
        denominator sums); "loss_sq_sum" (over the same terms) gives the squares, else loss^2 stands in.
        None for a client that diverged or reported no finite loss."""
        num, den = loss_ratio
        terms = float(sums.get(den, 0.0))
        if "diverged" in sums or num not in sums or not terms > 0:
            return None
        loss = float(sums[num]) / terms
        loss_sq = float(sums["loss_sq_sum"]) / terms if "loss_sq_sum" in sums else loss * loss
        values = (float(sums.get("samples", 0.0)), loss, loss_sq)
        if not all(math.isfinite(v) for v in values) or values[0] < 0 or values[2] < 0:
            return None
        return cls(uid=uid, samples=values[0], loss=loss, loss_sq=loss_sq, task_id=task_id)


@dataclass(frozen=True)
class RankUpdate:
    """One rank's contribution to a training step: sum of n_k * delta_k over its users, and sum of n_k."""

    step: int
    rank: int
    weight: float
    delta_sum: np.ndarray      # float64, the layout's size (empty when weight is 0 or `reduced`)
    sums: Mapping[str, float] = field(default_factory=dict)
    # the rank's sum travelled over the job's data plane (simulator/data_plane.py) into rank 0's delta_sum,
    # which then holds every rank's: this update carries only the weight and metric sums
    reduced: bool = False
    # in-process only (never on the wire): further float64 sums, in rank order after delta_sum, that a data
    # plane left for the scheduler's one pass to add (simulator/data_plane.py: the last rank of a single node)
    more: tuple[np.ndarray, ...] = ()
    # the rank's clients' reports for client selection (`--selection` other than uniform; else empty)
    clients: tuple[ClientReport, ...] = ()


@dataclass(frozen=True)
class RankMetrics:
    """One rank's evaluation sums for an evaluation step."""

    step: int
    rank: int
    sums: Mapping[str, float]
    per_user: Mapping[str, float] = field(default_factory=dict)   # user -> main metric


def home_rank(uid: str, world_size: int) -> int:
    """The rank that owns `uid`'s private parameters: a fixed function of the user id (crc32)."""
    return zlib.crc32(uid.encode("utf-8")) % world_size


def assign_users(users: Sequence[str], counts: Sequence[int], world_size: int, *, pinned: bool) -> list[list[str]]:
    """Splits a step's users over the ranks.

    `pinned`: every user goes to its home rank (needed when users hold private parameters). Otherwise the
    users are balanced by sample count (largest first onto the least loaded rank), which keeps ranks busy
    the same time. Either way each rank's list keeps the order of `users`.
    """
    if pinned:
        owner = {u: home_rank(u, world_size) for u in users}
    else:
        load = [0] * world_size
        owner = {}
        for u, n in sorted(zip(users, counts), key=lambda uc: (-uc[1], uc[0])):
            r = min(range(world_size), key=lambda i: (load[i], i))
            owner[u] = r
            load[r] += int(n)
    out: list[list[str]] = [[] for _ in range(world_size)]
    for u in users:
        out[owner[u]].append(u)
    return out


def over_selected(k: int, factor: float) -> int:
    """How many candidates to select for K results: ceil(K x factor), factor >= 1."""
    if k < 1 or not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"over-selection needs K >= 1 and a finite factor >= 1, got K={k}, factor={factor}")
    # a factor like 1.1 is not exact in binary: round off the noise before the ceiling
    return max(k, math.ceil(round(k * factor, 9)))
