"""The float64 passes of a round's aggregation, compiled with numba, each the arithmetic of a sequence of
torch or numpy ops in one pass over memory, bit for bit.

Accumulation (the ranks): dst += a0 s0 (+ a1 s1 + a2 s2) for a float64 `dst` and float32 sources, each
value widened as it is read.

torch has no op for this: its mixed-dtype add casts element by element, and widening a source into a float64
buffer first (then a float64 add) reads and writes `dst` once per source. Here three sources go in a pass,
the additions in the order written, `dst[i] = ((dst[i] + a0 s0[i]) + a1 s1[i]) + a2 s2[i]`. The callers pass
only scales `a` for which `a * s` is exact in float64 (`simulator.shard.exact_scale`): each addition then
rounds once, as torch's, whether or not the compiler fuses the multiply into it; no other rewriting is
allowed (numba's default, fastmath off), so the results are bit for bit those of torch's adds in turn.

The server step (scheduler/aggregate.py, FedAvg): the mean of the ranks' sums and the check that it is
finite, FedAvg's step into float32, the check that the new parameters are finite and their copy into the
node's shared memory: each operation as numpy rounds it (IEEE double, no fused multiply-add).

The compiled code is cached beside this file (`__pycache__`), or in numba's user cache where that is not
writable (else each process compiles it): a process compiles each signature once (about 0.5 s), later
processes load it; a process's first call costs about 0.35 s either way (numba's own start-up)."""
from __future__ import annotations

import math

import numba
import numpy as np


def _compiled(fn):
    """numba.njit, its machine code cached on disk; compiled in each process where no cache directory
    is writable (numba then refuses to cache)."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:
        return numba.njit(nogil=True)(fn)



@_compiled
def axpy1(dst, s0, a0):       # pragma: no cover - compiled
    for i in range(dst.size):
        dst[i] = dst[i] + a0 * s0[i]


@_compiled
def axpy3(dst, s0, a0, s1, a1, s2, a2):       # pragma: no cover - compiled
    for i in range(dst.size):
        dst[i] = ((dst[i] + a0 * s0[i]) + a1 * s1[i]) + a2 * s2[i]


# The finiteness checks OR integer flags: a float sum of x - x (0 for a finite x, NaN else) would be as
# exact, but a float reduction may not be reordered, so it runs serially, 4x slower than the rest of the pass.

@_compiled
def mean2(out, p0, p1, weight):       # pragma: no cover - compiled
    """out = (p0 + p1) / weight; whether every value is finite."""
    bad = 0
    for i in range(out.size):
        x = (p0[i] + p1[i]) / weight
        out[i] = x
        bad |= not math.isfinite(x)
    return bad == 0


@_compiled
def mean1(out, p0, weight):       # pragma: no cover - compiled
    bad = 0
    for i in range(out.size):
        x = p0[i] / weight
        out[i] = x
        bad |= not math.isfinite(x)
    return bad == 0


@_compiled
def fedavg_step(out, params, mean, lr):       # pragma: no cover - compiled
    """out (float32) = mean * lr + params, rounded after each operation, as numpy's passes round it."""
    for i in range(out.size):
        out[i] = np.float32(mean[i] * lr + np.float64(params[i]))


@_compiled
def finite_copy(mirror, values):       # pragma: no cover - compiled
    """Whether every value is finite; if so, they are copied into `mirror` (of their size; empty: none)."""
    bad = 0
    for i in range(values.size):
        bad |= not math.isfinite(values[i])
    if bad:
        return False
    if mirror.size:
        for i in range(values.size):
            mirror[i] = values[i]
    return True


def warm() -> None:
    """Loads (or compiles) the kernels for the common argument types now, at a process's start-up, so that
    numba's own start-up (about 0.35 s) is not billed to the first round."""
    f64, f32 = np.zeros(2), np.zeros(2, np.float32)
    axpy1(f64, f32, 1.0)
    axpy3(f64, f32, 1.0, f32, 1.0, f32, 1.0)
    mean1(f64, f64, 1.0)
    mean2(f64, f64, f64, 1.0)
    fedavg_step(f32.copy(), f32, f64, 1.0)
    finite_copy(f32.copy(), f32)
