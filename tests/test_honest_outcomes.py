"""Outcomes a run reports must be true: epsilon with phones that come and go, rounds that failed, a resumed run
that continues for more rounds, and hostile input (OS refusals, self-contradicting data, unbounded counts,
plug-ins of the wrong kind) ending in one `error:` line, from the command line and from config files."""
import json
import math
import zlib

import numpy as np
import pytest

from flock import simulate
from flock.channel.accounting import accounting_of
from flock.common.config import FIELDS, Config, parse_config
from flock.common.errors import ConfigError, DataError, RunFailed
from reader.leaf import parse_leaf_reddit
from reader.vocab import load_vocab
from scheduler.phones.availability import AlwaysOn
from scheduler.phones.devices import BuiltinProfiles
from scheduler.phones.rounds import PhoneRounds
from scheduler.phones.sync_round import resolve_sync_round
from tests.helpers import make_lm_data, read_metrics, run_app

VOLATILE = ("seconds", "time", "clients_per_s", "rank_work_s")
# 6 rounds of 4 phones in which 4 fail: late phones and phones in time but voided by the failure
FAILING = dict(rounds=6, clients_per_round=4, eval_every=0, seed=5, checkpoint_every=0, device_profiles="builtin",
               deadline=8.0, min_clients=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"), users=30)


def stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def one_error(proc, expected: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.count("error: ") == 1 and expected in out, out
    assert "Traceback" not in out and "ERROR" not in out, out
    return out


# -- epsilon with phones ----------------------------------------------------------------------------------------

class HalfAlwaysOn:
    """Users 0-19 always on-line, the rest on-line for one selection in ten: what --availability traces do."""

    def online_until(self, uid: str, t: float, draw: int):
        if int(uid[4:]) < 20:
            return math.inf
        return math.inf if zlib.crc32(f"{uid}/{draw}".encode()) % 10 == 0 else None


def test_the_accountants_rate_bounds_what_the_scheduler_samples_when_phones_come_and_go():
    """The scheduler's own planning over 400 rounds: a phone that is always on-line takes part far more often
    than K / population (the rate the accountant used before), and never more often than the recorded rates."""
    users = [f"user{i:03d}" for i in range(200)]
    phones = PhoneRounds(profiles=BuiltinProfiles(seed=3), availability=HalfAlwaysOn(), seed=3, count_online=True)
    taken = dict.fromkeys(users, 0)
    rates = []
    for r in range(400):
        planned = phones.plan_round(r, users, dict.fromkeys(users, 5), 10, start_time=0.0, shared_params=1000)
        online, asked = planned.sampling
        rates.append(min(1.0, asked / online))
        for uid in planned.trained:
            taken[uid] += 1
    always_on = np.array([taken[u] for u in users[:20]]) / 400
    mean_rate = float(np.mean(rates))
    assert always_on.mean() > 2.5 * 10 / 200                 # the old rate was far too small for them
    assert always_on.mean() == pytest.approx(mean_rate, rel=0.1)      # the recorded rate is theirs
    assert always_on.max() <= mean_rate + 4 * math.sqrt(mean_rate / 400)
    assert max(taken.values()) / 400 <= mean_rate + 4 * math.sqrt(mean_rate / 400)


def test_over_selection_raises_the_accountants_cohort_to_the_candidates_asked_for():
    config = Config(data_dir="x", device_profiles="builtin", over_select=1.5, dp_clip=1.0, dp_noise_multiplier=1.0)
    accounting = accounting_of(config, 1.0, population=100)
    assert (accounting.cohort, accounting.population, accounting.per_round) == (15, 100, False)
    assert accounting_of(Config(data_dir="x", dp_clip=1.0, dp_noise_multiplier=1.0), 1.0, 100).cohort == 10


@pytest.mark.mpi
def test_epsilon_with_availability_is_composed_from_each_rounds_own_rate(data, tmp_path):
    import dp_accounting as dpa
    from dp_accounting import rdp

    proc = run_app(2, data, tmp_path / "run", "--rounds", "4", "--clients-per-round", "4", "--eval-every", "2",
                   "--device-profiles", "builtin", "--availability", "round:0.4", "--dp-clip", "1",
                   "--dp-noise-multiplier", "1.2", "--checkpoint-every", "0", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    accountant = rdp.RdpAccountant()
    for r in train:         # the online count is what the scheduler saw: rate = 4 / online, composed in order
        online = round(4 / r["dp_sampling_rate"])
        accountant.compose(dpa.PoissonSampledDpEvent(4 / online, dpa.GaussianDpEvent(1.2)))
        assert r["epsilon"] == accountant.get_epsilon(1e-5)
    assert all(r["dp_sampling_rate"] > 4 / 30 for r in train)       # on-line users are fewer than the population
    privacy = json.loads((tmp_path / "run" / "config.json").read_text())["privacy"]
    assert privacy["sampling"].startswith("per round: min(1, c / m)")


@pytest.mark.parametrize("extra", [["--dp-target-epsilon", "3"], ["--dp-noise-multiplier", "1", "--dp-population",
                                                                    "1000"]])
def test_fixed_rates_with_phones_that_come_and_go_are_refused(extra, tmp_path):
    argv = ["data", "--device-profiles", "builtin", "--availability", "round:0.5", "--dp-clip", "1", *extra]
    with pytest.raises(ConfigError, match="each round's own rate"):
        parse_config(argv)
    config = tmp_path / "dp.toml"
    config.write_text('availability = "round:0.5"\ndevice-profiles = "builtin"\n')
    with pytest.raises(ConfigError, match=f"--availability from --config {config}"):
        parse_config(["data", "--config", str(config), "--dp-clip", "1", *extra])


# -- failed rounds ----------------------------------------------------------------------------------------------

def test_a_failed_round_counts_late_phones_apart_from_phones_in_time():
    outcome = resolve_sync_round(["a", "b", "c", "d"], [1.0, 2.0, 9.0, 12.0], [math.inf] * 4, start_time=0.0, k=4,
                                 deadline_s=5.0, min_clients=3)
    assert outcome.failed and outcome.trained == ()
    assert outcome.voided == ("a", "b") and outcome.discarded == ("c", "d")


def test_a_run_with_failed_rounds_says_how_many(data, tmp_path, capsys):
    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path), **FAILING))
    rows = [(r["failed"], r["stale"], r["voided"], r["completed"]) for r in history.train]
    assert rows == [(0, 2, 0, 2), (1, 3, 1, 0), (1, 3, 1, 0), (1, 3, 1, 0), (1, 4, 0, 0), (0, 2, 0, 2)]
    assert history.evals[-1]["failed_rounds"] == 4
    last = capsys.readouterr().out.strip().splitlines()[-1]       # the final evaluation line says it
    assert last.startswith("eval @ round 6") and last.endswith("(4 of 6 rounds failed: nothing applied)")


@pytest.mark.mpi
def test_a_run_in_which_no_round_applies_exits_2_from_the_command_line_and_a_config_file(data, tmp_path):
    expected = "no round was applied: all 3 training rounds failed"
    proc = run_app(2, data, tmp_path / "cli", "--rounds", "3", "--device-profiles", "builtin", "--deadline", "2",
                   "--min-clients", "3", "--eval-every", "0", timeout=120)
    one_error(proc, expected)
    config = tmp_path / "failing.yaml"
    config.write_text("rounds: 3\ndevice-profiles: builtin\ndeadline: 2\nmin-clients: 3\n")
    one_error(run_app(2, data, tmp_path / "file", "--config", str(config), timeout=120), expected)
    assert "eval" not in [r["kind"] for r in read_metrics(tmp_path / "file")]     # no untrained model reported


def test_a_run_in_which_no_round_applies_raises_in_python(data, tmp_path):
    with pytest.raises(RunFailed, match="no round was applied"):
        simulate(Config(data_dir=str(data), run_dir=str(tmp_path), **{**FAILING, "deadline": 2.0, "min_clients": 3}))


# -- resuming for more rounds ---------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_a_finished_run_continues_for_more_rounds_as_if_never_stopped(data, tmp_path):
    common = ("--clients-per-round", "4", "--eval-every", "2", "--checkpoint-every", "2", "--seed", "3")
    assert run_app(2, data, tmp_path / "whole", "--rounds", "5", *common).returncode == 0
    assert run_app(2, data, tmp_path / "cut", "--rounds", "3", *common).returncode == 0
    config = tmp_path / "more.toml"
    config.write_text("rounds = 5\n")
    proc = run_app(2, "", tmp_path / "cut", "--resume", str(tmp_path / "cut"), "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stable(read_metrics(tmp_path / "cut")) == stable(read_metrics(tmp_path / "whole"))
    with np.load(tmp_path / "cut" / "checkpoint.npz") as a, np.load(tmp_path / "whole" / "checkpoint.npz") as b:
        assert np.array_equal(a["params"], b["params"])
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["rounds"] == 5
    # any other option that differs is refused, each named; nothing of the run is touched
    before = (tmp_path / "cut" / "metrics.jsonl").read_bytes()
    one_error(run_app(2, "", tmp_path / "cut", "--resume", str(tmp_path / "cut"), "--lr", "0.5", "--seed", "4"),
              "--lr 0.5 (saved: 1.0); --seed 4 (saved: 3): a resumed run keeps its options")
    one_error(run_app(2, "", tmp_path / "cut", "--resume", str(tmp_path / "cut"), "--rounds", "4"),
              "--rounds 4: the run has done 5 rounds already")
    assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == before


def test_resume_options_from_a_config_file_name_the_file(data, tmp_path):
    run = tmp_path / "run"
    simulate(Config(data_dir=str(data), run_dir=str(run), rounds=2, clients_per_round=3, eval_every=0))
    config = tmp_path / "other.json"
    config.write_text(json.dumps({"lr": 0.25, "rounds": 4}))
    with pytest.raises(ConfigError, match=rf"--lr 0.25 \(saved: 1.0\).*\(--lr from --config {config}\)"):
        parse_config(["--resume", str(run), "--config", str(config)])
    assert parse_config(["--resume", str(run), "--rounds", "4"]).rounds == 4
    # an option given on the command line with its default value is still a change
    assert parse_config(["--resume", str(run), "--eval-every", "10"]).eval_every == 10
    with pytest.raises(ConfigError, match="--clients-per-round 10 \\(saved: 3\\)"):
        parse_config(["--resume", str(run), "--clients-per-round", "10"])
    with pytest.raises(ConfigError, match="a resumed run continues in its own folder"):
        parse_config(["--resume", str(run), "--run-dir", str(tmp_path / "elsewhere")])


# -- hostile input ------------------------------------------------------------------------------------------------

def test_every_numeric_option_has_an_upper_bound():
    unbounded = [name for name, f in FIELDS.items() if isinstance(f.default, (int, float))
                 and not isinstance(f.default, bool) and f.metadata.get("hi") is None]
    assert unbounded == []


@pytest.mark.parametrize("option, value", [("rounds", 99999999999999), ("clients-per-round", 10**12),
                                           ("eval-users", 10**13), ("checkpoint-every", 10**15)])
def test_huge_counts_are_refused_from_the_command_line_and_config_files(option, value, tmp_path):
    with pytest.raises(ConfigError, match=f"--{option} must be at most"):
        parse_config(["data", f"--{option}", str(value)])
    config = tmp_path / "big.json"
    config.write_text(json.dumps({option: value}))
    with pytest.raises(ConfigError, match=f"--config {config}: '{option}': --{option} must be at most"):
        parse_config(["data", "--config", str(config)])


def test_a_cross_option_error_from_a_config_file_names_the_file(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text("min-clients = 12\n")
    with pytest.raises(ConfigError, match=f"need phones.*\\(--min-clients from --config {config}\\)"):
        parse_config(["data", "--config", str(config)])


@pytest.mark.mpi
def test_os_refusals_and_wrong_plugins_are_one_error_line_at_np_2(data, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    one_error(run_app(2, data, a_file, "--rounds", "1"), f"--run-dir {a_file}: exists and is not a folder")
    one_error(run_app(2, data, a_file / "sub", "--rounds", "1"), f"--run-dir {a_file / 'sub'}: cannot create")
    config = tmp_path / "paths.yaml"
    config.write_text(f"run-dir: {a_file}\nrounds: 1\n")
    proc = run_app(2, data, a_file, "--config", str(config))
    one_error(proc, "exists and is not a folder")
    one_error(run_app(2, a_file, tmp_path / "r1", "--rounds", "1"), f"DATA_DIR {a_file}: not a folder")
    one_error(run_app(2, data, tmp_path / "r2", "--rounds", "1", "--flower-client", "os:system"),
              "--flower-client 'os:system': not a client_fn")


@pytest.mark.mpi
def test_a_start_that_fails_leaves_nothing_that_blocks_the_next_attempt(data, tmp_path):
    users = [f"user{u:02d}" for u in range(30)]
    table = tmp_path / "profiles.csv"
    table.write_text("user,ms_per_sample,downlink_kbps,uplink_kbps\n" + "".join(f"{u},10,20000,5000\n"
                                                                               for u in users[:-2]))
    run = tmp_path / "run"
    one_error(run_app(2, data, run, "--rounds", "2", "--device-profiles", str(table)),
              f"{table}: no entry for 2 of the training day 20200101's users (first: 'user28')")
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint.npz").exists()
    proc = run_app(2, data, run, "--rounds", "2", "--device-profiles", "builtin", "--eval-users", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def leaf_file(tmp_path, doc: dict):
    path = tmp_path / "train_data.json"
    path.write_text(json.dumps(doc))
    return path


def test_leaf_data_that_contradicts_itself_is_refused_naming_the_file_and_user(data, tmp_path):
    vocab = load_vocab(data / "vocab.json")
    comment = [["<BOS>", "w1", "<EOS>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>"]]
    user = {"x": [comment, comment], "y": [{"target_tokens": comment}] * 2}
    good = {"users": ["a", "b"], "num_samples": [2, 2], "user_data": {"a": user, "b": user}}
    assert parse_leaf_reddit(leaf_file(tmp_path, good), vocab)[1].tolist() == [2, 2]
    cases = [({**good, "num_samples": [2, 3]}, "user 'b': num_samples says 3 but user_data has 2 comments"),
             ({**good, "num_samples": [2]}, "'num_samples' must be a list with one count per user"),
             ({**good, "users": ["a"], "num_samples": [2]}, "1 user(s) have user_data but are not in 'users' "
                                                            "(first: 'b')"),
             ({**good, "users": ["a", "b", "c"], "num_samples": [2, 2, 2]}, "user 'c' is listed in 'users' but has "
                                                                            "no user_data")]
    for doc, message in cases:
        path = leaf_file(tmp_path, doc)
        with pytest.raises(DataError) as caught:
            parse_leaf_reddit(path, vocab)
        assert str(path) in str(caught.value) and message in str(caught.value)


def test_a_leaf_import_refuses_unlisted_users(tmp_path):
    from reader.leaf_reddit import import_leaf_reddit

    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "test").mkdir()
    user = {"x": [[["w"] * 10]], "y": [{"target_tokens": [["w"] * 10]}]}
    (src / "train" / "a.json").write_text(json.dumps({"users": ["a"], "user_data": {"a": user, "b": user}}))
    (src / "test" / "a.json").write_text(json.dumps({"users": ["a"], "user_data": {"a": user}}))
    with pytest.raises(DataError, match="user\\(s\\) have user_data but are not in 'users' \\(first: 'b'\\)"):
        import_leaf_reddit(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_always_on_phones_need_no_count(data):
    phones = PhoneRounds(profiles=BuiltinProfiles(seed=1), availability=AlwaysOn(), seed=1)
    planned = phones.plan_round(0, ["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, 2, start_time=0.0, shared_params=10)
    assert planned.sampling is None
