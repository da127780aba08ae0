"""The trainer plug-in interface: local training on one user's samples, and evaluation.

A trainer returns plain sums (floats) so that any number of users and ranks reduce by addition. It names
its ratio metrics as (numerator sum, denominator sum): the scheduler reports each ratio over all samples
(`top1`) and as the unweighted mean over users (`top1_user_mean`).

    class MyTrainer:
        train_ratios = {"loss": ("loss_sum", "samples")}
        eval_ratios = {"accuracy": ("correct", "samples")}

        def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None: ...
        def train(self, model, samples, rng=None) -> dict[str, float]: ...   # "samples" (n_k, the FedAvg weight)
        def evaluate(self, model, samples) -> dict[str, float]: ...

Client selection (`--selection oort`, `power-of-choice`) reads each client's training loss, the ratio named
"loss" in `train_ratios`; a trainer that also returns "loss_sq_sum", the sum of the squared per-term losses
over the loss ratio's denominator (tokens, samples), gives Oort its statistical utility exactly (without
it, the mean loss squared stands in).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings, the same for every user."""

    lr: float = 1.0
    batch_size: int = 5
    local_epochs: int = 1
    max_grad_norm: float = 5.0     # 0: no clipping
    prox_mu: float = 0.0           # FedProx's proximal weight; 0 is plain FedAvg local training
    momentum: float = 0.0          # local SGD momentum (buffers start at zero for every user)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.local_epochs < 1:
            raise ValueError("batch_size and local_epochs must be at least 1")


def clip_grad_norm(params: list[torch.Tensor], grads: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_(params, max_norm), bit for bit, without its multiplication by exactly
    1.0 when the norm is within the bound (a pass over every gradient that changes none: torch does it to
    spare an accelerator a synchronisation; on the CPU it is a quarter of a tiny client's update). Returns
    the norm of the gradients as they leave (at most max_norm, up to rounding; inf if not finite)."""
    total = torch.nn.utils.get_total_norm([g for g in grads if g is not None])
    if not bool(max_norm / (total + 1e-6) >= 1.0):     # torch's coefficient, before it is clamped to 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    norm = float(total)
    return min(norm, max_norm) if math.isfinite(norm) else math.inf


@contextmanager
def lent_params(params: list[torch.Tensor]) -> Iterator[None]:
    """While training: parameters whose memory is not theirs to write (a shard's global parameters, which
    the first forward pass reads in place). The first `LocalSGD.step` of each, in whatever thread, writes
    it out of place into the memory of its own gradient (whose values that step has used up) and points it
    there. Each step also adds to the parameter's `flock_moved` a bound on how far any of its values moved
    (see `moved`). The marks are on the parameter objects themselves, and taken off when the block ends."""
    for p in params:
        p.flock_lent, p.flock_moved = True, 0.0
    try:
        yield
    finally:
        for p in params:
            p.flock_lent, p.flock_moved = False, math.inf


def moved(params: list[torch.Tensor]) -> float:
    """Inside `lent_params`: a bound on |theta - theta_start| over every value of these parameters, from the
    steps `LocalSGD` made (the sum over steps of lr times the norm of the step's direction, which bounds each
    of its entries; float32 rounding adds a relative 2^-24 or so per operation, which a caller's margin must
    cover). inf when a step's norm was not known (no clipping) or not finite; 0 before any step. One stepper
    per parameter at a time: the bound is added to without a lock, as `flock_lent` is switched."""
    bounds = [getattr(p, "flock_moved", math.inf) for p in params]
    return math.inf if any(math.isnan(b) for b in bounds) else max(bounds, default=0.0)


def local_sgd_only(train):
    """Marks a trainer's `train` as changing the model's parameters only through `LocalSGD.step` (no
    in-place op, optimizer or `.data` write of its own): a shard may then start a user on the global
    parameters themselves (`lent_params`) instead of a copy of them, which saves a copy of the model per
    user. A subclass that overrides `train` is not marked unless it says so too."""
    train.local_sgd_only = True
    return train


class LocalSGD:
    """Plain SGD for local training, shared by the built-in trainers: FedProx's proximal term
    mu/2 * ||w - w_start||^2 (w_start: the weights the user started from, i.e. the global model), then
    global-norm clipping, then the step (with momentum when configured). Create one per user (it remembers
    w_start and the momentum buffers). A parameter named by `lent_params` is stepped out of place, into
    its gradient's memory: the same values as a copy stepped in place."""

    def __init__(self, params: list[torch.Tensor], config: TrainConfig) -> None:
        self.params = params
        self.config = config
        self.anchor = [p.detach().clone() for p in params] if config.prox_mu > 0 else None
        self.buffers: list[torch.Tensor] | None = None
        self.direction = 0.0    # a bound on the norm of the step's direction (the momentum buffer's)

    @torch.no_grad()
    def step(self) -> None:
        """Applies the gradients in `p.grad` (after loss.backward()) and clears them."""
        grads = spent = [p.grad for p in self.params]
        if self.anchor is not None:
            torch._foreach_add_(grads, torch._foreach_sub(self.params, self.anchor), alpha=self.config.prox_mu)
        norm = clip_grad_norm(self.params, grads, self.config.max_grad_norm) if self.config.max_grad_norm > 0 \
            else math.inf       # unknown without a pass over the gradients
        # ||m b + g|| <= m ||b|| + ||g|| (no NaN from 0 * inf)
        self.direction = norm + (self.config.momentum * self.direction if self.config.momentum > 0 else 0.0)
        if self.config.momentum > 0:
            if self.buffers is None:
                self.buffers = [g.clone() for g in grads]
            else:
                torch._foreach_mul_(self.buffers, self.config.momentum)
                torch._foreach_add_(self.buffers, grads)
            grads = self.buffers
        if any(getattr(p, "flock_lent", False) for p in self.params):
            for p, g, own in zip(self.params, grads, spent):
                if getattr(p, "flock_lent", False):
                    if not own.is_contiguous() or own.shape != p.shape:
                        own = torch.empty_like(p, memory_format=torch.contiguous_format)
                    torch.add(p, g, alpha=-self.config.lr, out=own)
                    p.data = own
                    p.flock_lent = False
                else:
                    p.add_(g, alpha=-self.config.lr)
        else:
            torch._foreach_add_(self.params, grads, alpha=-self.config.lr)
        step = abs(self.config.lr) * self.direction
        if not step < math.inf:         # NaN too (a NaN lr, or inf x 0): unknown
            step = math.inf
        for p in self.params:
            p.grad = None
            if hasattr(p, "flock_moved"):
                p.flock_moved += step


@dataclass(frozen=True)
class UserCall:
    """Which phone a shard is simulating right now (see `current_call`)."""

    user: str
    round: int      # the round being trained (1-based), or the number of rounds done before an evaluation
    clip: float = 0.0   # the round's DP clipping norm (0: none), from the scheduler's plan


_CURRENT: ContextVar[UserCall | None] = ContextVar("flock_user_call", default=None)


def current_call() -> UserCall | None:
    """The user (and round) whose `train`/`evaluate` runs in this thread; None outside a shard's call. For
    trainers that need the user's identity (logging, the Flower adapter's partition ids)."""
    return _CURRENT.get()


@contextmanager
def simulating(user: str, round_index: int, clip: float = 0.0) -> Iterator[None]:
    token = _CURRENT.set(UserCall(user, round_index, clip))
    try:
        yield
    finally:
        _CURRENT.reset(token)


@runtime_checkable
class Trainer(Protocol):
    train_ratios: ClassVar[Mapping[str, tuple[str, str]]]
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]]
    # Optional: `main_metric = "top1"`, the eval ratio reported per user (eval_users.json, plots); default:
    # the first of eval_ratios.
    # Optional: `defaults = {"lr": 0.05, "batch_size": 20}`, the task's own defaults for the optimisation
    # options (flock/common/task_defaults.py: TASK_OPTIONS); the user's values win, Config's apply to the rest.
    # Optional: `thread_safe = False` for trainers that use process-global state (torch's global RNG, a
    # framework's singletons); the application then runs one shard per rank (use more ranks instead).
    # Optional: `train` decorated with `@local_sgd_only` (see there).

    def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None: ...

    def train(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray],
              rng: torch.Generator | None = None) -> dict[str, float]:
        """Trains `model` in place on one user's samples; returns sums including "samples" (the FedAvg weight).
        `rng` is the user's generator for this round (seeded by seed, round and user id): draw every random
        number from it (shuffling, dropout) and results do not depend on ranks or threads."""

    def evaluate(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Evaluates `model` on one user's samples; returns sums (no training, no state kept)."""
