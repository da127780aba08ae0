"""What the benchmark scripts share: the repository root on sys.path, the application's command line
under this venv's mpirun, and running a command to completion."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def app_command(np_: int | None, *args: str) -> list[str]:
    """`mpirun -np N python application.py ARGS` (or without mpirun when np_ is None)."""
    app = [sys.executable, str(ROOT / "application.py"), *args]
    return app if np_ is None else [str(Path(sys.executable).parent / "mpirun"), "-np", str(np_), *app]


def run(cmd: list[str], label: str, *, quiet: bool = False) -> float:
    """Runs `cmd` in the repository root; returns its wall seconds; exits the script if it fails."""
    print(f"[{label}] {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=quiet, text=True)
    if proc.returncode != 0:
        sys.exit(f"[{label}] failed with exit code {proc.returncode}" + (f"\n{proc.stderr[-3000:]}" if quiet else ""))
    return time.perf_counter() - started


def side_by_side(target, arg_lists: list[tuple]) -> list:
    """Runs `target(*args, queue)` for each of `arg_lists` in its own spawned process, all at once (as
    many plain loops as cores: the ceiling a simulator's ranks are compared with); returns what each put
    on the queue, in the order they finished."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, q)) for args in arg_lists]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """The script's own options, and the application options after `--`."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut], argv[cut + 1:]


def write_table(out: Path, lines: list[str]) -> None:
    """A benchmark's Markdown table: `out/table.md`, and printed."""
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)
