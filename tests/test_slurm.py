"""flock under Slurm on one machine: munged, slurmctld and two slurmd, each node a network namespace of the
test's own joined by a veth pair (`tests/netns.py`), so the job's ranks meet across a real interface.
`examples/slurm/nodes.sbatch`, as the README submits it, runs a tiny job with `sbatch --wait` on both nodes
(one task each, `srun --mpi=pmi2`; `SLURM_MPI_TYPE=pmix` for Open MPI); its metrics equal a plain
`mpirun -np 2` run's, bitwise. A plain `srun -n 2` without a PMI plugin stops, writing no run folder: MPICH's
two singletons with one error line of flock's, Open MPI's processes in MPI_Init. Each node has its own TmpFS
(Slurm's PMIx plugin makes its per-step folder there, by a name both nodes of this machine would share).

Debian's slurm-wlm and munge are installed with apt where missing; the tests skip, with the reason, only
when apt cannot install them or the kernel refuses namespaces. Every daemon runs in the foreground as a
child of the test, with its own key, socket, configuration and spool under a temporary folder (nothing of
the machine's own is read or changed), and is ended, with everything left in the namespaces, on the way out.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import ROOT, make_lm_data, run_app, untimed_metrics
from tests.launcher import OPEN_MPI, launcher
from tests.netns import TwoHosts, two_hosts

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]
WAIT_S = 180          # the longest any step here waits
NODES = ("flocka", "flockb")
ARGS = ("--rounds", "2", "--clients-per-round", "4")


def ensure_slurm() -> None:
    """Debian's slurm-wlm and munge, installed with apt where missing; a skip naming why when they cannot be."""
    if all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and cannot be (needs root and apt-get: apt-get install slurm-wlm munge)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{' '.join(cmd)}: no answer in 600 s")
        if done.returncode != 0:
            pytest.skip(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[-300:]}")


SLURM_CONF = """\
ClusterName=flocktest
SlurmctldHost={ctld}({ctld_addr})
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/ctld
SlurmdSpoolDir={dir}/spool-%n
TmpFS={dir}/tmp-%n
SlurmctldPidFile={dir}/ctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/ctld.log
SlurmdLogFile={dir}/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
ReturnToService=2
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
{nodes}
PartitionName=flock Nodes={names} Default=YES MaxTime=10 State=UP
"""


def _until(what: str, ready, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


@contextmanager
def slurm_cluster(hosts: TwoHosts) -> Iterator[dict[str, str]]:
    """munged, slurmctld and a slurmd per host, all children of this process; yields the environment that
    Slurm's commands need (SLURM_CONF). Ended (SIGTERM, then SIGKILL) on the way out."""
    ensure_slurm()
    work = Path(tempfile.mkdtemp(prefix="flock-slurm-"))     # short: munge's socket path has a length limit
    cores = len(os.sched_getaffinity(0))
    nodes = "\n".join(f"NodeName={n} NodeHostname={os.uname().nodename} NodeAddr={a} CPUs={cores} State=UNKNOWN"
                      for n, a in zip(NODES, hosts.addresses))
    conf = work / "slurm.conf"
    conf.write_text(SLURM_CONF.format(ctld=os.uname().nodename, ctld_addr=hosts.addresses[0], dir=work, nodes=nodes,
                                      names=",".join(NODES)))
    for name in ("ctld", *(f"tmp-{n}" for n in NODES)):
        (work / name).mkdir()
    key = work / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, cmd: list[str]) -> None:
        log = open(work / f"{name}.out", "wb")
        daemons.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)))
        log.close()

    try:
        start("munged", ["munged", "-F", "--force", f"--socket={work}/munge.socket", f"--key-file={key}",
                         f"--pid-file={work}/munged.pid", f"--log-file={work}/munged.log",
                         f"--seed-file={work}/munged.seed"])
        _until("munged's socket", (work / "munge.socket").exists, 30)
        start("slurmctld", [*hosts.enter(0), "slurmctld", "-D", "-i", "-f", str(conf)])
        for host, node in enumerate(NODES):
            start(f"slurmd-{node}", [*hosts.enter(host), "slurmd", "-D", "-N", node, "-f", str(conf)])

        def idle() -> bool:
            for name, proc in daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {_tail(work, name)}")
            out = subprocess.run([*hosts.enter(0), "sinfo", "-h", "-N", "-o", "%N %t"], env=env,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            return out.count("idle") == len(NODES)

        _until("both slurmd registered and idle", idle, 60)
        yield env
    finally:
        for _, proc in reversed(daemons):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(daemons):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        shutil.rmtree(work, ignore_errors=True)


def _tail(work: Path, name: str) -> str:
    logs = [work / f"{name}.out", work / f"{name}.log", work / "ctld.log"]
    return " | ".join(p.read_text(errors="replace")[-400:] for p in logs if p.exists())


@pytest.fixture(scope="module")
def cluster():
    with ExitStack() as stack:
        hosts = stack.enter_context(two_hosts("s"))
        env = stack.enter_context(slurm_cluster(hosts))
        yield hosts, env


@pytest.fixture(scope="module")
def same_run_under_mpirun(tmp_path_factory):
    """(tiny data, the run folder of `mpirun -np 2` on it): what every Slurm run here must equal."""
    tmp = tmp_path_factory.mktemp("mpirun")
    data = make_lm_data(tmp / "data")
    alone = run_app(2, data, tmp / "run", *ARGS, "--shards", "1")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    return data, tmp / "run"


def sbatch(hosts: TwoHosts, env: dict[str, str], script: str, run_dir: Path, *options: str) -> tuple[str, int]:
    """`sbatch --wait [options] examples/slurm/SCRIPT DATA_DIR ARGS` from the repository, on the first node;
    returns the job's output and the bytes the first node received over the pair meanwhile."""
    data = run_dir.parent / "data"
    out = run_dir.parent / f"{run_dir.name}.out"
    job_env = {**env, **hosts.env(), **launcher().srun_env(), "FLOCK_PYTHON": sys.executable,
               "FLOCK_RUN_DIR": str(run_dir)}
    received = hosts.received_bytes(0)
    job = subprocess.run([*hosts.enter(0), "sbatch", "--wait", *options, "--cpus-per-task", "1", "--time", "5",
                          f"--output={out}", str(ROOT / "examples" / "slurm" / script), str(data), *ARGS],
                         cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=WAIT_S)
    received = hosts.received_bytes(0) - received
    output = out.read_text(errors="replace") if out.exists() else ""
    assert job.returncode == 0, job.stdout + job.stderr + output
    return output, received


def test_sbatch_on_two_nodes_equals_mpirun_np_2(cluster, same_run_under_mpirun):
    hosts, env = cluster
    data, expected = same_run_under_mpirun
    run_dir = data.parent / "two-nodes"
    output, received = sbatch(hosts, env, "nodes.sbatch", run_dir, "-N", "2", "--ntasks-per-node", "1")
    assert f"scheduler on {hosts.addresses[0]}:" in output and "2 rank(s) x 1 shard(s)" in output, output
    rows = untimed_metrics(run_dir)
    assert [r["kind"] for r in rows] == ["train", "train", "eval"]
    assert rows == untimed_metrics(expected)
    # rank 1 ran on the other node: its update sums (float64, one per round) came over the veth pair
    size = json.loads((run_dir / "config.json").read_text())["shared_params"]
    assert received > 2 * 8 * size, (received, size)


def test_sbatch_on_one_node_equals_mpirun_np_2(cluster, same_run_under_mpirun):
    hosts, env = cluster
    data, expected = same_run_under_mpirun
    run_dir = data.parent / "one-node"
    output, _ = sbatch(hosts, env, "one_node.sbatch", run_dir, "-N", "1", "-n", "2")
    assert "2 rank(s) x 1 shard(s)" in output, output
    assert untimed_metrics(run_dir) == untimed_metrics(expected)


def test_plain_srun_singletons_stop_with_one_error(cluster, tmp_path):
    """srun without a PMI plugin: MPICH's processes start as singletons, which flock stops with one error line
    naming the fix; Open MPI's stop in MPI_Init, before flock's own check, in its words naming srun's PMIx."""
    hosts, env = cluster
    data = make_lm_data(tmp_path / "data")
    proc = subprocess.run([*hosts.enter(0), "srun", "--mpi=none", "-N", "1", "-n", "2", "--time", "5",
                           sys.executable, str(ROOT / "application.py"), str(data), "--run-dir", str(tmp_path / "run"),
                           *ARGS], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=WAIT_S)
    assert proc.returncode != 0
    assert not (tmp_path / "run").exists()
    if launcher().kind == OPEN_MPI:
        assert 'direct launched using "srun"' in proc.stderr and "PMIx support" in proc.stderr, proc.stderr
        return
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "srun --mpi=pmi2" in errors[0], proc.stdout + proc.stderr
