"""Client selection (`--selection`): Oort's utilities, scores and pacer against hand computations,
power-of-choice, the reports on the wire, the options' errors, and real runs that select the same clients at
any -np and after a failure and --resume (synchronous rounds with over-selection and a deadline, FedBuff)."""
import json
import math

import numpy as np
import pytest

from application import main
from flock import Config, simulate
from flock.common.domain import ClientReport, RankUpdate
from flock.common.errors import RefusedError
from protos import convert
from scheduler.phones.availability import AlwaysOn
from scheduler.phones.selection import select_online
from scheduler.selection import make_selection
from scheduler.selection.base import Candidate, Known, SelectionRequest
from scheduler.selection.oort import (
    Oort,
    OortSettings,
    normalization,
    preferred_duration,
    statistical_utility,
    weighted_sample,
)
from scheduler.selection.power_of_choice import PowerOfChoice
from tests.helpers import (
    fail_at_round_3_then_resume,
    kill_after_train_rows,
    make_lm_data,
    read_metrics,
    records_at_np_1_and_2,
    run_app,
    stable,
)

SMALL = dict(rounds=6, clients_per_round=3, eval_every=3, seed=5, checkpoint_every=2, device_profiles="builtin")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"), users=30)


def request(candidates, count, round_=3, seed=0, population=None):
    return SelectionRequest(round=round_, count=count, candidates=tuple(candidates),
                            population=population or len(candidates), time=0.0, rng=np.random.default_rng(seed))


# -- Oort, by hand ------------------------------------------------------------------------------------------

def test_statistical_utility_is_samples_times_the_root_mean_square_loss():
    assert statistical_utility(ClientReport("a", samples=4, loss=1.2, loss_sq=2.25)) == 6.0     # 4 x sqrt(2.25)
    assert statistical_utility(ClientReport("b", samples=10, loss=1.0, loss_sq=1.0)) == 10.0


def test_a_report_takes_the_squares_from_the_trainer_or_the_mean_loss_squared():
    ratio = ("loss_sum", "tokens")
    with_squares = ClientReport.from_sums("u", {"samples": 3.0, "loss_sum": 6.0, "loss_sq_sum": 20.0, "tokens": 4.0}, ratio)
    assert (with_squares.samples, with_squares.loss, with_squares.loss_sq) == (3.0, 1.5, 5.0)
    assert ClientReport.from_sums("u", {"samples": 3.0, "loss_sum": 6.0, "tokens": 4.0}, ratio).loss_sq == 2.25
    assert ClientReport.from_sums("u", {"diverged": 1.0}, ratio) is None
    assert ClientReport.from_sums("u", {"samples": 3.0, "loss_sum": math.inf, "tokens": 4.0}, ratio) is None


def test_oort_scores_utility_staleness_and_the_slow_clients_penalty_by_hand():
    oort = Oort(settings=OortSettings(round_threshold=50, clip_bound=1.0, round_penalty=2))
    oort.round = 3
    oort.arms = {"a": [10.0, 1, 1], "b": [4.0, 1, 1], "c": [6.0, 2, 1]}
    durations = {"a": 10.0, "b": 20.0, "c": 40.0, "d": 30.0}
    # the preferred duration T: the 50th percentile of [10, 20, 30, 40], index int(4 x 0.5) = 2 -> 30 s
    oort._preferred = preferred_duration(list(durations.values()), 50)
    assert oort._preferred == 30.0
    # utilities [4, 6, 10]: clip at the top (bound 1.0) = 10, min 4 x 0.999 = 3.996, range 6.004
    assert normalization([10.0, 4.0, 6.0], 1.0) == (10.0, 3.996, pytest.approx(6.004))
    scores = oort.scores([Candidate(u, 1, durations[u], None) for u in "abc"])
    # a: (10 - 3.996) / 6.004 + sqrt(0.1 ln 3 / 1) = 1 + 0.331453
    # b: (4 - 3.996) / 6.004 + 0.331453 = 0.000666 + 0.331453
    # c: ((6 - 3.996) / 6.004 + sqrt(0.1 ln 3 / 2)) x (30 / 40)^2 = (0.333777 + 0.234373) x 0.5625
    assert scores == {"a": pytest.approx(1.331453, abs=1e-6), "b": pytest.approx(0.332119, abs=1e-6),
                      "c": pytest.approx(0.319584, abs=1e-6)}


def test_oort_pacer_relaxes_the_preferred_duration_when_utility_stalls_and_tightens_it_when_it_jumps():
    def pacer_after(utilities):
        oort = Oort(settings=OortSettings(pacer_step=2, pacer_delta=5, round_threshold=30))
        thresholds = []
        for round_, utility in enumerate(utilities, start=1):
            oort.round, oort.last_exploit, oort.reported = round_, ["x"], {"x"}
            oort.arms["x"] = [utility, round_ - 1, 1]
            oort.pace()
            thresholds.append(oort.threshold)
        return thresholds, oort.exploit_history
    # round 4 compares rounds 3-4's exploited utility with rounds 1-2's (each u / (1 + 1e-4))
    thresholds, history = pacer_after([10, 10, 10.5, 10.4])     # |20.9 - 20| <= 10% of 20: relax, T at 35%
    assert thresholds == [30, 30, 30, 35] and history[0] == pytest.approx(10 / 1.0001)
    assert pacer_after([1, 1, 10, 10])[0] == [30, 30, 30, 25]    # |20 - 2| >= 5 x 2: tighten
    assert pacer_after([10, 10, 13, 13])[0] == [30, 30, 30, 30]  # between: no change


def test_oort_exploits_and_explores_as_told_and_fills_from_the_best():
    explored = [Candidate(u, 5, 10.0, None) for u in ("a", "b", "c")]
    oort = Oort(settings=OortSettings(exploration_factor=0, exploration_min=0))
    oort.arms = {"a": [10.0, 1, 1], "b": [4.0, 1, 1], "c": [6.0, 1, 1]}
    assert sorted(oort.select(request(explored, 3))) == ["a", "b", "c"]
    assert oort.record()["oort_exploited"] == 3
    # all exploration: the unexplored ranked by samples x (T / t)^2 with T = the 30th percentile (10 s), window 1
    fresh = [Candidate("d", 5, 10.0, None), Candidate("e", 50, 100.0, None), Candidate("f", 20, 10.0, None)]
    oort = Oort(settings=OortSettings(exploration_factor=1, exploration_min=1, sample_window=1))
    assert sorted(oort.select(request(fresh, 2, round_=1))) == ["d", "f"]     # e: 50 x (10 / 100)^2 = 0.5
    # exploration wanted, nobody unexplored: the best-scored explored clients fill the round
    oort = Oort(settings=OortSettings(exploration_factor=1, exploration_min=1))
    oort.arms = {"a": [10.0, 1, 1], "b": [4.0, 1, 1], "c": [6.0, 1, 1]}
    assert oort.select(request(explored, 2)) == ["a", "c"]


def test_oort_gives_clients_that_brought_nothing_the_rounds_mean_utility_and_blacklists_the_most_picked():
    oort = Oort(settings=OortSettings(blacklist_rounds=1, blacklist_max_len=0.5))
    oort.observe(3, [ClientReport("a", 4, 1.0, 2.25), ClientReport("b", 10, 1.0, 1.0)], ["late"])
    assert oort.arms == {"a": [6.0, 3, 1], "b": [10.0, 3, 1], "late": [8.0, 3, 1]}
    oort.observe(4, [ClientReport("a", 4, 1.0, 1.0), ClientReport("b", 4, 1.0, 1.0)], [])
    assert oort.blacklist(population=2) == {"a"} and oort.blacklist(population=4) == {"a", "b"}


def test_weighted_sampling_without_replacement_puts_weightless_items_last():
    rng = np.random.default_rng(0)
    assert weighted_sample(["a", "b", "c"], [0.0, 0.0, 5.0], 1, rng) == ["c"]
    assert weighted_sample(["a", "b", "c"], [0.0, 0.0, 5.0], 3, rng) == ["c", "a", "b"]
    picks = [weighted_sample(["a", "b"], [3.0, 1.0], 1, rng)[0] for _ in range(4000)]
    assert picks.count("a") / 4000 == pytest.approx(0.75, abs=0.03)


def test_oort_state_survives_json_and_selects_the_same_next():
    candidates = [Candidate(f"u{i}", 1 + i % 5, 5.0 + 3 * i, None) for i in range(20)]
    original = Oort(settings=OortSettings(pacer_step=2))
    for round_ in range(1, 6):
        picked = original.select(request(candidates, 4, round_=round_, seed=round_))
        original.observe(round_, [ClientReport(u, 3, 1.0, 0.5 + i) for i, u in enumerate(picked[:3])], picked[3:])
    copy = Oort(settings=OortSettings(pacer_step=2))
    copy.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert copy.select(request(candidates, 4, round_=6, seed=9)) == original.select(request(candidates, 4, round_=6, seed=9))
    with pytest.raises(Exception, match="other --oort-"):
        Oort(settings=OortSettings(pacer_step=3)).load_state_dict(original.state_dict())


# -- power-of-choice and the scheduler's side ---------------------------------------------------------------

def test_power_of_choice_trains_the_highest_reported_losses_unseen_first():
    known = {"a": 1.0, "c": 3.0, "d": 2.0}
    candidates = [Candidate(u, 1, 1.0, Known(1, known[u], 1, 1, 1) if u in known else None) for u in "abcd"]
    assert PowerOfChoice(d=4).select(request(candidates, 2)) == ["b", "c"]
    assert PowerOfChoice(d=0).pool_size(5) == 10 and PowerOfChoice(d=7).pool_size(5) == 7


def test_a_pool_of_exactly_the_clients_asked_for_is_uniform_selections_draw():
    users = [f"u{i:03d}" for i in range(200)]
    selection = make_selection(Config(data_dir="x", device_profiles="builtin", selection="power-of-choice",
                                      selection_pool=8, clients_per_round=8, seed=3))
    got = selection.choose(purpose="sync", index=4, round=5, users=users, counts={u: 1 for u in users}, count=8,
                           availability=AlwaysOn(), t=0.0, duration_of=lambda u: 1.0)
    uniform = select_online(users, 8, seed=3, purpose="sync", index=4, availability=AlwaysOn(), t=0.0)
    assert got.uids == uniform.uids and got.online_until == uniform.online_until


def test_the_scheduler_refuses_reports_of_clients_the_round_did_not_train():
    selection = make_selection(Config(data_dir="x", device_profiles="builtin", selection="oort"))
    selection.expect(1, [(-1, "a")], ["b"])
    assert selection.finish(1, [ClientReport("z", 1, 1, 1)])[1].startswith("round 1: client reports for z")
    selection.expect(1, [(-1, "a")], ["b"])
    fields, failure = selection.finish(1, [ClientReport("a", 2, 1.0, 4.0)])
    assert failure is None and fields["oort_explored"] == 0
    assert selection.selector.arms == {"a": [4.0, 1, 1], "b": [4.0, 1, 1]}      # b: the round's mean
    assert selection.known["a"] == Known(samples=2, loss=1.0, loss_sq=4.0, round=1, reports=1)


def test_reports_cross_the_wire_and_non_finite_ones_are_refused():
    reports = (ClientReport("u1", 3.0, 1.5, 2.5), ClientReport("u2", 7.0, 0.25, 0.125, task_id=9))
    update = RankUpdate(step=2, rank=1, weight=10.0, delta_sum=np.zeros(0), sums={"clients": 2.0}, reduced=True,
                        clients=reports)
    assert convert.update_from_chunks(list(convert.update_chunks(update)), 5).clients == reports
    bad = RankUpdate(step=2, rank=1, weight=1.0, delta_sum=np.zeros(0), clients=(ClientReport("u", 1, math.nan, 1),))
    with pytest.raises(RefusedError, match="report of client 'u'"):
        convert.update_from_chunks(list(convert.update_chunks(bad)), 5)


# -- options ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--selection", "bogus"], "--selection must be one of uniform, oort, power-of-choice or module:Class"),
    (["--selection", "oort"], "--selection oort chooses among on-line phones"),
    (["--oort-pacer-step", "3"], "--oort-pacer-step is for --selection oort, not uniform"),
    (["--selection", "power-of-choice", "--device-profiles", "builtin", "--oort-round-penalty", "1"],
     "--oort-round-penalty is for --selection oort"),
    (["--selection", "power-of-choice", "--device-profiles", "builtin", "--selection-pool", "12",
      "--over-select", "1.3"], "--selection-pool 12 is fewer than the 13 phones a round asks for"),
    (["--selection", "oort", "--device-profiles", "builtin", "--dp-clip", "1", "--dp-noise-multiplier", "1"],
     "--selection oort: not with DP noise"),
    (["--selection", "oort", "--device-profiles", "builtin", "--dp-clip", "1", "--secagg"],
     "--selection oort: not with --secagg"),
    (["--selection", "oort", "--device-profiles", "builtin", "--oort-exploration-min", "1.5"],
     "--oort-exploration-min must be at most 1, got 1.5"),
    (["--selection", "oort", "--device-profiles", "builtin", "--oort-exploration-factor", "0.2"],
     "--oort-exploration-min 0.3 is above --oort-exploration-factor 0.2"),
])
def test_bad_selection_options_are_one_error_line(args, message, capsys):
    assert main(["data", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


@pytest.mark.parametrize("name, message", [("tests.nosuch:X", "cannot import module 'tests.nosuch'"),
                                           ("tests.selection_plugins:NoConfig", "must take config= keyword")])
def test_a_bad_selection_plug_in_is_one_error_line_before_anything_is_written(data, tmp_path, capsys, name, message):
    run = tmp_path / "run"
    assert main([str(data), "--run-dir", str(run), "--device-profiles", "builtin", "--selection", name, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --selection") and message in err[0], err
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()


# -- real runs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregator", ["median", "qfedavg"])
def test_selection_feeds_on_the_per_client_paths_reports_too(data, tmp_path, aggregator):
    """A per-client aggregator's round reports its clients to the selector as the linear path does."""
    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / aggregator), **SMALL,
                              selection="power-of-choice", aggregator=aggregator))
    assert len(history.train) == 6 and all(r["clients"] == 3 for r in history.train)
    assert all(len(r["selection_users"]) == 3 for r in history.train)

def test_oort_and_power_of_choice_runs_record_their_choices(data, tmp_path):
    for name in ("oort", "power-of-choice"):
        history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / name), **SMALL, selection=name,
                                  over_select=1.5, deadline=40.0))
        train = history.train
        assert all(len(r["selection_users"]) == r["selected"] == 5 for r in train)
        assert all(r["clients"] <= 3 for r in train) and train[-1]["sim_time"] > 0
        if name == "oort":
            assert train[0]["oort_explored"] == 5 and sum(r["oort_exploited"] for r in train) > 0
            assert all(r["selection_pool"] == 30 for r in train)


@pytest.mark.parametrize("extra", [dict(selection="oort", over_select=1.5, deadline=40.0),
                                   dict(selection="oort", async_buffer=2, async_concurrency=4),
                                   dict(selection="tests.selection_plugins:MostSamples", async_buffer=2,
                                        async_concurrency=4)],
                         ids=["oort-sync", "oort-fedbuff", "plugin-fedbuff"])
def test_a_failed_run_resumes_with_the_same_selection(data, tmp_path, monkeypatch, extra):
    whole, cut, _ = fail_at_round_3_then_resume(data, tmp_path, monkeypatch, **SMALL, **extra)
    assert stable(read_metrics(cut)) == stable(whole.records)
    if "async_buffer" not in extra:
        assert {u for r in whole.train for u in r["selection_users"]}     # the choices are in the rows compared


@pytest.mark.mpi
@pytest.mark.parametrize("extra", [("--over-select=1.5", "--deadline=40"),
                                   ("--async-buffer=2", "--async-concurrency=4", "--oort-exploration-factor=0.5")],
                         ids=["sync", "fedbuff"])
def test_oort_selects_the_same_clients_at_any_number_of_ranks(data, tmp_path, extra):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()] + ["--selection=oort", *extra]
    pairs = records_at_np_1_and_2(data, tmp_path, args)
    for a, b in pairs:
        assert a.get("selection_users") == b.get("selection_users")
    assert any(a.get("oort_exploited") for a, _ in pairs), "Oort never exploited what it learned"


@pytest.mark.mpi
@pytest.mark.parametrize("extra", [("--over-select=1.5", "--deadline=40"),
                                   ("--async-buffer=2", "--async-concurrency=4")], ids=["sync", "fedbuff"])
def test_oort_sigkill_then_resume_selects_what_an_uninterrupted_run_does(data, tmp_path, extra):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()] + [
        "--selection=oort", "--trainer=tests.faulty:SlowTrainer", *extra]
    whole = run_app(2, data, tmp_path / "whole", *args, timeout=180)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    cut = tmp_path / "cut"
    done = kill_after_train_rows(2, data, cut, *args)
    assert 3 <= done < 6, "the kill came too late"
    resumed = run_app(2, data, cut, "--resume", str(cut), timeout=180)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stdout + resumed.stderr
    assert stable(read_metrics(cut)) == stable(read_metrics(tmp_path / "whole"))
