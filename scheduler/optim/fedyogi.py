from __future__ import annotations

import numpy as np

from scheduler.optim.adaptive import AdaptiveServerOptimizer


class FedYogi(AdaptiveServerOptimizer):
    """v <- v - (1 - beta2) * delta^2 * sign(v - delta^2): v grows only additively (Zaheer et al. 2018)."""

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * delta_sq * np.sign(v - delta_sq)
