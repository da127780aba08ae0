"""The per-client path: each client's update reaches the aggregator whole (in one process) or as slices of
whole blocks (under mpirun), the aggregate applies like FedAvg's mean, the same bits at any -np, and the
combinations that cannot work are one error line."""
import numpy as np
import pytest
import torch

from flock import simulate
from flock.common.config import Config, parse_config
from flock.common.errors import ConfigError, FlockError
from reader.mnist import build
from scheduler import robust
from simulator.per_client import SendBuffer, permute_rows, slice_of
from tests.helpers import read_metrics, run_app

MLP = dict(reader="arrays", model="mlp", trainer="classifier", lr=0.05, batch_size=50, server_lr=1.0, max_grad_norm=0.0,
           clients_per_round=7, rounds=2, eval_every=0, eval_users=6, checkpoint_every=1, seed=4)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist") / "iid"
    build(out, scheme="iid", users=20, seed=3)
    return out


class Recording:
    """A user's aggregator (module:Class): the weighted mean, keeping what it was given."""

    capability = "per-client"
    seen: list = []

    def __init__(self, *, config):
        self.config = config

    def check(self, clients: int) -> None:
        pass

    def aggregate(self, updates, weights, *, reducer):
        Recording.seen.append((updates.copy(), weights.copy()))
        return robust.chosen_mean(updates, weights)


def test_slices_are_whole_blocks_that_cover_the_vector():
    for world in (1, 2, 3, 5):
        bounds = [slice_of(r, world, 200_001, block=65536) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == 200_001
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(lo % 65536 == 0 for lo, _ in bounds)


def test_the_send_buffer_holds_each_ranks_slice_of_every_client_and_drops_the_empty_slots():
    bounds = [slice_of(r, 3, 20, block=4) for r in range(3)]          # 5 blocks over 3 ranks: 4, 8, 8 values
    sink = SendBuffer(bounds, slots=3)
    rows = np.arange(60, dtype=np.float32).reshape(3, 20)
    for slot in (2, 0):                       # slot 1's client diverged: it writes nothing
        for at in range(0, 20, 7):            # written a tensor at a time, across the slices' edges
            sink.write(slot, at, torch.from_numpy(rows[slot, at:at + 7].astype(np.float64)))
    sink.compact([0, 2])
    data, counts, displs = sink.segments(2)
    assert counts == [2 * (b - a) for a, b in bounds] and displs == [3 * a for a, _ in bounds]
    for (a, b), c, d in zip(bounds, counts, displs):
        assert np.array_equal(data[d:d + c].reshape(2, b - a), rows[[0, 2], a:b])


def test_rows_are_permuted_in_place_as_fancy_indexing_would():
    rng = np.random.default_rng(3)
    for k in (1, 2, 5, 17):
        rows = rng.normal(size=(k, 6)).astype(np.float32)
        for _ in range(5):
            order = rng.permutation(k).tolist()
            expected = rows[order]
            permute_rows(rows, order)
            assert np.array_equal(rows, expected)


def test_a_user_aggregator_gets_every_clients_update_and_its_result_is_the_rounds_mean(mnist, tmp_path):
    """The weighted mean on the per-client path equals FedAvg's mean from the ranks' sums (to float32's rounding
    of each update), so rows and weights belong together; the aggregator saw K rows weighted by samples."""
    Recording.seen = []
    per_client = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "pc"), aggregator=f"{__name__}:Recording",
                                 **MLP))
    linear = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "fedavg"), **MLP))
    assert len(Recording.seen) == 2
    updates, weights = Recording.seen[0]
    assert updates.shape == (7, sum(v.size for v in linear.params.values())) and updates.dtype == np.float32
    assert np.all(weights == 3000)           # iid over 20 users: every user has 3,000 training images
    for name, value in linear.params.items():
        np.testing.assert_allclose(per_client.params[name], value, rtol=1e-5, atol=1e-6)
    assert [r["samples"] for r in per_client.train] == [r["samples"] for r in linear.train]


def test_the_median_is_applied_with_the_server_step(mnist, tmp_path):
    """One round, server lr 1: the new parameters are the old plus the coordinate-wise median of the updates."""
    Recording.seen = []
    first = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "a"), aggregator=f"{__name__}:Recording",
                            **{**MLP, "rounds": 1}))
    updates, _ = Recording.seen[0]
    median = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "b"), aggregator="median",
                             **{**MLP, "rounds": 1, "checkpoint_every": 1}))
    # both runs start from the same parameters (the same seed): the first's result less its mean
    start = (np.concatenate([v.reshape(-1) for v in first.params.values()]).astype(np.float64)
             - robust.chosen_mean(updates, Recording.seen[0][1]))
    expected = (start + np.median(updates.astype(np.float64), axis=0)).astype(np.float32)
    got = np.concatenate([v.reshape(-1) for v in median.params.values()])
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


@pytest.mark.mpi
@pytest.mark.parametrize("aggregator, extra", [("geomed", ()), ("bulyan", ("--krum-f", "1")),
                                               ("qfedavg", ("--qfedavg-q", "2"))])
def test_per_client_rules_give_the_same_model_at_any_np(mnist, tmp_path, aggregator, extra):
    """The MLP's 199,210 parameters are 4 blocks: at -np 2 and 3 the ranks hold different slices."""
    args = ["--reader", "arrays", "--model", "mlp", "--trainer", "classifier", "--lr", "0.05", "--batch-size", "50",
            "--server-lr", "1", "--max-grad-norm", "0", "--clients-per-round", "7", "--rounds", "2", "--eval-every",
            "2", "--eval-users", "6", "--checkpoint-every", "2", "--aggregator", aggregator, *extra]
    params, metrics = [], []
    for np_ in (1, 2, 3):
        proc = run_app(np_, mnist, tmp_path / f"np{np_}", *args, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with np.load(tmp_path / f"np{np_}" / "checkpoint.npz") as z:
            params.append(z["params"])
        metrics.append([{k: v for k, v in r.items() if k not in ("seconds", "time", "clients_per_s", "rank_work_s")}
                        for r in read_metrics(tmp_path / f"np{np_}")])
    assert all(np.array_equal(params[0], p) for p in params[1:])
    for other in metrics[1:]:       # per-user means add the ranks' users in another order: the last digit
        for a, b in zip(metrics[0], other):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == (pytest.approx(a[key], rel=1e-12) if key.endswith("_user_mean") else a[key]), key


@pytest.mark.parametrize("argv, message", [
    (["--aggregator", "median", "--secagg", "--dp-clip", "1"], "not with --secagg"),
    (["--aggregator", "krum", "--dp-clip", "1", "--dp-noise-multiplier", "1"], "not with central DP noise"),
    (["--aggregator", "median", "--async-buffer", "2"], "not with --async-buffer"),
    (["--aggregator", "median", "--krum-f", "2"], "--krum-f is for --aggregator krum or multi-krum or bulyan"),
    (["--aggregator", "geomed", "--trim-fraction", "0.6"], "--trim-fraction must be below 0.5"),
])
def test_impossible_combinations_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["data", *argv])


@pytest.mark.parametrize("aggregator, extra, message", [
    ("krum", {"krum_f": 4}, "--krum-f 4 needs more than 2f \\+ 2 = 10 clients"),
    ("bulyan", {"krum_f": 2}, "--krum-f 2: Bulyan needs at least 4f \\+ 3 = 11 clients"),
    ("nosuch:Thing", {}, "--aggregator 'nosuch:Thing': cannot import module"),
    ("os:path", {}, "lacks capability, aggregate, check"),
])
def test_rules_that_cannot_hold_for_the_round_are_refused_before_the_run(mnist, tmp_path, aggregator, extra, message):
    with pytest.raises(FlockError, match=message):
        simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path), aggregator=aggregator, **{**MLP, **extra}))
    assert not (tmp_path / "config.json").exists()


# -- attacks in runs ------------------------------------------------------------------------------------------------

ATTACKED = dict(MLP, rounds=2, eval_every=2, clients_per_round=8, attack_fraction=0.3)


def test_a_sign_flip_attack_on_fedavg_runs_on_the_per_client_path_and_counts_the_attackers(mnist, tmp_path):
    honest = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "honest"), **{**ATTACKED, "attack_fraction": 0.0},
                             attack="sign-flip"))
    attacked = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "attacked"), attack="sign-flip", **ATTACKED))
    assert [r["malicious"] for r in honest.train] == [0, 0]
    malicious = [r["malicious"] for r in attacked.train]
    assert all(0 < m < 8 for m in malicious)
    # the same clients, the same data: only what the attackers sent differs
    assert [r["samples"] for r in attacked.train] == [r["samples"] for r in honest.train]
    assert attacked.evals[-1]["top1"] < honest.evals[-1]["top1"]
    median = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "median"), attack="sign-flip",
                             aggregator="median", **ATTACKED))
    assert median.evals[-1]["top1"] > attacked.evals[-1]["top1"]


def test_the_malicious_users_are_the_same_in_every_round(mnist, tmp_path):
    from reader.arrays import ArrayReader
    from simulator.attacks import client_attack

    config = Config(data_dir=str(mnist), attack="scale", **ATTACKED)
    reader = ArrayReader(mnist)
    first, again = client_attack(config, reader.spec(), reader), client_attack(config, reader.spec(), reader)
    assert first.malicious == again.malicious and len(first.malicious) == 6        # round(0.3 x 20)


def test_a_backdoor_reports_its_success_at_every_evaluation(mnist, tmp_path):
    clean = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "clean"), attack="backdoor",
                            **{**ATTACKED, "attack_fraction": 0.0}))
    attacked = simulate(Config(data_dir=str(mnist), run_dir=str(tmp_path / "bd"), attack="backdoor", **ATTACKED))
    assert "backdoor_acc" in clean.evals[-1] and "backdoor_acc" in attacked.evals[-1]
    assert clean.evals[-1]["backdoor_acc"] < 0.2 < attacked.evals[-1]["backdoor_acc"]


@pytest.mark.mpi
def test_an_alie_attack_against_krum_gives_the_same_model_at_any_np(mnist, tmp_path):
    args = ["--reader", "arrays", "--model", "mlp", "--trainer", "classifier", "--lr", "0.05", "--batch-size", "50",
            "--server-lr", "1", "--max-grad-norm", "0", "--clients-per-round", "8", "--rounds", "2", "--eval-every",
            "2", "--eval-users", "6", "--checkpoint-every", "2", "--aggregator", "multi-krum", "--krum-f", "2",
            "--attack", "alie", "--attack-fraction", "0.3"]
    params = []
    for np_ in (1, 3):
        proc = run_app(np_, mnist, tmp_path / f"np{np_}", *args, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with np.load(tmp_path / f"np{np_}" / "checkpoint.npz") as z:
            params.append(z["params"])
        assert all("malicious" in r for r in read_metrics(tmp_path / f"np{np_}") if r["kind"] == "train")
    assert np.array_equal(params[0], params[1])


@pytest.mark.parametrize("argv, message", [
    (["--attack", "sign-flip", "--async-buffer", "2"], "not with --async-buffer"),
    (["--attack", "scale", "--dp-clip", "1", "--dp-noise-multiplier", "1"], "not with central DP noise"),
    (["--attack-std", "2"], "--attack-std is for --attack gaussian"),
    (["--attack", "scale", "--attack-std", "2"], "--attack-std is for --attack gaussian, not scale"),
    (["--attack", "nosuch"], "--attack must be one of"),
    (["--attack", "scale", "--attack-fraction", "1"], "--attack-fraction must be below 1"),
])
def test_attack_options_that_cannot_work_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["data", *argv])


def test_a_backdoor_on_text_is_refused_before_the_run(tmp_path):
    from tests.helpers import make_lm_data

    data = make_lm_data(tmp_path / "lm")
    with pytest.raises(FlockError, match="--attack backdoor"):
        simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), attack="backdoor", rounds=1))


@pytest.mark.parametrize("argv, message", [
    (["--aggregator", "median", "--krum-f", "1"], "--krum-f is for --aggregator krum or multi-krum or bulyan"),
    (["--attack-fraction", "0.2"], "--attack-fraction is for --attack NAME"),
])
def test_a_rules_option_set_by_the_user_with_its_default_value_is_refused_too(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["data", *argv])


def test_a_built_in_mnist_model_on_other_images_is_one_message(tmp_path):
    from tests.helpers import make_arrays_data

    data = make_arrays_data(tmp_path / "data", features=12)
    with pytest.raises(FlockError, match="MnistMLP takes 28 x 28 one-channel images .* the data's samples are 12"):
        simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "run"), reader="arrays", model="mlp",
                        trainer="classifier", rounds=1))
