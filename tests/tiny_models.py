"""Small models for the arrays data of `tests.helpers.make_arrays_data` (plug-ins named as module:Class)."""
from __future__ import annotations

import torch


class Linear(torch.nn.Module):
    """Logistic regression: one linear layer from the features to the classes."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.out = torch.nn.Linear(features, classes)

    @classmethod
    def build(cls, spec):
        return cls(int(spec["input_0"]), int(spec["num_classes"]))

    def forward(self, x):
        return self.out(x)


class OneClassTooMany(Linear):
    """A model whose output size disagrees with the data's classes."""

    @classmethod
    def build(cls, spec):
        return cls(int(spec["input_0"]), int(spec["num_classes"]) + 1)


class WithDefaults(Linear):
    """A model that declares a task default; the trainer's win over it."""

    defaults = {"lr": 0.3, "local_epochs": 2}


class Picky(Linear):
    """A model that refuses data it was not written for, with its own message."""

    @classmethod
    def build(cls, spec):
        if "input_0" not in spec:
            raise ValueError("needs feature vectors (the spec's input_0), not token sequences")
        return super().build(spec)
