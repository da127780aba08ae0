"""FedAvg's reduction as one pure function: the weighted mean of client deltas from (weight, weighted sum)
parts. The scheduler, the tests and the plain-PyTorch floor call it; the server optimizer applies the
result."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

BLOCK = 1 << 16      # elements a block's passes work on at a time (512 KiB of float64: they stay in cache)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def in_blocks(size: int, work: Callable[[int, int], None], threads: int | None = None) -> None:
    """Calls `work(a, b)` on consecutive blocks that cover range(size), the blocks split into contiguous
    runs over `threads` threads (default: the cores this process may use; numpy releases the interpreter
    on large arrays). For elementwise work the values are those of one call over the whole range: this
    only makes the scheduler's 50 MB passes run from cache and on every core."""
    global _pool
    threads = max(1, min(threads or len(os.sched_getaffinity(0)), -(-size // BLOCK)))

    def run(t: int) -> None:
        lo, hi = size * t // threads, size * (t + 1) // threads
        for a in range(lo, hi, BLOCK):
            work(a, min(a + BLOCK, hi))

    if threads == 1:
        return run(0)
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads:
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="blocks")
        pool = _pool
    list(pool.map(run, range(threads)))


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite, in cache-sized blocks over the cores (no 6-million-entry mask)."""
    bad: list[int] = []

    def block(a: int, b: int) -> None:
        if not np.isfinite(values[a:b]).all():
            bad.append(a)

    in_blocks(values.size, block)
    return not bad


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
    in_place = len(parts) == 1 and parts[0].flags.writeable
    if in_place:
        total = parts[0]
    else:
        total = out if out is not None and out.shape == parts[0].shape else np.empty(parts[0].shape, np.float64)

    def block(a: int, b: int) -> None:
        t = total[a:b]
        if not in_place:
            if len(parts) > 1:
                np.add(parts[0][a:b], parts[1][a:b], out=t)
            else:
                np.copyto(t, parts[0][a:b])
            for part in parts[2:]:
                t += part[a:b]
        t /= total_weight

    in_blocks(total.size, block)
    return total
