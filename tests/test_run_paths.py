"""Paths the README leans on, run in-process through `flock.simulate`: the centralized baseline, the memory
store's resume with private parameters, SQLite with two shard threads, and a pinned home rank."""
import pytest

from flock import Config, read_metrics, simulate
from flock.common.domain import home_rank
from tests.helpers import make_lm_data

SMALL = dict(rounds=4, clients_per_round=4, eval_every=2, seed=7, checkpoint_every=2)
VOLATILE = ("seconds", "time", "clients_per_s", "rank_work_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


def stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def test_home_rank_is_pinned():
    # users' private parameters live on disk by rank: the function must never change
    assert [home_rank(f"user{u:02d}", 4) for u in range(6)] == [2, 0, 2, 0, 3, 1]
    assert home_rank("t2_abc", 3) == home_rank("t2_abc", 3) and home_rank("x", 1) == 0


def test_the_centralized_baseline_trains_and_evaluates(data, tmp_path):
    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path), centralized=True, **SMALL))
    assert [(r["kind"], r["round"]) for r in history.records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert all(r["samples"] > 0 and r["loss"] > 0 for r in history.train)
    assert history.evals[-1]["users"] == 12 and 0 < history.evals[-1]["top1"] < 1
    assert history.evals[-1]["loss"] < history.evals[0]["loss"] + 0.5


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_private_parameters_resume_exactly(data, tmp_path, monkeypatch, store):
    options = dict(private=("decoder.bias",), data_server=store, trainer="tests.faulty:FailFromRound3IfAsked",
                   shards=2, **SMALL)
    whole = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "whole"), **options))
    monkeypatch.setenv("FLOCK_TEST_FAIL", "1")
    with pytest.raises(Exception, match="injected failure from round 3"):
        simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "cut"), **options))
    monkeypatch.delenv("FLOCK_TEST_FAIL")
    simulate(Config(resume=str(tmp_path / "cut")))
    assert stable(read_metrics(tmp_path / "cut")) == stable(whole.records)


def test_sqlite_with_two_shard_threads_equals_one_shard(data, tmp_path):
    runs = [simulate(Config(data_dir=str(data), run_dir=str(tmp_path / f"s{n}"), private=("decoder.bias",),
                            data_server="sqlite", shards=n, **SMALL)) for n in (1, 2)]
    one, two = (stable(r.records) for r in runs)
    for a, b in zip(one, two, strict=True):
        for key, value in a.items():
            assert b[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
