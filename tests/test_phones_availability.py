"""Availability models, trace files (FedScale's pickles and JSON), and lazy on-line selection that never
scans the population."""
import json
import math
import pickle
from collections import Counter
from typing import Sequence

import numpy as np
import pytest

from flock.common.errors import ConfigError, DataError
from scheduler.phones.availability import (
    AlwaysOn,
    DailyPattern,
    RoundProbability,
    Sessions,
    availability_from_option,
    load_trace,
)
from scheduler.phones.selection import candidate_order, default_max_probes, select_online

H = 3600.0


def test_always_on_and_round_probability():
    assert AlwaysOn().online_until("u", 123.0, 4) == math.inf
    half = RoundProbability(seed=1, probability=0.3)
    answers = [half.online_until(f"u{i}", 0.0, 7) for i in range(5000)]
    assert set(answers) <= {None, math.inf}
    assert sum(a is not None for a in answers) / 5000 == pytest.approx(0.3, abs=0.03)
    # a coin per (draw, user): the same answer when asked again, another at another draw
    assert [half.online_until(f"u{i}", 99.0, 7) for i in range(5000)] == answers
    assert [half.online_until(f"u{i}", 0.0, 8) for i in range(5000)] != answers
    with pytest.raises(ConfigError, match="0 < P <= 1"):
        RoundProbability(seed=0, probability=0)


def test_daily_pattern_follows_the_hourly_curve_and_sessions_end_at_an_off_line_hour():
    curve = tuple([0.0] * 12 + [0.8] * 12)            # off-line all morning, often on-line afternoons
    daily = DailyPattern(seed=2, hourly=curve)
    assert all(daily.online_until(f"u{i}", 5 * H + 10, 0) is None for i in range(300))
    ends = [daily.online_until(f"u{i}", 30 * H + 5, 0) for i in range(2000)]       # day 2, 6 am: off
    assert all(e is None for e in ends)
    afternoon = [daily.online_until(f"u{i}", 14 * H + 1, 0) for i in range(2000)]
    on = [e for e in afternoon if e is not None]
    assert len(on) / 2000 == pytest.approx(0.8, abs=0.03)
    # a session ends at the start of an hour, after 14:00, by midnight at the latest (the morning is off)
    assert all(e % H == 0 and 15 * H <= e <= 24 * H for e in on)
    # the answer is a pure function: the same when asked mid-session
    for i, e in enumerate(afternoon):
        if e is not None and e > 16 * H:
            assert daily.online_until(f"u{i}", 15.5 * H, 0) == e
    assert DailyPattern(seed=0, hourly=(1.0,) * 24).online_until("u", 1e6, 0) == math.inf
    with pytest.raises(ConfigError, match="24 hourly"):
        DailyPattern(seed=0, hourly=(0.5,) * 23)
    with pytest.raises(ConfigError, match="at least one above 0"):
        DailyPattern(seed=0, hourly=(0.0,) * 24)


def test_sessions_bisect_and_wrap():
    s = Sessions(active=(10.0, 50.0), inactive=(20.0, 60.0), period=100.0)
    assert s.online_until(5) is None
    assert s.online_until(10) == 20 and s.online_until(15) == 20 and s.online_until(20) == 20   # closed
    assert s.online_until(30) is None
    assert s.online_until(155) == 160        # the trace repeats every 100 s
    assert s.online_until(1010) == 1020
    once = Sessions(active=(10.0,), inactive=(20.0,), period=None)
    assert once.online_until(15) == 20 and once.online_until(115) is None
    # a session running into the end of the period goes on when the trace begins on-line
    edge = Sessions(active=(0.0, 80.0), inactive=(30.0, 100.0), period=100.0)
    assert edge.online_until(90) == 130
    assert Sessions(active=(), inactive=(), period=10.0).online_until(3) is None


def _behave_trace(n):
    # FedScale's client_behave_trace: {client id: {"duration", "inactive", "finish_time", "active", "model"}}
    return {i: {"duration": 100, "inactive": [20 + i, 60 + i], "finish_time": 100, "active": [10 + i, 50 + i],
                "model": "SM-G960F"} for i in range(1, n + 1)}


def test_fedscale_behave_trace_pickle_wraps_for_unlisted_users(tmp_path):
    path = tmp_path / "client_behave_trace"
    path.write_bytes(pickle.dumps(_behave_trace(3)))
    trace = load_trace(path)
    assert trace.online_until("2", 13.0, 0) == 22.0 and trace.online_until("2", 25.0, 0) is None
    assert trace.online_until("5", 13.0, 0) == 23.0          # 5 % 3 = 2 -> the third entry (id 3)
    assert trace.online_until("alice", 0.0, 0) is None       # wraps by crc32; off-line before t = 11
    same = availability_from_option(f"trace:{path}", seed=0)
    assert same.online_until("5", 13.0, 0) == 23.0


def test_json_trace_keyed_by_user_does_not_wrap(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"alice": {"active": [0, 100], "inactive": [50, 200]},
                                "bob": {"active": [], "inactive": []}}))
    trace = load_trace(path)
    assert trace.online_until("alice", 120.0, 0) == 200.0 and trace.online_until("alice", 250.0, 0) is None
    assert trace.online_until("bob", 1.0, 0) is None
    with pytest.raises(DataError, match=r"trace.json: no entry for user 'carol'"):
        trace.online_until("carol", 0.0, 0)


@pytest.mark.parametrize("entry, message", [
    ({"active": [0, 10], "inactive": [5]}, r"2 active times but 1 inactive times"),
    ({"active": [10], "inactive": [5]}, r"inactive\[0\] = 5.0 is before active\[0\] = 10.0"),
    ({"active": [0, 3], "inactive": [5, 9]}, r"active\[1\] = 3.0 is before inactive\[0\] = 5.0"),
    ({"active": [-1], "inactive": [5]}, r"active\[0\] must be a finite number >= 0"),
    ({"active": [float("nan")], "inactive": [5]}, r"active\[0\] must be a finite number"),
    ({"active": ["0"], "inactive": [5]}, r"active\[0\] must be a number, got str"),
    ({"active": 0, "inactive": [5]}, r"active must be a list of seconds"),
    ({"active": [0], "inactive": [5], "finish_time": 0}, r"finish_time must be a finite number > 0"),
    ({"active": [0], "inactive": [5], "model": 3}, r"model must be a string"),
    ({"active": [0], "inactive": [5], "battery": 0.5}, r"unknown field 'battery'"),
    ({"active": [0]}, r"missing field 'inactive'"),
])
def test_bad_traces_name_the_file_entry_and_field(tmp_path, entry, message):
    path = tmp_path / "client_behave_trace"
    path.write_bytes(pickle.dumps({1: {"active": [0], "inactive": [1]}, 7: entry}))
    with pytest.raises(DataError, match=rf"client_behave_trace, entry '7': {message}"):
        load_trace(path)


def test_truncated_trace_pickle_is_a_data_error(tmp_path):
    whole = pickle.dumps(_behave_trace(30))
    path = tmp_path / "client_behave_trace"
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match="client_behave_trace: not a plain-data pickle"):
        load_trace(path)


def test_availability_option(tmp_path):
    assert isinstance(availability_from_option("", 0), AlwaysOn)
    assert isinstance(availability_from_option("always", 0), AlwaysOn)
    assert availability_from_option("round:0.25", 3) == RoundProbability(seed=3, probability=0.25)
    curve = ",".join(["0.5"] * 24)
    assert availability_from_option(f"daily:{curve}", 1) == DailyPattern(seed=1, hourly=(0.5,) * 24)
    path = tmp_path / "curve.json"
    path.write_text(json.dumps([0.1] * 24))
    assert availability_from_option(f"daily:{path}", 1).hourly == (0.1,) * 24
    path.write_text(json.dumps({"h": 1}))
    with pytest.raises(DataError, match="curve.json: expected a JSON list"):
        availability_from_option(f"daily:{path}", 1)
    for bad, message in (("round:x", "P must be a number"), ("round:1.5", "0 < P <= 1"),
                         ("daily:0.5,0.5", "24 hourly"), ("daily:a,b", "neither a file nor"),
                         ("trace:nowhere.pkl", "no such file"), ("sometimes", "expected always")):
        with pytest.raises(ConfigError, match=message):
            availability_from_option(bad, 0)


def test_candidate_order_is_a_lazy_uniform_permutation():
    for n in (1, 5, 64, 200):
        order = list(candidate_order(np.random.default_rng(0), n))
        assert sorted(order) == list(range(n))
    assert list(candidate_order(np.random.default_rng(0), 0)) == []
    # a prefix is what a longer read starts with
    full = list(candidate_order(np.random.default_rng(9), 1000))
    it = candidate_order(np.random.default_rng(9), 1000)
    assert [next(it) for _ in range(10)] == full[:10]
    # the first position is uniform
    firsts = Counter(next(candidate_order(np.random.default_rng(s), 10)) for s in range(5000))
    assert min(firsts.values()) > 400 and max(firsts.values()) < 600


class LazyPopulation(Sequence[str]):
    """1.66 million user ids that exist only when indexed."""

    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        if not 0 <= i < self.n:
            raise IndexError(i)
        return f"user{i:07d}"


class CountingAvailability:
    def __init__(self, inner):
        self.inner, self.lookups = inner, 0

    def online_until(self, uid, t, draw):
        self.lookups += 1
        return self.inner.online_until(uid, t, draw)


def test_selection_among_millions_asks_only_about_the_users_it_draws():
    users = LazyPopulation(1_660_000)
    availability = CountingAvailability(RoundProbability(seed=0, probability=0.05))
    chosen = select_online(users, 100, seed=0, purpose="sync", index=3, availability=availability, t=0.0)
    assert len(chosen.uids) == len(set(chosen.uids)) == 100
    assert chosen.probes == availability.lookups
    # about 100 / 0.05 = 2,000 lookups, nothing near the population
    assert availability.lookups < 4000 and users.reads < 4000
    assert all(availability.inner.online_until(u, 0.0, 3) == math.inf for u in chosen.uids)
    again = select_online(users, 100, seed=0, purpose="sync", index=3, availability=availability, t=0.0)
    assert again == chosen
    other = select_online(users, 100, seed=0, purpose="sync", index=4, availability=availability, t=0.0)
    assert other.uids != chosen.uids


def test_selection_with_almost_nobody_on_line_is_bounded():
    users = LazyPopulation(1_660_000)
    availability = CountingAvailability(RoundProbability(seed=0, probability=1e-7))
    chosen = select_online(users, 10, seed=1, purpose="sync", index=0, availability=availability, t=0.0)
    assert availability.lookups == default_max_probes(10) == chosen.probes
    assert len(chosen.uids) <= 10


def test_selection_in_a_small_population_skips_excluded_and_off_line_users():
    users = [f"u{i}" for i in range(10)]
    trace_like = CountingAvailability(RoundProbability(seed=5, probability=0.5))
    everyone = select_online(users, 10, seed=0, purpose="async", index=1, availability=AlwaysOn(), t=0.0,
                             exclude={"u3", "u4"})
    assert sorted(everyone.uids) == sorted(set(users) - {"u3", "u4"})
    some = select_online(users, 10, seed=0, purpose="async", index=1, availability=trace_like, t=0.0)
    assert trace_like.lookups == 10 and len(some.uids) < 10
    assert select_online(users, 0, seed=0, purpose="sync", index=0, availability=AlwaysOn(), t=0.0).uids == ()
