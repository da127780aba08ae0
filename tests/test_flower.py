"""Flower NumPyClients as flock trainers (trainer/flower.py). Needs the optional `flwr` extra."""
from __future__ import annotations

import sys

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="flwr is an optional extra: pip install -r requirements-extras.txt")

from flwr.client import ClientApp, NumPyClient  # noqa: E402

from common.domain import ParamLayout  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from reader.arrays import ArrayReader, write_split  # noqa: E402
from reader.mnist import build  # noqa: E402
from simulator.data_server import MemoryStore  # noqa: E402
from simulator.shard import Shard  # noqa: E402
from tests.helpers import read_metrics, run_app  # noqa: E402
from trainer.base import TrainConfig  # noqa: E402
from trainer.flower import flower_plugins, load_client_fn, user_samples  # noqa: E402

SEEN: list[tuple] = []


class Recording(NumPyClient):
    """Deterministic: fit adds the mean label to the weights; records what flock handed it."""

    def __init__(self, context) -> None:
        self.context = context

    def get_parameters(self, config):
        SEEN.append(("init", dict(self.context.node_config), dict(config), None, len(user_samples(self.context)["y"])))
        return [np.zeros((2, 3), np.float32), np.array([7], np.int64)]

    def fit(self, parameters, config):
        samples = user_samples(self.context)
        SEEN.append(("fit", dict(self.context.node_config), dict(config), parameters[1].dtype, len(samples["y"])))
        w = parameters[0] + float(np.mean(samples["y"]))
        return [w, parameters[1] + 1], len(samples["y"]), {"train_loss": 0.5, "note": "text is skipped"}

    def evaluate(self, parameters, config):
        samples = user_samples(self.context)
        SEEN.append(("evaluate", dict(self.context.node_config), dict(config), None, len(samples["y"])))
        return 2.0, len(samples["y"]), {"accuracy": float(parameters[0].mean())}


def recording_client_fn(context):
    return Recording(context).to_client()


def wrong_shape_client_fn(context):
    class Wrong(Recording):
        def fit(self, parameters, config):
            return [np.zeros((3, 2), np.float32), parameters[1]], 1, {}
    return Wrong(context)


def not_numpy_client_fn(context):
    return object()


app = ClientApp(client_fn=recording_client_fn)


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    users = ["bob", "ann", "cy"]
    for day, split, n in (("20200101", "train", 4), ("20200102", "test", 2)):
        write_split(tmp_path, day, split, users, [rng.integers(0, 255, (n, 1, 2, 2), dtype=np.uint8)] * 3,
                    [np.full(n, i) for i in range(3)])
    (tmp_path / "meta.json").write_text('{"num_classes": 3}')
    return ArrayReader(tmp_path)


def make_shard(reader, ref="tests.test_flower:recording_client_fn"):
    config = TrainConfig(lr=0.1, batch_size=8, local_epochs=2)
    model_cls, trainer_cls = flower_plugins(ref, reader, config)
    model = model_cls.build(reader.spec())
    named = dict(model.named_parameters())
    layout = ParamLayout(names=tuple(named), shapes=tuple(tuple(p.shape) for p in named.values()))
    shard = Shard(model, trainer_cls(config, reader.spec()), layout, (), MemoryStore(), {})
    shard.set_global(layout.flatten({n: p.detach().numpy() for n, p in named.items()}))
    return shard, model


def test_fit_and_evaluate_get_the_users_context_data_and_config(tiny):
    SEEN.clear()
    shard, model = make_shard(tiny)
    # the initial parameters come from the first user with training data (file order), with its samples
    assert SEEN == [("init", {"partition-id": 1, "num-partitions": 3, "flock-user": "bob"}, {}, None, 4)]
    sums = shard.train_user("cy", tiny.load("20200101", "train", "cy"), seed=3, round_index=4)
    assert sums == {"samples": 4.0, "train_loss_sum": 2.0}           # metrics weighted by num_examples
    kind, node, config, dtype, n = SEEN[-1]
    # partition ids: every user of every day, sorted (ann, bob, cy)
    assert node == {"partition-id": 2, "num-partitions": 3, "flock-user": "cy"}
    assert config == {"server_round": 4, "local_epochs": 2, "lr": 0.1, "batch_size": 8}
    assert dtype == np.int64 and n == 4                                   # arrays come back in their own dtype
    np.testing.assert_array_equal(shard.weighted_sum[:6].numpy(), np.full(6, 4 * 2.0))   # n_k * (0 + mean label 2)
    assert shard.weighted_sum[6] == 4 * 8                                  # the int64 counter, 7 + 1, as float
    out = shard.evaluate_user("ann", tiny.load("20200102", "test", "ann"), round_index=1)
    assert out == {"samples": 2.0, "loss_sum": 4.0, "accuracy_sum": 0.0}
    assert SEEN[-1][:3] == ("evaluate", {"partition-id": 0, "num-partitions": 3, "flock-user": "ann"},
                            {"server_round": 1})


def test_bad_clients_are_named(tiny):
    shard, _ = make_shard(tiny, "tests.test_flower:wrong_shape_client_fn")
    with pytest.raises(ValueError, match=r"user 'bob': array 0 has shape \(3, 2\), expected \(2, 3\)"):
        shard.train_user("bob", tiny.load("20200101", "train", "bob"))
    with pytest.raises(ConfigError, match="returned object; flock runs Flower NumPyClients"):
        make_shard(tiny, "tests.test_flower:not_numpy_client_fn")
    with pytest.raises(ConfigError, match="is a ClientApp: give the client_fn"):
        load_client_fn("tests.test_flower:app")
    with pytest.raises(ConfigError, match="has no 'nope'"):
        load_client_fn("tests.test_flower:nope")


def test_missing_flwr_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)    # import flwr now raises ImportError
    with pytest.raises(ConfigError, match="flwr is not installed"):
        load_client_fn("examples.flower_client:client_fn")


@pytest.fixture(scope="module")
def mnist_iid(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist") / "iid"
    build(out, scheme="iid", users=30, seed=2)
    return out


@pytest.mark.mpi
def test_a_flower_tutorial_client_learns_under_mpirun_with_the_same_metrics_at_any_np(mnist_iid, tmp_path):
    args = ("--reader", "arrays", "--flower-client", "examples.flower_client:client_fn", "--server-lr", "1",
            "--lr", "0.05", "--batch-size", "32", "--clients-per-round", "6", "--rounds", "3", "--eval-every", "1",
            "--eval-users", "10")
    results = {}
    for np_ in (1, 2):
        proc = run_app(np_, mnist_iid, tmp_path / f"np{np_}", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[np_] = read_metrics(tmp_path / f"np{np_}")
    assert [r["kind"] for r in results[1]] == ["train", "eval"] * 3
    for a, b in zip(results[1], results[2]):
        for key in ("loss", "accuracy", "accuracy_user_mean"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    evals = [r for r in results[1] if r["kind"] == "eval"]
    assert evals[0]["accuracy"] > 0.5 and evals[-1]["accuracy"] > evals[0]["accuracy"]   # chance is 0.1
    assert results[1][0]["loss"] > results[1][-2]["loss"]                                # fit's train_loss
