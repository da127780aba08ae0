from __future__ import annotations

from typing import Any

import numpy as np

from scheduler.optim.base import BlockwiseOptimizer


class FedAvgM(BlockwiseOptimizer):
    """Server momentum (Hsu et al. 2019): v <- momentum * v + mean_delta; theta <- theta + server_lr * v."""

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self.velocity: np.ndarray | None = None

    def prepare(self, size: int) -> None:
        if self.velocity is None:
            self.velocity = np.zeros(size, dtype=np.float64)

    def step_block(self, a: int, b: int, params: np.ndarray, mean: np.ndarray, out: np.ndarray) -> None:
        v = self.velocity[a:b]
        v *= self.momentum
        v += mean
        np.multiply(v, self.server_lr, out=mean)
        mean += params
        out[...] = mean

    def state_dict(self) -> dict[str, Any]:
        return {} if self.velocity is None else {"velocity": self.velocity.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocity = np.array(state["velocity"], dtype=np.float64) if "velocity" in state else None
