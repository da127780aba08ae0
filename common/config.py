"""The run's options as one frozen, validated dataclass, built from the command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from common.errors import ConfigError


@dataclass(frozen=True)
class Config:
    data_dir: str
    rounds: int = 100
    clients_per_round: int = 10
    local_epochs: int = 1
    batch_size: int = 5
    lr: float = 1.0
    server_lr: float = 1.85
    server_opt: str = "fedavg"
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    prox_mu: float = 0.0
    momentum: float = 0.0
    finetune_epochs: int = 0
    max_grad_norm: float = 5.0
    seed: int = 0
    eval_every: int = 10
    eval_users: int = 0
    run_dir: str = ""
    reader: str = "leaf"
    model: str = "lstm"
    trainer: str = "lm"
    flower_client: str = ""
    private: tuple[str, ...] = ()
    data_server: str = "memory"
    data_plane: str = "mpi"
    shards: int = 0
    device: str = "auto"
    scheduler_host: str = "127.0.0.1"
    round_timeout: float = 600.0
    log_level: str = "INFO"
    quiet: bool = False
    config: str = ""
    centralized: bool = False
    checkpoint_every: int = 10
    resume: str = ""
    token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def __post_init__(self) -> None:
        positive = ("rounds", "clients_per_round", "local_epochs", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.data_dir and not self.resume:
            raise ConfigError("DATA_DIR is required (unless --resume RUN_DIR continues a saved run)")
        for name in ("eval_every", "eval_users", "shards", "checkpoint_every", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        if self.lr <= 0 or self.server_lr <= 0 or self.round_timeout <= 0:
            raise ConfigError("--lr, --server-lr and --round-timeout must be positive")
        if self.max_grad_norm < 0 or self.prox_mu < 0 or self.server_tau <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("--max-grad-norm and --prox-mu must not be negative, --server-tau must be positive, "
                              "--momentum must be in [0, 1)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: file not found")
        if self.data_server not in ("memory", "sqlite"):
            raise ConfigError(f"--data-server must be 'memory' or 'sqlite', got {self.data_server!r}")
        if self.data_plane not in ("mpi", "grpc"):
            raise ConfigError(f"--data-plane must be 'mpi' or 'grpc', got {self.data_plane!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def to_saved_json(self) -> dict:
        """As saved in the run directory: without the token."""
        return {**self.to_json(), "token": ""}


HELP = {
    "rounds": "training rounds (FL-mobile's Reddit benchmark: 100)",
    "clients_per_round": "users sampled uniformly without replacement each round",
    "local_epochs": "local epochs over each user's data (in order, unshuffled)",
    "batch_size": "local batch size (sequences)",
    "lr": "client SGD learning rate",
    "server_lr": "server learning rate: theta += server_lr * weighted mean client delta",
    "server_opt": "server optimizer: fedavg, fedavgm (server momentum), fedadam, fedyogi, fedadagrad (FedOpt)",
    "server_momentum": "fedavgm's momentum",
    "server_beta1": "fedadam/fedyogi/fedadagrad: first-moment decay",
    "server_beta2": "fedadam/fedyogi: second-moment decay",
    "server_tau": "fedadam/fedyogi/fedadagrad: adaptivity (epsilon) tau",
    "momentum": "local SGD momentum (0: plain SGD, as FL-mobile)",
    "finetune_epochs": "also report each user's accuracy after this many local epochs of fine-tuning on its "
                       "training data (personalization; reported as top1_ft, top1_ft_user_mean); 0: off",
    "prox_mu": "FedProx: weight mu of the local proximal term mu/2 ||w - w_global||^2 (0: FedAvg)",
    "max_grad_norm": "clip each local step's gradient to this global norm (0: no clipping)",
    "seed": "fixes initialisation, sampling and evaluation users; same seed, same metrics at any -np",
    "eval_every": "evaluate on the test day every this many rounds (and after the last); 0: only at the end",
    "eval_users": "evaluate this many test users (a fixed seeded subset); 0: all of them",
    "run_dir": "where config.json and metrics.jsonl go; empty means runs/<timestamp>",
    "reader": "data reader: built-in short name or module:Class",
    "model": "model: built-in short name or module:Class",
    "trainer": "local trainer: built-in short name or module:Class",
    "flower_client": "run a Flower NumPyClient as every phone's trainer: module:client_fn (the function given "
                     "to Flower's ClientApp); replaces --model and --trainer; needs the flwr extra",
    "private": "parameter name pattern (fnmatch) to keep private per user; repeatable, e.g. 'decoder.bias'",
    "data_server": "where private parameters live on each rank: memory, or sqlite under the run dir",
    "data_plane": "how parameters and updates move between the ranks: mpi (node-shared memory, MPI between "
                  "nodes; plans and metrics still go through the scheduler) or grpc (every rank through the "
                  "scheduler's gRPC service)",
    "device": "where shards train: cuda when visible (auto), or cpu, or cuda; same-seed-same-metrics across "
              "rank counts is guaranteed on cpu",
    "shards": "trainers per rank, each a thread with one torch thread (0: this node's cores / its ranks)",
    "scheduler_host": "address the scheduler binds on rank 0 (loopback by default)",
    "round_timeout": "seconds a rank waits for the other ranks to finish a round (or evaluation) before the job fails",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "quiet": "no per-round progress; warnings, errors and the final result only",
    "config": "read options from a TOML, YAML or JSON file (keys as the long option names; a run's saved "
              "config.json works too); options given on the command line win",
    "checkpoint_every": "checkpoint the scheduler (and private params) every this many rounds; 0: never",
    "resume": "continue the run saved in this run directory from its last checkpoint (its config.json "
              "gives every option; DATA_DIR may point to the data's new place)",
    "token": "shared secret every scheduler call must carry (default: FLOCK_TOKEN, else a fresh random one "
             "per run, handed to the ranks over MPI); never written to the run directory",
    "tls_cert": "serve the scheduler over TLS with this certificate (PEM); with --tls-key",
    "tls_key": "the TLS certificate's private key (PEM)",
    "tls_ca": "certificate the ranks trust for the scheduler (default: --tls-cert)",
    "centralized": "the non-federated baseline: one process trains one model on the pooled training data, "
                   "with the federated run's sample visits per round (run without mpirun or with -np 1)",
}


CHOICES = {"device": ["auto", "cpu", "cuda"], "server_opt": ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"], "data_server": ["memory", "sqlite"],
           "data_plane": ["mpi", "grpc"],
           "log_level": ["DEBUG", "INFO", "WARNING", "ERROR"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpirun -np N python application.py",
        description="flock: federated learning device simulator. Rank 0 hosts the scheduler; every rank "
                    "simulates phones. If DATA_DIR does not exist it is built from the popquotes corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", metavar="DATA_DIR", nargs="?", default="",
                   help="day folders (YYYYMMDD/train_data.json, ...) and vocab.json")
    defaults = Config(data_dir="DATA_DIR")
    for f in dataclasses.fields(Config):
        if f.name == "data_dir":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "private":
            p.add_argument(flag, action="append", default=[], help=HELP[f.name])
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=HELP[f.name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=HELP[f.name],
                           **({"choices": CHOICES[f.name]} if f.name in CHOICES else {}))
    return p


# keys a run's config.json records beside the options (skipped when it is read back as a config file)
RECORD_KEYS = {"world_size", "shards_per_rank", "run_id", "argv", "private_params", "shared_params", "versions"}


def load_config_file(path: str) -> dict:
    """Options from a .toml, .yaml/.yml or .json file; unknown keys and wrong types name the key and file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
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
    saved_run = "run_id" in raw
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in RECORD_KEYS or (saved_run and name in ("run_dir", "resume", "config", "token")):
            continue
        if name not in fields or name == "config":
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        default = getattr(Config(data_dir="DATA_DIR"), name)
        if name == "private":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"--config {path}: {key!r} must be a pattern or a list of patterns")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key!r} must be true or false")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(default):
            raise ConfigError(f"--config {path}: {key!r} must be a {type(default).__name__}, got {value!r}")
        values[name] = value
    return values


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Options (a --config file, then the command line over it) -> Config. argparse exits with status 2 on
    malformed options; invalid values raise ConfigError."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**load_config_file(known.config))
    values = vars(parser.parse_args(argv))
    values["private"] = tuple(values["private"])
    return Config(**values)


def resumed_config(config: Config) -> Config:
    """The saved run's Config for `--resume RUN_DIR` (DATA_DIR from the command line if given)."""
    path = Path(config.resume) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--resume {config.resume}: no config.json there, not a flock run directory") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    names = {f.name for f in dataclasses.fields(Config)}
    values = {k: (tuple(v) if k == "private" else v) for k, v in saved.items() if k in names}
    return Config(**{**values, "data_dir": config.data_dir or values["data_dir"], "run_dir": config.resume,
                     "resume": config.resume})


def default_run_dir() -> str:
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
