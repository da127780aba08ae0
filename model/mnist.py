"""MNIST models of McMahan et al. (2017) and of the widely used PyTorch FedAvg reference."""
from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _dropout(x: torch.Tensor, p: float, training: bool, rng: torch.Generator | None) -> torch.Tensor:
    """Dropout drawing from `rng` (the user's generator), so results do not depend on thread or rank."""
    if not training or p == 0:
        return x
    keep = (torch.rand(x.shape, generator=rng) >= p).to(x.device)    # drawn on the CPU: same on any device
    return x * keep / (1 - p)


def check_mnist_input(spec: Mapping[str, int], model: str) -> None:
    """MNIST's models take 28 x 28 one-channel images (784 values): another input shape in the data's spec is
    refused here, at start-up, rather than by a reshape in the first round."""
    shape = tuple(int(spec[f"input_{i}"]) for i in range(8) if f"input_{i}" in spec)
    if shape and int(np.prod(shape)) != 784:
        raise ValueError(f"{model} takes 28 x 28 one-channel images (784 values); the data's samples are "
                         f"{' x '.join(map(str, shape))}: use --model simple-cnn for square (C, H, W) images, or a "
                         "model of your own (--model module:Class)")


class MnistMLP(nn.Module):
    """McMahan's "2NN": 784 -> 200 -> 200 -> 10 with ReLU (199,210 parameters)."""

    private_patterns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(784, 200), nn.Linear(200, 200), nn.Linear(200, num_classes)

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> "MnistMLP":
        check_mnist_input(spec, cls.__name__)
        return cls(int(spec["num_classes"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MnistCNN(nn.Module):
    """conv 5x5 (10) -> max-pool -> conv 5x5 (20) -> dropout -> max-pool -> fc 50 -> dropout -> fc 10
    (21,840 parameters), the CNN of the PyTorch FedAvg reference runs."""

    private_patterns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 20, 5)
        self.fc1, self.fc2 = nn.Linear(320, 50), nn.Linear(50, num_classes)
        self.dropout = dropout
        self.rng: torch.Generator | None = None     # set by the trainer to the user's generator

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> "MnistCNN":
        check_mnist_input(spec, cls.__name__)
        return cls(int(spec["num_classes"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), 1, 28, 28)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(_dropout(self.conv2(x), self.dropout, self.training, self.rng), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(_dropout(x, self.dropout, self.training, self.rng))


class PersonalMnistCNN(MnistCNN):
    """MnistCNN whose output layer is private (FedPer-style): each user keeps its own classifier head."""

    private_patterns: ClassVar[tuple[str, ...]] = ("fc2.*",)


class PersonalMnistMLP(MnistMLP):
    """MnistMLP whose output layer is private (FedPer-style)."""

    private_patterns: ClassVar[tuple[str, ...]] = ("out.*",)
