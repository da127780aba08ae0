from __future__ import annotations

from typing import Any

import numpy as np


class FedAvgM:
    """Server momentum (Hsu et al. 2019): v <- momentum * v + mean_delta; theta <- theta + server_lr * v."""

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self.velocity: np.ndarray | None = None

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        if self.velocity is None:
            self.velocity = np.zeros_like(mean_delta, dtype=np.float64)
        self.velocity = self.momentum * self.velocity + mean_delta
        return (params.astype(np.float64) + self.server_lr * self.velocity).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocity = np.asarray(state["velocity"], dtype=np.float64) if "velocity" in state else None
