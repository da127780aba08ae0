"""One simulation, from a Config to a History: the builders of a run's parts, and one owner (an ExitStack)
that closes every resource they open (gRPC server, recorder, private store, shard threads, scheduler
clients) on success, on error and on KeyboardInterrupt.

The same function runs in a notebook (one process, no MPI) and on every rank of an MPI job (the CLI passes
the MPI communicator). Set-up errors are agreed: every rank shares what any rank found, so all ranks stop
alike with one message and no rank is left waiting in a collective.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import secrets
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import numpy as np

from flock.common.config import BUILTIN_DATA, FIELDS, Config, default_run_dir, parse_target, redact_argv, resumed_config
from flock.common.errors import ConfigError, DataError, FlockError, RunFailed, SharedError
from flock.common.recorder import read_metrics
from simulator.comm import Comm, SingleComm
from simulator.launch_env import mpi_problem

log = logging.getLogger("flock")
T = TypeVar("T")


@dataclass
class History:
    """What a simulation measured. `records`: the metrics.jsonl records in order (train rounds and
    evaluations); `params`: the final shared parameters by name; `run_dir`: where the run's files are.
    On an MPI job only rank 0 holds records and parameters."""

    run_dir: Path
    records: list[dict]
    params: dict[str, np.ndarray] | None = None

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "train"]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "eval"]

    def metric(self, name: str, kind: str = "eval") -> list[tuple[int, float]]:
        """(round, value) of one metric over the run, e.g. `history.metric("top1")`."""
        return [(r["round"], r[name]) for r in self.records if r["kind"] == kind and name in r]

    def __repr__(self) -> str:
        last = self.evals[-1] if self.evals else {}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in last.items()
                          if isinstance(v, float) and (k.endswith("_user_mean") or f"{k}_user_mean" in last))
        return (f"History(run_dir={str(self.run_dir)!r}, {len(self.train)} rounds, {len(self.evals)} evaluations"
                + (f", last evaluation @ round {last['round']}: {shown}" if last else "") + ")")


def agreed(comm: Comm, fn: Callable[[], T]) -> T:
    """Runs a set-up step on every rank and shares its outcome: if any rank raised a FlockError, every rank
    raises the lowest such rank's message as a SharedError (no rank is left waiting; rank 0 reports it)."""
    try:
        value, error = fn(), None
    except FlockError as e:
        value, error = None, str(e)
    for rank, message in enumerate(comm.allgather(error)):
        if message is not None:
            raise SharedError(message if rank == 0 else f"rank {rank}: {message}")
    return value


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set for the run and restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_data(config: Config) -> None:
    """Rank 0, before anyone reads: builds the built-in corpus when DATA_DIR is missing and named as the
    README's default (a folder called lm_data), or --builtin-data says so; any other missing DATA_DIR is an
    error (a mistyped path must not train on film quotes)."""
    data_dir = Path(config.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"DATA_DIR {data_dir}: not a folder (day folders and vocab.json, or an arrays data set)")
    if data_dir.exists():
        return
    if not (config.builtin_data or data_dir.name == BUILTIN_DATA):
        raise DataError(f"DATA_DIR {data_dir}: not found (the built-in corpus is built only for "
                        f"{BUILTIN_DATA!r} or with --builtin-data)")
    if config.reader != "leaf":
        raise ConfigError(f"--builtin-data builds LEAF Reddit data; --reader is {config.reader!r}")
    from reader import popquotes

    log.info("%s does not exist: building it once from the popquotes corpus (speakers as users) ...", data_dir)
    summary = popquotes.build(data_dir)
    log.info("built %s: %d users, %d training and %d test comments, vocabulary %d",
             data_dir, summary["users"], summary["train_comments"], summary["test_comments"], summary["vocab_size"])


def check_mpi(config: Config, comm: Comm) -> None:
    """Before anything is written: the MPI gives what the chosen data plane needs (ConfigError saying what
    it lacks and what to use instead)."""
    problem = mpi_problem(data_plane=config.data_plane, world_size=comm.size, threads=comm.threads,
                          mpi_version=comm.mpi_version)
    if problem:
        raise ConfigError(problem, options=("data_plane",))


def holds_a_run(run_dir: Path) -> bool:
    """Whether a folder holds a run that a new one must not overwrite: a checkpoint, or at least one record
    (a start that failed before its first record leaves neither, and does not block the next attempt)."""
    metrics = run_dir / "metrics.jsonl"
    return (run_dir / "checkpoint.npz").exists() or (metrics.is_file() and metrics.stat().st_size > 0)


def check_run_dir(config: Config) -> list[Path]:
    """Rank 0, before anything is read: the run folder exists (made here if need be) and can be written; an
    OS refusal is one message naming the path. Returns the folders it made, deepest first."""
    run_dir = Path(config.run_dir)
    option = "--resume" if config.resume else "--run-dir"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{option} {run_dir}: exists and is not a folder")
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {run_dir}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {run_dir}: the folder is not writable")
    return made


def remove_if_empty(folders: list[Path]) -> None:
    """After a start that failed: the folders `check_run_dir` made, deepest first, as long as they are still
    empty (a folder with anything in it, a log or config.json, stays for the user to read)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def write_json_atomic(path: Path, value: Any) -> None:
    """`value` as JSON in `path`, written whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "grpcio", "protobuf", "mpi4py", "mpich"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def simulate(config: Config, *, comm: Comm | None = None, on_record: Callable[[dict], None] | None = None,
             progress: str = "quiet", given: Mapping[str, str] | None = None) -> History:
    """Runs one simulation and returns its History. In one process by default (no MPI, no gRPC server);
    the CLI passes the MPI world. `on_record` gets each metrics record as it is written (rank 0), after the
    recorder and the trackers (--tracker) have it; `progress`: "bar", "lines" or "quiet". `given`: the
    options the user set and where ("command line", "config file"; the CLI knows them); None: those that
    differ from Config's defaults. The others take the trainer's (or model's) defaults, else Config's
    (`flock.common.task_defaults`); config.json records each value's source. The process's C allocator keeps
    freed memory for reuse from then on (`flock.common.memory`). torch's thread count is restored and
    every resource the run opened is closed when this returns or raises; logging is left as the caller
    configured it."""
    from flock.common.memory import keep_freed_memory
    from flock.common.task_defaults import saved_sources, with_task_defaults
    from flock.common.trackers import check_trackers

    keep_freed_memory()      # glibc keeps the memory a step frees for the next (flock/common/memory.py)
    comm = comm or SingleComm()
    if config.resume:       # the saved run's options (its task defaults resolved when it started)
        config = agreed(comm, lambda: resumed_config(config))
        sources = saved_sources(config.resume)
    else:
        config, sources = agreed(comm, lambda: with_task_defaults(config, given))
    agreed(comm, lambda: check_mpi(config, comm))
    config = replace(config, run_dir=comm.bcast(config.run_dir or default_run_dir() if comm.rank == 0 else None))
    made = agreed(comm, lambda: check_run_dir(config) if comm.rank == 0 else [])
    try:
        agreed(comm, lambda: check_trackers(config.tracker) if comm.rank == 0 else None)
        sink = _Sink(on_record, sources)
        with ExitStack() as stack:
            stack.enter_context(torch_threads(1))
            stack.callback(sink.close)
            try:
                params = _run(config, comm, stack, sink, progress)
            except RunFailed:
                comm.barrier()     # every rank learns it from its plan; rank 0's server stays up until all have
                raise
    except BaseException:
        remove_if_empty(made)     # a start that failed before writing anything leaves no empty folder behind
        raise
    return History(run_dir=Path(config.run_dir), records=sink.records, params=params)


def _plugins(config: Config) -> tuple[type, type | None, type | None]:
    from flock.common.plugins import resolve

    reader_cls = resolve("reader", config.reader)
    if config.flower_client or config.flower_app:
        from trainer.flower import load_client_app, load_client_fn

        if config.flower_client:    # fail early (every rank alike) when flwr or the client is missing
            load_client_fn(config.flower_client)
        else:
            load_client_app(config.flower_app)
        return reader_cls, None, None
    return reader_cls, resolve("model", config.model), resolve("trainer", config.trainer)


def _open_reader(config: Config, comm: Comm, reader_cls: type):
    """Rank 0 builds missing built-in data and the reader's caches first; then every rank opens it."""
    def first():
        if comm.rank == 0:
            prepare_data(config)
            reader = reader_cls(Path(config.data_dir))
            reader.prepare()
            return reader
        return None

    reader = agreed(comm, first)
    return agreed(comm, lambda: reader if comm.rank == 0 else reader_cls(Path(config.data_dir)))


@dataclass
class _Built:
    """The run's model and what follows from it, the same on every rank."""

    spec: Mapping[str, int]
    model_cls: type
    trainer_cls: type
    model: Any
    n_shards: int
    device: Any
    private: tuple[str, ...]
    layout: Any                 # ParamLayout of the shared parameters
    eval_ratios: dict[str, tuple[str, str]]
    aggregator: Any = None      # a per-client aggregator (scheduler/aggregators.py); None: FedAvg's sums
    attack: Any = None          # the run's malicious clients (simulator/attacks.py: ClientAttack), or None

    def tensors(self, names) -> dict[str, np.ndarray]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().cpu().numpy().copy() for n in names}


class _Sink:
    """Where each metrics record goes: the recorder (once it exists), the trackers (--tracker, rank 0), the
    History's list, the caller. `sources`: where each option's value came from (config.json's `sources`)."""

    def __init__(self, on_record: Callable[[dict], None] | None, sources: Mapping[str, str]) -> None:
        self.records: list[dict] = []
        self.recorder = None
        self.trackers: list = []
        self.on_record = on_record
        self.sources = dict(sources)

    def open(self, config: Config, run_dir: Path, recorder) -> None:
        """Rank 0, once config.json is written: the recorder and the trackers start taking records."""
        from flock.common.trackers import open_trackers

        self.recorder = recorder
        self.trackers = open_trackers(config, run_dir)

    def __call__(self, record: dict) -> None:
        self.recorder(record)
        for tracker in self.trackers:
            tracker.record(record)
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def close(self) -> None:
        """Closes the trackers (each once, even if another's close raised)."""
        trackers, self.trackers = self.trackers, []
        with ExitStack() as stack:
            for tracker in trackers:
                stack.callback(tracker.close)


def _build(config: Config, comm: Comm, reader, plugins: tuple, train_config) -> _Built:
    """Every rank builds the model (seeded), decides its shards and device; agreed set-up errors."""
    import torch

    from flock.common.domain import ParamLayout
    from model.base import private_names

    def build():
        _, model_cls, trainer_cls = plugins
        spec = reader.spec()
        torch.manual_seed(config.seed)     # before a Flower app builds its model
        if config.flower_client or config.flower_app:
            from trainer.flower import flower_plugins

            model_cls, trainer_cls = flower_plugins(config, reader, train_config, rank=comm.rank)
        cores = len(os.sched_getaffinity(0))
        n_shards = config.shards or max(1, cores // comm.local_size)
        if not getattr(trainer_cls, "thread_safe", True) and n_shards > 1:
            if comm.rank == 0:
                log.info("%s uses process-wide state: one shard per rank (start more ranks to use more cores)",
                         trainer_cls.__name__)
            n_shards = 1
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible")
        if config.centralized and comm.size != 1:
            raise ConfigError("--centralized runs in one process: start it without mpirun (or with -np 1)")
        what = "the Flower app's model" if config.flower_client or config.flower_app else f"--model {config.model}"
        try:
            model = model_cls.build(spec)
        except Exception as e:     # a plug-in that does not fit the data: one message on every rank
            log.debug("building the model raised", exc_info=True)
            # a ValueError is the plug-in's own refusal: its message says it; other errors need their type
            detail = str(e) if type(e) is ValueError and str(e) else f"{type(e).__name__}: {e}"
            raise ConfigError(f"{what} cannot be built for this data: {detail} (the data's spec: {dict(spec)})") \
                from None
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"{what}: build(spec) returned {type(model).__name__}, not a torch.nn.Module")
        check_outputs(model, spec, what)
        return spec, model_cls, trainer_cls, model, n_shards, torch.device("cuda" if use_cuda else "cpu")

    spec, model_cls, trainer_cls, model, n_shards, device = agreed(comm, build)
    from scheduler.aggregators import make_aggregator
    from simulator.attacks import client_attack

    aggregator = agreed(comm, lambda: make_aggregator(config, trainer_cls.aggregator() if config.flower_server else None))
    if getattr(aggregator, "needs_loss", False) and aggregator.loss_metric not in trainer_cls.train_ratios:
        raise ConfigError(f"{config.flower_server or '--aggregator ' + config.aggregator}: weighs clients by their "
                          f"training loss {aggregator.loss_metric!r}, which the trainer does not report (its training "
                          f"metrics: {', '.join(trainer_cls.train_ratios) or 'none'})")
    attack = agreed(comm, lambda: client_attack(config, spec, reader))
    if attack is not None and attack.settings.kind == "model" and aggregator is None:
        from scheduler.aggregators import WeightedMean  # FedAvg's mean, on updates the attackers changed

        aggregator = WeightedMean()
    private = private_names(model, config.private)
    named = dict(model.named_parameters())
    shared = [n for n in named if n not in private]
    eval_ratios = dict(trainer_cls.eval_ratios)
    if config.finetune_epochs:
        eval_ratios.update({f"{k}_ft": (f"ft_{num}", f"ft_{den}") for k, (num, den) in trainer_cls.eval_ratios.items()})
    if attack is not None and attack.settings.name == "backdoor":      # triggered test images classed as the target
        eval_ratios["backdoor_acc"] = ("backdoor_correct", "backdoor_samples")
    return _Built(spec=spec, model_cls=model_cls, trainer_cls=trainer_cls, model=model, n_shards=n_shards,
                  device=device, private=private, eval_ratios=eval_ratios, aggregator=aggregator, attack=attack,
                  layout=ParamLayout(names=tuple(shared), shapes=tuple(tuple(named[n].shape) for n in shared)))


def check_outputs(model, spec: Mapping[str, Any], what: str) -> None:
    """A model whose last linear layer's outputs disagree with the data's classes is refused (when both are
    known: the spec has num_classes, the model a torch.nn.Linear)."""
    import torch

    classes = spec.get("num_classes")
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if classes is not None and linear and linear[-1].out_features != int(classes):
        raise ConfigError(f"{what}: its last layer has {linear[-1].out_features} outputs, but the data has "
                          f"{int(classes)} classes (num_classes in the reader's spec)")


def _run(config: Config, comm: Comm, stack: ExitStack, sink: _Sink, progress: str) -> dict[str, np.ndarray] | None:
    """Builds every part of the run (each owned by `stack`), runs it, returns rank 0's final shared parameters."""
    from flock.common import kernels
    from scheduler.client import LocalSchedulerClient, SchedulerClient
    from simulator.data_plane import make_data_plane
    from trainer.base import TrainConfig

    rank, world = comm.rank, comm.size
    pids = comm.gather(f"{rank}={os.getpid()}@{platform.node()}")
    if rank == 0 and world > 1:   # MPI reports a killed process by pid: this maps it to its rank
        log.info("ranks: %s", " ".join(pids))
    train_config = TrainConfig(lr=config.lr, batch_size=config.batch_size, local_epochs=config.local_epochs,
                               max_grad_norm=config.max_grad_norm, prox_mu=config.prox_mu, momentum=config.momentum)
    plugins = agreed(comm, lambda: _plugins(config))
    reader = _open_reader(config, comm, plugins[0])
    built = _build(config, comm, reader, plugins, train_config)
    if config.centralized:
        return _centralized(config, built, reader, train_config, stack, sink, progress)
    kernels.warm()        # numba's start-up (about 0.3 s) before the scheduler's clock starts the first round

    run_id = uuid.uuid4().hex[:12] if rank == 0 else None
    token = (config.token or os.environ.get("FLOCK_TOKEN") or secrets.token_hex(16)) if rank == 0 else None
    started = agreed(comm, lambda: _start_scheduler(config, built, reader, world, run_id, stack, sink, progress)
                     if rank == 0 else None)
    scheduler, resume_round = started if rank == 0 else (None, None)
    address = None
    if world > 1:         # one process calls its scheduler in-process: no server at all
        address = agreed(comm, lambda: _serve(config, scheduler, stack, run_id, token) if rank == 0 else None)
    address, run_id, resume_round, token = comm.bcast((address, run_id, resume_round, token))
    if rank == 0:
        log.info("%s%d rank(s) x %d shard(s) on %s; %d shared parameters (%.1f MB), private: %s; run dir %s",
                 f"scheduler on {address}; " if address else "", world, built.n_shards, built.device,
                 built.layout.size, built.layout.size * 4 / 1e6, ", ".join(built.private) or "none", config.run_dir)

    tls_ca = config.tls_ca or config.tls_cert
    if rank == 0:      # hosts the scheduler: calls it in-process; every other rank goes through gRPC
        client = LocalSchedulerClient(scheduler, rank=0, run_id=run_id)
    else:
        client = SchedulerClient(address, rank=rank, world_size=world, run_id=run_id, token=token,
                                 tls_ca=Path(tls_ca) if tls_ca else None)
    stack.callback(client.close)
    start_step = client.hello().step
    if rank == 0 and resume_round == 0:
        client.init_params(built.layout, built.layout.flatten(built.tensors(built.layout.names)))
    data_plane = make_data_plane(config.data_plane, comm, client, built.layout.size, timeout=config.round_timeout)
    stack.callback(data_plane.stop)     # on every exit: no thread of it reads shared memory any more
    simulator = _simulator(config, built, comm, reader, client, data_plane, train_config, resume_round, stack)
    simulator.run(start_step)
    # freeing MPI shared memory is collective: only on success (a failing rank aborts the job, which frees it)
    data_plane.close()
    peak_mb = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)   # Linux: KiB
    comm.barrier()   # every rank has seen "done": the scheduler may stop
    if rank != 0:
        return None
    run_dir = Path(config.run_dir)
    (run_dir / "resources.json").write_text(json.dumps({"peak_rss_mb": [round(m, 1) for m in peak_mb]}))
    log.info("done: metrics in %s; peak memory (RSS) per rank: %s", run_dir / "metrics.jsonl",
             " ".join(f"{r}={m:.0f}MB" for r, m in enumerate(peak_mb)))
    if scheduler.failed_rounds:
        log.warning("%d of %d training rounds failed: nothing was applied in them (the train rows say why)",
                    scheduler.failed_rounds, config.rounds)
    if scheduler.channel is not None and scheduler.channel.summary():
        log.info("%s", scheduler.channel.summary())
    return {n: v.copy() for n, v in built.layout.split(scheduler.params).items()}


def _centralized(config: Config, built: _Built, reader, train_config, stack: ExitStack, sink: _Sink,
                 progress: str) -> dict[str, np.ndarray]:
    """The non-federated baseline in this process; returns its final shared parameters."""
    from flock.common.recorder import Recorder
    from simulator.centralized import run_centralized

    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(
        {**config.to_saved_json(), "world_size": 1, "argv": redact_argv(sys.argv), "sources": sink.sources},
        indent=1))
    sink.open(config, run_dir, stack.enter_context(Recorder(run_dir, config.rounds, mode=progress)))
    log.info("centralized baseline: %d parameters; run dir %s", built.layout.size, run_dir)
    run_centralized(reader=reader, model=built.model,
                    trainer=built.trainer_cls(replace(train_config, local_epochs=1), built.spec),
                    rounds=config.rounds, clients_per_round=config.clients_per_round,
                    local_epochs=config.local_epochs, eval_every=config.eval_every,
                    eval_users=config.eval_users, seed=config.seed, on_record=sink)
    return built.tensors(built.layout.names)


def _start_scheduler(config: Config, built: _Built, reader, world: int, run_id: str, stack: ExitStack, sink: _Sink,
                     progress: str):
    """Rank 0: the scheduler (restored on --resume), config.json and the recorder; returns (scheduler, rounds
    already done)."""
    from flock.channel import keeps_user_state, server_channel
    from flock.channel.accounting import Accountant, training_population
    from flock.common.recorder import Recorder, truncate_metrics
    from scheduler.optim import make_server_optimizer
    from scheduler.rounds import round_policy
    from scheduler.selection import make_selection
    from scheduler.state import Scheduler, SchedulerConfig

    run_dir = Path(config.run_dir)
    checkpoint = run_dir / "checkpoint.npz"
    if not config.resume and holds_a_run(run_dir):
        raise ConfigError(f"--run-dir {run_dir} already holds a run: continue it with --resume {run_dir}, "
                          f"or choose another --run-dir")
    trainer_cls, layout = built.trainer_cls, built.layout
    target = parse_target(config.target)
    if target is not None and target[0] not in built.eval_ratios:
        raise ConfigError(f"--target {config.target}: the trainer reports no {target[0]!r} (its evaluation "
                          f"metrics: {', '.join(built.eval_ratios)})")
    if target is not None and built.eval_ratios[target[0]][0].endswith("correct") and not 0 <= target[1] <= 1:
        raise ConfigError(f"--target {config.target}: {target[0]} is a fraction of correct predictions, in [0, 1] "
                          f"(shown as a percentage): e.g. --target {target[0]}=0.1 for 10%")
    channel = server_channel(config, layout.sizes, training_population(reader))     # privacy and bytes
    selection = make_selection(config)
    if selection is not None and "loss" not in trainer_cls.train_ratios:
        raise ConfigError(f"--selection {config.selection} ranks clients by their training loss: the trainer "
                          f"reports no 'loss' ratio (its training metrics: {', '.join(trainer_cls.train_ratios) or 'none'})")
    phones = phone_rounds(config)
    if phones is not None:      # compressed transfers take their own time on the virtual clock
        accounting = channel.stage(Accountant).accounting
        phones = replace(phones, client_bytes=(channel.bytes_down, channel.bytes_up),
                         count_online=accounting is not None and accounting.per_round)
    scheduler = Scheduler(
        SchedulerConfig(world_size=world, rounds=config.rounds, clients_per_round=config.clients_per_round,
                        eval_every=config.eval_every, eval_users=config.eval_users, seed=config.seed,
                        pin_users=bool(built.private) or keeps_user_state(config),
                        checkpoint_every=config.checkpoint_every, target=parse_target(config.target)),
        reader=reader, optimizer=trainer_cls.server_step(layout) if config.flower_server else make_server_optimizer(
            config.server_opt, server_lr=config.server_lr, momentum=config.server_momentum,
            beta1=config.server_beta1, beta2=config.server_beta2, tau=config.server_tau),
        train_ratios=trainer_cls.train_ratios, eval_ratios=built.eval_ratios,
        main_metric=getattr(trainer_cls, "main_metric", ""),
        rounds=round_policy(phones, async_config(config), selection), channel=channel,
        checkpoint_path=checkpoint if config.checkpoint_every else None)
    resume_round = 0
    if config.resume:
        resume_round = scheduler.restore(checkpoint, layout) if checkpoint.exists() else 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.resume:
        truncate_metrics(run_dir / "metrics.jsonl", resume_round)
        log.info("resuming %s after round %d", run_dir, resume_round)
    else:       # what a start that failed before its first record left is not a run: it is replaced
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    # a resumed run's too: --rounds, --eval-every and --checkpoint-every may have changed
    write_json_atomic(run_dir / "config.json", {
        **config.to_saved_json(), "world_size": world, "shards_per_rank": built.n_shards, "run_id": run_id,
        "argv": redact_argv(sys.argv), "private_params": list(built.private), "shared_params": layout.size,
        "versions": package_versions(), **channel.run_fields(), "sources": sink.sources})
    sink.open(config, run_dir, stack.enter_context(Recorder(run_dir, config.rounds, mode=progress,
                                                            done=resume_round)))
    scheduler.attach(on_record=sink, before_checkpoint=sink.recorder.sync)   # before rank 0's parameters arrive,
    return scheduler, resume_round


def _simulator(config: Config, built: _Built, comm: Comm, reader, client, data_plane, train_config,
               resume_round: int, stack: ExitStack):
    """This rank's simulator: its private store (rolled back on --resume), shards with model replicas."""
    from flock.channel import update_channel
    from simulator.async_simulator import AsyncSimulator
    from simulator.data_server import MemoryStore, SQLiteStore
    from simulator.per_client import PerClientRound
    from simulator.shard import Shard, ring_slots
    from simulator.simulator import Simulator

    run_dir, rank = Path(config.run_dir), comm.rank
    channel = update_channel(config)      # privacy and compression on the clients; None: plain FedAvg
    if config.data_server == "sqlite":
        store = SQLiteStore(run_dir / "private" / f"rank{rank}.sqlite")
    else:
        keep = (built.private or (channel and channel.error_feedback)) and config.checkpoint_every
        store = MemoryStore(run_dir / "private" / f"rank{rank}-memory" if keep else None)
    stack.callback(store.close)
    if config.resume:
        store.rollback(resume_round)
    private_init = built.tensors(built.private)
    models = [built.model.to(built.device)]
    for _ in range(built.n_shards - 1):
        replica = built.model_cls.build(built.spec).to(built.device)
        replica.load_state_dict(built.model.state_dict())
        models.append(replica)
    finetune = replace(train_config, local_epochs=config.finetune_epochs) if config.finetune_epochs else None
    # plain synchronous FedAvg: each shard's sum takes several users a pass (simulator/shard.py: ParamRing)
    linear = channel is None and not config.async_buffer and built.aggregator is None
    slots = ring_slots(built.layout.size, len(models)) if linear else 1
    shards = [Shard(m, built.trainer_cls(train_config, built.spec), built.layout, built.private, store, private_init,
                    finetuner=built.trainer_cls(finetune, built.spec) if finetune else None,
                    channel=channel, slots=slots) for m in models]
    # client selection's feedback: each client's training loss (the trainer's "loss" ratio), uniform needs none
    report_loss = built.trainer_cls.train_ratios.get("loss") if config.selection != "uniform" else None
    if config.async_buffer:
        simulator = AsyncSimulator(rank=rank, client=client, reader=reader, shards=shards, store=store,
                                   eval_ratios=built.eval_ratios, seed=config.seed, round_timeout=config.round_timeout,
                                   data_plane=data_plane, report_loss=report_loss)
    else:
        loss = built.trainer_cls.train_ratios.get(getattr(built.aggregator, "loss_metric", "loss"))
        per_client = (PerClientRound(comm, built.layout.size, built.aggregator, timeout=config.round_timeout,
                                     attack=built.attack, loss_ratio=loss) if built.aggregator is not None else None)
        simulator = Simulator(rank=rank, client=client, reader=reader, shards=shards, store=store,
                              eval_ratios=built.eval_ratios, seed=config.seed, round_timeout=config.round_timeout,
                              data_plane=data_plane, per_client=per_client, attack=built.attack,
                              report_loss=report_loss)
    stack.callback(simulator.close)
    return simulator


def phone_rounds(config: Config):
    """The run's device model (--device-profiles and the options that need it), or None: no clock.
    Asynchronous mode always has one (built-in profiles unless a source is given)."""
    if not config.device_profiles and not config.async_buffer:
        return None
    from scheduler.phones.availability import availability_from_option
    from scheduler.phones.devices import profiles_from_option
    from scheduler.phones.rounds import PhoneRounds

    return PhoneRounds(profiles=profiles_from_option(config.device_profiles or "builtin", config.seed),
                       availability=availability_from_option(config.availability, config.seed), seed=config.seed,
                       local_epochs=config.local_epochs, over_select=config.over_select,
                       deadline_s=config.deadline or math.inf, min_clients=config.min_clients)


def async_config(config: Config):
    """FedBuff's settings from --async-buffer and its options, or None: synchronous rounds."""
    if not config.async_buffer:
        return None
    from scheduler.phones.fedbuff import AsyncConfig

    return AsyncConfig(concurrency=config.async_concurrency or config.clients_per_round,
                       buffer_size=config.async_buffer, staleness_exponent=config.staleness_exponent,
                       max_staleness=None if config.async_max_staleness < 0 else config.async_max_staleness)


def _serve(config: Config, scheduler, stack: ExitStack, run_id: str, token: str) -> str:
    """Rank 0's gRPC server for the other ranks, stopped when the run ends; returns its address."""
    from scheduler.server import create_server

    tls = (Path(config.tls_cert), Path(config.tls_key)) if config.tls_cert else None
    if tls is None and config.scheduler_host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the scheduler listens on %s without TLS: its token and parameters travel in clear; "
                    "give --tls-cert/--tls-key on a shared network", config.scheduler_host)
    server, port = create_server(f"{config.scheduler_host}:0", scheduler, run_id=run_id, token=token, tls=tls)
    stack.callback(server.stop, grace=2)
    return f"{config.scheduler_host}:{port}"


def find_mpirun() -> str:
    """The mpirun of this Python's environment (the mpich wheel puts it beside the interpreter), else the
    one on PATH; a clear error when there is none."""
    import shutil

    here = Path(sys.executable).parent / "mpirun"
    found = str(here) if here.exists() else shutil.which("mpirun")
    if not found:
        raise FileNotFoundError("mpirun not found: install flock's dependencies (./install.sh) in this environment")
    return found


def launch(config: Config, *, np: int = 2, mpirun: str | None = None, timeout: float | None = None,
           on_record: Callable[[dict], None] | None = None, given: Mapping[str, str] | None = None) -> History:
    """Runs `config` as an MPI job of `np` ranks (`mpirun -np N python application.py --config ...`) and
    returns its History, read back from the run directory (the final shared parameters come from the
    checkpoint written after the last round: None with checkpoint_every=0; with --target, the last periodic
    one). `on_record` gets each metrics record as it appears in metrics.jsonl while the job runs (read every
    half second, so a little after simulate's would; any not seen yet when the job ends follow then).
    `given`: the options to pass as set by the user (None: those that differ from Config's defaults); they
    reach the job in a temporary config file, so config.json's `sources` says "config file" for them. A
    failed job raises RuntimeError with the job's output."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    run_dir = Path(config.run_dir or default_run_dir()).resolve()
    found = mpirun or find_mpirun()
    names = set(given) if given is not None else {n for n, v in config.to_json().items() if v != FIELDS[n].default}
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_json().items()
              if k in names and k not in ("config", "run_dir", "data_dir", "token")}
    follower = _RecordFollower(run_dir / "metrics.jsonl", on_record)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(values))
        cmd = [found, "-np", str(np), sys.executable, str(root / "application.py"), *([config.data_dir] if config.data_dir else []),
               "--config", str(cfg), "--run-dir", str(run_dir), "--quiet"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        if config.token:
            env["FLOCK_TOKEN"] = config.token
        deadline = None if timeout is None else time.monotonic() + timeout
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            while True:
                try:       # communicate keeps collecting the output across its timeouts
                    stdout, stderr = proc.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    follower.poll()
                    if deadline is not None and time.monotonic() > deadline:
                        proc.kill()
                        proc.communicate()
                        raise
    follower.poll()
    if proc.returncode != 0:
        raise RuntimeError(f"mpirun -np {np} failed with status {proc.returncode}:\n{stdout}{stderr}")
    params = None
    checkpoint = run_dir / "checkpoint.npz"
    if checkpoint.is_file():
        from flock.common.domain import ParamLayout
        from scheduler.checkpoint import load_checkpoint

        flat, meta, _ = load_checkpoint(checkpoint)
        layout = ParamLayout(names=tuple(n for n, _ in meta["layout"]), shapes=tuple(tuple(s) for _, s in meta["layout"]))
        params = {n: v.copy() for n, v in layout.split(flat).items()}
    return History(run_dir=run_dir, records=read_metrics(run_dir), params=params)


class _RecordFollower:
    """Hands the caller each complete line appended to a metrics.jsonl that another process writes."""

    def __init__(self, path: Path, on_record: Callable[[dict], None] | None) -> None:
        self.path, self.on_record, self.offset = path, on_record, 0

    def poll(self) -> None:
        if self.on_record is None or not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]       # a line being written waits for the next look
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            self.on_record(json.loads(line))
