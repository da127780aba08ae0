"""The run's options as one frozen, validated dataclass: the one place that says each option's default,
help, and the rule its value must meet. The command line, config files and a saved run's config.json all
build a `Config`, so every value passes the same checks (type, finite, range, known choice)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from flock.channel import check_channel_options
from flock.channel.accounting import central_dp_noise
from flock.common.errors import ConfigError
from flock.common.run_config import format_run_config, parse_run_config

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TRACKERS = ("csv", "mlflow", "wandb")
# scheduler/optim's SERVER_OPTIMIZERS by name (common/ never imports the scheduler; a test keeps the two equal)
SERVER_OPTIMIZER_NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# scheduler/selection's NAMES (its built-in selectors; module:Class names a user's own), by the same rule
SELECTIONS = ("uniform", "oort", "power-of-choice")
LIST_OPTIONS = ("private", "tracker")     # repeatable options: a tuple of strings
BUILTIN_DATA = "lm_data"      # the documented DATA_DIR that is built from the built-in corpus when missing
# upper bounds that no real study reaches and a machine can hold (nothing is built in proportion to them up
# front: the schedule is computed step by step, a round's lists are as long as its clients)
MAX_ROUNDS = 10_000_000
MAX_USERS = 1_000_000          # clients a round, test users evaluated, results a round needs
MAX_POPULATION = 10_000_000_000
MAX_EPOCHS = 10_000
MAX_STEP = 1e300               # step sizes: any finite one may be studied (a diverging run is stopped, not hidden)


def opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
        hi_open: bool = False, choices: Sequence[str] | None = None) -> Any:
    """A Config field: its default, help text and rule (a closed or open range, or choices)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "hi_open": hi_open, "choices": tuple(choices) if choices else None})


COMMAND_LINE, FILE, CALLER = "command line", "config file", "caller"


def list_value(name: str, values: Sequence[str]) -> tuple[str, ...]:
    """A repeatable option's values as a tuple; --tracker's may also be comma-separated."""
    if name == "tracker":
        return tuple(t.strip() for v in values for t in v.split(",") if t.strip())
    return tuple(values)


def parse_target(text: str) -> tuple[str, float] | None:
    """--target METRIC=VALUE -> (metric, value), or None when empty."""
    if not text:
        return None
    metric, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not metric.strip() or not math.isfinite(number):
        raise ConfigError(f"--target must be METRIC=VALUE with a finite number (e.g. top1=0.9), got {text!r}")
    return metric.strip(), number


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Config:
    data_dir: str = opt("", "day folders (YYYYMMDD/train_data.json, ...) and vocab.json")
    rounds: int = opt(100, "training rounds (FL-mobile's Reddit benchmark: 100)", lo=1, hi=MAX_ROUNDS)
    clients_per_round: int = opt(10, "users sampled uniformly without replacement each round", lo=1,
                                   hi=MAX_USERS)
    local_epochs: int = opt(1, "local epochs over each user's data (in order, unshuffled)", lo=1, hi=MAX_EPOCHS)
    batch_size: int = opt(5, "local batch size (sequences)", lo=1, hi=1_000_000)
    lr: float = opt(1.0, "client SGD learning rate", lo=0, lo_open=True, hi=MAX_STEP)
    server_lr: float = opt(1.85, "server learning rate: theta += server_lr * weighted mean client delta",
                           lo=0, lo_open=True, hi=MAX_STEP)
    server_opt: str = opt("fedavg", "server optimizer: fedavg, fedavgm (server momentum), fedadam, fedyogi, "
                          "fedadagrad (FedOpt)", choices=SERVER_OPTIMIZER_NAMES)
    server_momentum: float = opt(0.9, "fedavgm's momentum", lo=0, hi=1, hi_open=True)
    server_beta1: float = opt(0.9, "fedadam/fedyogi/fedadagrad: first-moment decay", lo=0, hi=1, hi_open=True)
    server_beta2: float = opt(0.99, "fedadam/fedyogi: second-moment decay", lo=0, hi=1, hi_open=True)
    server_tau: float = opt(1e-3, "fedadam/fedyogi/fedadagrad: adaptivity (epsilon) tau", lo=0, lo_open=True,
                             hi=1e6)
    prox_mu: float = opt(0.0, "FedProx: weight mu of the local proximal term mu/2 ||w - w_global||^2 (0: FedAvg)",
                         lo=0, hi=1e6)
    momentum: float = opt(0.0, "local SGD momentum (0: plain SGD, as FL-mobile)", lo=0, hi=1, hi_open=True)
    finetune_epochs: int = opt(0, "also report each user's accuracy after this many local epochs of fine-tuning "
                               "on its training data (personalization; reported as top1_ft, top1_ft_user_mean); "
                               "0: off", lo=0, hi=MAX_EPOCHS)
    max_grad_norm: float = opt(5.0, "clip each local step's gradient to this global norm (0: no clipping)", lo=0,
                                hi=1e9)
    seed: int = opt(0, "fixes initialisation, sampling and evaluation users; same seed, same metrics at any -np",
                    lo=0, hi=2**63 - 1)
    eval_every: int = opt(10, "evaluate on the test day every this many rounds (and after the last); 0: only "
                          "at the end", lo=0, hi=MAX_ROUNDS)
    eval_users: int = opt(0, "evaluate this many test users (a fixed seeded subset); 0: all of them", lo=0,
                         hi=MAX_USERS)
    run_dir: str = opt("", "where config.json and metrics.jsonl go; empty means runs/<timestamp>")
    reader: str = opt("leaf", "data reader: built-in short name or module:Class")
    model: str = opt("lstm", "model: built-in short name or module:Class")
    trainer: str = opt("lm", "local trainer: built-in short name or module:Class")
    flower_client: str = opt("", "run a Flower NumPyClient as every phone's trainer: module:client_fn (the "
                             "function given to Flower's ClientApp); replaces --model and --trainer; needs the "
                             "flwr extra")
    flower_app: str = opt("", "run a Flower ClientApp (Message API: @app.train, @app.evaluate) as every phone's "
                          "trainer: module:app; with --flower-server; replaces --model and --trainer")
    flower_server: str = opt("", "the Flower ServerApp (module:app) of --flower-app: its strategy.start(...) gives "
                             "the initial model, the round config and the server step (FedAvg, FedAvgM, FedProx, "
                             "FedAdam, FedYogi, FedAdagrad; FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan on the "
                             "per-client path)")
    run_config: str = opt("", "a Flower app's run config (context.run_config): 'key=value ...' with TOML values, "
                          "or a [run-config] table in a config file; it updates the keys flock fills from its "
                          "options: num-server-rounds, local-epochs, lr, batch-size")
    private: tuple[str, ...] = opt((), "parameter name pattern (fnmatch) to keep private per user; repeatable, "
                                   "e.g. 'decoder.bias'")
    data_server: str = opt("memory", "where private parameters live on each rank: memory, or sqlite under the "
                           "run dir", choices=("memory", "sqlite"))
    data_plane: str = opt("mpi", "how parameters and updates move between the ranks: mpi (node-shared memory, "
                          "MPI between nodes; plans and metrics still go through the scheduler) or grpc (every "
                          "rank through the scheduler's gRPC service)", choices=("mpi", "grpc"))
    shards: int = opt(0, "trainers per rank, each a thread with one torch thread (0: this node's cores / its "
                      "ranks)", lo=0, hi=1024)
    device: str = opt("auto", "where shards train: cuda when visible (auto), or cpu, or cuda; same-seed-same-"
                      "metrics across rank counts is guaranteed on cpu", choices=("auto", "cpu", "cuda"))
    scheduler_host: str = opt("127.0.0.1", "address the scheduler binds on rank 0 (loopback by default)")
    round_timeout: float = opt(600.0, "seconds a rank waits for the other ranks to finish a round (or "
                               "evaluation) before the job fails", lo=0, lo_open=True, hi=1e7)
    log_level: str = opt("INFO", "DEBUG, INFO, WARNING or ERROR", choices=LOG_LEVELS)
    quiet: bool = opt(False, "no per-round progress; warnings, errors and the final result only")
    config: str = opt("", "read options from a TOML, YAML or JSON file (keys as the long option names; a run's "
                      "saved config.json works too); options given on the command line win")
    centralized: bool = opt(False, "the non-federated baseline: one process trains one model on the pooled "
                            "training data, with the federated run's sample visits per round (run without "
                            "mpirun or with -np 1)")
    builtin_data: bool = opt(False, f"build DATA_DIR from the built-in popquotes corpus if it does not exist "
                             f"(implied for the default name {BUILTIN_DATA!r})")
    device_profiles: str = opt("", "phones' speeds and links: 'builtin' (seeded lognormal per user), or a file "
                               "(FedScale's device-capacity pickle or JSON, or a per-user CSV/JSON table); starts "
                               "the virtual clock (sim_time); empty: no clock, every sampled client trains")
    availability: str = opt("always", "when phones are on-line (needs --device-profiles): always, round:P, "
                            "daily:P0,...,P23 (hourly probabilities), daily:FILE, trace:FILE (FedScale's "
                            "client_behave_trace or JSON)")
    over_select: float = opt(1.0, "select this many times --clients-per-round on-line phones; the round ends at "
                             "the K-th finisher (needs --device-profiles)", lo=1, hi=100)
    deadline: float = opt(0.0, "virtual seconds a synchronous round waits at most; later results are "
                          "discarded (0: no deadline; needs --device-profiles)", lo=0, hi=1e9)
    min_clients: int = opt(1, "fewer results than this make a failed round (counted, nothing applied; needs "
                           "--device-profiles)", lo=1, hi=MAX_USERS)
    async_buffer: int = opt(0, "asynchronous aggregation (FedBuff): a server update every K client updates, "
                            "in virtual-time order (1: FedAsync); --rounds then counts server updates; 0: "
                            "synchronous rounds. Phones time the tasks (--device-profiles, builtin by default)",
                            lo=0, hi=512)
    async_concurrency: int = opt(0, "asynchronous mode: clients training at once (0: --clients-per-round)", lo=0,
                                 hi=1_000_000)
    async_max_staleness: int = opt(-1, "asynchronous mode: discard updates made from a version more than this "
                                   "many updates old (-1: no limit)", lo=-1, hi=MAX_ROUNDS)
    staleness_exponent: float = opt(0.5, "asynchronous mode: an update s versions stale weighs (1 + s)^-a "
                                    "(0.5: FedBuff's 1/sqrt(1 + s); 0: all alike)", lo=0, hi=16)
    # client selection (scheduler/selection/): who trains among the on-line phones
    selection: str = opt("uniform", "how clients are chosen among the on-line phones (needs --device-profiles or "
                         "--async-buffer): uniform (at random), oort (Oort: high training loss and short durations), "
                         "power-of-choice (the highest last reported losses of --selection-pool random ones), or "
                         "module:Class")
    selection_pool: int = opt(0, "oort, power-of-choice: how many on-line phones, drawn at random, a selection "
                              "chooses from (power-of-choice's d; 0: oort every on-line phone, power-of-choice "
                              "twice the phones asked for)", lo=0, hi=MAX_USERS)
    oort_exploration_factor: float = opt(0.9, "oort: the starting share of a round's clients that explore (never "
                                         "trained before)", lo=0, hi=1)
    oort_exploration_decay: float = opt(0.98, "oort: the exploration share's factor each round", lo=0, hi=1)
    oort_exploration_min: float = opt(0.3, "oort: the exploration share's floor", lo=0, hi=1)
    oort_round_threshold: float = opt(30.0, "oort: the preferred round duration T as a percentile of the "
                                      "candidates' durations (100: none); the pacer raises it when utility stalls",
                                      lo=0, hi=100)
    oort_round_penalty: float = opt(2.0, "oort: a client slower than T has its score times (T / duration)^this",
                                    lo=0, hi=100)
    oort_pacer_step: int = opt(20, "oort: rounds between the pacer's looks at the exploited utility", lo=1,
                               hi=MAX_ROUNDS)
    oort_pacer_delta: float = opt(5.0, "oort: percentile points the pacer moves T by", lo=0, hi=100)
    oort_blacklist_rounds: int = opt(-1, "oort: leave out clients picked more than this many times (-1: never)",
                                     lo=-1, hi=MAX_ROUNDS)
    oort_blacklist_max_len: float = opt(0.3, "oort: the blacklist's largest share of the population", lo=0, hi=1)
    oort_clip_bound: float = opt(0.9, "oort: utilities are clipped at this quantile before scoring", lo=0, hi=1)
    oort_cut_off_util: float = opt(0.05, "oort: exploitation samples among the clients scoring above this share of "
                                   "the score below the K-th (at least 10 K of them)", lo=0, hi=1)
    oort_sample_window: float = opt(5.0, "oort: exploration samples among this many times the explorers wanted "
                                    "(most samples and fastest first)", lo=1, hi=1000)
    # robust aggregation (scheduler/aggregators.py): rules that see every client's update
    aggregator: str = opt("fedavg", "server aggregation: fedavg (the weighted mean, from the ranks' sums), or a rule "
                          "that sees each client's update: median, trimmed-mean, krum, multi-krum, bulyan, geomed "
                          "(RFA), norm-bound, qfedavg (q-FFL), or module:Class")
    trim_fraction: float = opt(0.1, "trimmed-mean: the fraction of clients cut at each end, per coordinate", lo=0,
                               hi=0.5, hi_open=True)
    krum_f: int = opt(1, "krum, multi-krum, bulyan: the clients assumed Byzantine (Krum needs K > 2f + 2, Bulyan "
                      "K >= 4f + 3)", lo=0, hi=MAX_USERS)
    krum_m: int = opt(0, "multi-krum: the clients averaged (0: K - f)", lo=0, hi=MAX_USERS)
    geomed_nu: float = opt(1e-6, "geomed: the smoothing nu of the Weiszfeld weights", lo=0, lo_open=True, hi=1e6)
    geomed_max_iter: int = opt(100, "geomed: Weiszfeld iterations at most", lo=1, hi=10_000)
    geomed_tol: float = opt(1e-6, "geomed: stop when the objective changes by at most this fraction", lo=0, hi=1)
    norm_bound: float = opt(1.0, "norm-bound: each client's update is clipped to this L2 norm before the mean",
                            lo=0, lo_open=True, hi=1e9)
    qfedavg_q: float = opt(0.1, "qfedavg: the fairness power q (clients weigh by their training loss to the q; 0: "
                           "FedAvg's unweighted mean); L = 1 / --lr", lo=0, hi=100)
    # attacks (simulator/attacks.py): a fixed, seeded set of malicious users
    attack: str = opt("", "malicious clients' behaviour: label-flip, backdoor (they poison their data), sign-flip, "
                      "scale, gaussian, alie (they change their update; FedAvg then runs on the per-client path); "
                      "empty: none", choices=("", "label-flip", "sign-flip", "scale", "gaussian", "alie", "backdoor"))
    attack_fraction: float = opt(0.2, "--attack: the fraction of the training population that is malicious (exactly "
                                 "round(F x users), the same users in every round)", lo=0, hi=1, hi_open=True)
    attack_boost: float = opt(0.0, "--attack scale: the factor (0: K, the round's clients, as model replacement)",
                              lo=0, hi=1e6)
    attack_std: float = opt(1.0, "--attack gaussian: the noise's standard deviation", lo=0, lo_open=True, hi=1e6)
    alie_z: float = opt(0.0, "--attack alie: the number of standard deviations (0: the paper's z_max for K and f)",
                        lo=0, hi=100)
    backdoor_target: int = opt(0, "--attack backdoor: the class the trigger leads to", lo=0, hi=2**31 - 1)
    backdoor_fraction: float = opt(0.5, "--attack backdoor: the share of a malicious client's samples poisoned",
                                   lo=0, lo_open=True, hi=1)
    # privacy and communication (issue 15): flock/channel/ checks how they combine
    dp_clip: float = opt(0.0, "DP-FedAvg: clip each user's shared-parameter update to this L2 norm C; users then "
                         "weigh 1 each, not n_k (0: no clipping, sample-weighted FedAvg)", lo=0, hi=1e6)
    dp_noise_multiplier: float = opt(0.0, "DP-FedAvg: Gaussian noise of std z*C added once to the round's sum of "
                                     "clipped updates (0: none; with --dp-target-epsilon: calibrated)", lo=0, hi=1e4)
    dp_delta: float = opt(1e-5, "DP-FedAvg: the delta at which epsilon is reported", lo=0, hi=1, lo_open=True,
                          hi_open=True)
    dp_target_epsilon: float = opt(0.0, "DP-FedAvg: calibrate --dp-noise-multiplier before the run so that "
                                   "epsilon after --rounds rounds is this (0: off)", lo=0, hi=1e6)
    dp_accountant: str = opt("rdp", "epsilon from Google's dp-accounting: rdp or pld (Poisson sampling at rate "
                             "K/population, add/remove one user), or rdp-fixed (fixed-size sampling without "
                             "replacement, replace one user: flock's sampler)", choices=("rdp", "pld", "rdp-fixed"))
    dp_noise_cohort: int = opt(0, "DP-FedAvg: calibrate the noise for a deployed cohort of this many users per "
                               "round (noise std on the sum z*C*K/M; the accountant uses M/population); 0: K", lo=0,
                               hi=MAX_POPULATION)
    dp_population: int = opt(0, "DP-FedAvg: the population the accountant samples from (0: the smallest "
                             "training day's users)", lo=0, hi=MAX_POPULATION)
    dp_adaptive_quantile: float = opt(0.0, "adaptive clipping (Andrew et al. 2021): move the clipping norm each "
                                      "round towards this quantile of the clients' update norms, starting from "
                                      "--dp-clip (0: off, a fixed norm)", lo=0, hi=1, hi_open=True)
    dp_clip_lr: float = opt(0.2, "adaptive clipping: the geometric rate eta, C <- C * exp(-eta * (unclipped "
                            "fraction - quantile))", lo=0, lo_open=True, hi=10)
    dp_clip_count_noise: float = opt(0.0, "adaptive clipping: std sigma_b of the noise on the count of unclipped "
                                     "clients (its share of the privacy budget; 0: the cohort / 20, "
                                     "--dp-noise-cohort or else --clients-per-round)", lo=0, hi=1e9)
    dp_local: bool = opt(False, "local DP: each client adds noise of std z*C to its own clipped update (no "
                         "server noise); epsilon is then per participation, composed over --rounds at rate 1")
    secagg: bool = opt(False, "simulated secure aggregation: clipped updates in fixed point modulo "
                       "2^--secagg-bits within [-C, C] (needs --dp-clip), pairwise masks, dropout threshold")
    secagg_bits: int = opt(32, "secure aggregation: bits of the modulus 2^b", lo=8, hi=52)
    secagg_neighbors: int = opt(0, "secure aggregation: masking partners per user (SecAgg+'s k-regular graph); "
                                "0: every other user of the round", lo=0, hi=MAX_USERS)
    secagg_threshold: float = opt(0.5, "secure aggregation: the round fails (nothing applied) when fewer than "
                                  "this fraction of its clients survive to unmasking", lo=0, hi=1, lo_open=True)
    compress_up: str = opt("fp32", "how clients send updates: fp32, fp16, qB (B-bit stochastic quantization, "
                           "B in 1..32, e.g. q8), topk:F (the largest F of the values, with error feedback)")
    compress_down: str = opt("fp32", "how clients receive the model: fp32, fp16 or qB")
    checkpoint_every: int = opt(10, "checkpoint the scheduler (and private params) every this many rounds; "
                                "0: never", lo=0, hi=MAX_ROUNDS)
    resume: str = opt("", "continue the run saved in this run directory from its last checkpoint (its "
                      "config.json gives every option; DATA_DIR may point to the data's new place)")
    token: str = opt("", "shared secret every scheduler call must carry (default: FLOCK_TOKEN, else a fresh "
                     "random one per run, handed to the ranks over MPI); never written to the run directory")
    tls_cert: str = opt("", "serve the scheduler over TLS with this certificate (PEM); with --tls-key")
    tls_key: str = opt("", "the TLS certificate's private key (PEM)")
    tls_ca: str = opt("", "certificate the ranks trust for the scheduler (default: --tls-cert)")
    target: str = opt("", "stop at the first evaluation that reaches METRIC=VALUE (e.g. 'top1=0.9'; a metric "
                      "named *loss* is reached at or below VALUE, any other at or above) and record when "
                      "(target_reached in metrics.jsonl); empty: run every round")
    tracker: tuple[str, ...] = opt((), f"also send every record to an experiment tracker: {', '.join(TRACKERS)} "
                                   "(repeatable or comma-separated; mlflow and wandb are optional extras)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name))
        unknown = [t for t in self.tracker if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"--tracker must be one of {', '.join(TRACKERS)}; got {', '.join(map(repr, unknown))}")
        if parse_target(self.target) and self.centralized:
            raise ConfigError("--target ends a federated run early; the --centralized baseline runs every round")
        if not self.data_dir and not self.resume:
            raise ConfigError("DATA_DIR is required (unless --resume RUN_DIR continues a saved run)")
        phone_options = [_flag(n) for n in ("availability", "over_select", "deadline", "min_clients")
                         if getattr(self, n) != self.__dataclass_fields__[n].default]
        if phone_options and not self.device_profiles and not self.async_buffer:
            raise ConfigError(f"{', '.join(phone_options)} need phones: give --device-profiles builtin (or a file)")
        async_options = [_flag(n) for n in ("async_concurrency", "async_max_staleness", "staleness_exponent")
                         if getattr(self, n) != self.__dataclass_fields__[n].default]
        if async_options and not self.async_buffer:
            raise ConfigError(f"{', '.join(async_options)} need asynchronous mode: give --async-buffer K")
        sync_options = [_flag(n) for n in ("over_select", "deadline", "min_clients")
                        if getattr(self, n) != self.__dataclass_fields__[n].default]
        if sync_options and self.async_buffer:
            raise ConfigError(f"{', '.join(sync_options)} are for synchronous rounds, not with --async-buffer")
        if self.async_buffer and (self.flower_server or self.centralized):
            raise ConfigError("--async-buffer runs flock's own server optimizers on the federated run: not with "
                              f"{'--flower-server' if self.flower_server else '--centralized'}")
        if self.async_buffer and self.async_buffer > (self.async_concurrency or self.clients_per_round):
            raise ConfigError(f"--async-buffer {self.async_buffer} is more than the clients training at once "
                              f"({self.async_concurrency or self.clients_per_round}: --async-concurrency, or else "
                              f"--clients-per-round): a buffer could never fill")
        if self.min_clients > self.clients_per_round:
            raise ConfigError(f"--min-clients {self.min_clients} is more than --clients-per-round "
                              f"{self.clients_per_round}")
        parse_run_config(self.run_config)
        if self.flower_app and self.flower_client:
            raise ConfigError("--flower-app (a ClientApp) and --flower-client (a client_fn) exclude each other")
        if bool(self.flower_app) != bool(self.flower_server):
            raise ConfigError("--flower-app and --flower-server go together: the ServerApp gives the initial model, "
                              "the round config and the strategy")
        server_options = [_flag(n) for n in ("server_opt", "server_lr", "server_momentum", "server_beta1",
                                             "server_beta2", "server_tau") if getattr(self, n) != FIELDS[n].default]
        if self.flower_server and server_options:
            raise ConfigError(f"{', '.join(server_options)}: with --flower-server the ServerApp's strategy is the "
                              f"server step (set its options in the ServerApp)")
        check_channel_options(self)
        check_aggregator_options(self)
        check_attack_options(self)
        check_selection_options(self)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ConfigError(f"{_flag(name)} {getattr(self, name)}: file not found")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def to_saved_json(self) -> dict:
        """As saved in the run directory: without the token."""
        return {**self.to_json(), "token": ""}


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# each rule's own options (a rule's option given with another rule is refused: it would have no effect)
AGGREGATOR_OPTIONS = {"trim_fraction": ("trimmed-mean",), "krum_f": ("krum", "multi-krum", "bulyan"),
                      "krum_m": ("multi-krum",), "geomed_nu": ("geomed",), "geomed_max_iter": ("geomed",),
                      "geomed_tol": ("geomed",), "norm_bound": ("norm-bound",), "qfedavg_q": ("qfedavg",)}


ATTACK_OPTIONS = {"attack_fraction": None, "attack_boost": ("scale",), "attack_std": ("gaussian",),
                  "alie_z": ("alie",), "backdoor_target": ("backdoor",), "backdoor_fraction": ("backdoor",)}


def _set(config: Config, option: str, given: set[str] | None) -> bool:
    """Whether the user set `option`: named on the command line or in a config file when that is known
    (`given`), else given a value other than its default."""
    return option in given if given is not None else getattr(config, option) != FIELDS[option].default


def check_attack_options(config: Config, given: set[str] | None = None) -> None:
    """An attack's options only with that attack; attacks run in synchronous rounds of flock's own trainers."""
    for option, attacks in ATTACK_OPTIONS.items():
        if _set(config, option, given) and (not config.attack or (attacks and config.attack not in attacks)):
            raise ConfigError(f"{_flag(option)} is for --attack {' or '.join(attacks or ('NAME',))}"
                              + (f", not {config.attack}" if config.attack else ""))
    if not config.attack:
        return
    for given, what in ((config.async_buffer, "--async-buffer"), (config.flower_client or config.flower_app,
                        "a Flower client"), (config.flower_server, "--flower-server"),
                        (config.centralized, "--centralized"), (config.secagg, "--secagg")):
        if given:
            raise ConfigError(f"--attack {config.attack}: not with {what} (attacks run in flock's synchronous rounds, "
                              f"on the updates each client sends)")
    if central_dp_noise(config) and config.attack not in ("label-flip", "backdoor"):
        raise ConfigError(f"--attack {config.attack} changes single updates, which the per-client path aggregates: "
                          f"not with central DP noise (calibrated for a sum)")


SELECTION_OPTIONS = {"selection_pool": ("oort", "power-of-choice"),
                     **{n: ("oort",) for n in FIELDS if n.startswith("oort_")}}


def check_selection_options(config: Config, given: set[str] | None = None) -> None:
    """How --selection combines with the rest: a known name or module:Class; a selection's options only with
    it (a module:Class may read any); phones to choose among; a pool that holds a round's clients; and no
    DP or secure aggregation (the clients' reports are private data that nothing noises or accounts)."""
    name = config.selection
    custom = ":" in name
    if name not in SELECTIONS and not custom:
        raise ConfigError(f"--selection must be one of {', '.join(SELECTIONS)} or module:Class; got {name!r}")
    for option, selections in SELECTION_OPTIONS.items():
        if _set(config, option, given) and name not in selections and not custom:
            raise ConfigError(f"{_flag(option)} is for --selection {' or '.join(selections)}, not {name}")
    if name == "uniform":
        return
    if not config.device_profiles and not config.async_buffer:
        raise ConfigError(f"--selection {name} chooses among on-line phones, with their durations on the virtual "
                          f"clock: give --device-profiles builtin (or a file)")
    private = [(config.dp_noise_multiplier > 0 or config.dp_target_epsilon > 0 or config.dp_local,
                "DP noise (--dp-noise-multiplier, --dp-target-epsilon, --dp-local)"),
               (config.secagg, "--secagg")]
    for on, what in private:
        if on:
            raise ConfigError(f"--selection {name}: not with {what}: the selection reads each client's training "
                              f"loss, private data that this run would neither noise nor account for (uniform "
                              f"selection uses none)")
    if config.centralized:
        raise ConfigError(f"--selection {name}: not with --centralized (one model, no clients)")
    if name == "oort" and config.oort_exploration_min > config.oort_exploration_factor:
        raise ConfigError(f"--oort-exploration-min {config.oort_exploration_min:g} is above --oort-exploration-factor "
                          f"{config.oort_exploration_factor:g}: the exploration share starts at the factor and decays "
                          f"to the floor (set both: the defaults are 0.9 and 0.3)")
    if config.selection_pool and not config.async_buffer and not custom:
        from flock.common.domain import over_selected

        asked = over_selected(config.clients_per_round, config.over_select)
        if config.selection_pool < asked:
            raise ConfigError(f"--selection-pool {config.selection_pool} is fewer than the {asked} phones a round "
                              f"asks for (--clients-per-round {config.clients_per_round} x --over-select "
                              f"{config.over_select:g})")


def check_aggregator_options(config: Config, given: set[str] | None = None) -> None:
    """How --aggregator combines with the rest: a rule's options only with that rule (or a module:Class, which
    may read any); per-client rules not where single updates are hidden (secure aggregation), where the noise is
    calibrated for a sum (central DP), nor with the asynchronous buffer, a Flower strategy or --centralized."""
    name = config.aggregator
    custom = ":" in name
    for option, rules in AGGREGATOR_OPTIONS.items():
        if _set(config, option, given) and name not in rules and not custom:
            raise ConfigError(f"{_flag(option)} is for --aggregator {' or '.join(rules)}, not {name}")
    if name == "fedavg":
        return
    refused = [(config.secagg, "--secagg (its masks hide every single update)"),
               (central_dp_noise(config), "central DP noise (calibrated for the sum of the clients' updates)"),
               (config.async_buffer, "--async-buffer (FedBuff's buffers are sums)"),
               (config.flower_server, "--flower-server (the ServerApp's strategy aggregates)"),
               (config.centralized, "--centralized (one model, no clients)")]
    for given, why in refused:
        if given:
            raise ConfigError(f"--aggregator {name} sees each client's update: not with {why}")


def check_value(f: dataclasses.Field, value: Any) -> None:
    """The one rule set: `value` has the field's type, is finite, in its range and one of its choices."""
    flag, rule, default = _flag(f.name), f.metadata, f.default
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{flag} must be {type(default).__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value!r}")
    lo, hi = rule.get("lo"), rule.get("hi")
    if lo is not None and (value < lo or (rule["lo_open"] and value == lo)):
        raise ConfigError(f"{flag} must be {'above' if rule['lo_open'] else 'at least'} {_num(lo)}"
                          f"{_upper(rule)}, got {value!r}")
    if hi is not None and (value > hi or (rule["hi_open"] and value == hi)):
        raise ConfigError(f"{flag} must be {'below' if rule['hi_open'] else 'at most'} {_num(hi)}, got {value!r}")
    if rule.get("choices") and value not in rule["choices"]:
        raise ConfigError(f"{flag} must be one of {', '.join(rule['choices'])}; got {value!r}")


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing and exiting (so that, under mpirun, one rank
    prints the one message)."""

    def error(self, message: str):
        raise ConfigError(message)


def _upper(rule) -> str:
    if rule.get("hi") is None:
        return ""
    return f" and {'below' if rule['hi_open'] else 'at most'} {_num(rule['hi'])}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _number(kind: type, flag: str):
    """argparse type: an int or float that names the option when it does not parse (range checks are
    Config's)."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
    return parse


def launch_name() -> str:
    """How the usage line names the program: as it was started (the `flock` command, or application.py)."""
    import sys

    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "mpirun -np N flock" if name == "flock" else "mpirun -np N python application.py"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=launch_name(),
        description="flock: federated learning device simulator. Rank 0 hosts the scheduler; every rank "
                    f"simulates phones. DATA_DIR {BUILTIN_DATA!r} is built from the popquotes corpus if missing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="?", default="", help=FIELDS["data_dir"].metadata["help"])
    for f in dataclasses.fields(Config):
        if f.name == "data_dir":
            continue
        flag, default, help_ = _flag(f.name), f.default, f.metadata["help"]
        if f.name in LIST_OPTIONS:
            p.add_argument(flag, action="append", default=[], help=help_)
        elif isinstance(default, bool):     # --no-quiet turns off `quiet = true` from a config file
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=False, help=help_)
        elif isinstance(default, (int, float)):
            p.add_argument(flag, type=_number(type(default), flag), default=default, help=help_)
        else:
            # choices are checked by Config (one rule for the command line and files), shown in the help
            p.add_argument(flag, default=default, help=help_,
                           **({"metavar": "{" + ",".join(f.metadata["choices"]) + "}"} if f.metadata["choices"] else {}))
    return p


DEFAULTS = Config(data_dir="DATA_DIR")

# keys a run's config.json records beside the options (skipped when it is read back as a config file)
RECORD_KEYS = {"world_size", "shards_per_rank", "run_id", "argv", "private_params", "shared_params", "versions",
               "privacy", "sources"}


def _read_table(path: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml, .yml or .json file")
    except ConfigError:
        raise
    except Exception as e:  # each parser has its own error type
        raise ConfigError(f"--config {path}: not valid {p.suffix[1:].upper()} ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a table of option = value")
    return raw


def load_config_file(path: str) -> dict:
    """Options from a .toml, .yaml/.yml or .json file, each checked by the same rules as the command line;
    a fault names the key and the file."""
    raw = _read_table(path)
    saved_run = "run_id" in raw
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in RECORD_KEYS or (saved_run and name in ("run_dir", "resume", "config", "token")):
            continue
        if name not in FIELDS or name == "config":
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        f = FIELDS[name]
        if name in LIST_OPTIONS:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"--config {path}: {key!r} must be a string or a list of strings")
            value = list_value(name, value)
        elif name == "run_config" and isinstance(value, dict):
            try:
                value = format_run_config(value)
            except ConfigError as e:
                raise ConfigError(f"--config {path}: {key!r}: {e}") from None
        elif isinstance(f.default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif name == "log_level" and isinstance(value, str):
            value = value.upper()
        try:
            check_value(f, value)
        except ConfigError as e:
            raise ConfigError(f"--config {path}: {key!r}: {e}") from None
        values[name] = value
    return values


def _given_on_command_line(argv: Sequence[str] | None) -> set[str]:
    """The options named on the command line (whatever their values): a parser without defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Options -> Config, as `parse_options` (the sources dropped)."""
    return parse_options(argv)[0]


def parse_options(argv: Sequence[str] | None = None) -> tuple[Config, dict[str, str]]:
    """Options (a --config file, then the command line over it) -> (Config, where each option the user set
    came from: "command line" or "config file"; empty on --resume, whose options are the saved run's). Malformed options and invalid
    values raise ConfigError (the caller prints one message and exits with status 2); an error about how
    options combine names the --config file when one of them came from it. With --resume the saved run's
    options come back, changed only where a continued run may change (`resumed_config`)."""
    pre = _Parser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    from_file = load_config_file(known.config) if known.config else {}
    on_command_line = _given_on_command_line(argv)
    parser.set_defaults(**{k: list(v) if k in LIST_OPTIONS else v for k, v in from_file.items()})
    values = vars(parser.parse_args(argv))
    for name in LIST_OPTIONS:
        values[name] = list_value(name, values[name])
    values["log_level"] = values["log_level"].upper()
    given = {**{n: FILE for n in from_file}, **{n: COMMAND_LINE for n in on_command_line}}
    given.pop("config", None)
    try:
        config = Config(**values)
        if config.resume:
            return resumed_config(config, set(given)), {}
        # a rule's or attack's option the user set, whatever its value (a saved run's config.json lists every
        # option: from it, those that differ from their defaults)
        saved_run = bool(known.config) and "run_id" in _read_table(known.config)
        chosen = set(on_command_line) | {n for n in from_file if not saved_run or from_file[n] != FIELDS[n].default}
        check_aggregator_options(config, chosen)
        check_attack_options(config, chosen)
        check_selection_options(config, chosen)
        return config, given
    except ConfigError as e:
        at_fault = e.options or [n for n in FIELDS if re.search(rf"{_flag(n)}\b", str(e))]
        named = [_flag(n) for n in from_file if n in at_fault]
        if named:
            raise ConfigError(f"{e} ({', '.join(named)} from --config {known.config})") from None
        raise


# what a continued run may change (it trains for more rounds, evaluates and checkpoints as now asked), and what
# only says where and how this attempt runs; every other option is the saved run's
RESUME_CHANGES = ("rounds", "eval_every", "checkpoint_every")
RESUME_LOCAL = ("data_dir", "run_dir", "resume", "config", "token", "log_level", "quiet", "round_timeout",
                "scheduler_host", "tls_cert", "tls_key", "tls_ca", "shards", "data_plane")


def saved_options(run_dir: str) -> dict[str, Any]:
    """The options a run directory's config.json saved (a fault names the file)."""
    folder = Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--resume {run_dir}: not a folder")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there, not a flock run directory")
    saved = _read_table(str(folder / "config.json"))
    return {k: (tuple(v) if k in LIST_OPTIONS and isinstance(v, list) else v) for k, v in saved.items() if k in FIELDS}


def resumed_config(config: Config, given: set[str] | None = None) -> Config:
    """The Config that continues the run saved in `config.resume`: its saved options, with --rounds,
    --eval-every and --checkpoint-every (RESUME_CHANGES) and this attempt's own settings (RESUME_LOCAL: the
    data's place, logging, timeouts, TLS, shards) from `config` where `given` names them. Any other option in
    `given` that differs from the saved run is refused, each one named. `given`: the options the user set (the
    CLI knows them); None: those that differ from their defaults, or every option when `config` is resolved
    already (its run_dir is the resumed folder), so that resolving twice changes nothing. The saved values pass
    the same checks as any other."""
    values = saved_options(config.resume)
    same_folder = bool(config.run_dir) and Path(config.run_dir).resolve() == Path(config.resume).resolve()
    if config.run_dir and not same_folder:
        raise ConfigError(f"--run-dir {config.run_dir}: a resumed run continues in its own folder (--resume "
                          f"{config.resume}); to copy its options into a new run: --config {config.resume}/config.json "
                          f"--run-dir NEW")
    if given is None:
        given = set(FIELDS) if same_folder else {n for n in FIELDS if getattr(config, n) != FIELDS[n].default}
    differ = [n for n in FIELDS if n in given and n not in RESUME_CHANGES + RESUME_LOCAL
              and getattr(config, n) != values.get(n, FIELDS[n].default)]
    if differ:
        shown = "; ".join(f"{_flag(n)} {getattr(config, n)!r} (saved: {values.get(n, FIELDS[n].default)!r})"
                          for n in differ)
        raise ConfigError(f"--resume {config.resume}: {shown}: a resumed run keeps its options (only "
                          f"{', '.join(map(_flag, RESUME_CHANGES))} may change); to change others start a new run "
                          f"with --config {config.resume}/config.json --run-dir NEW", options=tuple(differ))
    changed = {n: getattr(config, n) for n in FIELDS if n in given and n in RESUME_CHANGES + RESUME_LOCAL}
    merged = {**values, **changed, "data_dir": config.data_dir or values.get("data_dir", ""),
              "run_dir": config.resume, "resume": config.resume, "token": config.token, "config": ""}
    try:
        return Config(**merged)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{Path(config.resume) / 'config.json'}: {e}") from None


def redact_argv(argv: Sequence[str]) -> list[str]:
    """The command line as recorded in config.json: the value of --token is never written."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg == "--token":
            out.append(arg)
            hide = True
        elif arg.startswith("--token="):
            out.append("--token=***")
        else:
            out.append(arg)
    return out


def default_run_dir() -> str:
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
