"""FedEM (Marfoq et al., NeurIPS 2021): each user's data is a mixture of M underlying distributions.

The model holds M learners (shared: each is FedAvg-updated) and the user's mixture weights `pi`
(private: they stay in the user's home rank's data server). Prediction is the pi-weighted mixture of the
learners' class probabilities. The EM steps live in trainer/fedem.py.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import nn

from model.mnist import MnistCNN, MnistMLP, check_mnist_input


class FedEMEnsemble(nn.Module):
    private_patterns: ClassVar[tuple[str, ...]] = ("pi",)

    def __init__(self, learners: list[nn.Module]) -> None:
        super().__init__()
        self.learners = nn.ModuleList(learners)
        self.pi = nn.Parameter(torch.full((len(learners),), 1.0 / len(learners)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log of the mixture's class probabilities, [batch, classes]."""
        logp = torch.stack([torch.log_softmax(learner(x), -1) for learner in self.learners])   # [M, B, C]
        return torch.logsumexp(logp + torch.log(self.pi.clamp_min(1e-12))[:, None, None], dim=0)


class FedEMMLP(FedEMEnsemble):
    """3 x McMahan's 2NN."""

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> "FedEMMLP":
        check_mnist_input(spec, cls.__name__)
        return cls([MnistMLP(int(spec["num_classes"])) for _ in range(3)])


class FedEMCNN(FedEMEnsemble):
    """3 x the reference MNIST CNN."""

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> "FedEMCNN":
        check_mnist_input(spec, cls.__name__)
        return cls([MnistCNN(int(spec["num_classes"])) for _ in range(3)])
