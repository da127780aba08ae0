from __future__ import annotations

import numpy as np

from flock.common import kernels
from scheduler.optim.base import BlockwiseOptimizer


class FedAvg(BlockwiseOptimizer):
    """theta <- theta + server_lr * mean_delta (McMahan et al.; server_lr = 1 is plain averaging)."""

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = float(server_lr)

    def step_block(self, a: int, b: int, params: np.ndarray, mean: np.ndarray, out: np.ndarray) -> None:
        """out = float32(mean * server_lr + params), the float32 parameters added in float64: numpy's
        `mean *= lr; mean += params; out[...] = mean` in one pass (`flock.common.kernels`)."""
        kernels.fedavg_step(out, params, mean, self.server_lr)
