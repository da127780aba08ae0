"""FedAvg's reduction as one pure function: the weighted mean of client deltas from (weight, weighted sum)
parts. The scheduler, the tests and the plain-PyTorch floor call it; the server optimizer applies the
result."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def weighted_mean(parts: Sequence[np.ndarray], total_weight: float, *,
                  out: np.ndarray | None = None) -> np.ndarray | None:
    """sum(parts) / total_weight in float64, summing the parts in the order given (the callers give rank
    order, so the result does not depend on when the parts arrived). Each part is a sum of n_k * delta_k
    (one rank's, or several ranks' that a data plane summed already); `total_weight` is sum n_k over all of
    them. A single writable part is divided in place (it is the caller's work buffer: no 50 MB copy);
    otherwise the sum goes into `out` (a float64 work buffer reused across rounds) or a new array. Returns
    None when no client contributed (total weight 0 or no part)."""
    if total_weight <= 0 or not parts:
        return None
    if len(parts) == 1 and parts[0].flags.writeable:
        total = parts[0]
    else:
        total = out if out is not None and out.shape == parts[0].shape else np.empty(parts[0].shape, np.float64)
        if len(parts) > 1:
            np.add(parts[0], parts[1], out=total)
        else:
            np.copyto(total, parts[0])
        for part in parts[2:]:
            total += part
    total /= total_weight
    return total
