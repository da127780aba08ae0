"""A small CNN plug-in for (3, 32, 32) images, as a user would write one (`--model tests.cifar_model:SmallCNN`):
the arrays reader's spec gives it num_classes and the sample shape (input_0, input_1, input_2)."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    private_patterns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, channels: int, side: int, num_classes: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.out = nn.Linear(16 * (side // 4) ** 2, num_classes)

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> "SmallCNN":
        return cls(int(spec["input_0"]), int(spec["input_1"]), int(spec["num_classes"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.out(x.flatten(1))
