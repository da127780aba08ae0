from __future__ import annotations

from typing import Any

import numpy as np

from scheduler.aggregate import in_blocks


class FedAvg:
    """theta <- theta + server_lr * mean_delta (McMahan et al.; server_lr = 1 is plain averaging)."""

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = float(server_lr)

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        out = np.empty(params.shape, np.float32)

        def block(a: int, b: int) -> None:
            m = mean_delta[a:b]     # the scheduler's buffer: float64, the float32 parameters added in float64
            m *= self.server_lr
            m += params[a:b]
            out[a:b] = m

        in_blocks(out.size, block)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
