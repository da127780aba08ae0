"""Power-of-choice (Cho, Wang and Joshi, AISTATS 2022): d candidates drawn uniformly from the on-line users,
the K with the highest loss trained.

This is the paper's communication-free variant (rpow-d): the loss of a candidate is the mean training loss
it reported the last time it trained, so no extra round trip evaluates the global model on d phones. A
candidate that never trained has no loss yet and comes first (its loss is unknown, so it may be the
highest); ties keep the candidates' uniform random order. d is `--selection-pool` (0: twice the clients a
round asks for, K x --over-select); d equal to that count picks exactly what uniform selection picks.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from flock.common.domain import ClientReport
from scheduler.selection.base import SelectionRequest


class PowerOfChoice:
    """Stateless: the losses it ranks by are the scheduler's (`Candidate.known`)."""

    def __init__(self, *, d: int = 0, config: Any = None) -> None:
        self.d = config.selection_pool if config is not None else d

    def pool_size(self, count: int) -> int:
        return self.d or 2 * count

    def select(self, request: SelectionRequest) -> list[str]:
        def loss(c) -> float:
            return c.known.loss if c.known is not None else math.inf

        ranked = sorted(request.candidates, key=lambda c: -loss(c))     # stable: ties keep the random order
        return [c.uid for c in ranked[:request.count]]

    def observe(self, round: int, reports: Sequence[ClientReport], missed: Sequence[str]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
