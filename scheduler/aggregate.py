"""FedAvg's reduction as one pure function: the weighted mean of client deltas from (weight, weighted sum)
parts. The scheduler, the tests and the plain-PyTorch floor call it; the server optimizer applies the
result."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def weighted_mean(parts: Sequence[tuple[float, np.ndarray]], *, out: np.ndarray | None = None) -> np.ndarray | None:
    """sum(weighted sums) / sum(weights), in float64, summing the parts in the order given (the callers
    give rank order, so the result does not depend on when the parts arrived). `parts` are
    (weight, sum of n_k * delta_k); parts of weight 0 are skipped. `out`, when given, is the float64 work
    buffer reused across rounds. Returns None when the total weight is 0 (no client contributed)."""
    used = [(w, s) for w, s in parts if w > 0]
    total_weight = float(sum(w for w, _ in used))
    if total_weight <= 0:
        return None
    size = used[0][1].shape
    if out is None or out.shape != size:
        out = np.empty(size, dtype=np.float64)
    if len(used) > 1:
        np.add(used[0][1], used[1][1], out=out)
    else:
        np.copyto(out, used[0][1])
    for _, part in used[2:]:
        out += part
    out /= total_weight
    return out
