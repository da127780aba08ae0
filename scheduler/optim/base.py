from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class ServerOptimizer(Protocol):
    """Applies the weighted mean client delta to the global parameters."""

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """params (float32) and mean_delta = sum n_k delta_k / sum n_k (float64) -> new params (float32).
        `mean_delta` is the scheduler's work buffer: a step may overwrite it (and must not keep it)."""

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, for checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict`'s output."""
