"""flock's entry point: `mpirun -np N python application.py DATA_DIR [options]`.

Options -> one frozen Config -> roles: rank 0 hosts the scheduler (gRPC, loopback by default) and writes
the run directory; every rank, rank 0 included, runs a simulator. Nothing else lives here.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import secrets
import sys
import uuid
from dataclasses import replace
from pathlib import Path

from common.config import Config, default_run_dir, parse_config, resumed_config
from common.errors import ConfigError, DataError, FlockError

log = logging.getLogger("flock")


def setup_logging(rank: int, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr if rank else sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def progress_mode(config: Config) -> str:
    """A progress bar on a terminal, log lines otherwise (files, CI), nothing with --quiet."""
    if config.quiet:
        return "quiet"
    return "bar" if on_terminal() else "lines"


def on_terminal() -> bool:
    """Whether a person watches: stdout is a terminal, or (under mpirun, which pipes the ranks' output to its
    own stdout) the launcher a few parents up writes to a terminal, and this is not CI."""
    if sys.stdout.isatty():
        return True
    if os.environ.get("CI") or "PMI_RANK" not in os.environ:
        return False
    pid = os.getppid()
    for _ in range(4):            # rank <- hydra proxy <- mpiexec
        try:
            if os.readlink(f"/proc/{pid}/fd/1").startswith(("/dev/pts/", "/dev/tty")):
                return True
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def prepare_data(config: Config) -> None:
    """Rank 0, before anyone reads: builds the built-in corpus if DATA_DIR is missing."""
    data_dir = Path(config.data_dir)
    if data_dir.exists():
        return
    if config.reader != "leaf":
        raise DataError(f"{data_dir}: data folder not found")
    from reader import popquotes

    log.info("%s does not exist: building it once from the popquotes corpus (speakers as users) ...", data_dir)
    summary = popquotes.build(data_dir)
    log.info("built %s: %d users, %d training and %d test comments, vocabulary %d",
             data_dir, summary["users"], summary["train_comments"], summary["test_comments"], summary["vocab_size"])


def run(config: Config, comm) -> None:
    import torch

    from common.domain import ParamLayout
    from common.plugins import resolve
    from model.base import private_names
    from scheduler.client import LocalSchedulerClient, SchedulerClient
    from simulator.data_plane import make_data_plane
    from simulator.data_server import MemoryStore, SQLiteStore
    from simulator.shard import Shard
    from simulator.simulator import Simulator
    from trainer.base import TrainConfig

    rank, world = comm.rank, comm.size
    pids = comm.gather(f"{rank}={os.getpid()}@{platform.node()}")
    if rank == 0 and world > 1:   # MPI reports a killed process by pid: this maps it to its rank
        log.info("ranks: %s", " ".join(pids))
    # One torch thread per shard keeps every user's arithmetic identical whatever the number of ranks;
    # the cores are used by running shards side by side instead.
    torch.set_num_threads(1)
    train_config = TrainConfig(lr=config.lr, batch_size=config.batch_size, local_epochs=config.local_epochs,
                               max_grad_norm=config.max_grad_norm, prox_mu=config.prox_mu, momentum=config.momentum)

    reader_cls = resolve("reader", config.reader)
    if config.flower_client:
        from trainer.flower import load_client_fn

        load_client_fn(config.flower_client)   # fail early (every rank alike) when flwr or the function is missing
    else:
        model_cls, trainer_cls = resolve("model", config.model), resolve("trainer", config.trainer)
    if rank == 0:
        prepare_data(config)
        reader = reader_cls(Path(config.data_dir))
        reader.prepare()
    comm.barrier()
    if rank != 0:
        reader = reader_cls(Path(config.data_dir))
    spec = reader.spec()
    if config.flower_client:
        from trainer.flower import flower_plugins

        model_cls, trainer_cls = flower_plugins(config.flower_client, reader, train_config)
    cores = len(os.sched_getaffinity(0))
    n_shards = config.shards or max(1, cores // comm.local_size)
    if not getattr(trainer_cls, "thread_safe", True) and n_shards > 1:
        if rank == 0:
            log.info("%s uses process-wide state: one shard per rank (start more ranks to use more cores)",
                     trainer_cls.__name__)
        n_shards = 1

    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    torch.manual_seed(config.seed)
    model = model_cls.build(spec)
    private = private_names(model, config.private)
    named = dict(model.named_parameters())
    shared = [n for n in named if n not in private]
    layout = ParamLayout(names=tuple(shared), shapes=tuple(tuple(named[n].shape) for n in shared))
    eval_ratios = dict(trainer_cls.eval_ratios)
    if config.finetune_epochs:
        eval_ratios.update({f"{k}_ft": (f"ft_{num}", f"ft_{den}") for k, (num, den) in trainer_cls.eval_ratios.items()})
    run_dir = Path(config.run_dir)
    if config.centralized:
        from common.recorder import Recorder
        from simulator.centralized import run_centralized

        if world != 1:
            raise ConfigError("--centralized runs in one process: start it without mpirun (or with -np 1)")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({**config.to_saved_json(), "world_size": 1, "argv": sys.argv},
                                                        indent=1))
        recorder = Recorder(run_dir, config.rounds, mode=progress_mode(config))
        log.info("centralized baseline: %d parameters; run dir %s", layout.size, run_dir)
        run_centralized(reader=reader, model=model, trainer=trainer_cls(replace(train_config, local_epochs=1), spec),
                        rounds=config.rounds, clients_per_round=config.clients_per_round,
                        local_epochs=config.local_epochs, eval_every=config.eval_every,
                        eval_users=config.eval_users, seed=config.seed, on_record=recorder)
        recorder.close()
        return
    server = recorder = scheduler = None
    address = run_id = token = None
    resume_round = 0
    if rank == 0:
        from common.recorder import Recorder, truncate_metrics
        from scheduler.optim import make_server_optimizer
        from scheduler.server import create_server
        from scheduler.state import Scheduler, SchedulerConfig

        checkpoint = run_dir / "checkpoint.npz"
        if not config.resume and ((run_dir / "metrics.jsonl").exists() or checkpoint.exists()):
            raise ConfigError(f"--run-dir {run_dir} already holds a run: continue it with --resume {run_dir}, "
                              f"or choose another --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        if not config.resume:
            (run_dir / "config.json").write_text(json.dumps(
                {**config.to_saved_json(), "world_size": world, "shards_per_rank": n_shards, "run_id": run_id,
                 "argv": sys.argv, "private_params": list(private), "shared_params": layout.size,
                 "versions": package_versions()}, indent=1))
        scheduler = Scheduler(
            SchedulerConfig(world_size=world, rounds=config.rounds, clients_per_round=config.clients_per_round,
                            eval_every=config.eval_every, eval_users=config.eval_users, seed=config.seed,
                            pin_users=bool(private), checkpoint_every=config.checkpoint_every),
            reader=reader, optimizer=make_server_optimizer(
                config.server_opt, server_lr=config.server_lr, momentum=config.server_momentum,
                beta1=config.server_beta1, beta2=config.server_beta2, tau=config.server_tau),
            train_ratios=trainer_cls.train_ratios, eval_ratios=eval_ratios,
            checkpoint_path=checkpoint if config.checkpoint_every else None)
        if config.resume:
            resume_round = scheduler.restore(checkpoint, layout) if checkpoint.exists() else 0
            truncate_metrics(run_dir / "metrics.jsonl", resume_round)
            log.info("resuming %s after round %d", run_dir, resume_round)
        token = config.token or os.environ.get("FLOCK_TOKEN") or secrets.token_hex(16)
        tls = (Path(config.tls_cert), Path(config.tls_key)) if config.tls_cert else None
        if tls is None and config.scheduler_host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("the scheduler listens on %s without TLS: its token and parameters travel in clear; "
                        "give --tls-cert/--tls-key on a shared network", config.scheduler_host)
        server, port = create_server(f"{config.scheduler_host}:0", scheduler, run_id=run_id, token=token, tls=tls)
        address = f"{config.scheduler_host}:{port}"
        log.info("scheduler on %s; %d rank(s) x %d shard(s) on %s; %d shared parameters (%.1f MB), private: %s; run dir %s",
                 address, world, n_shards, device, layout.size, layout.size * 4 / 1e6, ", ".join(private) or "none", run_dir)
        recorder = Recorder(run_dir, config.rounds, mode=progress_mode(config), done=resume_round)
        scheduler.on_record = recorder    # before rank 0's parameters arrive, no step can finish
        scheduler.before_checkpoint = recorder.sync
    address, run_id, resume_round, token = comm.bcast((address, run_id, resume_round, token))

    tls_ca = config.tls_ca or config.tls_cert
    if rank == 0:      # hosts the scheduler: calls it in-process; every other rank goes through gRPC
        client = LocalSchedulerClient(scheduler, rank=0, run_id=run_id)
    else:
        client = SchedulerClient(address, rank=rank, world_size=world, run_id=run_id, token=token,
                                 tls_ca=Path(tls_ca) if tls_ca else None)
    start_step = client.hello().step
    if rank == 0 and resume_round == 0:
        client.init_params(layout, layout.flatten({n: named[n].detach().numpy() for n in shared}))
    data_plane = make_data_plane(config.data_plane, comm, client, layout.size)

    if config.data_server == "sqlite":
        store = SQLiteStore(run_dir / "private" / f"rank{rank}.sqlite")
    else:
        store = MemoryStore(run_dir / "private" / f"rank{rank}-memory" if private and config.checkpoint_every else None)
    if config.resume:
        store.rollback(resume_round)
    private_init = {n: named[n].detach().numpy().copy() for n in private}
    models = [model.to(device)]
    for _ in range(n_shards - 1):
        replica = model_cls.build(spec).to(device)
        replica.load_state_dict(model.state_dict())
        models.append(replica)
    finetune_config = replace(train_config, local_epochs=config.finetune_epochs) if config.finetune_epochs else None
    shards = [Shard(m, trainer_cls(train_config, spec), layout, private, store, private_init,
                    finetuner=trainer_cls(finetune_config, spec) if finetune_config else None) for m in models]
    simulator = Simulator(rank=rank, client=client, reader=reader, shards=shards, store=store,
                          eval_ratios=eval_ratios, seed=config.seed, round_timeout=config.round_timeout,
                          data_plane=data_plane)
    simulator.run(start_step)
    data_plane.close()
    peak_mb = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)   # Linux: KiB
    comm.barrier()   # every rank has seen "done": the scheduler may stop
    store.close()
    client.close()
    if rank == 0:
        recorder.close()
        server.stop(grace=2)
        (run_dir / "resources.json").write_text(json.dumps({"peak_rss_mb": [round(m, 1) for m in peak_mb]}))
        log.info("done: metrics in %s; peak memory (RSS) per rank: %s", run_dir / "metrics.jsonl",
                 " ".join(f"{r}={m:.0f}MB" for r, m in enumerate(peak_mb)))


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "grpcio", "protobuf", "mpi4py", "mpich"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)   # the same on every rank: all exit alike
    except FlockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from simulator.comm import world

    comm = world()
    setup_logging(comm.rank, "WARNING" if config.quiet else config.log_level)
    code = 0
    try:
        if config.resume:
            config = resumed_config(config)
        run_dir = comm.bcast(config.run_dir or default_run_dir() if comm.rank == 0 else None)
        config = Config(**{**config.to_json(), "run_dir": run_dir})
        run(config, comm)
    except FlockError as e:
        log.error("%s", e)
        code = 2
    except BaseException:
        log.exception("rank %d failed", comm.rank)
        code = 1
    if code and comm.size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        comm.abort(code)   # a failed rank must not leave the others waiting forever
    return code


if __name__ == "__main__":
    sys.exit(main())
