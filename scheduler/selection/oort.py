"""Oort's training selector (Lai et al., OSDI 2021), as FedScale runs it (`thirdparty/oort/oort.py`, read at
SymbioticLab/FedScale 7ec441c; FedScale's parameter names and defaults, `--oort-*` here).

A client that has trained ("explored") has a statistical utility, |B_i| sqrt(mean of its squared sample
losses) (its samples times the root-mean-square of the per-sample training losses it reported; a client
picked that brought nothing gets the round's mean utility, as FedScale's stragglers do). Each round:

1. Blacklist (`blacklist_rounds` >= 0): the clients picked more than that many times, the most picked first,
   at most `blacklist_max_len` of the population, are left out.
2. Pacer: the mean utility of last round's exploited and explored clients that reported is logged; every
   `pacer_step` rounds (from round 2 x pacer_step), when the exploited utility of the last `pacer_step`
   rounds is within 10% of the `pacer_step` before, the preferred round duration is relaxed
   (`round_threshold` += `pacer_delta`, at most 100); when it changed 5-fold or more it is tightened.
3. Preferred duration T: the `round_threshold` percentile of the candidates' durations (100: none).
4. Scores of explored candidates: (utility clipped at its `clip_bound` quantile - min) / range, plus the
   staleness bonus sqrt(0.1 ln R / L_i) (R this round, L_i the round of its last report), times
   (T / t_i)^`round_penalty` for a client slower than T.
5. Exploration fraction e = max(e x `exploration_decay`, `exploration_min`), from `exploration_factor`.
   (1 - e) K clients are exploited: sampled by score, without replacement, among the best ones (those
   above `cut_off_util` x the score just below the K-th, but at least 10 K); the rest explore unexplored
   candidates: the `sample_window` x n best by samples x the same duration penalty, sampled by that reward.

Where flock differs from FedScale, and why:
- e K is rounded at random (up with probability its fraction) instead of down: FedBuff selects one client
  per start, and ⌊e⌋ = 0 would never explore again once any client has trained.
- A selection that cannot fill K from its part (too few unexplored or explored candidates) takes the
  remaining best-scored candidates; FedScale returns fewer clients.
- T is the percentile over the round's candidates (every on-line user by default, `--selection-pool`), not
  over every registered client: only on-line users can be picked.
- The first round explores by reward like any other (FedScale picks it uniformly, before Oort runs).
- Guards where FedScale would raise: no positive utility yet (scores are the staleness bonus alone), and
  the cut-off index when every explored candidate is exploited; the blacklist cap is an integer.
- Sampling proportional to weights without replacement uses exponential keys (log u / w, the largest n;
  Efraimidis and Spirakis), the same law as numpy's sequential `choice(p=...)`, from the request's seeded
  stream; ties keep the candidates' (uniform random) order.
- FedScale's `exploration_alpha` only appears in its log lines; it is not an option here.
- Asynchronous mode: the per-round steps (blacklist, pacer, decay) run at the first start of each new
  server version.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from flock.common.domain import ClientReport
from flock.common.errors import ConfigError
from scheduler.selection.base import Candidate, SelectionRequest

STATE_FORMAT = 1
STALENESS_WEIGHT = 0.1        # the 0.1 in sqrt(0.1 ln R / L_i)
PACER_FLAT, PACER_SHARP = 0.1, 5.0      # utility within 10% of the window before: relax; 5-fold: tighten
AUGMENT = 10                  # exploitation samples among at least this many times K candidates


@dataclass(frozen=True, kw_only=True)
class OortSettings:
    """FedScale's names and defaults (fedscale/cloud/config_parser.py)."""

    exploration_factor: float = 0.9
    exploration_decay: float = 0.98
    exploration_min: float = 0.3
    round_threshold: float = 30.0       # percent of candidates by duration
    round_penalty: float = 2.0          # alpha in (T / t_i)^alpha
    pacer_step: int = 20
    pacer_delta: float = 5.0
    blacklist_rounds: int = -1          # -1: no blacklist
    blacklist_max_len: float = 0.3
    clip_bound: float = 0.9
    cut_off_util: float = 0.05
    sample_window: float = 5.0
    pool: int = 0                       # candidates drawn each round; 0: every on-line user

    def __post_init__(self) -> None:
        fractions = (self.exploration_factor, self.exploration_decay, self.exploration_min,
                     self.blacklist_max_len, self.clip_bound, self.cut_off_util)
        if not all(0 <= v <= 1 for v in fractions):
            raise ConfigError("oort: exploration factor, decay and minimum, blacklist share, clip bound and cut-off "
                              "must be in [0, 1]")
        if self.exploration_min > self.exploration_factor:
            raise ConfigError("oort: the exploration minimum (the floor) must be at most the exploration factor")
        if not (0 <= self.round_threshold <= 100 and 0 <= self.pacer_delta <= 100 and self.round_penalty >= 0
                and self.pacer_step >= 1 and self.blacklist_rounds >= -1 and self.sample_window >= 1
                and self.pool >= 0):
            raise ConfigError("oort: round threshold and pacer delta in [0, 100], round penalty >= 0, pacer step "
                              ">= 1, blacklist rounds >= -1, sample window >= 1, pool >= 0")


def weighted_sample(items: Sequence[str], weights: Sequence[float], n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct items drawn in proportion to `weights` without replacement (exponential keys: the same
    law as drawing one at a time in proportion to the weights left); items of weight <= 0 come last, in
    their order. One block of uniform draws from `rng`."""
    if n <= 0 or not items:
        return []
    u = rng.random(len(items))
    keys = [math.log(max(x, 1e-300)) / w if w > 0 else -math.inf for x, w in zip(u, weights)]
    order = sorted(range(len(items)), key=lambda i: -keys[i])     # stable: ties keep the items' order
    return [items[i] for i in order[:n]]


def normalization(rewards: list[float], clip_bound: float) -> tuple[float, float, float]:
    """(clip value, min, range) of the positive utilities, as FedScale's get_norm (min 0.999 x the smallest,
    range at least 1e-4); (0, 0, 1e-4) without any."""
    if not rewards:
        return 0.0, 0.0, 1e-4
    ordered = sorted(rewards)
    clip = ordered[min(int(len(ordered) * clip_bound), len(ordered) - 1)]
    low = ordered[0] * 0.999
    return clip, low, max(ordered[-1] - low, 1e-4)


def preferred_duration(durations: Sequence[float], threshold: float) -> float:
    """The `threshold` percentile of `durations` (FedScale's index int(n x threshold / 100)); inf at 100."""
    if threshold >= 100 or not durations:
        return math.inf
    ordered = sorted(durations)
    return ordered[min(int(len(ordered) * threshold / 100.0), len(ordered) - 1)]


def statistical_utility(report: ClientReport) -> float:
    """|B_i| sqrt(mean of the squared sample losses)."""
    return report.samples * math.sqrt(report.loss_sq)


class Oort:
    """Oort's selector over a run (see the module): per explored client its utility, the round of its last
    report and how often it was picked; the pacer's threshold and history; the exploration fraction."""

    def __init__(self, *, settings: OortSettings | None = None, config: Any = None) -> None:
        self.settings = settings or (oort_settings(config) if config is not None else OortSettings())
        s = self.settings
        self.arms: dict[str, list[float]] = {}     # uid -> [utility, round of its last report, times picked]
        self.exploration = s.exploration_factor
        self.threshold = s.round_threshold
        self.exploit_history: list[float] = []
        self.explore_history: list[float] = []
        self.last_exploit: list[str] = []
        self.last_explore: list[str] = []
        self.reported: set[str] = set()            # clients whose feedback came in since the last pacer step
        self.round = 0
        self._blacklist: set[str] = set()
        self._preferred = math.inf
        self._picked = [0, 0]                      # explored, exploited picks since the last record

    def pool_size(self, count: int) -> int:
        return self.settings.pool

    # -- once per round ---------------------------------------------------------------------------------

    def _new_round(self, round_index: int, population: int) -> None:
        self.round = round_index
        self._blacklist = self.blacklist(population)
        self.pace()
        s = self.settings
        self.exploration = max(self.exploration * s.exploration_decay, s.exploration_min)
        self.last_exploit, self.last_explore = [], []

    def blacklist(self, population: int) -> set[str]:
        """The clients picked more than `blacklist_rounds` times, the most picked first, at most
        `blacklist_max_len` of the population."""
        s = self.settings
        if s.blacklist_rounds < 0:
            return set()
        over = sorted((u for u, arm in self.arms.items() if arm[2] > s.blacklist_rounds),
                      key=lambda u: (-self.arms[u][2], u))
        return set(over[:int(s.blacklist_max_len * population)])

    def _mean_utility(self, clients: list[str]) -> float:
        got = [self.arms[u][0] for u in clients if u in self.reported]
        return sum(got) / (len(got) + 1e-4)

    def pace(self) -> None:
        """The pacer (see the module, step 2), at the start of round `self.round`."""
        s, window = self.settings, self.settings.pacer_step
        self.exploit_history.append(self._mean_utility(self.last_exploit))
        self.explore_history.append(self._mean_utility(self.last_explore))
        del self.exploit_history[:-2 * window], self.explore_history[:-2 * window]
        self.reported = set()
        if self.round >= 2 * window and self.round % window == 0:
            before = sum(self.exploit_history[-2 * window:-window])
            now = sum(self.exploit_history[-window:])
            if abs(now - before) <= before * PACER_FLAT:
                self.threshold = min(100.0, self.threshold + s.pacer_delta)
            elif abs(now - before) >= before * PACER_SHARP:
                self.threshold = max(s.pacer_delta, self.threshold - s.pacer_delta)

    # -- a selection ------------------------------------------------------------------------------------

    def _penalty(self, duration: float) -> float:
        if duration <= self._preferred:
            return 1.0
        return (self._preferred / max(1e-4, duration)) ** self.settings.round_penalty

    def scores(self, explored: Sequence[Candidate]) -> dict[str, float]:
        """Each explored candidate's score (see the module, step 4), in the candidates' order."""
        clip, low, span = normalization([self.arms[c.uid][0] for c in explored if self.arms[c.uid][0] > 0],
                                        self.settings.clip_bound)
        out = {}
        for c in explored:
            utility, last, _ = self.arms[c.uid]
            score = (min(utility, clip) - low) / span + math.sqrt(
                STALENESS_WEIGHT * math.log(max(self.round, 1)) / max(last, 1))
            out[c.uid] = abs(score * self._penalty(c.duration_s))
        return out

    def select(self, request: SelectionRequest) -> list[str]:
        s, k, rng = self.settings, request.count, request.rng
        if request.round != self.round:
            self._new_round(request.round, request.population)
        self._preferred = preferred_duration([c.duration_s for c in request.candidates], self.threshold)
        eligible = [c for c in request.candidates if c.uid not in self._blacklist]
        explored = [c for c in eligible if c.uid in self.arms]
        scores = self.scores(explored)
        share = k * self.exploration
        explore_n = math.floor(share) + int(rng.random() < share - math.floor(share))
        exploit_n = min(k - explore_n, len(scores))
        ranked = sorted(scores, key=lambda u: -scores[u])
        exploit: list[str] = []
        if exploit_n > 0:
            cut = scores[ranked[exploit_n]] * s.cut_off_util if exploit_n < len(ranked) else 0.0
            admitted: list[str] = []
            for uid in ranked:
                if scores[uid] < cut and len(admitted) > AUGMENT * exploit_n:
                    break
                admitted.append(uid)
            exploit = weighted_sample(admitted, [scores[u] for u in admitted], exploit_n, rng)
        unexplored = [c for c in eligible if c.uid not in self.arms]
        explore_n = min(len(unexplored), k - len(exploit))
        explore: list[str] = []
        if explore_n > 0:
            reward = {c.uid: c.samples * self._penalty(c.duration_s) for c in unexplored}
            best = sorted(reward, key=lambda u: -reward[u])[:max(explore_n, int(s.sample_window * explore_n))]
            explore = weighted_sample(best, [reward[u] for u in best], explore_n, rng)
        picked = explore + exploit
        if len(picked) < k:      # too few of one kind: the best-scored others fill the selection
            taken = set(picked)
            picked += [u for u in ranked if u not in taken][:k - len(picked)]
        self.last_explore += explore
        exploring = set(explore)
        self.last_exploit += [u for u in picked if u not in exploring]
        self._picked[0] += len(explore)
        self._picked[1] += len(picked) - len(explore)
        return picked

    def observe(self, round: int, reports: Sequence[ClientReport], missed: Sequence[str]) -> None:
        """The reports after `round` (each client's utility); the users picked that brought nothing get the
        round's mean utility, as FedScale's stragglers."""
        utilities = []
        for report in reports:
            utility = statistical_utility(report)
            self._update(report.uid, utility, round)
            utilities.append(utility)
        mean = sum(utilities) / max(1, len(utilities))
        for uid in missed:
            self._update(uid, mean, round)

    def _update(self, uid: str, utility: float, round_index: int) -> None:
        arm = self.arms.setdefault(uid, [0.0, 0, 0])
        arm[0], arm[1], arm[2] = float(utility), int(round_index), int(arm[2]) + 1
        self.reported.add(uid)

    def record(self) -> dict[str, float]:
        """The train row's fields: picks that explored and exploited since the last row, the pacer's
        threshold, the exploration fraction, and the preferred duration T (when there is one)."""
        out = {"oort_explored": self._picked[0], "oort_exploited": self._picked[1],
               "oort_threshold": self.threshold, "oort_exploration": round(self.exploration, 6)}
        if math.isfinite(self._preferred):
            out["oort_preferred_s"] = self._preferred
        self._picked = [0, 0]
        return out

    # -- checkpoints ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "settings": asdict(self.settings),
                "arms": {u: list(a) for u, a in sorted(self.arms.items())}, "exploration": self.exploration,
                "threshold": self.threshold, "exploit_history": list(self.exploit_history),
                "explore_history": list(self.explore_history), "last_exploit": list(self.last_exploit),
                "last_explore": list(self.last_explore), "reported": sorted(self.reported), "round": self.round,
                "picked": list(self._picked)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"oort: selector state of format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state.get("settings") != asdict(self.settings):
            raise ConfigError("oort: the checkpoint's selector was made with other --oort-* settings")
        self.arms = {str(u): [float(a[0]), int(a[1]), int(a[2])] for u, a in state["arms"].items()}
        self.exploration, self.threshold = float(state["exploration"]), float(state["threshold"])
        self.exploit_history = [float(v) for v in state["exploit_history"]]
        self.explore_history = [float(v) for v in state["explore_history"]]
        self.last_exploit = [str(u) for u in state["last_exploit"]]
        self.last_explore = [str(u) for u in state["last_explore"]]
        self.reported = {str(u) for u in state["reported"]}
        self.round = int(state["round"])
        self._picked = [int(v) for v in state["picked"]]


def oort_settings(config: Any) -> OortSettings:
    """OortSettings from a Config's --oort-* options and --selection-pool."""
    names = [f for f in OortSettings.__dataclass_fields__ if f != "pool"]
    return OortSettings(**{n: getattr(config, f"oort_{n}") for n in names}, pool=config.selection_pool)
