"""Flower clients as flock trainers (trainer/flower.py, trainer/flower_server.py): NumPyClients by client_fn,
and Message-API ClientApps with their ServerApp's strategy as the server step. Needs the optional `flwr` extra."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="flwr is an optional extra: pip install -r requirements-extras.txt")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.serverapp.strategy import (  # noqa: E402
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)

from flock.common.config import Config, load_config_file  # noqa: E402
from flock.common.domain import ParamLayout  # noqa: E402
from flock.common.errors import ConfigError  # noqa: E402
from flock.run import simulate  # noqa: E402
from reader.arrays import ArrayReader, write_split  # noqa: E402
from reader.mnist import build  # noqa: E402
from scheduler.aggregate import weighted_mean  # noqa: E402
from scheduler.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from scheduler.optim.fedavgm import FedAvgM as FlockFedAvgM  # noqa: E402
from scheduler.sampling import sample_clients  # noqa: E402
from simulator.data_server import MemoryStore  # noqa: E402
from simulator.shard import Shard  # noqa: E402
from tests.helpers import read_metrics, run_app  # noqa: E402
from trainer.base import TrainConfig  # noqa: E402
from trainer.flower import flower_plugins, load_client_app, load_client_fn, user_samples  # noqa: E402
from trainer.flower_server import FlockGrid, StrategyStep, flower_calls  # noqa: E402

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


# -- Message-API apps (Flower 1.2x: @app.train / @app.evaluate, a ServerApp whose main calls strategy.start) --

def reply(msg, arrays=None, **metrics):
    content = {"metrics": MetricRecord(metrics)} if metrics else {}
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Message(RecordDict(content), reply_to=msg)


echo_app = ClientApp()


@echo_app.train()
def echo_train(msg, context):
    """Deterministic: adds the mean label to w; records what flock sent."""
    samples = user_samples(context, "train")
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    SEEN.append(("train", dict(context.node_config), dict(context.run_config), dict(msg.content["config"]),
                 arrays, len(samples["y"])))
    return reply(msg, {"w": arrays["w"] + float(np.mean(samples["y"])), "count": arrays["count"] + 1},
                 **{"num-examples": len(samples["y"]), "train_loss": float(np.mean(samples["y"])), "hist": [1.0, 2.0]})


@echo_app.evaluate()
def echo_evaluate(msg, context):
    samples = user_samples(context, "test")
    SEEN.append(("evaluate", dict(context.node_config), dict(context.run_config), dict(msg.content["config"]),
                 None, len(samples["y"])))
    return reply(msg, **{"num-examples": len(samples["y"]), "eval_acc": float(msg.content["arrays"]["w"].numpy().mean()),
                         "eval_loss": 2.0})


no_train_app = ClientApp()
no_train_app.evaluate()(echo_evaluate)
no_arrays_app, no_weight_app, wrong_shape_app, wrong_key_app = ClientApp(), ClientApp(), ClientApp(), ClientApp()
no_arrays_app.train()(lambda msg, context: reply(msg, **{"num-examples": 3}))
no_weight_app.train()(lambda msg, context: reply(msg, {"w": np.zeros((2, 3)), "count": [7]}, train_loss=1.0))
wrong_shape_app.train()(lambda msg, context: reply(msg, {"w": np.zeros((3, 2)), "count": [7]}, **{"num-examples": 3}))
wrong_key_app.train()(lambda msg, context: reply(msg, {"v": np.zeros((2, 3)), "count": [7]}, **{"num-examples": 3}))
for bad in (no_arrays_app, no_weight_app, wrong_shape_app, wrong_key_app):
    bad.evaluate()(echo_evaluate)

STRATEGIES = {"fedavg": lambda: FedAvg(fraction_train=0.5), "fedadam": lambda: FedAdam(eta=0.05),
              "fedprox": lambda: FedProx(proximal_mu=0.25), "fedmedian": lambda: FedMedian(),
              "trimmed": lambda: FedTrimmedAvg(beta=0.34), "krum": lambda: Krum(num_malicious_nodes=0),
              "multikrum": lambda: MultiKrum(num_malicious_nodes=0, num_nodes_to_select=2),
              "bulyan": lambda: Bulyan(num_malicious_nodes=0), "qfedavg": lambda: QFedAvg(client_learning_rate=0.1, q=0.5),
              "own": lambda: OwnAggregation()}


class OwnAggregation(FedAvg):
    """A strategy with an aggregate_train of its own: flock cannot know what it computes."""

    def aggregate_train(self, server_round, replies):
        return super().aggregate_train(server_round, list(replies)[:1])


def make_server(strategy: str, count_dtype=np.int64, **start):
    server = ServerApp()

    @server.main()
    def main(grid, context):
        initial = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "count": Array(np.array([7], count_dtype))})
        STRATEGIES[strategy]().start(grid=grid, initial_arrays=initial, num_rounds=context.run_config["num-server-rounds"],
                                     train_config=ConfigRecord({"lr": context.run_config["lr"], "tag": "x"}), **start)
    return server


server_app, fedadam_server, fedprox_server, median_server = (make_server(k) for k in ("fedavg", "fedadam", "fedprox",
                                                                                      "fedmedian"))
trimmed_server, krum_server, multikrum_server, bulyan_server, qfedavg_server, own_server = (
    make_server(k) for k in ("trimmed", "krum", "multikrum", "bulyan", "qfedavg", "own"))
no_start_server, key_error_server, grid_server = ServerApp(), ServerApp(), ServerApp()
no_start_server.main()(lambda grid, context: None)
key_error_server.main()(lambda grid, context: context.run_config["fraction-train"])
grid_server.main()(lambda grid, context: grid.send_and_receive([]))


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    users = ["bob", "ann", "cy"]
    for day, split, n in (("20200101", "train", 4), ("20200102", "test", 2)):
        write_split(tmp_path, day, split, users, [rng.integers(0, 255, (n, 1, 2, 2), dtype=np.uint8)] * 3,
                    [np.full(n, i) for i in range(3)])
    (tmp_path / "meta.json").write_text('{"num_classes": 3}')
    return ArrayReader(tmp_path)


def make_shard(reader, ref="tests.test_flower:recording_client_fn", **options):
    """A shard running a Flower client (`ref` by client_fn, or the options --flower-app/--flower-server)."""
    options = options or {"flower_client": ref}
    config = Config(data_dir=str(reader.data_dir), rounds=3, lr=0.1, batch_size=8, local_epochs=2, **options)
    train_config = TrainConfig(lr=0.1, batch_size=8, local_epochs=2)
    model_cls, trainer_cls = flower_plugins(config, reader, train_config)
    model = model_cls.build(reader.spec())
    named = dict(model.named_parameters())
    layout = ParamLayout(names=tuple(named), shapes=tuple(tuple(p.shape) for p in named.values()))
    shard = Shard(model, trainer_cls(train_config, reader.spec()), layout, (), MemoryStore(), {})
    shard.set_global(layout.flatten({n: p.detach().numpy() for n, p in named.items()}))
    return shard, trainer_cls


def test_fit_and_evaluate_get_the_users_context_data_and_config(tiny):
    SEEN.clear()
    shard, trainer_cls = make_shard(tiny)
    # the initial parameters come from the first user with training data (file order), with its samples; then
    # one fit and one evaluate check the replies and name the run's metrics
    assert SEEN[0] == ("init", {"partition-id": 1, "num-partitions": 3, "flock-user": "bob"}, {}, None, 4)
    assert [k for k, *_ in SEEN] == ["init", "fit", "evaluate"]
    assert trainer_cls.train_ratios == {"train_loss": ("train_loss_sum", "samples"),
                                              "loss": ("train_loss_sum", "samples")}     # fit's train_loss, as before
    assert list(trainer_cls.eval_ratios) == ["accuracy", "loss"] and trainer_cls.main_metric == "accuracy"
    sums = shard.train_user("cy", tiny.load("20200101", "train", "cy"), seed=3, round_index=4)
    assert sums == {"samples": 4.0, "train_loss_sum": 2.0}           # metrics weighted by num_examples
    kind, node, config, dtype, n = SEEN[-1]
    # partition ids: every user of every day, sorted (ann, bob, cy)
    assert node == {"partition-id": 2, "num-partitions": 3, "flock-user": "cy"}
    assert config == {"server_round": 4, "local_epochs": 2, "lr": 0.1, "batch_size": 8}
    assert dtype == np.int64 and n == 4                                   # arrays come back in their own dtype
    np.testing.assert_array_equal(shard.sum.total[:6].numpy(), np.full(6, 4 * 2.0))   # n_k * (0 + mean label 2)
    assert shard.sum.total[6] == 4 * 8                                  # the int64 counter, 7 + 1, as float
    out = shard.evaluate_user("ann", tiny.load("20200102", "test", "ann"), round_index=1)
    assert out == {"samples": 2.0, "loss_sum": 4.0, "accuracy_sum": 0.0}
    assert SEEN[-1][:3] == ("evaluate", {"partition-id": 0, "num-partitions": 3, "flock-user": "ann"},
                            {"server_round": 1})


def test_bad_clients_are_named(tiny):
    with pytest.raises(ConfigError, match=r"fit of user 'bob': array '0' has shape \(3, 2\), the global model's is "
                                          r"\(2, 3\)"):
        make_shard(tiny, "tests.test_flower:wrong_shape_client_fn")      # found by the check call, before round 1
    with pytest.raises(ConfigError, match="returned object; flock runs Flower NumPyClients"):
        make_shard(tiny, "tests.test_flower:not_numpy_client_fn")
    with pytest.raises(ConfigError, match="is a ClientApp: give the client_fn"):
        load_client_fn("tests.test_flower:app")
    with pytest.raises(ConfigError, match="is a Message-API ClientApp: run it with --flower-app"):
        load_client_fn("tests.test_flower:echo_app")
    with pytest.raises(ConfigError, match="has no 'nope'"):
        load_client_fn("tests.test_flower:nope")


def message_api(app="echo_app", server="server_app", **options):
    return {"flower_app": f"tests.test_flower:{app}", "flower_server": f"tests.test_flower:{server}", **options}


def test_a_clientapp_gets_flowers_message_and_context_and_its_metrics_are_weighted(tiny):
    SEEN.clear()
    shard, trainer_cls = make_shard(tiny, **message_api(run_config='fraction-train=0.5 note="hi"'))
    assert [k for k, *_ in SEEN] == ["train", "evaluate"]                # the check calls, before round 1
    # every numeric metric under its own name (lists left out), the evaluation's accuracy first (per-user values)
    assert trainer_cls.train_ratios == {"train_loss": ("train_loss_sum", "samples")}
    assert trainer_cls.eval_ratios == {"eval_acc": ("eval_acc_sum", "samples"), "eval_loss": ("eval_loss_sum", "samples")}
    assert trainer_cls.main_metric == "eval_acc"
    sums = shard.train_user("cy", tiny.load("20200101", "train", "cy"), seed=3, round_index=2)
    assert sums == {"samples": 4.0, "train_loss_sum": 4 * 2.0}            # weighted by "num-examples"
    kind, node, run_config, config, arrays, n = SEEN[-1]
    assert node == {"partition-id": 2, "num-partitions": 3, "flock-user": "cy"}
    assert run_config == {"num-server-rounds": 3, "local-epochs": 2, "lr": 0.1, "batch-size": 8,
                          "fraction-train": 0.5, "note": "hi"}
    assert config == {"lr": 0.1, "tag": "x", "server-round": 2}            # the ServerApp's train_config, as FedAvg sends it
    assert arrays["count"].dtype == np.int64 and arrays["count"].tolist() == [7] and not arrays["w"].any()
    np.testing.assert_array_equal(shard.sum.total[:6].numpy(), np.full(6, 4 * 2.0))
    assert shard.sum.total[6] == 4 * 8
    out = shard.evaluate_user("ann", tiny.load("20200102", "test", "ann"), round_index=1)
    assert out == {"samples": 2.0, "eval_acc_sum": 0.0, "eval_loss_sum": 4.0}
    assert SEEN[-1][3] == {"server-round": 1}


def test_a_strategys_own_config_keys_reach_the_client(tiny):
    SEEN.clear()
    make_shard(tiny, **message_api(server="fedprox_server"))
    assert SEEN[0][3] == {"lr": 0.1, "tag": "x", "server-round": 1, "proximal-mu": 0.25}


@pytest.mark.parametrize("options, message", [
    (message_api("no_train_app"), "the ClientApp has no train function: register one with @app.train()"),
    (message_api("no_arrays_app"), "train of user 'bob' replied without arrays: put the trained model in an ArrayRecord"),
    (message_api("no_weight_app"), "train of user 'bob' replied without 'num-examples' in its MetricRecord"),
    (message_api("wrong_shape_app"), r"train of user 'bob': array 'w' has shape \(3, 2\), the global model's is \(2, 3\)"),
    (message_api("wrong_key_app"), "train of user 'bob': its arrays are not the global model's; missing: 'w'; not in "
                                   "the global model: 'v'"),
    (message_api("app"), "a ClientApp built with client_fn: run that with --flower-client"),
    (message_api(server="own_server"), "strategy OwnAggregation is not one flock runs"),
    (message_api(server="no_start_server"), r"returned without calling strategy.start\(...\)"),
    (message_api(server="key_error_server"), "its main raised KeyError: 'fraction-train' \\(give the app's run config "
                                             "with --run-config"),
    (message_api(server="grid_server"), "flock runs the rounds; its ServerApp must hand them to a strategy's start"),
    (message_api(server="echo_app"), "not a ServerApp"),
    (message_api(rounds=5), "its strategy.start runs 3 rounds, --rounds is 5"),
])
def test_what_does_not_fit_is_named_before_the_first_round(tiny, options, message):
    options.setdefault("rounds", 3)
    rounds = options.pop("rounds")
    config = Config(data_dir=str(tiny.data_dir), rounds=rounds, run_config="num-server-rounds=3", **options)
    with pytest.raises(ConfigError, match=message):
        flower_plugins(config, tiny, TrainConfig(lr=0.1, batch_size=8, local_epochs=2))


def test_flower_options_follow_one_rule_set(tmp_path):
    with pytest.raises(ConfigError, match="--flower-app and --flower-server go together"):
        Config(data_dir="d", flower_app="m:app")
    with pytest.raises(ConfigError, match="exclude each other"):
        Config(data_dir="d", flower_client="m:f", flower_app="m:app", flower_server="m:s")
    with pytest.raises(ConfigError, match="--server-opt, --server-lr: with --flower-server the ServerApp's strategy"):
        Config(data_dir="d", flower_app="m:app", flower_server="m:s", server_opt="fedadam", server_lr=0.1)
    with pytest.raises(ConfigError, match="--run-config: cannot read 'oops'"):
        Config(data_dir="d", run_config="lr=0.1 oops")
    with pytest.raises(ConfigError, match="values must be TOML"):
        Config(data_dir="d", run_config="name=mnist")
    cfg = tmp_path / "run.toml"
    cfg.write_text('rounds = 2\n[run-config]\nfraction-train = 0.1\nname = "it\'s"\nnested.flag = true\n')
    values = load_config_file(str(cfg))
    from flock.common.run_config import parse_run_config

    assert parse_run_config(values["run_config"]) == {"fraction-train": 0.1, "name": "it's", "nested.flag": True}
    cfg.write_text("[run-config]\nbad = [1, 2]\n")
    with pytest.raises(ConfigError, match=r"run.toml: 'run-config': --run-config: 'bad' must be a number"):
        load_config_file(str(cfg))


def test_user_samples_reads_flocks_data_in_flowers_own_engine(tiny):
    context = Context(run_id=1, node_id=9, node_config={"partition-id": 2, "num-partitions": 3}, state=RecordDict(),
                      run_config={"flock-data": str(tiny.data_dir), "flock-reader": "arrays"})
    for split, day in (("train", "20200101"), ("test", "20200102")):
        got, want = user_samples(context, split), tiny.load(day, split, "cy")      # partition 2: cy (ann, bob, cy)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(RuntimeError, match="names no 'flock-data' folder"):
        user_samples(Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))


def test_load_client_app_names_what_it_got():
    with pytest.raises(ConfigError, match="not a ClientApp \\(got function\\); a client_fn runs with --flower-client"):
        load_client_app("tests.test_flower:recording_client_fn")


def flower_round(strategy, server_round, params: ArrayRecord, clients):
    """Flower's own step: configure_train, then aggregate_train on each client's reply."""
    with flower_calls():
        sent = next(iter(strategy.configure_train(server_round, params, ConfigRecord(), FlockGrid(10))))
        replies = [reply(sent, arrays, **{"num-examples": n, **extra}) for n, arrays, *more in clients
                   for extra in [{"train_loss": more[0]} if more else {}]]
        return strategy.aggregate_train(server_round, replies)[0]


def flock_round(step, layout, keys, params_flat, clients, ranks=2):
    """flock's step: each rank's pre-reduced sum n_k * delta_k, the weighted mean, then the server step."""
    parts = []
    for rank in range(ranks):
        mine = clients[rank::ranks]
        deltas = [n * (layout.flatten(dict(zip(layout.names, (arrays[k] for k in keys))), np.float64) - params_flat)
                  for n, arrays in mine]
        parts.append((float(sum(n for n, _ in mine)), np.sum(deltas, axis=0)))
    return step.step(params_flat, weighted_mean([s for _, s in parts], sum(w for w, _ in parts)))


@pytest.mark.parametrize("make", [FedAvg, lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
                                  lambda: FedAdam(eta=0.05), lambda: FedYogi(eta=0.05), lambda: FedAdagrad(eta=0.05),
                                  lambda: FedProx(proximal_mu=0.1)])
def test_a_flower_strategy_as_flocks_server_step_gives_flowers_numbers(make, tmp_path):
    rng = np.random.default_rng(0)
    keys, shapes = ["fc.weight", "fc.bias"], [(4, 3), (4,)]
    layout = ParamLayout(names=("arrays.0", "arrays.1"), shapes=tuple(shapes))
    theta = {k: rng.normal(size=s).astype(np.float32) for k, s in zip(keys, shapes)}
    flower_params = ArrayRecord({k: Array(v) for k, v in theta.items()})
    flock_params = layout.flatten(dict(zip(layout.names, theta.values())))
    step = StrategyStep(make(), keys=keys, dtypes=[np.dtype(np.float32)] * 2, layout=layout, num_nodes=10)
    flower, saved = make(), None
    for server_round in (1, 2, 3):
        current = {k: a.numpy() for k, a in flower_params.items()}
        clients = [(int(rng.integers(5, 50)), {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(np.float32)
                                                for k, v in current.items()}) for _ in range(5)]
        flower_params = flower_round(flower, server_round, flower_params, clients)
        flock_params = flock_round(step, layout, keys, flock_params, clients)
        want = layout.flatten(dict(zip(layout.names, (flower_params[k].numpy() for k in keys))))
        np.testing.assert_allclose(flock_params, want, rtol=1e-5, atol=1e-6)
        if server_round == 1:     # a checkpoint: a fresh strategy given the state continues alike
            saved = (step.state_dict(), flock_params.copy(), clients)
    meta = {k: 0 for k in ("round", "version", "step", "seed", "rounds", "world_size", "data")} | {"layout": []}
    save_checkpoint(tmp_path / "ckpt.npz", params=saved[1], meta=meta, optimizer_state=saved[0])
    resumed = StrategyStep(make(), keys=keys, dtypes=[np.dtype(np.float32)] * 2, layout=layout, num_nodes=10)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.npz")[2])
    uninterrupted = StrategyStep(make(), keys=keys, dtypes=[np.dtype(np.float32)] * 2, layout=layout, num_nodes=10)
    rng = np.random.default_rng(1)
    clients = [(int(rng.integers(5, 50)), {k: (v + 0.01).astype(np.float32) for k, v in theta.items()}) for _ in range(3)]
    params = flock_round(uninterrupted, layout, keys, layout.flatten(dict(zip(layout.names, theta.values()))),
                         saved[2])
    np.testing.assert_array_equal(params, saved[1])
    np.testing.assert_array_equal(flock_round(resumed, layout, keys, params, clients),
                                  flock_round(uninterrupted, layout, keys, params, clients))


def test_the_serverapps_strategy_is_the_runs_server_step(tiny, tmp_path):
    """In a whole run: FedAdam from the ServerApp makes each step, as Flower's FedAdam would on the replies."""
    config = Config(data_dir=str(tiny.data_dir), run_dir=str(tmp_path / "run"), reader="arrays", rounds=2,
                    clients_per_round=2, eval_every=1, lr=0.1, batch_size=8, local_epochs=2, **message_api(server="fedadam_server"))
    history = simulate(config)
    assert [r["kind"] for r in history.records] == ["train", "eval"] * 2 and "eval_acc" in history.records[1]
    flower = FedAdam(eta=0.05)
    params = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "count": Array(np.array([7], np.int64))})
    for server_round in (1, 2):
        picked = sample_clients(0, server_round - 1, ["bob", "ann", "cy"], 2)        # the train day's users, file order
        clients = [(4, {"w": params["w"].numpy() + {"bob": 0, "ann": 1, "cy": 2}[u], "count": params["count"].numpy() + 1})
                   for u in picked]
        params = flower_round(flower, server_round, params, clients)
    np.testing.assert_allclose(history.params["arrays.0"], params["w"].numpy(), rtol=1e-6)

@pytest.mark.parametrize("server", ["median_server", "trimmed_server", "krum_server", "multikrum_server",
                                    "bulyan_server", "qfedavg_server"])
def test_a_serverapps_robust_strategy_runs_on_the_per_client_path_as_flower_aggregates(tiny, tmp_path, server):
    """FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan and QFedAvg (which also reads each reply's
    train_loss) from a ServerApp: each round's model is what the strategy's own aggregate_train makes of the
    clients' replies."""
    config = Config(data_dir=str(tiny.data_dir), run_dir=str(tmp_path / "run"), reader="arrays", rounds=2,
                    clients_per_round=3, eval_every=1, lr=0.1, batch_size=8, local_epochs=2, **message_api(server=server))
    history = simulate(config)
    assert [r["kind"] for r in history.records] == ["train", "eval"] * 2
    flower = STRATEGIES[server.removesuffix("_server").replace("median", "fedmedian")]()
    # Flower's own QFedAvg cannot take an integer array (it scales the replies in place); flock's rule reads
    # the counter as its float32 parameter, so the reference gets it as a float
    count = np.array([7], np.float64 if server == "qfedavg_server" else np.int64)
    params = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "count": Array(count)})
    for server_round in (1, 2):        # every user trains: each adds its own number to w (echo_app); the replies
        # in user-id order, flock's (Krum's scores tie here, and both take the first of equal scores)
        clients = [(n, {"w": params["w"].numpy() + add, "count": params["count"].numpy() + 1}, add)
                   for n, add in ((4, 1.0), (4, 0.0), (4, 2.0))]       # ann, bob, cy; train_loss = add
        params = flower_round(flower, server_round, params, clients)
    # q-FedAvg's step is a ratio of float32-rounded sums: equal to float32 rounding
    rtol = 1e-5 if server == "qfedavg_server" else 1e-6
    np.testing.assert_allclose(history.params["arrays.0"], params["w"].numpy(), rtol=rtol)
    assert not np.allclose(params["w"].numpy(), 0.0)


def test_flocks_fedavgm_options_are_flowers_fedavgm():
    """--server-opt fedavgm --server-lr 0.7 --server-momentum 0.9 is Flower's FedAvgM(0.7, 0.9) (FedAdam is not:
    flock's follows the paper, v from tau^2 and no bias correction; with --flower-server Flower's own runs)."""
    rng = np.random.default_rng(2)
    keys, layout = ["w"], ParamLayout(names=("w",), shapes=((6,),))
    flower, flock = FedAvgM(server_learning_rate=0.7, server_momentum=0.9), FlockFedAvgM(server_lr=0.7, momentum=0.9)
    flower_params = ArrayRecord({"w": Array(rng.normal(size=6).astype(np.float32))})
    flock_params = flower_params["w"].numpy().copy()
    for server_round in (1, 2, 3):
        clients = [(int(rng.integers(5, 50)), {"w": (flower_params["w"].numpy() + rng.normal(scale=0.1, size=6))
                                                .astype(np.float32)}) for _ in range(4)]
        flower_params = flower_round(flower, server_round, flower_params, clients)
        flock_params = flock_round(flock, layout, keys, flock_params, clients)
        np.testing.assert_allclose(flock_params, flower_params["w"].numpy(), rtol=1e-5, atol=1e-6)


def test_missing_flwr_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)    # import flwr now raises ImportError
    with pytest.raises(ConfigError, match="flwr is not installed"):
        load_client_fn("examples.flower_client:client_fn")


@pytest.fixture(scope="module")
def mnist_iid(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist") / "iid"
    build(out, scheme="iid", users=30, seed=2)
    return out


def same_metrics_at_np_1_and_2(data, tmp_path, args, keys) -> list[dict]:
    """Runs the application with `args` at -np 1 and 2 (3 rounds, each evaluated); `keys` must agree wherever
    either run has them. Returns the -np 1 records."""
    results = {}
    for np_ in (1, 2):
        proc = run_app(np_, data, tmp_path / f"np{np_}", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[np_] = read_metrics(tmp_path / f"np{np_}")
    assert [r["kind"] for r in results[1]] == ["train", "eval"] * 3
    for a, b in zip(results[1], results[2]):
        for key in keys:
            if key in a or key in b:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    return results[1]


@pytest.mark.mpi
def test_a_flower_tutorial_client_learns_under_mpirun_with_the_same_metrics_at_any_np(mnist_iid, tmp_path):
    args = ("--reader", "arrays", "--flower-client", "examples.flower_client:client_fn", "--server-lr", "1",
            "--lr", "0.05", "--batch-size", "32", "--clients-per-round", "6", "--rounds", "3", "--eval-every", "1",
            "--eval-users", "10")
    records = same_metrics_at_np_1_and_2(mnist_iid, tmp_path, args, ("loss", "accuracy", "accuracy_user_mean"))
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["accuracy"] > 0.5 and evals[-1]["accuracy"] > evals[0]["accuracy"]   # chance is 0.1
    assert records[0]["loss"] > records[-2]["loss"]                                      # fit's train_loss


QUICKSTART = ("--reader", "arrays", "--flower-app", "examples.flower_app.client_app:app", "--flower-server",
              "examples.flower_app.server_app:app", "--run-config", "fraction-train=0.2", "--lr", "0.05",
              "--batch-size", "32", "--clients-per-round", "6", "--rounds", "3", "--eval-every", "1",
              "--eval-users", "10")


@pytest.mark.mpi
def test_flowers_quickstart_clientapp_learns_under_mpirun_with_the_same_metrics_at_any_np(mnist_iid, tmp_path):
    records = same_metrics_at_np_1_and_2(mnist_iid, tmp_path, QUICKSTART, ("train_loss", "eval_acc", "eval_loss",
                                                                          "eval_acc_user_mean", "eval_loss_user_mean"))
    evals = [r for r in records if r["kind"] == "eval"]
    assert all("eval_acc" in r and "eval_loss_user_mean" in r for r in evals)
    assert evals[-1]["eval_acc"] > 0.6 and evals[-1]["eval_acc"] > evals[0]["eval_acc"]      # chance is 0.1
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


@pytest.mark.mpi
def test_a_bad_reply_stops_every_rank_with_one_message(mnist_iid, tmp_path):
    proc = run_app(2, mnist_iid, tmp_path / "run", "--reader", "arrays", "--flower-app", "tests.test_flower:no_weight_app",
                   "--flower-server", "tests.test_flower:server_app", "--rounds", "3", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.count("replied without 'num-examples' in its MetricRecord") == 1 and out.count("error: ") == 1, out
    assert "Traceback" not in out and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_flower_client_composes_with_dp_clipping_and_compression(tiny):
    """The channel sees a Flower client's update like any other: fit's new arrays minus the global ones,
    clipped to C with weight 1 (not num_examples), then quantized; the int64 counter is a parameter too."""
    from flock.channel import UpdateChannel
    from flock.channel.clip import Clip
    from flock.channel.compress import Compress
    from flock.common.codecs import Codec

    shard, _ = make_shard(tiny)
    shard.channel = UpdateChannel([Clip(1.0)], seed=0)
    shard.train_user("cy", tiny.load("20200101", "train", "cy"), seed=3, round_index=1)
    # the update: +2 (cy's mean label) on six weights and +1 on the counter: norm 5, clipped to 1
    np.testing.assert_allclose(shard.sum.total[:6].numpy(), np.full(6, 2 / 5))
    assert shard.sum.total[6] == pytest.approx(7 + 1 / 5) and shard.sum.weight == 1.0
    shard.reset_sum()
    shard.channel = UpdateChannel([Compress(Codec("fp16", bits=16), Codec(), seed=0)], seed=0)
    shard.train_user("cy", tiny.load("20200101", "train", "cy"), seed=3, round_index=1)
    np.testing.assert_allclose(shard.sum.total[:6].numpy(), np.full(6, 4 * 2.0))     # n_k weights without clipping
    assert shard.sum.weight == 4.0


def test_a_serverapps_mean_strategy_runs_with_flocks_dp(tiny, tmp_path):
    """flock's DP options with a ServerApp's FedAvg: the clients clip (weight 1 each), the server noises the
    mean before the strategy's step, and the records carry epsilon."""
    config = Config(data_dir=str(tiny.data_dir), run_dir=str(tmp_path / "run"), reader="arrays", rounds=2,
                    clients_per_round=3, eval_every=1, lr=0.1, batch_size=8, local_epochs=2, dp_clip=0.5,
                    dp_noise_multiplier=0.5, dp_population=100, **message_api(server="server_app"))
    history = simulate(config)
    train = [r for r in history.records if r["kind"] == "train"]
    assert len(train) == 2 and 0 < train[0]["epsilon"] < train[1]["epsilon"] < math.inf
    assert np.isfinite(history.params["arrays.0"]).all() and not np.allclose(history.params["arrays.0"], 0.0)


# Flower's DP wrappers run as flock's own DP (the clients clip, the server noises the mean, flock accounts)
DP_WRAPPED = {
    "dp_fixed": lambda: flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.5, clipping_norm=0.5, num_sampled_clients=3),
    "dp_client_fixed": lambda: flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping(
        FedAvg(), noise_multiplier=0.5, clipping_norm=0.5, num_sampled_clients=3),
    "dp_adaptive": lambda: flwr.serverapp.strategy.DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.5, num_sampled_clients=3, initial_clipping_norm=0.5,
        target_clipped_quantile=0.4, clip_norm_lr=0.3, clipped_count_stddev=1.0),
    "dp_client_adaptive": lambda: flwr.serverapp.strategy.DifferentialPrivacyClientSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.5, num_sampled_clients=3, initial_clipping_norm=0.5,
        target_clipped_quantile=0.4, clip_norm_lr=0.3, clipped_count_stddev=1.0),
    "dp_fedadam": lambda: flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping(
        FedAdam(eta=0.05), noise_multiplier=0.5, clipping_norm=0.5, num_sampled_clients=3),
}
STRATEGIES.update(DP_WRAPPED)
dp_fixed_server, dp_adaptive_server, dp_fedadam_server = (make_server(k) for k in ("dp_fixed", "dp_adaptive",
                                                                                     "dp_fedadam"))
# Flower's clipping mod scales the update in place: it cannot take the integer counter
dp_client_fixed_server = make_server("dp_client_fixed", count_dtype=np.float32)
dp_client_adaptive_server = make_server("dp_client_adaptive", count_dtype=np.float32)
adaptive_clipping_app = ClientApp()
adaptive_clipping_app.train(mods=[flwr.clientapp.mod.adaptiveclipping_mod])(echo_train)
adaptive_clipping_app.evaluate()(echo_evaluate)
float_server = make_server("fedavg", count_dtype=np.float32)
clipping_app = ClientApp()
clipping_app.train(mods=[flwr.clientapp.mod.fixedclipping_mod])(echo_train)    # as Flower's DP docs show
clipping_app.evaluate()(echo_evaluate)
FIXED_DP = {"dp_clip": 0.5, "dp_noise_multiplier": 0.5, "dp_population": 100}
# Flower's target_clipped_quantile 0.4 (the share meant to be clipped) is the paper's gamma 0.6 (within the norm)
ADAPTIVE_DP = {"dp_clip": 0.5, "dp_noise_multiplier": 0.5, "dp_adaptive_quantile": 0.6,
               "dp_clip_lr": 0.3, "dp_clip_count_noise": 1.0, "dp_population": 100}


def dp_run(tiny, tmp_path, name, dp, **api):
    config = Config(data_dir=str(tiny.data_dir), run_dir=str(tmp_path / name), reader="arrays", rounds=2,
                    clients_per_round=3, eval_every=1, lr=0.1, batch_size=8, local_epochs=2, **dp, **api)
    history = simulate(config)
    return history.params["arrays.0"], [{k: v for k, v in r.items() if k not in ("seconds", "time", "clients_per_s",
                                                                               "rank_work_s")} for r in history.records]


@pytest.mark.parametrize("server, app, dp", [("dp_fixed_server", "echo_app", FIXED_DP),
                                             ("dp_client_fixed_server", "clipping_app", FIXED_DP),
                                             ("dp_adaptive_server", "echo_app", ADAPTIVE_DP),
                                             ("dp_client_adaptive_server", "adaptive_clipping_app", ADAPTIVE_DP)])
def test_flowers_dp_wrappers_run_as_flocks_dp(tiny, tmp_path, server, app, dp):
    """A DP wrapper around FedAvg gives the run that flock's own DP options give with the plain FedAvg
    ServerApp (the same noise, from flock's seeded streams; the client-side variant's clients clip in
    Flower's mod too, to the same norm)."""
    wrapped, wrapped_records = dp_run(tiny, tmp_path, "wrapped", dp, **message_api(app, server))
    plain, plain_records = dp_run(tiny, tmp_path, "plain", dp,     # clipped by flock only
                                  **message_api("echo_app", "server_app" if app == "echo_app" else "float_server"))
    assert wrapped_records[-1]["epsilon"] > 0 and [r["kind"] for r in wrapped_records] == ["train", "eval"] * 2
    if app == "echo_app":
        assert np.array_equal(wrapped, plain) and wrapped_records == plain_records
    else:           # clipped twice to the same norm: equal to float32 rounding
        np.testing.assert_allclose(wrapped, plain, rtol=1e-6)
    if "adaptive" in server:       # the norm moved after round 1, by the clients' own bits with Flower's mod
        clips = [r["dp_clip"] for r in wrapped_records if r["kind"] == "train"]
        assert clips[0] == 0.5 and clips[1] != 0.5
        assert clips == [r["dp_clip"] for r in plain_records if r["kind"] == "train"]


@pytest.mark.parametrize("server, dp, message", [
    ("dp_fixed_server", {}, r"give its settings as flock's options: --clients-per-round 3 --dp-clip 0.5 "
                            r"--dp-noise-multiplier 0.5 \(now --dp-clip 0, --dp-noise-multiplier 0\)"),
    ("dp_fixed_server", {**FIXED_DP, "dp_clip": 0.7}, r"\(now --dp-clip 0.7\)"),
    ("dp_adaptive_server", FIXED_DP, "--dp-adaptive-quantile 0.6 --dp-clip-lr 0.3 --dp-clip-count-noise 1"),
    ("dp_fedadam_server", FIXED_DP, "wraps FedAdam: flock adds the DP noise to the round's mean before the "
                                    "strategy's step"),
])
def test_a_dp_wrapper_that_flocks_options_do_not_match_is_named(tiny, server, dp, message):
    config = Config(data_dir=str(tiny.data_dir), rounds=3, run_config="num-server-rounds=3", clients_per_round=3,
                    **dp, **message_api(server=server))
    with pytest.raises(ConfigError, match=message):
        flower_plugins(config, tiny, TrainConfig(lr=0.1, batch_size=8, local_epochs=2))
