"""FedAvg's reduction as one pure function: the weighted mean of client deltas from (weight, weighted sum)
parts, and `server_step`: that mean, the server optimizer's step, their finiteness checks and the copy
into shared memory in one pass over memory, which the scheduler calls (`weighted_mean` alone: the tests,
the plain-PyTorch floor, and optimizers without `step_block`)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from flock.common import kernels

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
    total, in_place = _work_buffer(parts, out)

    def block(a: int, b: int) -> None:
        t = total[a:b]
        if not in_place:
            _sum_block(t, parts, a, b)
        t /= total_weight

    in_blocks(total.size, block)
    return total


def _work_buffer(parts: Sequence[np.ndarray], out: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """Where the sum of `parts` goes: a single writable part itself (no 50 MB copy), else `out` (reused
    across rounds) or a new array; and whether it is the part itself."""
    if len(parts) == 1 and parts[0].flags.writeable:
        return parts[0], True
    return (out if out is not None and out.shape == parts[0].shape else np.empty(parts[0].shape, np.float64)), False


_NO_MIRROR = np.empty(0, np.float32)


def _mean_block(t: np.ndarray, parts: Sequence[np.ndarray], a: int, b: int, weight: float) -> bool:
    """t = sum(parts) / weight over elements [a, b) (`_sum_block`'s order; in one pass for one or two
    parts, `flock.common.kernels`); whether every value is finite."""
    if len(parts) == 1:
        return kernels.mean1(t, parts[0][a:b], weight)
    if len(parts) == 2:
        return kernels.mean2(t, parts[0][a:b], parts[1][a:b], weight)
    _sum_block(t, parts, a, b)
    t /= weight
    return bool(np.isfinite(t).all())


def _sum_block(t: np.ndarray, parts: Sequence[np.ndarray], a: int, b: int) -> None:
    """t = ((parts[0] + parts[1]) + parts[2]) + ... over elements [a, b)."""
    if len(parts) > 1:
        np.add(parts[0][a:b], parts[1][a:b], out=t)
    else:
        np.copyto(t, parts[0][a:b])
    for part in parts[2:]:
        t += part[a:b]


def blockwise(optimizer) -> bool:
    """Whether `optimizer` has a `step_block` for `server_step`'s one pass (else: the plain passes)."""
    return callable(getattr(optimizer, "step_block", None))


@dataclass
class StepResult:
    """What `server_step` made: the new parameters (None when no client contributed), and which check
    failed, if one did (then `params` must not be used)."""

    params: np.ndarray | None
    update_finite: bool = True
    params_finite: bool = True


def server_step(parts: Sequence[np.ndarray], total_weight: float, params: np.ndarray, optimizer, *,
                work: np.ndarray | None = None, mirror: np.ndarray | None = None) -> StepResult:
    """The server's aggregation in one pass over memory: per cache-sized block, the weighted mean of
    `parts` (summed in the order given, into a block-sized buffer: the parts are only read), the check that
    it is finite, the optimizer's step (`step_block`), the check that the new parameters are finite, and
    their copy into `mirror` (the data plane's shared memory, when given). The same bits as those passes
    one after another. An optimizer without `step_block` gets them one after another (the mean in place
    in a single writable part, else in `work` when given). `params` is left as it was."""
    if total_weight <= 0 or not parts:
        return StepResult(None)
    if not blockwise(optimizer):
        mean = weighted_mean(parts, total_weight, out=work)
        if not all_finite(mean):
            return StepResult(None, update_finite=False)
        out = optimizer.step(params, mean)
        if not all_finite(out):
            return StepResult(None, params_finite=False)
        if mirror is not None:
            in_blocks(out.size, lambda a, b: np.copyto(mirror[a:b], out[a:b]))
        return StepResult(out)
    optimizer.prepare(params.size)
    out = np.empty(params.shape, np.float32)
    bad_update: list[int] = []
    bad_params: list[int] = []

    def block(a: int, b: int) -> None:
        t = _block_buffer(b - a)
        if not _mean_block(t, parts, a, b, total_weight):
            bad_update.append(a)
            return
        optimizer.step_block(a, b, params[a:b], t, out[a:b])
        if not kernels.finite_copy(_NO_MIRROR if mirror is None else mirror[a:b], out[a:b]):
            bad_params.append(a)

    in_blocks(out.size, block)
    if bad_update:
        return StepResult(None, update_finite=False)
    return StepResult(None, params_finite=False) if bad_params else StepResult(out)


_local = threading.local()


def _block_buffer(size: int) -> np.ndarray:
    """A float64 buffer of `size` <= BLOCK values, one per thread, reused (it stays in that core's cache)."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = np.empty(BLOCK, np.float64)
    return buffer[:size]
