import pytest

from flock.common.domain import assign_users, home_rank
from scheduler.sampling import evaluation_users, sample_clients
from scheduler.state import schedule

USERS = [f"u{i}" for i in range(50)]


def test_sampling_is_without_replacement_and_seeded():
    a = sample_clients(7, 3, USERS, 10)
    assert len(a) == len(set(a)) == 10
    assert set(a) <= set(USERS)
    assert a == sample_clients(7, 3, USERS, 10)
    assert a != sample_clients(7, 4, USERS, 10)
    assert a != sample_clients(8, 3, USERS, 10)
    assert sorted(sample_clients(0, 0, USERS, 50)) == sorted(USERS)


def test_sampling_more_than_users_is_refused():
    with pytest.raises(ValueError, match="cannot sample 51"):
        sample_clients(0, 0, USERS, 51)


def test_sampling_is_uniform_over_many_rounds():
    counts = {u: 0 for u in USERS}
    for r in range(2000):
        for u in sample_clients(1, r, USERS, 10):
            counts[u] += 1
    # each user is expected 400 times; a uniform sampler stays well inside +-25%
    assert min(counts.values()) > 300 and max(counts.values()) < 500


def test_evaluation_subset_is_fixed_and_ordered():
    sub = evaluation_users(0, USERS, 5)
    assert len(sub) == 5 and sub == sorted(sub, key=USERS.index)
    assert sub == evaluation_users(0, USERS, 5)
    assert evaluation_users(0, USERS, 0) == USERS


def test_home_rank_is_stable_and_assignment_covers_every_user():
    assert home_rank("alice", 4) == home_rank("alice", 4)
    users, counts = USERS[:10], list(range(10, 0, -1))
    for pinned in (True, False):
        parts = assign_users(users, counts, 3, pinned=pinned)
        assert sorted(u for p in parts for u in p) == sorted(users)
    pinned = assign_users(users, counts, 3, pinned=True)
    assert all(home_rank(u, 3) == r for r, part in enumerate(pinned) for u in part)
    balanced = assign_users(users, counts, 2, pinned=False)
    loads = [sum(counts[users.index(u)] for u in part) for part in balanced]
    assert abs(loads[0] - loads[1]) <= max(counts)


def test_schedule_evaluates_every_k_rounds_and_at_the_end():
    assert schedule(5, 2) == [("train", 0), ("train", 1), ("eval", 2), ("train", 2), ("train", 3), ("eval", 4),
                              ("train", 4), ("eval", 5), ("done", 5)]
    assert schedule(2, 0) == [("train", 0), ("train", 1), ("eval", 2), ("done", 2)]
