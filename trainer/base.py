"""The trainer plug-in interface: local training on one user's samples, and evaluation.

A trainer returns plain sums (floats) so that any number of users and ranks reduce by addition. It names
its ratio metrics as (numerator sum, denominator sum): the scheduler reports each ratio over all samples
(`top1`) and as the unweighted mean over users (`top1_user_mean`).

    class MyTrainer:
        train_ratios = {"loss": ("loss_sum", "samples")}
        eval_ratios = {"accuracy": ("correct", "samples")}

        def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None: ...
        def train(self, model, samples) -> dict[str, float]: ...   # must include "samples" (n_k, the FedAvg weight)
        def evaluate(self, model, samples) -> dict[str, float]: ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation settings, the same for every user."""

    lr: float = 1.0
    batch_size: int = 5
    local_epochs: int = 1
    max_grad_norm: float = 5.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.local_epochs < 1:
            raise ValueError("batch_size and local_epochs must be at least 1")


@runtime_checkable
class Trainer(Protocol):
    train_ratios: ClassVar[Mapping[str, tuple[str, str]]]
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]]

    def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None: ...

    def train(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Trains `model` in place on one user's samples; returns sums including "samples" (the FedAvg weight)."""

    def evaluate(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Evaluates `model` on one user's samples; returns sums (no training, no state kept)."""
