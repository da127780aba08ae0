"""The scheduler's side of client selection: the pool of on-line candidates, what is known of each user, the
clients' reports, and the selection's state in checkpoints. `--selection uniform` (the default) has no
`Selection` at all: the scheduler's own uniform path runs, unchanged.

Determinism. The pool is a prefix of the seeded candidate order (`phones.selection.select_online`, the
purpose and index of uniform selection: a pool of exactly the clients asked for is uniform selection's
draw), the selector draws from its own stream (`streams.selection_rng`), and the reports reach it sorted by
(user, task), whichever rank trained whom: the same clients at any -np.

Synchronous rounds: a round's reports are handed over once all its ranks have pushed, before the next
round is planned; the checkpoint after a round holds what is known of every user and the selector's state.

Asynchronous rounds (FedBuff): the scheduler runs the event schedule ahead of real training, so a start is
decided before the results of some earlier tasks exist. The rule: the schedule runs ahead only while the
scheduler makes the plans of version v (or checkpoints at v), after version v's update is applied; every
start decided then sees the reports of the tasks of versions <= v, and nothing later. A start from version
u is decided at some v <= u (the schedule never decides a start before the version it starts from
exists), so it only uses results the server had at its virtual start. Which v decides which start is a
function of the schedule (not of real time or of the ranks), so the decisions are deterministic. The
checkpoint keeps every version's reports (a few numbers per task); a resumed run replays the schedule from
the start and hands each version's reports to the selector at the same point, so it decides the same starts.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Container, Mapping, Sequence

from flock.common import streams
from flock.common.domain import ClientReport
from flock.common.errors import ConfigError
from scheduler.phones.availability import Availability
from scheduler.phones.selection import Candidates, select_online
from scheduler.selection.base import Candidate, Known, SelectionRequest, Selector

STATE_FORMAT = 1


class Selection:
    """A selector (made by `make`) over a run: what is known of each user, the expected reports, the
    checkpoint state. `asynchronous`: FedBuff's starts (the reports are logged for replay)."""

    def __init__(self, make: Callable[[], Selector], *, name: str, seed: int, asynchronous: bool = False) -> None:
        self.make, self.name, self.seed, self.asynchronous = make, name, seed, asynchronous
        self.selector = make()
        self.known: dict[str, Known] = {}
        self.log: dict[int, list[list[Any]]] = {}     # asynchronous: each version's reports, for replay
        self._expected: tuple[int, set[tuple[int, str]], tuple[str, ...]] | None = None
        self._picks: tuple[int, tuple[str, ...]] = (0, ())       # the last synchronous round's pool size, picks

    # -- choosing ---------------------------------------------------------------------------------------

    def choose(self, *, purpose: str, index: int, round: int, users: Sequence[str], counts: Mapping[str, int],
               count: int, availability: Availability, t: float, duration_of: Callable[[str], float],
               exclude: Container[str] = ()) -> Candidates:
        """`count` on-line users of `users` at virtual time `t`, chosen by the selector from a uniform pool
        (the candidate order of (seed, purpose, index), skipping `exclude`); `round` is the request's."""
        wanted = self.selector.pool_size(count)
        if not (isinstance(wanted, int) and wanted >= 0):
            raise ConfigError(f"--selection {self.name}: pool_size({count}) returned {wanted!r}, not an integer >= 0")
        pool = select_online(users, len(users) if wanted == 0 else max(wanted, count), seed=self.seed,
                             purpose=purpose, index=index, availability=availability, t=t, exclude=exclude)
        candidates = tuple(Candidate(uid=u, samples=int(counts[u]), duration_s=float(duration_of(u)),
                                     known=self.known.get(u)) for u in pool.uids)
        request = SelectionRequest(round=round, count=min(count, len(candidates)), candidates=candidates,
                                   population=len(users), time=t, rng=streams.selection_rng(self.seed, purpose, index))
        picked = list(self.selector.select(request))
        until = dict(zip(pool.uids, pool.online_until))
        if len(set(picked)) != len(picked) or len(picked) > request.count or not all(u in until for u in picked):
            raise ConfigError(f"--selection {self.name}: select() must return at most {request.count} distinct "
                              f"users among the {len(candidates)} candidates; it returned {picked[:5]!r}"
                              f"{'...' if len(picked) > 5 else ''}")
        if purpose == "sync":
            self._picks = (len(candidates), tuple(picked))
        return Candidates(uids=tuple(picked), online_until=tuple(until[u] for u in picked), probes=pool.probes)

    # -- reports ----------------------------------------------------------------------------------------

    def expect(self, round: int, trained: Sequence[tuple[int, str]], missed: Sequence[str] = ()) -> None:
        """The (task id, user) pairs whose reports `round` brings (task -1 in synchronous rounds), and the
        users picked that bring none."""
        self._expected = (round, set(trained), tuple(missed))

    def finish(self, round: int, reports: Sequence[ClientReport]) -> tuple[dict[str, Any], str | None]:
        """Round (or version) `round`'s reports, pushed by the ranks: the selector learns from them. Returns
        the train row's fields, and why the run must stop (a report nobody expected), if it must."""
        expected = self._expected if self._expected is not None and self._expected[0] == round else (round, set(), ())
        ordered = sorted(reports, key=lambda r: (r.uid, r.task_id))
        keys = [(r.task_id, r.uid) for r in ordered]
        stray = [uid for task, uid in keys if (task, uid) not in expected[1]]
        if stray or len(set(keys)) != len(keys):
            return {}, (f"round {round}: client reports for {', '.join(sorted(set(stray))) or 'a client twice'}, "
                        f"which the round did not train; the run stops")
        # a client that trained but sent no report (its training diverged) brought nothing either
        silent = sorted(uid for _, uid in expected[1] - set(keys))
        self._learn(round, ordered, [*expected[2], *silent] if not self.asynchronous else [])
        if self.asynchronous:
            self.log[round] = [[r.uid, r.samples, r.loss, r.loss_sq, r.task_id] for r in ordered]
        record = dict(getattr(self.selector, "record", dict)())
        if not self.asynchronous:
            record.update(selection_pool=self._picks[0], selection_users=list(self._picks[1]))
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            return {}, f"--selection {self.name}: record() gave non-finite {', '.join(bad)}; the run stops"
        return record, None

    def _learn(self, round: int, reports: Sequence[ClientReport], missed: Sequence[str]) -> None:
        for r in reports:
            before = self.known.get(r.uid)
            self.known[r.uid] = Known(samples=r.samples, loss=r.loss, loss_sq=r.loss_sq, round=round,
                                      reports=(before.reports if before else 0) + 1)
        self.selector.observe(round, reports, missed)

    def replay(self, version: int) -> None:
        """Asynchronous resume: hands version `version`'s logged reports to the selector again (a no-op for
        version 0 and versions without reports)."""
        if version not in self.log:
            return
        self._learn(version, [ClientReport(uid=u, samples=n, loss=a, loss_sq=b, task_id=t)
                              for u, n, a, b, t in self.log[version]], [])
        getattr(self.selector, "record", dict)()     # as the run's row did: counters since the last row restart

    # -- checkpoints ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Synchronous: what is known of every user and the selector's state. Asynchronous: every version's
        reports (the state follows from replaying them with the schedule)."""
        state: dict[str, Any] = {"format": STATE_FORMAT, "selection": self.name}
        if self.asynchronous:
            state["log"] = {str(v): rows for v, rows in sorted(self.log.items())}
        else:
            state["known"] = {u: [k.samples, k.loss, k.loss_sq, k.round, k.reports] for u, k in sorted(self.known.items())}
            state["selector"] = self.selector.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continues from `state_dict()`'s output (asynchronous: from scratch, with the log to replay)."""
        self.selector, self.known, self.log, self._expected = self.make(), {}, {}, None
        if not state:
            return
        if state.get("format") != STATE_FORMAT or state.get("selection") != self.name:
            raise ConfigError(f"the checkpoint's client selection is {state.get('selection')!r} (format "
                              f"{state.get('format')!r}), not --selection {self.name}")
        if self.asynchronous:
            self.log = {int(v): [list(row) for row in rows] for v, rows in state.get("log", {}).items()}
            return
        self.known = {str(u): Known(samples=float(s), loss=float(a), loss_sq=float(b), round=int(r), reports=int(n))
                      for u, (s, a, b, r, n) in state.get("known", {}).items()}
        self.selector.load_state_dict(state.get("selector", {}))
