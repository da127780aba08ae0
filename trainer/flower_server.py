"""The server half of a Flower app inside flock: what a Message-API `ServerApp` declares, and its strategy as
flock's server step.

A Flower 1.2x `ServerApp` is a `main(grid, context)` that builds the model and a strategy and hands the
rounds to `strategy.start(grid=..., initial_arrays=..., num_rounds=..., train_config=..., ...)`. flock runs
that main once per process with a Grid of its own and stops it at `start`, keeping what it was given: the
strategy, the initial arrays, the number of rounds and the train/evaluate configs (the code after `start`,
e.g. saving the final model, does not run; neither does a centralized `evaluate_fn`).

Strategies whose step depends on the clients only through their weighted mean (FedAvg, FedAvgM, FedProx,
FedAdam, FedYogi, FedAdagrad, and subclasses that keep their `aggregate_train`) run on flock's linear path:
`StrategyStep` hands such a strategy the round's weighted mean as a single reply weighted 1, after
`configure_train` (which sets FedOpt's reference arrays), so the strategy's own code (FedAdam's bias
correction included) makes the step. The strategies that need every reply (FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan, and QFedAvg, which also reads each reply's training loss) run on the
per-client path with the rule of
`scheduler/aggregators.py` that computes what their `aggregate_train` computes, with the strategy's own
settings (`per_client_rule` names it; flock/run.py builds it); the step is then the aggregated model.

This module imports flwr (an optional extra): trainer/flower.py loads it once flwr is known to be there.
"""
from __future__ import annotations

import copy
import inspect
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as strategies
from flwr.supercore.task_identity import TaskIdentity

from flock.common.domain import ParamLayout
from flock.common.errors import ConfigError, FlockError

log = logging.getLogger(__name__)

MEAN_STRATEGIES = ("FedAvg", "FedAvgM", "FedProx", "FedAdam", "FedYogi", "FedAdagrad")
STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")     # FedOpt's moments, FedAvgM's momentum


@contextmanager
def flower_calls() -> Iterator[None]:
    """Around flock's calls into Flower's server code: Flower's INFO lines (one per sampling and aggregation)
    stay quiet, Python's global random generator (which Flower samples nodes with) is left as it was, and
    messages can be made (Flower wants a task identity in the process, which its runtime would set)."""
    flwr_log = logging.getLogger("flwr")
    level, state = flwr_log.level, random.getstate()
    flwr_log.setLevel(logging.WARNING)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1   # as flwr.server.compat does
    try:
        yield
    finally:
        flwr_log.setLevel(level)
        random.setstate(state)


class FlockGrid(Grid):
    """A Flower Grid with `num_nodes` nodes to sample from; anything else a ServerApp asks of it is an error
    that says flock runs the rounds."""

    def __init__(self, num_nodes: int, ref: str = "") -> None:
        self.num_nodes, self.ref = num_nodes, ref

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_nodes + 1))

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError(f"--flower-server {self.ref}: flock runs the rounds; its ServerApp must hand them to a "
                          f"strategy's start(grid=..., initial_arrays=..., ...) and use the grid no further")

    set_run = create_message = push_messages = pull_messages = send_and_receive = _refuse
    run = property(_refuse)


def instruction(strategy: Any, kind: str, server_round: int, arrays: Mapping[str, np.ndarray],
                config: Mapping[str, Any], num_nodes: int) -> Message:
    """The Message `strategy` sends a node for `kind` ("train"/"evaluate") in `server_round`, from its
    `configure_train`/`configure_evaluate` (so a strategy's own keys, e.g. FedProx's "proximal-mu", and
    "server-round" are in its config). Call it inside `flower_calls()`."""
    record = ArrayRecord({k: Array(np.asarray(a)) for k, a in arrays.items()})
    configure = strategy.configure_train if kind == "train" else strategy.configure_evaluate
    message = next(iter(configure(server_round, record, ConfigRecord(copy.deepcopy(dict(config))),
                                  FlockGrid(num_nodes))), None)
    if message is None:     # e.g. fraction_evaluate=0: Flower would skip the call; flock's schedule makes it
        content = RecordDict({strategy.arrayrecord_key: record, strategy.configrecord_key:
                              ConfigRecord({**copy.deepcopy(dict(config)), "server-round": server_round})})
        message = Message(content=content, dst_node_id=1, message_type=kind, group_id=str(server_round))
    return message


class _Started(Exception):
    """Stops a ServerApp's main at `strategy.start` (nothing after it runs)."""


@dataclass
class ServerPlan:
    """What a ServerApp handed `strategy.start`. `strategy` is the ServerApp's (it configures the clients'
    calls); `inner` the one whose aggregation flock runs (a DP wrapper's wrapped strategy, else `strategy`),
    and `dp` the flock options that do what a DP wrapper does (None without one)."""

    strategy: Any                            # a flwr.serverapp.strategy.Strategy
    initial: dict[str, np.ndarray]           # the initial arrays by key, in the ArrayRecord's order
    num_rounds: int
    train_config: dict[str, Any]
    evaluate_config: dict[str, Any]
    evaluate_fn: Callable | None
    inner: Any = None
    dp: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.inner is None:
            self.inner = self.strategy


def capture_server_app(app: Any, ref: str, run_config: Mapping[str, Any], num_nodes: int) -> ServerPlan:
    """Runs the ServerApp `app`'s main up to its `strategy.start(...)` and returns what it was given; a
    ConfigError says why a ServerApp cannot run in flock (not a Message-API ServerApp, no start, a strategy
    that needs every client's reply)."""
    if not isinstance(app, ServerApp):
        raise ConfigError(f"--flower-server {ref!r}: not a ServerApp (got {type(app).__name__})")
    started: dict[str, Any] = {}
    signature = inspect.signature(strategies.Strategy.start)

    def start(*args: Any, **kwargs: Any):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        started.update(bound.arguments)
        raise _Started

    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config=dict(run_config))
    original = strategies.Strategy.start
    strategies.Strategy.start = start       # restored below: only this call of the app's main sees it
    try:
        with flower_calls():
            app(FlockGrid(num_nodes, ref), context)
    except _Started:
        pass
    except FlockError:
        raise
    except Exception as e:       # the user's main: its KeyError for a missing run-config key, ...
        raise ConfigError(f"--flower-server {ref}: its main raised {type(e).__name__}: {e}"
                          + (" (give the app's run config with --run-config 'key=value ...')"
                             if isinstance(e, KeyError) else "")) from None
    finally:
        strategies.Strategy.start = original
    if not started:
        raise ConfigError(f"--flower-server {ref}: its main returned without calling strategy.start(...); flock "
                          f"runs ServerApps that hand their rounds to a strategy")
    strategy, initial = started["self"], started["initial_arrays"]
    dp = dp_options(strategy, ref)
    inner = strategy.strategy if dp is not None else strategy
    check_mean_strategy(inner, ref)
    if dp is not None and getattr(type(inner), "aggregate_train", None) is not strategies.FedAvg.aggregate_train:
        raise ConfigError(f"--flower-server {ref}: {type(strategy).__name__} wraps {type(inner).__name__}: flock "
                          f"adds the DP noise to the round's mean before the strategy's step, which is where "
                          f"Flower adds it only for a strategy that aggregates as FedAvg does (FedAvg, FedProx)")
    if not isinstance(initial, ArrayRecord) or not len(initial):
        raise ConfigError(f"--flower-server {ref}: strategy.start got no initial_arrays (an ArrayRecord of the "
                          f"model, e.g. ArrayRecord(Net().state_dict()))")
    return ServerPlan(strategy=strategy, initial={k: a.numpy() for k, a in initial.items()},
                      num_rounds=int(started["num_rounds"]), train_config=dict(started["train_config"] or {}),
                      evaluate_config=dict(started["evaluate_config"] or {}), evaluate_fn=started["evaluate_fn"],
                      inner=inner, dp=dp)


FIXED_DP = ("DifferentialPrivacyServerSideFixedClipping", "DifferentialPrivacyClientSideFixedClipping")
ADAPTIVE_DP = ("DifferentialPrivacyServerSideAdaptiveClipping", "DifferentialPrivacyClientSideAdaptiveClipping")


def dp_options(strategy: Any, ref: str) -> dict[str, Any] | None:
    """The flock options that do what Flower's DP wrapper `strategy` does (flock's channel: clients clip, the
    server noises the round's mean, the accountant counts), or None when `strategy` is not one. Adaptive
    clipping: Flower keeps the update's multiplier z_delta; flock's option is the z it comes from
    (z^-2 = z_delta^-2 + (2 sigma_b)^-2). Flower's `target_clipped_quantile` is the fraction of updates
    meant to be clipped, so the paper's gamma (the fraction within the norm, --dp-adaptive-quantile) is one
    minus it; flock runs the paper's update (Andrew et al. 2021), where flwr 1.41's code counts the clipped
    clients in the formula for the unclipped ones (its norm shrinks when every update is clipped)."""
    kind = type(strategy).__name__
    if not any(isinstance(strategy, getattr(strategies, name)) for name in (*FIXED_DP, *ADAPTIVE_DP)):
        return None
    options: dict[str, Any] = {"clients_per_round": int(strategy.num_sampled_clients)}
    if any(isinstance(strategy, getattr(strategies, name)) for name in FIXED_DP):
        if getattr(strategy, "accountant", None) is not None:
            log.info("--flower-server %s: %s's accountant does not run; flock's reports epsilon", ref, kind)
        return {**options, "dp_clip": float(strategy.clipping_norm),
                "dp_noise_multiplier": float(strategy.noise_multiplier)}
    z_delta, sigma_b = float(strategy.noise_multiplier), float(strategy.clipped_count_stddev)
    if not (z_delta > 0 and sigma_b > 0):
        raise ConfigError(f"--flower-server {ref}: {kind} with noise multiplier {z_delta:g} and count noise "
                          f"{sigma_b:g}: flock's adaptive clipping noises the update and the count together")
    z = (z_delta ** -2 + (2 * sigma_b) ** -2) ** -0.5
    if not 0 < strategy.target_clipped_quantile < 1:
        raise ConfigError(f"--flower-server {ref}: {kind}'s target_clipped_quantile "
                          f"{strategy.target_clipped_quantile:g}: flock's --dp-adaptive-quantile is in (0, 1)")
    return {**options, "dp_clip": float(strategy.clipping_norm), "dp_noise_multiplier": z,
            "dp_adaptive_quantile": 1.0 - float(strategy.target_clipped_quantile),
            "dp_clip_lr": float(strategy.clip_norm_lr),
            "dp_clip_count_noise": sigma_b}


def check_mean_strategy(strategy: Any, ref: str) -> None:
    """A ConfigError unless `strategy` aggregates as one of MEAN_STRATEGIES does (its step depends on the
    clients only through their weighted mean) or as one that `per_client_rule` maps to flock's rules."""
    allowed = {getattr(strategies, name).aggregate_train for name in MEAN_STRATEGIES}
    if getattr(type(strategy), "aggregate_train", None) not in allowed and per_client_rule(strategy) is None:
        raise ConfigError(f"--flower-server {ref}: strategy {type(strategy).__name__} is not one flock runs: the "
                          f"mean strategies ({', '.join(MEAN_STRATEGIES)}) and the robust ones "
                          f"({', '.join(PER_CLIENT_STRATEGIES)})")


PER_CLIENT_STRATEGIES = ("FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan", "QFedAvg")


def per_client_rule(strategy: Any) -> tuple[str, dict[str, Any]] | None:
    """The per-client rule (a name of scheduler/aggregators.py's `RULES` and its settings) that computes what
    `strategy`'s aggregate_train computes, with the strategy's settings; None: not one of
    PER_CLIENT_STRATEGIES, or a subclass with its own aggregate_train, or a Bulyan with its own selection."""
    from flwr.serverapp.strategy.multikrum import select_multikrum

    method = getattr(type(strategy), "aggregate_train", None)
    if method is strategies.FedMedian.aggregate_train:
        return "median", {}
    if method is strategies.FedTrimmedAvg.aggregate_train:
        return "trimmed-mean", {"beta": float(strategy.beta)}
    if method is strategies.MultiKrum.aggregate_train:       # Krum is a MultiKrum that keeps 1
        return "krum", {"f": int(strategy.num_malicious_nodes), "m": int(strategy.num_nodes_to_select)}
    if method is strategies.Bulyan.aggregate_train and strategy.selection_rule is select_multikrum:
        return "bulyan", {"f": int(strategy.num_malicious_nodes), "selection": "multi-krum"}
    if method is strategies.QFedAvg.aggregate_train:
        return "qfedavg", {"q": float(strategy.q), "lr": float(strategy.client_learning_rate),
                           "loss_metric": str(strategy.train_loss_key)}
    return None


class StrategyStep:
    """A Flower strategy as flock's server step (a ServerOptimizer, see scheduler/optim/base.py): each step
    is the strategy's `configure_train` then `aggregate_train` on one reply that holds the round's weighted
    mean model (params + mean_delta). Array keys and dtypes are the ServerApp's initial ArrayRecord's;
    `server_round` counts the applied steps (a round that failed on phones is not one)."""

    def __init__(self, strategy: Any, *, keys: list[str], dtypes: list[np.dtype], layout: ParamLayout,
                 num_nodes: int) -> None:
        if len(keys) != len(layout.names):
            raise ValueError(f"{len(keys)} array keys for {len(layout.names)} parameters")
        self.strategy, self.keys, self.dtypes, self.layout = strategy, keys, dtypes, layout
        self.num_nodes = num_nodes
        self.rounds = 0
        # a robust strategy's aggregate comes from the per-client path: the step is the aggregated model
        self.per_client = per_client_rule(strategy) is not None

    def _arrays(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """flat -> {key: array}, floating arrays in their own dtype (others stay float64, as Flower's mean
        of integer arrays is)."""
        parts = self.layout.split(flat)
        return {k: (parts[n].astype(dt) if np.issubdtype(dt, np.floating) else parts[n].astype(np.float64))
                for k, n, dt in zip(self.keys, self.layout.names, self.dtypes)}

    def step(self, params: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        self.rounds += 1
        mean_delta += params            # the weighted mean model, in float64 (the scheduler's work buffer)
        if self.per_client:             # the robust rule's model, in the arrays' own dtypes as Flower returns it
            return self.layout.flatten(dict(zip(self.layout.names, self._arrays(mean_delta).values())))
        with flower_calls():
            sent = instruction(self.strategy, "train", self.rounds, self._arrays(params), {}, self.num_nodes)
            mean = ArrayRecord({k: Array(a) for k, a in self._arrays(mean_delta).items()})
            reply = Message(RecordDict({"arrays": mean, "metrics": MetricRecord({self.strategy.weighted_by_key: 1})}),
                            reply_to=sent)
            arrays, _ = self.strategy.aggregate_train(self.rounds, [reply])
        if arrays is None:
            raise ConfigError(f"round {self.rounds}: strategy {type(self.strategy).__name__} aggregated nothing")
        return self.layout.flatten({n: arrays[k].numpy() for k, n in zip(self.keys, self.layout.names)})

    def state_dict(self) -> dict[str, Any]:
        """The step count and the strategy's moment arrays (FedOpt's m_t/v_t, FedAvgM's momentum), flat in
        float64 with their dtypes."""
        state: dict[str, Any] = {"flower_rounds": self.rounds}
        for name in STRATEGY_STATE:
            value = getattr(self.strategy, name, None)
            if value:
                arrays = list(value.values()) if isinstance(value, dict) else list(value)
                state[name] = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])
                state[f"{name}_dtypes"] = [str(np.asarray(a).dtype) for a in arrays]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state.get("flower_rounds", 0))
        for name in STRATEGY_STATE:
            if name not in state:
                continue
            parts = self.layout.split(np.asarray(state[name], np.float64))
            arrays = [parts[n].astype(dt) for n, dt in zip(self.layout.names, state[f"{name}_dtypes"])]
            setattr(self.strategy, name, dict(zip(self.keys, arrays)) if name != "momentum_vector" else arrays)
