"""A client-selection plug-in for the tests (`--selection tests.selection_plugins:MostSamples`)."""
from __future__ import annotations


class MostSamples:
    """The candidates with the most samples, among 6 (ties: the random order). Fails the run if a request
    shows a report from the round being selected or later: the reports a selection sees must come from
    rounds (versions) already applied."""

    def __init__(self, *, config) -> None:
        self.rounds_seen = 0

    def pool_size(self, count: int) -> int:
        return max(6, count)

    def select(self, request):
        for c in request.candidates:
            if c.known is not None and c.known.round >= request.round:
                raise AssertionError(f"round {request.round} sees {c.uid}'s report of round {c.known.round}")
        best = sorted(request.candidates, key=lambda c: -c.samples)
        return [c.uid for c in best[:request.count]]

    def observe(self, round, reports, missed) -> None:
        self.rounds_seen += 1

    def state_dict(self) -> dict:
        return {"rounds_seen": self.rounds_seen}

    def load_state_dict(self, state: dict) -> None:
        self.rounds_seen = int(state.get("rounds_seen", 0))

    def record(self) -> dict:
        return {"rounds_seen": self.rounds_seen}


class NoConfig:
    """A selector whose constructor takes no config (refused)."""

    def __init__(self) -> None: ...

    def pool_size(self, count): return 0
    def select(self, request): return []
    def observe(self, round, reports, missed): ...
    def state_dict(self): return {}
    def load_state_dict(self, state): ...
