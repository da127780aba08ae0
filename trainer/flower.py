"""Flower clients inside flock: an existing Flower `NumPyClient` (its `get_parameters`, `fit`, `evaluate`)
runs unchanged as the local trainer of every simulated phone.

    mpirun -np 2 python application.py DATA_DIR --reader arrays --flower-client mymod:client_fn --server-lr 1

`client_fn(context)` is the function you give Flower's `ClientApp`: it returns a `NumPyClient` (or its
`.to_client()`). flock calls it once per user and call, as Flower's simulation engine does, with a Flower
`Context` whose `run_config` holds "local-epochs", "lr" and "batch-size" (flock's options) and whose
`node_config` holds

    "partition-id"    the user's index among all users of the data set (sorted ids), 0 .. num-partitions - 1
    "num-partitions"  the number of users
    "flock-user"      the user's id in flock's data

and `user_samples(context)` hands it that user's samples from flock's reader (the training split inside
`fit`, the test split inside `evaluate`), so the client needs no data loading of its own. The global model
is the list of arrays `get_parameters` returns (asked once, of the first user with training data, as
Flower's server asks one client); `fit` gets them with `config = {"server_round", "local_epochs", "lr",
"batch_size"}` and returns new arrays, the FedAvg weight (num_examples) and metrics; flock's scheduler does the aggregation (`--server-opt`,
`--server-lr 1` is Flower's FedAvg). Metrics are weighted by num_examples: `evaluate`'s loss and its
"accuracy" are reported as `loss` and `accuracy` (plus per-user means), other numeric metrics as
`<name>_sum` in metrics.jsonl; `fit`'s "train_loss" as the round's training `loss`.

Determinism: before every call flock seeds torch's, numpy's and Python's global generators from the
user's seed for the round, so a client that shuffles with them gives the same metrics at any -np. Those
generators are process-wide, so this trainer runs one shard per rank (`thread_safe = False`): use more ranks.
`flwr` is an optional extra (`pip install -r requirements-extras.txt`); nothing else in flock imports it.
"""
from __future__ import annotations

import importlib
import random
import zlib
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from common.errors import ConfigError
from reader.base import Reader
from trainer.base import TrainConfig, current_call


def user_samples(context: Any) -> dict[str, np.ndarray]:
    """The samples of the user `context` stands for, for the call being made (train split in `fit`, test
    split in `evaluate`; the first training user's when flock asks for the initial parameters), as flock's
    reader gives them (e.g. {"x": images, "y": labels}), as writable copies the client may keep or change."""
    try:
        samples = context.flock_samples
    except AttributeError:
        raise RuntimeError("user_samples(context): this context was not made by flock's Flower adapter") from None
    return {k: np.array(v) for k, v in samples.items()}


def load_client_fn(ref: str) -> Callable[[Any], Any]:
    """`module:function` -> the client_fn; a ConfigError when flwr or the function is missing."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError(f"--flower-client {ref!r}: flwr is not installed (it is an optional extra: "
                          f"pip install -r requirements-extras.txt)") from None
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--flower-client {ref!r}: expected 'module:client_fn'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ConfigError(f"--flower-client {ref!r}: cannot import module {module_name!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"--flower-client {ref!r}: module {module_name!r} has no {attr!r}") from None
    from flwr.client import ClientApp

    if isinstance(fn, ClientApp):
        raise ConfigError(f"--flower-client {ref!r} is a ClientApp: give the client_fn you built it with")
    if not callable(fn):
        raise ConfigError(f"--flower-client {ref!r}: not a function")
    return fn


class FlowerBridge:
    """Makes one Flower client per user and call, with the user's Context and samples."""

    def __init__(self, client_fn: Callable[[Any], Any], reader: Reader, ref: str,
                 run_config: Mapping[str, Any] | None = None) -> None:
        self.client_fn = client_fn
        self.run_config = dict(run_config or {})
        self.reader = reader
        self.ref = ref
        self._partitions: dict[str, int] | None = None

    def partitions(self) -> dict[str, int]:
        if self._partitions is None:   # every user of every day and split, sorted: the same on every rank
            users = {u for day in self.reader.days() for split in ("train", "test")
                     if self.reader.has_split(day, split) for u in self.reader.index(day, split).users}
            self._partitions = {u: i for i, u in enumerate(sorted(users))}
        return self._partitions

    def _first_training_user(self) -> tuple[str, Mapping[str, np.ndarray]]:
        """The first user with training samples on the first training day, and those samples."""
        for day in self.reader.days():
            if self.reader.has_split(day, "train"):
                index = self.reader.index(day, "train")
                for user, count in zip(index.users, index.counts):
                    if count > 0:
                        return user, self.reader.load(day, "train", user)
        raise ConfigError(f"--flower-client {self.ref}: the data has no user with training samples")

    def client(self, user: str | None, samples: Mapping[str, np.ndarray] | None, round_index: int = 0):
        from flwr.app import RecordDict
        from flwr.client import NumPyClient
        from flwr.common import Context

        parts = self.partitions()
        if user is None:      # the initial parameters: asked of one client, as Flower's server does
            user, samples = self._first_training_user()
        pid = parts.get(user, 0)
        context = Context(run_id=0, node_id=pid + 1, state=RecordDict(), run_config=self.run_config,
                          node_config={"partition-id": pid, "num-partitions": len(parts), "flock-user": user})
        context.flock_samples = samples
        made = self.client_fn(context)
        client = made if isinstance(made, NumPyClient) else getattr(made, "numpy_client", None)
        if not isinstance(client, NumPyClient):
            raise ConfigError(f"--flower-client {self.ref}: returned {type(made).__name__}; flock runs Flower "
                              f"NumPyClients (or their .to_client())")
        return client


class FlowerParams(torch.nn.Module):
    """The global model as flock sees it: the client's arrays as float32 parameters `arrays.<i>` (cast back
    to each array's own dtype, e.g. BatchNorm's int64 counter, when handed to the client)."""

    private_patterns: ClassVar[tuple[str, ...]] = ()
    bridge: ClassVar[FlowerBridge]

    def __init__(self, arrays: list[np.ndarray]) -> None:
        super().__init__()
        self.dtypes = [a.dtype for a in arrays]
        self.arrays = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32)), requires_grad=False) for a in arrays])

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> "FlowerParams":
        client = cls.bridge.client(None, None)
        arrays = [np.asarray(a) for a in client.get_parameters(config={})]
        if not arrays:
            raise ConfigError(f"--flower-client {cls.bridge.ref}: get_parameters returned no arrays")
        return cls(arrays)

    def get(self) -> list[np.ndarray]:
        return [p.detach().cpu().numpy().astype(dt, copy=False) for p, dt in zip(self.arrays, self.dtypes)]

    @torch.no_grad()
    def set(self, arrays: list[np.ndarray], user: str) -> None:
        if len(arrays) != len(self.arrays):
            raise ValueError(f"fit of user {user!r} returned {len(arrays)} arrays, "
                             f"get_parameters gave {len(self.arrays)}")
        for i, (p, a) in enumerate(zip(self.arrays, arrays)):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"fit of user {user!r}: array {i} has shape {a.shape}, expected {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.array(a, dtype=np.float32)))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _weighted(sums: dict[str, float], metrics: Mapping[str, Any], n: float) -> None:
    for k, v in metrics.items():
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and k != "samples":
            sums[f"{k}_sum"] = float(v) * n


class FlowerTrainer:
    """Runs `fit` / `evaluate` of the user's Flower client on the FlowerParams model."""

    train_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"loss": ("train_loss_sum", "samples")}
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"accuracy": ("accuracy_sum", "samples"),
                                                            "loss": ("loss_sum", "samples")}
    thread_safe: ClassVar[bool] = False
    bridge: ClassVar[FlowerBridge]

    def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None:
        self.config = config

    def train(self, model: FlowerParams, samples: Mapping[str, np.ndarray],
              rng: torch.Generator | None = None) -> dict[str, float]:
        call = current_call()
        user, round_index = (call.user, call.round) if call else ("", 0)
        client = self.bridge.client(user, samples, round_index)
        _seed_everything(int(torch.randint(2**31 - 1, (1,), generator=rng)) if rng is not None else 0)
        fit_config = {"server_round": round_index, "local_epochs": self.config.local_epochs,
                      "lr": self.config.lr, "batch_size": self.config.batch_size}
        out = client.fit(model.get(), fit_config)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise ValueError(f"fit of user {user!r} must return (arrays, num_examples, metrics), "
                             f"got {type(out).__name__}")
        arrays, n, metrics = out
        model.set(list(arrays), user)
        sums = {"samples": float(n)}
        _weighted(sums, metrics or {}, float(n))
        return sums

    def evaluate(self, model: FlowerParams, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        call = current_call()
        user, round_index = (call.user, call.round) if call else ("", 0)
        client = self.bridge.client(user, samples, round_index)
        _seed_everything(zlib.crc32(user.encode()))
        out = client.evaluate(model.get(), {"server_round": round_index})
        if not (isinstance(out, tuple) and len(out) == 3):
            raise ValueError(f"evaluate of user {user!r} must return (loss, num_examples, metrics), "
                             f"got {type(out).__name__}")
        loss, n, metrics = out
        sums = {"samples": float(n), "loss_sum": float(loss) * float(n)}
        _weighted(sums, metrics or {}, float(n))
        return sums


def flower_plugins(ref: str, reader: Reader, config: TrainConfig) -> tuple[type, type]:
    """The model and trainer classes that run `ref`'s Flower client over `reader`'s users."""
    run_config = {"local-epochs": config.local_epochs, "lr": config.lr, "batch-size": config.batch_size}
    bridge = FlowerBridge(load_client_fn(ref), reader, ref, run_config)
    model_cls = type("FlowerParams", (FlowerParams,), {"bridge": bridge})
    trainer_cls = type("FlowerTrainer", (FlowerTrainer,), {"bridge": bridge})
    return model_cls, trainer_cls
