from __future__ import annotations

import numpy as np

from scheduler.optim.adaptive import AdaptiveServerOptimizer


class FedAdam(AdaptiveServerOptimizer):
    """v <- beta2 * v + (1 - beta2) * delta^2."""

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta_sq
