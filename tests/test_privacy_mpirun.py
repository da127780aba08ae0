"""Real jobs with DP-FedAvg, compression and secure aggregation: the same metrics at -np 1 and 2, and a job
killed mid-run and resumed (accountant, error-feedback residuals, adaptive clipping's norm) ends as an
uninterrupted one."""
import json
import math

import pytest

from tests.helpers import kill_then_resume, make_lm_data, read_metrics, run_app

pytestmark = pytest.mark.mpi

KEYS = ("loss", "top1", "top1_user_mean", "samples", "clients", "tokens", "epsilon", "bytes_up", "bytes_down",
        "dp_clip", "dp_unclipped_fraction")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


def assert_same(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    assert [(r["kind"], r["round"]) for r in a] == [(r["kind"], r["round"]) for r in b]
    for x, y in zip(a, b):
        for key in KEYS:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-7), (x["kind"], x["round"], key)


def at_one_and_two_ranks(data, tmp_path, args: tuple[str, ...]) -> dict[int, list[dict]]:
    """The metrics of the same job at -np 1 and -np 2 (in tmp_path / "np1", "np2"), both run to the end."""
    runs = {}
    for np_ in (1, 2):
        proc = run_app(np_, data, tmp_path / f"np{np_}", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[np_] = read_metrics(tmp_path / f"np{np_}")
    return runs


@pytest.mark.parametrize("options", [
    ("--dp-clip", "0.5", "--dp-noise-multiplier", "0.8", "--compress-down", "q8", "--server-opt", "fedadam",
     "--server-lr", "0.05"),
    ("--dp-clip", "0.5", "--dp-noise-multiplier", "0.5", "--compress-up", "topk:0.1", "--private", "decoder.bias",
     "--prox-mu", "0.1"),
    ("--dp-clip", "0.5", "--secagg", "--secagg-bits", "20", "--dp-local", "--dp-noise-multiplier", "0.3"),
], ids=["dp-q8down-fedadam", "dp-topk-private-fedprox", "secagg-localdp"])
def test_same_seed_same_metrics_at_one_and_two_ranks(data, tmp_path, options):
    args = ("--rounds", "4", "--clients-per-round", "4", "--eval-every", "2", "--seed", "3", *options)
    runs = at_one_and_two_ranks(data, tmp_path, args)
    assert_same(runs[1], runs[2])
    train = [r for r in runs[1] if r["kind"] == "train"]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in train)
    assert ("epsilon" in train[-1]) == ("--dp-noise-multiplier" in options)


ARGS = ("--rounds", "6", "--clients-per-round", "4", "--eval-every", "2", "--checkpoint-every", "2", "--seed", "5",
        "--trainer", "tests.faulty:SlowTrainer", "--dp-clip", "0.5", "--dp-noise-multiplier", "0.7",
        "--compress-up", "topk:0.05")


def whole_and_resumed(data, tmp_path, args: tuple[str, ...], summary: str) -> tuple[list[dict], list[dict]]:
    """The metrics of an uninterrupted 2-rank job (whose last lines hold `summary`) and of the same job
    SIGKILLed mid-run (in tmp_path / "cut") and resumed, after checking that both ran as they should."""
    whole = tmp_path / "whole"
    proc = run_app(2, data, whole, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary in proc.stdout + proc.stderr
    cut = tmp_path / "cut"
    done, resumed = kill_then_resume(2, data, cut, *args)
    assert 3 <= done < 6, "the kill came too late"
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    return read_metrics(whole), read_metrics(cut)


def test_sigkill_then_resume_with_dp_and_error_feedback_matches_an_uninterrupted_run(data, tmp_path):
    """No private parameters: the residuals alone make the memory store keep snapshots and pin the users."""
    whole, cut = whole_and_resumed(data, tmp_path, ARGS, "privacy: epsilon")
    assert_same(whole, cut, rel=1e-6)
    # the residuals matter: without them (a fresh store) the resumed run would differ
    assert any((tmp_path / "cut" / "private").glob("rank*-memory-round*.npz"))


ADAPTIVE = ("--rounds", "6", "--clients-per-round", "4", "--eval-every", "3", "--seed", "2", "--dp-clip", "0.01",
            "--dp-adaptive-quantile", "0.5", "--dp-clip-lr", "1", "--dp-noise-multiplier", "0.1")


def test_adaptive_clipping_gives_the_same_norms_and_metrics_at_one_and_two_ranks(data, tmp_path):
    """From far below the update norms the norm grows by the paper's rule each round; rank 1's clients get
    it in their plans over gRPC, rank 0's in-process: the same norms, fractions and metrics."""
    runs = at_one_and_two_ranks(data, tmp_path, ADAPTIVE)
    assert_same(runs[1], runs[2])
    train = [[r for r in runs[n] if r["kind"] == "train"] for n in (1, 2)]
    assert [(r["dp_clip"], r["dp_unclipped_fraction"]) for r in train[0]] == \
        [(r["dp_clip"], r["dp_unclipped_fraction"]) for r in train[1]]          # exact counts, seeded noise
    clips = [r["dp_clip"] for r in train[0]]
    fractions = [r["dp_unclipped_fraction"] for r in train[0]]
    assert clips[0] == 0.01 and clips[-1] > clips[0]
    for r in range(len(clips) - 1):
        assert clips[r + 1] == pytest.approx(clips[r] * math.exp(-1.0 * (fractions[r] - 0.5)), rel=1e-12)
    config = json.loads((tmp_path / "np1" / "config.json").read_text())
    assert config["privacy"]["noise_multiplier"] == 0.1             # the accountant's z; the update's is larger
    assert config["privacy"]["update_noise_multiplier"] == pytest.approx((0.1 ** -2 - 0.4 ** -2) ** -0.5)


def test_sigkill_then_resume_with_adaptive_clipping_matches_an_uninterrupted_run(data, tmp_path):
    """The norm of the round after the checkpoint comes back from it: the resumed norms are the same floats."""
    args = (*ADAPTIVE, "--checkpoint-every", "2", "--trainer", "tests.faulty:SlowTrainer")
    whole, cut = whole_and_resumed(data, tmp_path, args, "adaptive clip")
    assert_same(whole, cut, rel=1e-6)
    assert [r["dp_clip"] for r in whole if r["kind"] == "train"] == [r["dp_clip"] for r in cut if r["kind"] == "train"]
