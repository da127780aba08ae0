"""Flower apps inside flock: a Flower client runs unchanged as the local trainer of every simulated phone.

    mpirun -np 2 python application.py DATA_DIR --reader arrays --flower-client mymod:client_fn --server-lr 1
    mpirun -np 2 python application.py DATA_DIR --reader arrays \\
        --flower-app mypkg.client_app:app --flower-server mypkg.server_app:app --run-config "fraction-train=0.1"

Two kinds of Flower client, one mechanism (`FlowerBridge`, `FlowerParams`, `FlowerTrainer`; the kinds differ
only in how a call is made and read: `NumPyClientCalls`, `ClientAppCalls`):
- `--flower-client`: the `client_fn(context)` you give Flower's `ClientApp`, returning a `NumPyClient` (or
  its `.to_client()`); flock asks it `get_parameters`, `fit`, `evaluate`. The global model is the list of
  arrays `get_parameters` returns (asked once, of the first user with training data, as Flower's server asks
  one client); `fit` gets `config = {"server_round", "local_epochs", "lr", "batch_size"}`; flock's
  scheduler aggregates (`--server-opt`; `--server-lr 1` is Flower's FedAvg).
- `--flower-app` with `--flower-server`: a Message-API `ClientApp` (`@app.train()`, `@app.evaluate()`)
  and its `ServerApp`. The ServerApp's main runs until its `strategy.start(...)` (trainer/flower_server.py):
  its initial arrays are the global model, its strategy is the server step, and each call's `Message`
  holds the global model as an ArrayRecord (the ServerApp's keys) and the config the strategy's
  `configure_train`/`configure_evaluate` makes (the ServerApp's train_config plus "server-round", ...).
  A train reply holds one ArrayRecord and one MetricRecord with "num-examples" (the FedAvg weight).

flock calls the client once per user and call, as Flower's simulation engine does, with a Flower `Context`:
`node_config` = {"partition-id": the user's index among all users of the data set (sorted ids),
"num-partitions": the number of users, "flock-user": the user's id}, `run_config` = {"num-server-rounds",
"local-epochs", "lr", "batch-size"} from flock's options, updated by `--run-config`. `user_samples(context)`
hands the client that user's samples from flock's reader (training samples in train/fit, test samples in
evaluate), so it needs no data loading of its own.

Before the first round every rank makes one train and one evaluate call (the first training user, the
first test user; not counted): a malformed reply is a set-up error (one message, exit status 2), and the
replies' metric names become the run's metrics. Every numeric metric is reported weighted by the number of
examples under its own name (`train_loss`, `eval_acc`; evaluation metrics also as per-user means,
`eval_acc_user_mean`). A NumPyClient's evaluate loss is `loss`; its fit's "train_loss" is also the round's
`loss`, as before.

Determinism: before every call flock seeds torch's, numpy's and Python's global generators from the
user's seed for the round, so a client that shuffles with them gives the same metrics at any -np. Those
generators are process-wide, so this trainer runs one shard per rank (`thread_safe = False`): use more ranks.
`flwr` is an optional extra (`pip install -r requirements-extras.txt`); nothing else in flock imports it.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from flock.common.errors import ConfigError
from flock.common.run_config import parse_run_config
from reader.base import Reader
from trainer.base import TrainConfig, current_call, simulating

log = logging.getLogger(__name__)

# fields of flock's metrics records: a client metric with one of these names would overwrite them
RECORD_FIELDS = frozenset({"kind", "round", "clients", "samples", "users", "seconds", "clients_per_s", "diverged",
                           "rank_work_s", "sim_time", "train_seconds"})


def user_samples(context: Any, split: str | None = None) -> dict[str, np.ndarray]:
    """The samples of the user `context` stands for, as flock's reader gives them (e.g. {"x": images,
    "y": labels}), as writable copies the client may keep or change.

    Under flock: the samples of the call being made (`split` "train" in train/fit, "test" in evaluate; the
    first training user's when flock asks for the initial parameters); a `split` given must be the call's.
    Elsewhere (e.g. the same app in Flower's own simulation engine): the training ("train", all training
    days) or test ("test") samples of partition `node_config["partition-id"]` of the flock data folder that
    `run_config["flock-data"]` names (read with `run_config["flock-reader"]`, default "arrays")."""
    samples = getattr(context, "flock_samples", None)
    if samples is not None:
        if split is not None and split != context.flock_split:
            raise ConfigError(f"user_samples(context, {split!r}): flock hands this call the user's "
                              f"{context.flock_split} samples")
        return {k: np.array(v) for k, v in samples.items()}
    data_dir = getattr(context, "run_config", {}).get("flock-data")
    if not data_dir:
        raise RuntimeError("user_samples(context): this context was not made by flock and its run_config names "
                           "no 'flock-data' folder")
    return partition_samples(str(data_dir), str(context.run_config.get("flock-reader", "arrays")),
                             int(context.node_config["partition-id"]), split or "train")


def partition_users(reader: Reader) -> list[str]:
    """Every user of every day and split, sorted: partition i is the i-th (the same on every rank)."""
    return sorted({u for day in reader.days() for split in ("train", "test")
                   if reader.has_split(day, split) for u in reader.index(day, split).users})


_OPENED: dict[tuple[str, str], tuple[Reader, list[str]]] = {}


def partition_samples(data_dir: str, reader_name: str, partition_id: int, split: str) -> dict[str, np.ndarray]:
    """Partition `partition_id`'s samples of `split` in a flock data folder: "test" from the test day (the
    last day), "train" from every other day, concatenated."""
    from flock.common.plugins import resolve
    from reader.calendar import Calendar

    if (data_dir, reader_name) not in _OPENED:
        reader = resolve("reader", reader_name)(Path(data_dir))
        _OPENED[data_dir, reader_name] = reader, partition_users(reader)
    reader, users = _OPENED[data_dir, reader_name]
    calendar = Calendar.from_reader(reader)
    uid = users[partition_id]
    days = (calendar.test_day,) if split == "test" else calendar.train_days
    parts = [reader.load(day, split, uid) for day in days if uid in reader.index(day, split).count_of()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def load_ref(ref: str, option: str) -> Any:
    """`module:name` -> the object; a ConfigError when flwr, the module or the name is missing."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError(f"{option} {ref!r}: flwr is not installed (it is an optional extra: "
                          f"pip install -r requirements-extras.txt)") from None
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{option} {ref!r}: expected 'module:name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ConfigError(f"{option} {ref!r}: cannot import module {module_name!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"{option} {ref!r}: module {module_name!r} has no {attr!r}") from None


def load_client_fn(ref: str) -> Callable[[Any], Any]:
    """`module:client_fn` -> the client_fn; a ConfigError when flwr or the function is missing."""
    fn = load_ref(ref, "--flower-client")
    from flwr.clientapp import ClientApp

    if isinstance(fn, ClientApp):
        if getattr(fn, "_call", None) is None:
            raise ConfigError(f"--flower-client {ref!r} is a Message-API ClientApp: run it with --flower-app "
                              f"(and its ServerApp with --flower-server)")
        raise ConfigError(f"--flower-client {ref!r} is a ClientApp: give the client_fn you built it with")
    if not callable(fn) or inspect.isclass(fn) or inspect.isbuiltin(fn):
        raise ConfigError(f"--flower-client {ref!r}: not a client_fn (a Python function of a Flower Context that "
                          f"returns a client), got {type(fn).__name__}")
    return fn


def load_client_app(ref: str) -> Any:
    """`module:app` -> a Message-API ClientApp with a train function; a ConfigError says what is wrong."""
    app = load_ref(ref, "--flower-app")
    from flwr.clientapp import ClientApp

    if not isinstance(app, ClientApp):
        raise ConfigError(f"--flower-app {ref!r}: not a ClientApp (got {type(app).__name__}); a client_fn runs "
                          f"with --flower-client")
    # flwr 1.41 keeps a ClientApp's functions private; read here so that the error comes before any round
    if getattr(app, "_call", None) is not None:
        raise ConfigError(f"--flower-app {ref!r}: a ClientApp built with client_fn: run that with --flower-client "
                          f"module:client_fn")
    if "train.default" not in getattr(app, "_registered_funcs", {"train.default": None}):
        raise ConfigError(f"--flower-app {ref!r}: the ClientApp has no train function: register one with "
                          f"@app.train()")
    return app


@dataclass(frozen=True)
class Reply:
    """A client's answer to one call, as flock uses it: the FedAvg weight, the numeric metrics, and (train)
    the trained arrays (a list in get_parameters' order, or by ArrayRecord key)."""

    num_examples: float
    metrics: dict[str, float]
    arrays: list[np.ndarray] | dict[str, np.ndarray] | None = None
    raw: dict[str, float] | None = None     # sums taken as they are (not weighted): e.g. "unclipped"

    @classmethod
    def checked(cls, num_examples: Any, metrics: Mapping[str, Any], arrays: Any, what: str) -> "Reply":
        """Numeric metrics only (text and lists are left out); a ConfigError names a bad weight or a metric
        that would overwrite a field of flock's records."""
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float, np.integer, np.floating)) \
                or not np.isfinite(num_examples) or num_examples < 0:
            raise ConfigError(f"{what}: the number of examples must be a number >= 0, got {num_examples!r}")
        numbers = {k: float(v) for k, v in (metrics or {}).items()
                   if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}
        clash = sorted(RECORD_FIELDS & set(numbers))
        if clash:
            raise ConfigError(f"{what}: metric {clash[0]!r} has the name of a field flock writes itself; rename it")
        return cls(float(num_examples), numbers, arrays)

    def sums(self) -> dict[str, float]:
        """flock's additive form: "samples" (n) and n * value as "<metric>_sum"."""
        return {"samples": self.num_examples, **{f"{k}_sum": v * self.num_examples for k, v in self.metrics.items()},
                **(self.raw or {})}


def _user(context: Any) -> str:
    return context.node_config["flock-user"]


class NumPyClientCalls:
    """--flower-client: a NumPyClient made per user and call by client_fn(context)."""

    option: ClassVar[str] = "--flower-client"
    train_call: ClassVar[str] = "fit"
    train_aliases: ClassVar[Mapping[str, str]] = {"loss": "train_loss"}     # fit's train_loss: the round's loss

    def __init__(self, client_fn: Callable[[Any], Any], ref: str) -> None:
        self.client_fn, self.ref = client_fn, ref

    def client(self, context: Any):
        from flwr.client import NumPyClient

        try:
            made = self.client_fn(context)
        except Exception as e:       # the plug-in is not of the kind it was named as: one message, not a traceback
            log.debug("--flower-client %s raised", self.ref, exc_info=True)
            raise ConfigError(f"--flower-client {self.ref}: client_fn(context) raised {type(e).__name__}: {e}") from None
        client = made if isinstance(made, NumPyClient) else getattr(made, "numpy_client", None)
        if not isinstance(client, NumPyClient):
            raise ConfigError(f"--flower-client {self.ref}: returned {type(made).__name__}; flock runs Flower "
                              f"NumPyClients (or their .to_client())")
        return client

    def initial(self, bridge: "FlowerBridge") -> tuple[list[str] | None, list[np.ndarray]]:
        """The global model: get_parameters of the first training user's client (as Flower's server asks one)."""
        user, samples = bridge.first_user("train")
        arrays = [np.asarray(a) for a in self.client(bridge.context(user, samples, "train")).get_parameters(config={})]
        if not arrays:
            raise ConfigError(f"--flower-client {self.ref}: get_parameters returned no arrays")
        return None, arrays

    def train(self, context: Any, arrays: list[np.ndarray], round_index: int, config: TrainConfig) -> Reply:
        fit_config = {"server_round": round_index, "local_epochs": config.local_epochs, "lr": config.lr,
                      "batch_size": config.batch_size}
        out = self.client(context).fit(arrays, fit_config)
        what = f"--flower-client {self.ref}: fit of user {_user(context)!r}"
        if not (isinstance(out, tuple) and len(out) == 3):
            raise ConfigError(f"{what} must return (arrays, num_examples, metrics), got {type(out).__name__}")
        new, n, metrics = out
        return Reply.checked(n, metrics, list(new), what)

    def evaluate(self, context: Any, arrays: list[np.ndarray], round_index: int) -> Reply | None:
        out = self.client(context).evaluate(arrays, {"server_round": round_index})
        what = f"--flower-client {self.ref}: evaluate of user {_user(context)!r}"
        if not (isinstance(out, tuple) and len(out) == 3):
            raise ConfigError(f"{what} must return (loss, num_examples, metrics), got {type(out).__name__}")
        loss, n, metrics = out
        return Reply.checked(n, {"loss": loss, **(metrics or {})}, None, what)


class ClientAppCalls:
    """--flower-app: a Message-API ClientApp called as `app(message, context)`, the way Flower's own
    runtime calls it, with the message its ServerApp's strategy would send."""

    option: ClassVar[str] = "--flower-app"
    train_call: ClassVar[str] = "train"
    train_aliases: ClassVar[Mapping[str, str]] = {}

    def __init__(self, app: Any, ref: str, plan: Any, num_nodes: int) -> None:
        self.app, self.ref, self.plan, self.num_nodes = app, ref, plan, num_nodes
        self.keys = list(plan.initial)
        self.has_evaluate = "evaluate.default" in getattr(app, "_registered_funcs", {"evaluate.default": None})
        self._sent: dict[str, tuple[int, Any]] = {}     # kind -> (round, the strategy's message for it)

    def initial(self, bridge: "FlowerBridge") -> tuple[list[str] | None, list[np.ndarray]]:
        return self.keys, list(self.plan.initial.values())

    def train(self, context: Any, arrays: list[np.ndarray], round_index: int, config: TrainConfig) -> Reply:
        return self._call("train", context, arrays, round_index)

    def evaluate(self, context: Any, arrays: list[np.ndarray], round_index: int) -> Reply | None:
        return self._call("evaluate", context, arrays, round_index) if self.has_evaluate else None

    def _call(self, kind: str, context: Any, arrays: list[np.ndarray], round_index: int) -> Reply:
        from flwr.app import Array, ArrayRecord, Message, RecordDict

        from trainer.flower_server import flower_calls, instruction

        strategy = self.plan.inner
        named = dict(zip(self.keys, arrays))
        with flower_calls():
            if self._sent.get(kind, (None,))[0] != round_index:     # the strategy's config: once per round
                config = self.plan.train_config if kind == "train" else self.plan.evaluate_config
                call = current_call()
                if self.plan.dp is not None and call is not None and call.clip > 0:
                    # a DP wrapper's clients clip to the round's norm (adaptive clipping's C_t is flock's)
                    self.plan.strategy.clipping_norm = call.clip
                self._sent[kind] = round_index, instruction(self.plan.strategy, kind, round_index, named, config,
                                                            self.num_nodes)
            sent = self._sent[kind][1]
            content = RecordDict({strategy.arrayrecord_key: ArrayRecord({k: Array(a) for k, a in named.items()}),
                                  strategy.configrecord_key: copy.deepcopy(sent.content[strategy.configrecord_key])})
            message = Message(content=content, dst_node_id=context.node_id, message_type=sent.metadata.message_type,
                              group_id=sent.metadata.group_id)
        return self._read(self.app(message, context), kind, f"--flower-app {self.ref}: {kind} of user "
                                                                f"{_user(context)!r}")

    def _read(self, reply: Any, kind: str, what: str) -> Reply:
        """A reply as Flower's strategies read it: one MetricRecord with the weight key, and for training one
        ArrayRecord; a ConfigError says what is missing."""
        from flwr.app import Message

        strategy = self.plan.inner
        if not isinstance(reply, Message):
            raise ConfigError(f"{what} returned {type(reply).__name__}, not a Message")
        if reply.has_error():
            raise ConfigError(f"{what} replied with an error: {reply.error.reason}")
        key = strategy.weighted_by_key
        metrics = list(reply.content.metric_records.values())
        if len(metrics) != 1 or key not in metrics[0]:
            raise ConfigError(f"{what} replied without {key!r} in its MetricRecord ({len(metrics)} MetricRecords): "
                              f"Flower's strategies weight each reply by it; reply e.g. RecordDict({{'arrays': "
                              f"ArrayRecord(model.state_dict()), 'metrics': MetricRecord({{'{key}': n, ...}})}})")
        weight = metrics[0][key]
        trained = None
        if kind == "train":
            records = list(reply.content.array_records.values())
            if len(records) != 1:
                raise ConfigError(f"{what} replied with {len(records)} ArrayRecords: reply the trained model as "
                                  f"one, e.g. RecordDict({{'arrays': ArrayRecord(model.state_dict()), ...}})"
                                  if records else f"{what} replied without arrays: put the trained model in an "
                                  f"ArrayRecord, e.g. RecordDict({{'arrays': ArrayRecord(model.state_dict()), ...}})")
            trained = {k: a.numpy() for k, a in records[0].items()}
        numbers = {k: v for k, v in metrics[0].items() if k != key}
        raw = None
        from flwr.serverapp.strategy import DifferentialPrivacyClientSideAdaptiveClipping as ClientSideAdaptive

        if kind == "train" and isinstance(self.plan.strategy, ClientSideAdaptive):
            # Flower's adaptiveclipping_mod clipped the update and says whether it had to (before flock's
            # channel sees it): its bit is the client's own report of whether it was within the norm
            from flwr.supercore.differential_privacy import KEY_NORM_BIT

            if KEY_NORM_BIT not in numbers:
                raise ConfigError(f"{what} replied without {KEY_NORM_BIT!r}: with {type(self.plan.strategy).__name__} "
                                  f"the ClientApp's train must run Flower's adaptiveclipping_mod")
            raw = {"unclipped": 0.0 if numbers.pop(KEY_NORM_BIT) else 1.0}
        reply = Reply.checked(weight, numbers, trained, what)
        return Reply(reply.num_examples, reply.metrics, reply.arrays, raw)


class FlowerBridge:
    """The run's Flower client (its kind of calls), flock's reader, and the Flower Context of each user and call."""

    def __init__(self, calls: NumPyClientCalls | ClientAppCalls, reader: Reader, run_config: Mapping[str, Any],
                 users: Sequence[str]) -> None:
        self.calls = calls
        self.reader = reader
        self.run_config = dict(run_config)
        self.partitions = {u: i for i, u in enumerate(users)}
        self.keys: list[str] | None = None
        self.initial: list[np.ndarray] = []

    def first_user(self, split: str) -> tuple[str, Mapping[str, np.ndarray]]:
        """The first user (file order) with samples of `split` on its first day (training: the first day with
        a training split; test: the last day, the test day), and those samples."""
        days = self.reader.days() if split == "train" else self.reader.days()[-1:]
        for day in days:
            if self.reader.has_split(day, split):
                index = self.reader.index(day, split)
                for user, count in zip(index.users, index.counts):
                    if count > 0:
                        return user, self.reader.load(day, split, user)
        raise ConfigError(f"{self.calls.option} {self.calls.ref}: the data has no user with {split} samples")

    def context(self, user: str, samples: Mapping[str, np.ndarray], split: str):
        from flwr.app import Context, RecordDict

        pid = self.partitions.get(user, 0)
        context = Context(run_id=0, node_id=pid + 1, state=RecordDict(), run_config=dict(self.run_config),
                          node_config={"partition-id": pid, "num-partitions": len(self.partitions), "flock-user": user})
        context.flock_samples, context.flock_split = samples, split
        return context


class FlowerParams(torch.nn.Module):
    """The global model as flock sees it: the client's arrays as float32 parameters `arrays.<i>` (cast back
    to each array's own dtype, e.g. BatchNorm's int64 counter, when handed to the client)."""

    private_patterns: ClassVar[tuple[str, ...]] = ()
    bridge: ClassVar[FlowerBridge]

    def __init__(self, arrays: list[np.ndarray], keys: list[str] | None = None) -> None:
        super().__init__()
        self.keys = keys
        self.dtypes = [a.dtype for a in arrays]
        self.arrays = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32)), requires_grad=False) for a in arrays])

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> "FlowerParams":
        return cls(cls.bridge.initial, cls.bridge.keys)

    def get(self) -> list[np.ndarray]:
        return [p.detach().cpu().numpy().astype(dt, copy=False) for p, dt in zip(self.arrays, self.dtypes)]

    @torch.no_grad()
    def set(self, arrays: list[np.ndarray] | Mapping[str, np.ndarray], what: str) -> None:
        """The client's new arrays (a list, or by key), checked against the global model's."""
        names = self.keys or [str(i) for i in range(len(self.arrays))]
        if isinstance(arrays, Mapping):
            missing, extra = [k for k in names if k not in arrays], [k for k in arrays if k not in names]
            if missing or extra:
                raise ConfigError(f"{what}: its arrays are not the global model's" +
                                  (f"; missing: {', '.join(map(repr, missing[:5]))}" if missing else "") +
                                  (f"; not in the global model: {', '.join(map(repr, extra[:5]))}" if extra else ""))
            arrays = [arrays[k] for k in names]
        if len(arrays) != len(self.arrays):
            raise ConfigError(f"{what} returned {len(arrays)} arrays, the global model has {len(self.arrays)}")
        for name, p, a in zip(names, self.arrays, arrays):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(p.shape):
                raise ConfigError(f"{what}: array {name!r} has shape {a.shape}, the global model's is {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.array(a, dtype=np.float32)))


def seed_globals(seed: int) -> None:
    """What flock does before every call of a Flower client: torch's, numpy's and Python's global generators
    seeded alike (call_seed for training, the user id's crc32 for evaluation)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def call_seed(rng: torch.Generator | None) -> int:
    """The seed of a training call, drawn from the user's generator for the round."""
    return int(torch.randint(2**31 - 1, (1,), generator=rng)) if rng is not None else 0


class FlowerTrainer:
    """Runs the user's Flower client's train (fit) / evaluate on the FlowerParams model. The ratios are the
    run's: set from the replies of the check calls (see `flower_plugins`)."""

    train_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {}
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {}
    main_metric: ClassVar[str] = ""
    thread_safe: ClassVar[bool] = False
    bridge: ClassVar[FlowerBridge]

    def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None:
        self.config = config

    def train(self, model: FlowerParams, samples: Mapping[str, np.ndarray],
              rng: torch.Generator | None = None) -> dict[str, float]:
        call = current_call()
        user, round_index = (call.user, call.round) if call else ("", 0)
        context = self.bridge.context(user, samples, "train")
        seed_globals(call_seed(rng))
        reply = self.bridge.calls.train(context, model.get(), round_index, self.config)
        calls = self.bridge.calls
        model.set(reply.arrays, f"{calls.option} {calls.ref}: {calls.train_call} of user {user!r}")
        return reply.sums()

    def evaluate(self, model: FlowerParams, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        call = current_call()
        user, round_index = (call.user, call.round) if call else ("", 0)
        context = self.bridge.context(user, samples, "test")
        seed_globals(zlib.crc32(user.encode()))
        reply = self.bridge.calls.evaluate(context, model.get(), round_index)
        return reply.sums() if reply is not None else {}

    @classmethod
    def aggregator(cls) -> tuple[str, dict[str, Any]] | None:
        """The per-client rule (name, settings) of the ServerApp's robust strategy (FedMedian, Krum, ...), or
        None: its step needs only the weighted mean (FedAvg, FedAdam, ...)."""
        from trainer.flower_server import per_client_rule

        return per_client_rule(cls.bridge.calls.plan.inner)

    @classmethod
    def server_step(cls, layout):
        """The ServerApp's strategy as the scheduler's server step (--flower-app), on its own copy."""
        from trainer.flower_server import StrategyStep

        calls = cls.bridge.calls
        return StrategyStep(copy.deepcopy(calls.plan.inner), keys=calls.keys,
                            dtypes=[np.asarray(a).dtype for a in cls.bridge.initial], layout=layout,
                            num_nodes=calls.num_nodes)


def server_notes(plan: Any, num_nodes: int, clients_per_round: int) -> list[str]:
    """What of a captured ServerApp flock does not do as Flower would."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    strategy, notes = plan.inner, []
    if plan.dp is not None:
        notes.append(f"its {type(plan.strategy).__name__} runs as flock's DP: the clients clip (each weighs 1, "
                     f"where Flower's {type(strategy).__name__} weighs them by examples), the server adds seeded "
                     f"noise to the round's mean before the strategy's step, and flock's accountant reports "
                     f"epsilon" + (" (adaptive clipping: the noise is at the round's own norm C_t, Flower's at "
                                   "the next one)" if "Adaptive" in type(plan.strategy).__name__ else ""))
    sampled = max(int(num_nodes * strategy.fraction_train), strategy.min_train_nodes)
    if sampled != clients_per_round:
        notes.append(f"its strategy would sample {sampled} of {num_nodes} nodes a round; flock samples "
                     f"--clients-per-round {clients_per_round}")
    if plan.evaluate_fn is not None:
        notes.append("its evaluate_fn (centralized evaluation) does not run; flock evaluates the test day's users "
                     "(--eval-every, --eval-users)")
    if any(fn is not aggregate_metricrecords for fn in (strategy.train_metrics_aggr_fn,
                                                         strategy.evaluate_metrics_aggr_fn)):
        notes.append("its metrics aggregation functions do not run; flock reports each metric's weighted mean")
    return notes


def check_dp_agrees(plan: Any, config: Any) -> None:
    """A ServerApp's DP wrapper runs as flock's own DP, so flock's options must say what the wrapper says:
    a ConfigError lists the options to give otherwise."""
    if plan.dp is None:
        return
    differ = [(name, value) for name, value in plan.dp.items()
              if not math.isclose(float(getattr(config, name)), float(value), rel_tol=1e-9, abs_tol=0.0)]
    if differ:
        wanted = " ".join(f"--{n.replace('_', '-')} {v:.12g}" for n, v in plan.dp.items())
        got = ", ".join(f"--{n.replace('_', '-')} {getattr(config, n):g}" for n, _ in differ)
        raise ConfigError(f"--flower-server {config.flower_server}: its {type(plan.strategy).__name__} runs as "
                          f"flock's DP, so give its settings as flock's options: {wanted} (now {got})")


def _metric_names(sums: Mapping[str, float]) -> list[str]:
    return [k[:-len("_sum")] for k in sums if k.endswith("_sum")]


def _ratios(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    return {name: (f"{name}_sum", "samples") for name in names}


def flower_plugins(config: Any, reader: Reader, train_config: TrainConfig, *, rank: int = 0) -> tuple[type, type]:
    """The model and trainer classes that run the Flower client of `config` (a flock Config: --flower-client,
    or --flower-app with --flower-server) over `reader`'s users. Makes the check calls (one train, one
    evaluate) and sets the run's metrics from their replies; a ConfigError says what is wrong. Rank 0 logs
    what of the ServerApp flock does not run."""
    run_config = {"num-server-rounds": config.rounds, "local-epochs": train_config.local_epochs,
                  "lr": train_config.lr, "batch-size": train_config.batch_size, **parse_run_config(config.run_config)}
    users = partition_users(reader)
    if config.flower_app:
        app = load_client_app(config.flower_app)
        from trainer.flower_server import capture_server_app

        plan = capture_server_app(load_ref(config.flower_server, "--flower-server"), config.flower_server,
                                  run_config, len(users))
        if plan.num_rounds != config.rounds:
            raise ConfigError(f"--flower-server {config.flower_server}: its strategy.start runs {plan.num_rounds} "
                              f"rounds, --rounds is {config.rounds}: make them agree (flock fills the run config's "
                              f"num-server-rounds from --rounds)")
        check_dp_agrees(plan, config)
        calls: NumPyClientCalls | ClientAppCalls = ClientAppCalls(app, config.flower_app, plan, len(users))
        if rank == 0:
            for note in server_notes(plan, len(users), config.clients_per_round):
                log.info("--flower-server %s: %s", config.flower_server, note)
    else:
        calls = NumPyClientCalls(load_client_fn(config.flower_client), config.flower_client)
    bridge = FlowerBridge(calls, reader, run_config, users)
    bridge.keys, bridge.initial = calls.initial(bridge)
    model_cls = type("FlowerParams", (FlowerParams,), {"bridge": bridge})
    trainer_cls = type("FlowerTrainer", (FlowerTrainer,), {"bridge": bridge})

    trainer = trainer_cls(train_config, {})
    user, samples = bridge.first_user("train")
    with simulating(user, 1):
        train_names = _metric_names(trainer.train(model_cls.build({}), samples, torch.Generator().manual_seed(0)))
    user, samples = bridge.first_user("test")
    with simulating(user, 0):
        eval_names = _metric_names(trainer.evaluate(model_cls.build({}), samples))
    main = next((n for n in eval_names if "acc" in n.lower()), eval_names[0] if eval_names else "")
    trainer_cls.train_ratios = {**_ratios(train_names), **{alias: (f"{name}_sum", "samples")
                                                            for alias, name in calls.train_aliases.items()
                                                            if name in train_names}}
    trainer_cls.eval_ratios = _ratios([main, *(n for n in eval_names if n != main)] if main else [])
    trainer_cls.main_metric = main
    return model_cls, trainer_cls
