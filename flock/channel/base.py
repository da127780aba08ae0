"""The update channel's contract: a `Stage` is one mechanism (clipping, noise, compression, secure aggregation,
the accountant) with its own typed settings, its checks of the options, its client side, its server side, the
bytes it puts on the wire and what it records. A channel is the ordered list of the run's stages
(`flock/channel/__init__.py`: STAGES): clients apply theirs in that order, the server undoes and adds in
the reverse order (as pfl-research's postprocessors), so the stage a client applied last is the first the
server sees (secure aggregation's decoding before the noise, the noise before the accountant counts).

Two composites run the stages: `UpdateChannel` on the ranks (one per rank; its shards share it) and
`ServerChannel` in the scheduler (once per training round, before the server optimizer's step).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from flock.common.codecs import Codec

if TYPE_CHECKING:
    import torch


@dataclass
class ClientStep:
    """One client's update on its way out: `deltas` (float64 tensors, one per shared parameter, named
    `names`) are transformed in place; `rng` is the user's channel stream; `state` its stored private state;
    `clip` the round's clipping norm from the plan. Stages add to `new_state` (private state to store) and
    `sums` (numbers the round's sums carry to the server)."""

    uid: str
    deltas: list[torch.Tensor]
    rng: torch.Generator
    state: Mapping[str, np.ndarray]
    names: tuple[str, ...]
    clip: float | None
    new_state: dict[str, np.ndarray] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)


@dataclass
class ServerRound:
    """A round's aggregate on its way to the server optimizer: `parts` (float64 sums of weighted deltas, in
    rank order) and `weight` (the mean's denominator) are replaced by the stages; `record` collects the
    train record's fields. `void`: a stage found that nothing can be applied (the parts are then empty)."""

    index: int                    # 0-based round
    parts: list[np.ndarray]
    weight: float
    sums: Mapping[str, float]
    clients: int                  # asked to train
    arrived: int                  # their results reached the server (not diverged)
    sampling: tuple[int, int] | None = None     # the round's own (population, cohort), phones that come and go
    record: dict[str, Any] = field(default_factory=dict)
    void: bool = False


@dataclass(frozen=True)
class Build:
    """What stages are built from besides the Config: the side ("client": a rank's channel; "server": the
    scheduler's), the noise multiplier (given, or calibrated from --dp-target-epsilon) and the population
    the accountant's rate is of (server side)."""

    side: str
    noise_multiplier: float
    population: int = 0


class Stage:
    """One mechanism of the channel. Every method has a neutral default, so a stage overrides only what it
    does. `from_config` builds the run's stage (None: off in this run); `check` refuses the option combinations
    the stage cannot honour (a ConfigError naming the options); `bind` lets a stage find the others it reads
    (e.g. the noise reads the clipping norm)."""

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, config, build: Build) -> Stage | None:
        return None

    @staticmethod
    def check(config) -> None:
        """Raises a ConfigError for options this stage cannot run with."""

    def bind(self, stages: Sequence[Stage]) -> None:
        """Called once all of the run's stages are built (in order)."""

    # -- client side --
    @property
    def uniform_weights(self) -> bool:
        """Whether each client must weigh 1 in the mean instead of its sample count (bounded influence)."""
        return False

    @property
    def keeps_state(self) -> bool:
        """Whether each user keeps private state across rounds (it must then train on its home rank)."""
        return False

    def receive(self, flat: torch.Tensor, sizes: Sequence[int], version: int) -> torch.Tensor | None:
        """The model as clients receive it (float32), or None when this stage leaves it exact."""
        return None

    def client(self, step: ClientStep) -> None:
        """Transforms one client's update (in place)."""

    # -- server side --
    def server(self, round_: ServerRound) -> None:
        """Transforms the round's aggregate and adds its record fields."""

    def bytes(self, down: int, up: int, sizes: Sequence[int]) -> tuple[int, int]:
        """A client's (down, up) bytes a round, given the earlier stages' (down, up)."""
        return down, up

    @property
    def round_clip(self) -> float | None:
        """The clipping norm the round's plan hands the clients (None: this stage sets none)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def eval_fields(self) -> dict[str, Any]:
        return {}

    def run_fields(self) -> dict[str, Any]:
        """config.json's `privacy` fields."""
        return {}

    def summary(self) -> str:
        """Part of the run's closing line ("" for none)."""
        return ""


def bind(stages: Sequence[Stage]) -> tuple[Stage, ...]:
    """The stages, each told of the others (in order)."""
    stages = tuple(stages)
    for stage in stages:
        stage.bind(stages)
    return stages


class UpdateChannel:
    """A rank's channel: the client sides of `stages`, in order; shards of a rank share it (thread-safe)."""

    def __init__(self, stages: Sequence[Stage], *, seed: int) -> None:
        self.stages = bind(stages)
        self.seed = seed
        self._lock = threading.Lock()
        self._received: tuple[int | None, torch.Tensor | None] = (None, None)

    @property
    def uniform_weights(self) -> bool:
        """With clipping every user weighs 1 (DP-FedAvg needs each user's influence bounded), else n_k."""
        return any(s.uniform_weights for s in self.stages)

    @property
    def error_feedback(self) -> bool:
        """Whether users keep private channel state (top-k's residual) on their home rank."""
        return any(s.keeps_state for s in self.stages)

    def received_model(self, flat: torch.Tensor, sizes: tuple[int, ...], version: int) -> torch.Tensor | None:
        """The global float32 parameters as every client of `version` receives them, or None when they arrive
        exactly. Computed once per version."""
        with self._lock:
            cached_version, cached = self._received
            if cached_version != version or cached is None:
                cached = None
                for stage in self.stages:
                    got = stage.receive(flat if cached is None else cached, sizes, version)
                    cached = got if got is not None else cached
                self._received = (version, cached)
            return cached

    def apply(self, uid: str, deltas: list[torch.Tensor], rng: torch.Generator,
              state: Mapping[str, np.ndarray] | None = None, names: tuple[str, ...] = (), *,
              clip: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Transforms user `uid`'s update in place; `state`: the user's stored private state; `clip`: the
        round's clipping norm from the scheduler's plan (None: the configured one, for callers outside a
        run). Returns the private state to store for it and its sums for the round."""
        step = ClientStep(uid=uid, deltas=deltas, rng=rng, state=state or {}, names=names, clip=clip)
        for stage in self.stages:
            stage.client(step)
        return step.new_state, step.sums


class ServerChannel:
    """What the scheduler does with a round's sum: the server sides of `stages`, in reverse order, and the
    bytes each client sends and receives (fp32 each way, changed by the stages in order)."""

    def __init__(self, stages: Sequence[Stage], sizes: Sequence[int]) -> None:
        self.stages = bind(stages)
        down = up = Codec().bytes(sizes)
        for stage in self.stages:
            down, up = stage.bytes(down, up, sizes)
        self.bytes_down, self.bytes_up = down, up

    def stage(self, kind: type) -> Any:
        """The run's stage of type `kind`, or None."""
        return next((s for s in self.stages if isinstance(s, kind)), None)

    @property
    def round_clip(self) -> float:
        """The clipping norm of the current round (0: no clipping)."""
        return next((c for c in (s.round_clip for s in self.stages) if c is not None), 0.0)

    def aggregate(self, round_index: int, parts: list[np.ndarray], weight: float, sums: dict[str, float], *,
                  sampling: tuple[int, int] | None = None) -> tuple[list[np.ndarray], float, dict[str, Any]]:
        """Round `round_index` (0-based): the ranks' `parts` (sums of weighted deltas, float64) and total
        `weight` -> the parts and weight for the mean, and the record's fields (bytes, epsilon, ...).
        `sampling`: the round's own (population, cohort) for the accountant (phones that come and go)."""
        clients = int(sums.get("clients", 0))
        arrived = clients - int(sums.get("diverged", 0))
        round_ = ServerRound(index=round_index, parts=parts, weight=weight, sums=sums, clients=clients,
                             arrived=arrived, sampling=sampling,
                             record={"bytes_down": clients * self.bytes_down, "bytes_up": arrived * self.bytes_up})
        for stage in reversed(self.stages):
            stage.server(round_)
        return round_.parts, round_.weight, round_.record

    def eval_fields(self) -> dict[str, Any]:
        """Fields of an evaluation record (the epsilon spent so far, with DP)."""
        return {k: v for s in self.stages for k, v in s.eval_fields().items()}

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint: each stage's state (one flat dict: the stages' keys are distinct)."""
        return {k: v for s in self.stages for k, v in s.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        for stage in self.stages:
            stage.load_state_dict(state or {})

    def run_fields(self) -> dict[str, Any]:
        """What config.json records beside the options (with DP: the noise multipliers actually used)."""
        fields = {k: v for s in self.stages for k, v in s.run_fields().items()}
        return {"privacy": fields} if fields else {}

    def summary(self) -> str:
        """One line for the end of the run ("" when there is nothing to say)."""
        parts = [p for p in (s.summary() for s in self.stages) if p]
        return "privacy: " + ", ".join(parts) if parts else ""
