"""The asynchronous (FedBuff / FedAsync) schedule: a hand-computed run, staleness, drop-outs, determinism,
independence from the real order of results, checkpoints, and a schedule that cannot progress."""
import json
import math
import zlib

import numpy as np
import pytest

from flock.common.errors import ConfigError, RefusedError
from scheduler.phones.availability import DailyPattern, RoundProbability
from scheduler.phones.clock import client_timing
from scheduler.phones.devices import BuiltinProfiles
from scheduler.phones.fedbuff import AsyncConfig, AsyncSchedule, PendingBuffers, staleness_weight
from scheduler.phones.report import async_update_record


def test_staleness_weights():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == 0.5                  # FedBuff's 1 / sqrt(1 + s)
    assert staleness_weight(4, exponent=1.0) == 0.2
    assert staleness_weight(9, exponent=0.0) == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1)


def two_phones(availability=None, **options):
    durations = {"a": 1.0, "b": 2.5}
    return AsyncSchedule(seed=0, population=["a", "b"], duration_of=durations.__getitem__,
                         config=AsyncConfig(concurrency=2, **options), availability=availability)


def test_fedasync_by_hand():
    # a takes 1 s, b 2.5 s, both start at 0 from version 0; K = 1 applies every arrival
    s = two_phones(buffer_size=1)
    seen = []
    for _ in range(5):
        b = s.next_buffer()
        (arrival,) = b.arrivals
        seen.append((b.version, b.time, arrival.task.uid, arrival.task.start_version, arrival.staleness))
    assert seen == [(1, 1.0, "a", 0, 0),      # a restarts at 1 from version 1
                    (2, 2.0, "a", 1, 0),      # ... at 2 from version 2
                    (3, 2.5, "b", 0, 2),      # b trained from version 0 while two versions were made
                    (4, 3.0, "a", 2, 1),
                    (5, 4.0, "a", 4, 0)]
    assert s.now == 4.0 and s.version == 5


def test_max_staleness_discards_and_counts():
    s = two_phones(buffer_size=1, max_staleness=1)
    versions = [s.next_buffer() for _ in range(3)]
    # b's arrival at 2.5 is 2 versions stale: discarded, counted with the next version (a at 3.0)
    assert [(b.time, b.arrivals[0].task.uid, b.stale) for b in versions] == [(1.0, "a", 0), (2.0, "a", 0),
                                                                            (3.0, "a", 1)]


def test_fedbuff_buffers_k_arrivals_with_their_weights():
    s = two_phones(buffer_size=2)
    first = s.next_buffer()
    # a arrives at 1 and at 2 (its second task also from version 0: no version was made at 1)
    assert [(a.task.uid, a.task.start_version, a.staleness) for a in first.arrivals] == [("a", 0, 0), ("a", 0, 0)]
    assert first.version == 1 and first.time == 2.0 and first.started == 3 and first.dropped == first.stale == 0
    second = s.next_buffer()
    assert [(a.task.uid, a.staleness, a.weight) for a in second.arrivals] == [("b", 1, staleness_weight(1)),
                                                                             ("a", 0, 1.0)]
    record = async_update_record(second, previous_time=first.time, bytes_down=10, bytes_up=4)
    assert record == {"sim_time": 3.0, "round_s": 1.0, "selected": second.started, "completed": 2, "dropped": 0,
                      "stale": 0, "staleness_mean": 0.5, "staleness_max": 1, "bytes_down": 10 * second.started,
                      "bytes_up": 8}


class LeavesAt:
    """b is on-line until 2.0 and never again; a always."""

    def online_until(self, uid, t, draw):
        if uid == "a":
            return math.inf
        return 2.0 if t < 2.0 else None


def test_a_phone_going_off_line_drops_its_task_and_is_not_picked_again():
    s = two_phones(buffer_size=1, availability=LeavesAt())
    buffers = [s.next_buffer() for _ in range(4)]
    assert all(a.task.uid == "a" for b in buffers for a in b.arrivals)
    assert sum(b.dropped for b in buffers) == 1          # b's task (due at 2.5) ended when b left at 2.0
    assert [b.time for b in buffers] == [1.0, 2.0, 3.0, 4.0]


def population_setup(n=300, seed=4):
    users = [f"user{i:03d}" for i in range(n)]
    samples = {u: 5 + zlib.crc32(u.encode()) % 60 for u in users}
    profiles = BuiltinProfiles(seed=seed)

    def duration_of(uid):
        return client_timing(profiles.profile(uid), samples=samples[uid], bytes_down=400_000,
                             bytes_up=400_000).total_s
    return users, duration_of


def make_schedule(seed=4, availability=None, **options):
    users, duration_of = population_setup(seed=seed)
    settings = dict(concurrency=20, buffer_size=5, max_staleness=6)
    settings.update(options)
    return AsyncSchedule(seed=seed, population=users, duration_of=duration_of, config=AsyncConfig(**settings),
                         availability=availability)


NIGHTS_OFF = tuple([0.0] * 6 + [0.6] * 18)


def test_schedule_is_a_function_of_the_seed():
    runs = [[make_schedule(availability=RoundProbability(seed=4, probability=0.5)).next_buffer()
             for _ in range(40)] for _ in range(2)]
    assert runs[0] == runs[1]
    other = make_schedule(seed=5)
    assert [other.next_buffer() for _ in range(40)] != runs[0]


def test_a_user_never_trains_twice_at_once_and_versions_follow_virtual_order():
    s = make_schedule(availability=DailyPattern(seed=4, hourly=NIGHTS_OFF))
    tasks, last = [], 0.0
    for _ in range(60):
        b = s.next_buffer()
        assert b.time >= last and len(b.arrivals) == 5
        last = b.time
        for a in b.arrivals:
            assert a.task.start_version < b.version and a.staleness == b.version - 1 - a.task.start_version
            assert a.task.finish_time <= b.time
            tasks.append(a.task)
    by_user = {}
    for t in tasks:
        by_user.setdefault(t.uid, []).append((t.start_time, t.finish_time))
    for spans in by_user.values():
        spans.sort()
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("cut", [1, 7, 23])
def test_snapshot_and_restore_continue_identically(cut):
    availability = DailyPattern(seed=4, hourly=NIGHTS_OFF)     # nights with nobody on-line: retries
    whole = make_schedule(availability=availability)
    expected = [whole.next_buffer() for _ in range(40)]
    first = make_schedule(availability=availability)
    head = [first.next_buffer() for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))     # strict JSON, as a checkpoint
    resumed = make_schedule(availability=availability)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    assert head + [resumed.next_buffer() for _ in range(40 - cut)] == expected


def test_the_night_makes_the_schedule_wait():
    users = [f"user{i:02d}" for i in range(50)]
    s = AsyncSchedule(seed=1, population=users, duration_of=lambda uid: 700.0,
                      config=AsyncConfig(concurrency=2, buffer_size=1),
                      availability=DailyPattern(seed=1, hourly=NIGHTS_OFF))
    buffers = [s.next_buffer() for _ in range(400)]
    assert buffers[-1].time > 1.5 * 86400
    assert sum(b.dropped for b in buffers) > 0       # sessions end on the hour, tasks in flight drop out
    # nobody starts between midnight and 6 am, so no 700-second task ends between 00:11:40 and 6:00
    assert not [b for b in buffers if 700 < b.time % 86400 < 6 * 3600]
    # the first tasks start at 6 am, when the first phones come on-line
    assert min(a.task.start_time for a in buffers[0].arrivals) == 6 * 3600


def test_a_state_of_other_settings_is_refused():
    state = make_schedule().state_dict()
    with pytest.raises(ConfigError, match="concurrency"):
        make_schedule(concurrency=21).load_state_dict(state)
    with pytest.raises(ConfigError, match="format"):
        make_schedule().load_state_dict({**state, "format": 99})


class FlickersOff:
    """Every phone is on-line for the first half of each second only: a 10 s task never finishes."""

    def online_until(self, uid, t, draw):
        return math.floor(t) + 0.5 if t - math.floor(t) < 0.5 else None


def test_a_schedule_that_cannot_progress_raises_instead_of_hanging():
    s = AsyncSchedule(seed=0, population=["a", "b", "c"], duration_of=lambda uid: 10.0,
                      config=AsyncConfig(concurrency=2, buffer_size=1, max_idle_s=3600.0), availability=FlickersOff())
    with pytest.raises(ConfigError, match=r"no new version for \d+ virtual seconds after version 0 .*dropped out"):
        s.next_buffer()


def test_bad_settings():
    with pytest.raises(ConfigError, match="concurrency"):
        make_schedule(concurrency=0)
    with pytest.raises(ConfigError, match="staleness"):
        make_schedule(max_staleness=-1)
    with pytest.raises(ConfigError, match="exponent"):
        AsyncConfig(concurrency=1, buffer_size=1, staleness_exponent=math.inf)
    with pytest.raises(ConfigError, match="idle"):
        AsyncConfig(concurrency=1, buffer_size=1, max_idle_s=math.inf)
    one = AsyncConfig(concurrency=1, buffer_size=1)
    with pytest.raises(ConfigError, match="no users"):
        AsyncSchedule(seed=0, population=[], duration_of=lambda u: 1.0, config=one)
    with pytest.raises(ConfigError, match="user 'a': virtual duration nan"):
        AsyncSchedule(seed=0, population=["a"], duration_of=lambda u: math.nan, config=one)


# -- real training in any order: a toy model whose update depends on the start version's parameters ------

def local_update(params, uid):
    direction = np.random.default_rng(zlib.crc32(uid.encode())).standard_normal(params.shape)
    return 0.5 * (direction - params)                   # the "delta" a phone would send


def apply(params, buffer, deltas):
    total = np.zeros_like(params)
    for arrival, delta in zip(buffer.arrivals, deltas):     # the buffer's order, whatever the real order
        total += arrival.weight * delta
    return params + total / sum(a.weight for a in buffer.arrivals)


def run_any_order(order_seed, versions=30, depth=4):
    pending = PendingBuffers(make_schedule(availability=RoundProbability(seed=4, probability=0.7)))
    params = {0: np.zeros(8)}
    rng = np.random.default_rng(order_seed)
    while pending.applied < versions:
        work = pending.trainable(depth)
        assert all(t.start_version <= pending.applied for t in work)
        # ranks finish some of the trainable tasks, in a random real order
        rng.shuffle(work)
        for task in work[:max(1, int(len(work) * rng.uniform(0.2, 1.0)))]:
            pending.complete(task.task_id, local_update(params[task.start_version], task.uid))
        while (ready := pending.pop_ready()) is not None:
            buffer, deltas = ready
            params[buffer.version] = apply(params[buffer.version - 1], buffer, deltas)
    return params[versions], pending


def test_results_depend_on_the_schedule_not_on_the_real_order():
    serial = make_schedule(availability=RoundProbability(seed=4, probability=0.7))
    params = {0: np.zeros(8)}
    for _ in range(30):
        b = serial.next_buffer()
        params[b.version] = apply(params[b.version - 1], b,
                                  [local_update(params[a.task.start_version], a.task.uid) for a in b.arrivals])
    for order_seed in (0, 1, 2):
        got, _ = run_any_order(order_seed)
        assert np.array_equal(got, params[30])          # bit for bit


def test_pending_buffers_refuse_unknown_and_duplicate_results_and_checkpoint_the_applied_state():
    pending = PendingBuffers(make_schedule())
    (task, *_) = pending.trainable(1)
    pending.complete(task.task_id, "done")
    with pytest.raises(RefusedError, match="duplicate"):
        pending.complete(task.task_id, "again")
    with pytest.raises(RefusedError, match="no pending buffer"):
        pending.complete(10**6, "x")
    assert pending.pop_ready() is None                # the rest of version 1's buffer is missing
    ahead = pending.buffer(3)                         # runs the schedule ahead ...
    assert ahead.version == 3 and pending.applied == 0
    # ... but a checkpoint now holds the state as of the applied version
    fresh = make_schedule()
    assert pending.state_dict() == fresh.state_dict()
    with pytest.raises(ValueError, match="already applied"):
        pending.buffer(0)


def test_old_versions_are_kept_as_long_as_a_task_needs_them_and_checkpoints_hold_them():
    availability = RoundProbability(seed=4, probability=0.7)
    pending = PendingBuffers(make_schedule(availability=availability, max_staleness=None))
    done = set()
    while pending.applied < 12:
        for task in pending.trainable(3):
            assert task.start_version >= pending.oldest_needed_version()
            pending.complete(task.task_id, None)
            done.add(task.task_id)
        while pending.pop_ready() is not None:
            pass
    applied, kept = pending.applied, pending.checkpoint_versions()
    assert kept.stop == applied + 1 and kept.start < applied   # without a staleness limit, older ones too
    resumed = make_schedule(availability=availability, max_staleness=None)
    resumed.load_state_dict(pending.state_dict())
    old = 0
    for _ in range(30):
        for arrival in resumed.next_buffer().arrivals:
            if arrival.task.start_version <= applied:      # tasks started before the checkpoint
                assert arrival.task.start_version in kept
                old += 1
    assert old > 0
