"""CIFAR-10-shaped models: pfl-research's `simple_cnn`, the model of its CIFAR-10 benchmarks."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.mnist import _dropout


class SimpleCNN(nn.Module):
    """pfl-research's `simple_cnn` (benchmarks/model/pytorch/cnn.py): conv 3x3 (32) -> ReLU -> conv 3x3 (64)
    -> ReLU -> max-pool 2 -> dropout 0.25 -> dense 128 -> ReLU -> dropout 0.5 -> dense num_classes, Glorot-
    uniform weights; 1,626,442 parameters for 3 x 32 x 32 images and 10 classes.

    Samples are (C, H, W), flock's layout. pfl takes (H, W, C) images and permutes them, so its convolutions
    run on channels-last memory; this model makes the same layout itself (the same arithmetic as pfl's, and
    on this CPU the faster one: bench/pfl_compare.py). Dropout draws from the user's generator (`rng`, set
    by the trainer), so results do not depend on ranks or threads."""

    private_patterns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, channels: int = 3, side: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if side < 6:
            raise ValueError(f"SimpleCNN needs images of at least 6 x 6 pixels, not {side} x {side}")
        self.conv1, self.conv2 = nn.Conv2d(channels, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(((side - 4) // 2) ** 2 * 64, 128), nn.Linear(128, num_classes)
        for m in (self.conv1, self.conv2, self.fc1, self.fc2):
            nn.init.xavier_uniform_(m.weight)
        self.rng: torch.Generator | None = None     # set by the trainer to the user's generator

    @classmethod
    def build(cls, spec: Mapping[str, Any]) -> "SimpleCNN":
        shape = tuple(int(spec[f"input_{i}"]) for i in range(8) if f"input_{i}" in spec)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"SimpleCNN takes square (C, H, W) images; the data's samples are "
                             f"{' x '.join(map(str, shape)) or 'of unknown shape'} (meta.json's input_shape)")
        return cls(shape[0], shape[1], int(spec["num_classes"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = _dropout(x, 0.25, self.training, self.rng).flatten(1)
        return self.fc2(_dropout(F.relu(self.fc1(x)), 0.5, self.training, self.rng))
