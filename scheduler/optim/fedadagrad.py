from __future__ import annotations

import numpy as np

from scheduler.optim.adaptive import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    """v <- v + delta^2."""

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq
