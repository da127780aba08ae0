from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from scheduler.aggregate import in_blocks


class ServerOptimizer(Protocol):
    """Applies the weighted mean client delta to the global parameters."""

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        """params (float32) and mean_delta = sum n_k delta_k / sum n_k (float64) -> new params (float32).
        `mean_delta` is the scheduler's work buffer: a step may overwrite it (and must not keep it)."""

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, for checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict`'s output."""


class BlockwiseOptimizer:
    """A server optimizer whose step is elementwise, written for one block of the parameter vector at a
    time: the scheduler runs it inside its one pass over memory (mean, step, finiteness checks, the copy
    into shared memory; `scheduler.aggregate.server_step`) while the block is in cache. `step` runs the
    same blocks on their own, with the same bits. A subclass defines

        step_block(self, a, b, params, mean, out) -> None

    out = the new float32 parameters of elements [a, b), from their float32 `params` and float64 `mean`
    delta (a work block: may be overwritten), advancing the state of those elements. An optimizer without
    `step_block` (a Flower strategy, a user's own, a subclass that overrides only `step`) gets the plain
    passes."""

    def prepare(self, size: int) -> None:
        """Allocates the state for `size` parameters, if the optimizer has state and has none yet."""

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        self.prepare(params.size)
        out = np.empty(params.shape, np.float32)
        in_blocks(out.size, lambda a, b: self.step_block(a, b, params[a:b], mean_delta[a:b], out[a:b]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
