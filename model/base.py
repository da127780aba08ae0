"""The model plug-in interface. A model is a `torch.nn.Module` that says which of its parameters are private.

Private parameters (matched by name, `fnmatch` patterns in `private_patterns` plus the run's `--private`
option) belong to one user each: they stay in the user's home rank's data server and never reach the
scheduler. Every other parameter is shared and FedAvg-updated.

    class MyModel(torch.nn.Module):
        private_patterns = ("head.*",)          # FedPer-style personal head

        @classmethod
        def build(cls, spec):                   # spec comes from the reader: {"vocab_size": ...} etc.
            return cls(spec["num_classes"])
"""
from __future__ import annotations

import fnmatch
from typing import ClassVar, Iterable, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class FederatedModel(Protocol):
    private_patterns: ClassVar[tuple[str, ...]]

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> torch.nn.Module:
        """A freshly initialised model for data described by `spec` (uses torch's global RNG)."""


def private_names(model: torch.nn.Module, extra_patterns: Iterable[str] = ()) -> tuple[str, ...]:
    """Names of the model's private parameters, in `named_parameters` order."""
    patterns = tuple(getattr(model, "private_patterns", ())) + tuple(extra_patterns)
    return tuple(n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns))
