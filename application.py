"""flock's entry point: `mpirun -np N python application.py DATA_DIR [options]` (the `flock` command).

Options -> one frozen Config -> `flock.simulate` on every rank, with the MPI world, console logging and the
progress display; errors -> one message and an exit status. Nothing else lives here.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from flock.common.config import Config, parse_options
from flock.common.errors import FlockError, SharedError
from simulator.launch_env import launcher_rank, singleton_problem

log = logging.getLogger("flock")


@contextmanager
def logging_to_console(rank: int, level: str) -> Iterator[None]:
    """The CLI's log lines (rank 0 on stdout, the others on stderr), with the rank in each line; the root
    logger's handlers and level are restored afterwards (main() may be called from Python)."""
    handler = logging.StreamHandler(sys.stderr if rank else sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    try:
        yield
    finally:
        handler.flush()
        root.handlers[:], _ = before
        root.setLevel(before[1])


def progress_mode(config: Config) -> str:
    """A progress bar on a terminal, log lines otherwise (files, CI), nothing with --quiet."""
    if config.quiet:
        return "quiet"
    return "bar" if on_terminal() else "lines"


def on_terminal() -> bool:
    """Whether a person watches: stdout is a terminal, or (under mpirun, which pipes the ranks' output to its
    own stdout) the launcher a few parents up writes to a terminal, and this is not CI. Open MPI's mpirun
    gives its ranks a terminal of its own whatever its stdout is: the launcher's is what counts."""
    launched = any(name in os.environ for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"))
    if sys.stdout.isatty() and not launched:
        return True
    if os.environ.get("CI") or not launched:
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


def say_error(message: str) -> None:
    """The one line a user's error gets, as before the run started: `error: ...` on stderr."""
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


def plugins_from_cwd() -> None:
    """`--model mymod:Net` finds mymod.py in the current folder, as under `python application.py`: an
    installed console script (`flock`) starts with its own folder on sys.path, not the current one. Added
    last, so the current folder shadows no installed module."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.append(here)


def main(argv: list[str] | None = None) -> int:
    """The CLI: `mpirun -np N python application.py DATA_DIR [options]` (or the `flock` command). Bad input
    gets one message (from rank 0) and exit status 2; a failed rank aborts the whole job."""
    plugins_from_cwd()
    try:
        config, given = parse_options(argv)   # the same on every rank: all exit alike, rank 0 says why
    except FlockError as e:
        if launcher_rank(os.environ) == 0:
            say_error(str(e))
        return 2
    from flock.run import simulate
    from simulator.comm import world

    comm = world()
    singleton = singleton_problem(os.environ, comm.size)
    if singleton:      # each process alone would write its own run folder and train everything
        if launcher_rank(os.environ) == 0:
            say_error(singleton)
        return 2
    code, abort = 0, False
    with logging_to_console(comm.rank, "WARNING" if config.quiet else config.log_level):
        try:
            simulate(config, comm=comm, progress=progress_mode(config), given=given)
        except SharedError as e:       # every rank raised it: one message, nobody left waiting
            if comm.rank == 0:
                say_error(str(e))
            code = 2
        except FlockError as e:
            say_error(str(e) if comm.rank == 0 else f"rank {comm.rank}: {e}")
            code, abort = 2, True
        except OSError as e:
            if e.filename is None:     # not about a path the user gave: a fault of flock's, with its traceback
                log.exception("rank %d failed", comm.rank)
                code, abort = 1, True
            else:
                say_error(f"{e.filename}: {e.strerror or e}")
                code, abort = 2, True
        except BaseException:
            log.exception("rank %d failed", comm.rank)
            code, abort = 1, True
        if abort and comm.size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            comm.abort(code)   # a failed rank must not leave the others waiting forever
    return code


if __name__ == "__main__":
    sys.exit(main())
