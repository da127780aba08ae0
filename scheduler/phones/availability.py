"""When a phone is on-line, in virtual seconds since the run began; pure functions of (seed, uid, time).

One question serves every model: `online_until(uid, t, draw)` is None when `uid` is off-line at time `t`,
otherwise the time it goes off-line (math.inf: it stays). A client started at `t` whose task would end
after that time drops out. `draw` keys the models that flip a coin per selection: the round in synchronous
mode, the start's serial number in asynchronous mode. Models (`--availability`):

- `always` (the default): every user, all the time.
- `round:P`: on-line for a whole selection with probability P, independently per draw and user; nobody
  drops out mid-task (the daily pattern and traces model that).
- `daily:P0,...,P23` (or `daily:FILE`, a JSON list of 24 numbers): in virtual hour h of each day a user
  is on-line with probability P[h mod 24], independently per user and hour; a session lasts until the first
  off-line hour. Real participation follows the clock (Bonawitz et al. 2019: most phones train at night,
  charging on Wi-Fi); the curve is yours to give.
- `trace:FILE`: on-line intervals per user, FedScale's client_behave_trace (a pickle, read with
  `safe_pickle`) or the same mapping as JSON: `{id: {"active": [t0, ...], "inactive": [t0', ...],
  "finish_time": T}}`, user on-line from active[i] to inactive[i] (closed, as FedScale's `is_active`), the
  trace repeating every `finish_time` seconds (without it, off-line after the last interval). FedScale's
  other fields ("duration", "model") are checked and ignored. A file keyed by client ids (integers) is
  reused for unlisted users as FedScale does (`files.UserEntries`); one keyed by user ids is not.
  Lookups bisect the user's intervals.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flock.common import streams
from flock.common.errors import ConfigError, DataError
from scheduler.phones.files import UserEntries, check_keys, load_mapping, number, user_entries

HOUR_S = 3600.0
HOURS_PER_DAY = 24
# a daily session still going after a year of virtual hours is as good as endless
SESSION_HORIZON_HOURS = 366 * HOURS_PER_DAY


class Availability(Protocol):
    """When users are on-line."""

    def online_until(self, uid: str, t: float, draw: int) -> float | None:
        """None if `uid` is off-line at virtual time `t` (for selection `draw`); else when it goes off-line
        (math.inf: never)."""
        ...


@dataclass(frozen=True)
class AlwaysOn:
    """Every user on-line all the time: today's behaviour."""

    def online_until(self, uid: str, t: float, draw: int) -> float | None:
        return math.inf


@dataclass(frozen=True, kw_only=True)
class RoundProbability:
    """On-line for a whole selection with probability `probability`, a fresh coin per draw and user."""

    seed: int
    probability: float

    def __post_init__(self) -> None:
        if not 0 < self.probability <= 1:
            raise ConfigError(f"--availability round:P needs 0 < P <= 1, got {self.probability}")

    def online_until(self, uid: str, t: float, draw: int) -> float | None:
        return math.inf if streams.online_coin(self.seed, draw, uid) < self.probability else None


@dataclass(frozen=True, kw_only=True)
class DailyPattern:
    """On-line in virtual hour h with probability `hourly[h % 24]`, a coin per user and hour."""

    seed: int
    hourly: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.hourly) != HOURS_PER_DAY:
            raise ConfigError(f"--availability daily: needs {HOURS_PER_DAY} hourly probabilities, "
                              f"got {len(self.hourly)}")
        if not all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in self.hourly) or max(self.hourly) == 0:
            raise ConfigError("--availability daily: probabilities must be in [0, 1], at least one above 0")

    def _on(self, uid: str, hour: int) -> bool:
        p = self.hourly[hour % HOURS_PER_DAY]
        # hours everyone shares need no coin: a night off-line costs nothing per lookup
        return p == 1 or (p > 0 and streams.hourly_coin(self.seed, hour, uid) < p)

    def online_until(self, uid: str, t: float, draw: int) -> float | None:
        hour = math.floor(t / HOUR_S)
        if not self._on(uid, hour):
            return None
        if min(self.hourly) == 1:
            return math.inf
        for h in range(hour + 1, hour + 1 + SESSION_HORIZON_HOURS):
            if not self._on(uid, h):
                return h * HOUR_S
        return math.inf


@dataclass(frozen=True)
class Sessions:
    """One user's on-line intervals [active[i], inactive[i]], repeating every `period` seconds (or not)."""

    active: tuple[float, ...]
    inactive: tuple[float, ...]
    period: float | None

    def online_until(self, t: float) -> float | None:
        cycle, offset = 0, t
        if self.period is not None:
            cycle = math.floor(t / self.period)
            offset = t - cycle * self.period
        i = bisect.bisect_right(self.active, offset) - 1
        if i < 0 or offset > self.inactive[i]:
            return None
        start = cycle * self.period if self.period is not None else 0.0
        end = start + self.inactive[i]
        # a session running into the end of the trace goes on if the trace begins on-line
        if self.period is not None and self.inactive[i] >= self.period and self.active[0] <= 0:
            end = start + self.period + self.inactive[0]
        return end


_TRACE_REQUIRED = frozenset({"active", "inactive"})
_TRACE_OPTIONAL = frozenset({"finish_time", "duration", "model"})


def _times(value: Any, *, where: str, field: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {field} must be a list of seconds, got {type(value).__name__}")
    return tuple(number(v, where=where, field=f"{field}[{i}]") for i, v in enumerate(value))


def _sessions(entry: Any, where: str) -> Sessions:
    check_keys(entry, where=where, required=_TRACE_REQUIRED, optional=_TRACE_OPTIONAL)
    active = _times(entry["active"], where=where, field="active")
    inactive = _times(entry["inactive"], where=where, field="inactive")
    if len(active) != len(inactive):
        raise DataError(f"{where}: {len(active)} active times but {len(inactive)} inactive times")
    for i, (a, b) in enumerate(zip(active, inactive)):
        if b < a:
            raise DataError(f"{where}: inactive[{i}] = {b} is before active[{i}] = {a}")
        if i + 1 < len(active) and active[i + 1] < b:
            raise DataError(f"{where}: active[{i + 1}] = {active[i + 1]} is before inactive[{i}] = {b} "
                            f"(intervals must be in order)")
    period = None
    if "finish_time" in entry:
        period = number(entry["finish_time"], where=where, field="finish_time", positive=True)
    if "duration" in entry:
        number(entry["duration"], where=where, field="duration")
    if "model" in entry and not isinstance(entry["model"], str):
        raise DataError(f"{where}: model must be a string, got {type(entry['model']).__name__}")
    return Sessions(active=active, inactive=inactive, period=period)


def _is_client_id(key: Any) -> bool:
    return (isinstance(key, int) and not isinstance(key, bool)) or (isinstance(key, str) and key.isascii()
                                                                    and key.isdecimal())


@dataclass(frozen=True)
class TraceAvailability:
    """On-line intervals per user from a trace file."""

    entries: UserEntries[Sessions]

    def online_until(self, uid: str, t: float, draw: int) -> float | None:
        return self.entries.lookup(uid).online_until(t)


def load_trace(path: Path | str) -> TraceAvailability:
    """A trace file (FedScale's pickle or JSON); a malformed one is a DataError naming the file, the entry
    and the field."""
    mapping = load_mapping(path)
    wrap = all(_is_client_id(k) for k in mapping)
    return TraceAvailability(user_entries(mapping, _sessions, source=str(path), wrap=wrap))


def _hourly_curve(text: str) -> tuple[float, ...]:
    if Path(text).is_file():
        try:
            values = json.loads(Path(text).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{text}: not a JSON list of {HOURS_PER_DAY} probabilities ({e})") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise DataError(f"{text}: expected a JSON list of {HOURS_PER_DAY} probabilities")
        return tuple(float(v) for v in values)
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--availability daily:{text}: neither a file nor {HOURS_PER_DAY} comma-separated "
                          f"probabilities") from None


def availability_from_option(value: str, seed: int) -> Availability:
    """The `--availability` option: "" or "always", "round:P", "daily:P0,...,P23" or "daily:FILE",
    "trace:FILE"."""
    kind, _, arg = value.partition(":")
    if kind in ("", "always") and not arg:
        return AlwaysOn()
    if kind == "round":
        try:
            probability = float(arg)
        except ValueError:
            raise ConfigError(f"--availability {value}: P must be a number") from None
        return RoundProbability(seed=seed, probability=probability)
    if kind == "daily":
        return DailyPattern(seed=seed, hourly=_hourly_curve(arg))
    if kind == "trace":
        if not Path(arg).is_file():
            raise ConfigError(f"--availability {value}: no such file {arg!r}")
        return load_trace(arg)
    raise ConfigError(f"--availability {value!r}: expected always, round:P, daily:P0,...,P23, daily:FILE or "
                      f"trace:FILE")
