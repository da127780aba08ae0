"""The arithmetic shared by FedAdagrad, FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2): the mean client delta is the pseudo-gradient's negative,

    m <- beta1 * m + (1 - beta1) * delta
    v <- second_moment(v, delta)          (the one line in which the three differ)
    theta <- theta + server_lr * m / (sqrt(v) + tau)

with v starting at tau^2 and no bias correction, as in the paper."""
from __future__ import annotations

from typing import Any

import numpy as np

from scheduler.optim.base import BlockwiseOptimizer


class AdaptiveServerOptimizer(BlockwiseOptimizer):
    def __init__(self, *, server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def prepare(self, size: int) -> None:
        if self.m is None:
            self.m = np.zeros(size, dtype=np.float64)
            self.v = np.full(size, self.tau ** 2, dtype=np.float64)

    def step_block(self, a: int, b: int, params: np.ndarray, mean: np.ndarray, out: np.ndarray) -> None:
        m, v = self.m[a:b], self.v[a:b]
        m *= self.beta1
        m += (1 - self.beta1) * mean
        mean *= mean
        v[...] = self.second_moment(v, mean)
        np.sqrt(v, out=mean)
        mean += self.tau
        step = self.server_lr * m
        step /= mean
        step += params
        out[...] = step

    def state_dict(self) -> dict[str, Any]:
        return {} if self.m is None else {"m": self.m.copy(), "v": self.v.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "m" in state:
            self.m, self.v = np.array(state["m"], np.float64), np.array(state["v"], np.float64)
