"""Real jobs with DP-FedAvg, compression and secure aggregation: the same metrics at -np 1 and 2, and a job
killed mid-run and resumed (accountant, error-feedback residuals) ends as an uninterrupted one."""
import pytest

from tests.helpers import kill_then_resume, make_lm_data, read_metrics, run_app

pytestmark = pytest.mark.mpi

KEYS = ("loss", "top1", "top1_user_mean", "samples", "clients", "tokens", "epsilon", "bytes_up", "bytes_down")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


def assert_same(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert [(r["kind"], r["round"]) for r in a] == [(r["kind"], r["round"]) for r in b]
    for x, y in zip(a, b):
        for key in KEYS:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-7), (x["kind"], x["round"], key)


@pytest.mark.parametrize("options", [
    ("--dp-clip", "0.5", "--dp-noise-multiplier", "0.8", "--compress-down", "q8", "--server-opt", "fedadam",
     "--server-lr", "0.05"),
    ("--dp-clip", "0.5", "--dp-noise-multiplier", "0.5", "--compress-up", "topk:0.1", "--private", "decoder.bias",
     "--prox-mu", "0.1"),
    ("--dp-clip", "0.5", "--secagg", "--secagg-bits", "20", "--dp-local", "--dp-noise-multiplier", "0.3"),
], ids=["dp-q8down-fedadam", "dp-topk-private-fedprox", "secagg-localdp"])
def test_same_seed_same_metrics_at_one_and_two_ranks(data, tmp_path, options):
    args = ("--rounds", "4", "--clients-per-round", "4", "--eval-every", "2", "--seed", "3", *options)
    runs = {}
    for np_ in (1, 2):
        proc = run_app(np_, data, tmp_path / f"np{np_}", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[np_] = read_metrics(tmp_path / f"np{np_}")
    assert_same(runs[1], runs[2])
    train = [r for r in runs[1] if r["kind"] == "train"]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in train)
    assert ("epsilon" in train[-1]) == ("--dp-noise-multiplier" in options)


ARGS = ("--rounds", "6", "--clients-per-round", "4", "--eval-every", "2", "--checkpoint-every", "2", "--seed", "5",
        "--trainer", "tests.faulty:SlowTrainer", "--dp-clip", "0.5", "--dp-noise-multiplier", "0.7",
        "--compress-up", "topk:0.05")


def test_sigkill_then_resume_with_dp_and_error_feedback_matches_an_uninterrupted_run(data, tmp_path):
    """No private parameters: the residuals alone make the memory store keep snapshots and pin the users."""
    whole = tmp_path / "whole"
    proc = run_app(2, data, whole, *ARGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "privacy: epsilon" in proc.stdout + proc.stderr
    cut = tmp_path / "cut"
    done, resumed = kill_then_resume(2, data, cut, *ARGS)
    assert 3 <= done < 6, "the kill came too late"
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    assert_same(read_metrics(whole), read_metrics(cut), rel=1e-6)
    # the residuals matter: without them (a fresh store) the resumed run would differ
    assert any((cut / "private").glob("rank*-memory-round*.npz"))
