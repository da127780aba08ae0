"""What the launcher's environment says about the job, checked against what MPI reports, before a run starts.

A launcher that cannot reach the MPI inside mpi4py (`srun` without a PMI plugin, the mpirun of another MPI)
starts N processes that each find a world of one, "rank 0 of 1": N runs that each write a run folder and
train everything alone. `singleton_problem` sees it from the environment the launcher set; `mpi_problem`
says what the data plane needs from the MPI that is there. Plain functions over a mapping: tested without
a launcher.
"""
from __future__ import annotations

from typing import Mapping

# the world size as MPI launchers announce it to their processes, and the rank beside it
LAUNCHER_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
LAUNCHER_RANKS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
SLURM_SIZES = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")


def _count(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def launcher_rank(environ: Mapping[str, str]) -> int:
    """This process's rank as its launcher announced it (before MPI starts): 0 without one."""
    for name in LAUNCHER_RANKS:
        if (rank := _count(environ, name)) is not None:
            return rank
    return 0


def expected_size(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """(the number of processes the launcher started, the variable that says so), or None when no launcher
    says. An MPI launcher's own variable wins; Slurm's count only inside a job step (srun), since a batch
    script's SLURM_NTASKS is the allocation's, which an `mpirun -np 2` inside it need not fill."""
    for name in LAUNCHER_SIZES:
        if (size := _count(environ, name)) is not None:
            return size, name
    if "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ:
        for name in SLURM_SIZES:
            if (size := _count(environ, name)) is not None:
                return size, name
    return None


def singleton_problem(environ: Mapping[str, str], world_size: int) -> str | None:
    """Why this process must not run, when its launcher started several but MPI reports a world of one
    (every process would be "rank 0 of 1"); None when they agree."""
    found = expected_size(environ)
    if found is None or world_size != 1 or found[0] <= 1:
        return None
    size, name = found
    seen = f"the launcher started {size} processes ({name}={size}) but MPI sees each as a world of one"
    if name.startswith("SLURM_"):
        return (f"{seen}: srun started them without a PMI that this MPI speaks; start them with "
                f"`srun --mpi=pmi2 ...` (or run `mpirun -np {size} ...` inside the allocation)")
    return (f"{seen}: mpi4py is built against another MPI than this mpirun's; use the mpirun of the MPI "
            f"mpi4py was built with (the venv's own `mpirun`, or see the README's 'On a cluster')")


def mpi_problem(*, data_plane: str, world_size: int, threads: bool, mpi_version: int) -> str | None:
    """What the MPI data plane lacks in this MPI (it calls MPI from several threads and shares node memory
    through MPI-3 windows), or None. Only a job of more than one rank with `--data-plane mpi` needs them."""
    if data_plane != "mpi" or world_size == 1:
        return None
    missing = [what for what, ok in (("MPI_THREAD_MULTIPLE (MPI from several threads)", threads),
                                     (f"MPI-3 shared memory (this MPI implements MPI-{mpi_version})",
                                      mpi_version >= 3)) if not ok]
    if not missing:
        return None
    return (f"--data-plane mpi needs {' and '.join(missing)}, which this MPI does not give: use "
            f"--data-plane grpc (every byte through the scheduler), or an MPI built with them")
