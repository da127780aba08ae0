"""The arithmetic shared by FedAdagrad, FedAdam and FedYogi (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2): the mean client delta is the pseudo-gradient's negative,

    m <- beta1 * m + (1 - beta1) * delta
    v <- second_moment(v, delta)          (the one line in which the three differ)
    theta <- theta + server_lr * m / (sqrt(v) + tau)

with v starting at tau^2 and no bias correction, as in the paper."""
from __future__ import annotations

from typing import Any

import numpy as np


class AdaptiveServerOptimizer:
    def __init__(self, *, server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = float(server_lr), float(beta1), float(beta2), float(tau)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        if self.m is None:
            self.m = np.zeros_like(mean_delta, dtype=np.float64)
            self.v = np.full_like(mean_delta, self.tau ** 2, dtype=np.float64)
        self.m = self.beta1 * self.m + (1 - self.beta1) * mean_delta
        self.v = self.second_moment(self.v, mean_delta * mean_delta)
        return (params.astype(np.float64) + self.server_lr * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "m" in state:
            self.m, self.v = np.asarray(state["m"], np.float64), np.asarray(state["v"], np.float64)
