"""Start-up checks of the launch: processes that each see a world of one although their launcher started
several (srun without a PMI plugin, another MPI's mpirun), and an MPI that lacks what the data plane needs."""
import os
import subprocess
import sys

import pytest

from flock.common.config import Config
from flock.common.errors import SharedError
from flock.run import simulate
from simulator.launch_env import expected_size, launcher_rank, mpi_problem, singleton_problem
from tests.helpers import ROOT, make_lm_data

LAUNCH_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_SIZE", "PMIX_RANK",
               "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEP_NUM_TASKS",
               "SLURM_PROCID")


@pytest.mark.parametrize("environ, hint", [
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, "srun --mpi=pmi2"),
    ({"SLURM_STEPID": "0", "SLURM_NPROCS": "2"}, "mpirun -np 2"),
    ({"PMI_SIZE": "2", "PMI_RANK": "1"}, "mpi4py is built against another MPI"),
    ({"OMPI_COMM_WORLD_SIZE": "3"}, "the venv's own `mpirun`"),
    ({"PMIX_SIZE": "8"}, "PMIX_SIZE=8"),
])
def test_singletons_are_named_with_the_fix(environ, hint):
    problem = singleton_problem(environ, world_size=1)
    assert problem and hint in problem and "world of one" in problem


@pytest.mark.parametrize("environ, world_size", [
    ({}, 1),                                                               # no launcher
    ({"PMI_SIZE": "1"}, 1),                                                # mpirun -np 1
    ({"PMI_SIZE": "4", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, 4),     # hydra's ranks under its srun proxies
    ({"SLURM_NTASKS": "4"}, 1),                       # a batch script (no step): `python application.py` alone
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "PMI_SIZE": "2"}, 2),     # srun --mpi=pmi2: a real world
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}, 1),
])
def test_agreeing_launches_pass(environ, world_size):
    assert singleton_problem(environ, world_size) is None


def test_the_mpi_launchers_count_wins_over_slurms():
    assert expected_size({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "PMI_SIZE": "6"}) == (6, "PMI_SIZE")
    assert expected_size({"SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8"}) == (
        2, "SLURM_STEP_NUM_TASKS")
    assert launcher_rank({"SLURM_PROCID": "3"}) == 3 and launcher_rank({"PMI_RANK": "1", "SLURM_PROCID": "0"}) == 1
    assert launcher_rank({}) == 0


def test_mpi_problems_suggest_the_grpc_data_plane():
    assert mpi_problem(data_plane="mpi", world_size=2, threads=True, mpi_version=4) is None
    assert mpi_problem(data_plane="grpc", world_size=2, threads=False, mpi_version=2) is None
    assert mpi_problem(data_plane="mpi", world_size=1, threads=False, mpi_version=2) is None
    no_threads = mpi_problem(data_plane="mpi", world_size=2, threads=False, mpi_version=4)
    assert "MPI_THREAD_MULTIPLE" in no_threads and "--data-plane grpc" in no_threads
    old = mpi_problem(data_plane="mpi", world_size=4, threads=True, mpi_version=2)
    assert "MPI-3 shared memory" in old and "MPI-2" in old and "--data-plane grpc" in old


class _NoThreadsWorld:
    """Two ranks' worth of agreement in one process: what simulate asks of the world before any set-up."""
    rank, size, local_size, threads, mpi_version = 0, 2, 1, False, 4

    def allgather(self, obj):
        return [obj, obj]


def test_an_mpi_without_threads_stops_before_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(SharedError, match="MPI_THREAD_MULTIPLE.*--data-plane grpc"):
        simulate(Config(data_dir=str(tmp_path / "data"), run_dir=str(run_dir)), comm=_NoThreadsWorld())
    assert not run_dir.exists()


@pytest.mark.parametrize("environ", [{"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, {"PMI_SIZE": "2"}])
def test_a_singleton_exits_2_before_writing_anything(tmp_path, environ):
    data = make_lm_data(tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.run([sys.executable, str(ROOT / "application.py"), str(data), "--run-dir", str(tmp_path / "run"),
                           "--rounds", "1"], cwd=ROOT, env={**env, **environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "world of one" in lines[0]
    assert not (tmp_path / "run").exists()
