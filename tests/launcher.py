"""The mpirun the tests launch with (flock's own choice: the venv's `mpirun`, else the one on PATH), which MPI
it belongs to, and that MPI's own words for what the tests ask of it: the settings a test machine needs, ranks
placed on several hosts through a stand-in for ssh, the network between hosts, and its report of a rank
killed by a signal. Known: MPICH's hydra (the pip `mpich` wheel, Debian's `mpich`) and Open MPI 4's ORTE
(Debian's `openmpi-bin`); another mpirun, or an mpirun of another MPI than mpi4py's, stops the MPI tests
with the reason."""
from __future__ import annotations

import functools
import ipaddress
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest

from flock.run import find_mpirun

HYDRA, OPEN_MPI = "MPICH's hydra", "Open MPI"
SLOTS = 16       # ranks Open MPI may place on each of several hosts: more than any test's -np


@dataclass(frozen=True)
class Launcher:
    path: str
    kind: str      # HYDRA or OPEN_MPI

    def settings(self) -> dict[str, str]:
        """What every MPI test job needs in its environment on a test machine: Open MPI refuses to start as
        root without leave, and refuses more ranks than the machine has cores (the tests start up to 6)."""
        if self.kind == HYDRA:
            return {}
        root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}
        return {**root, "OMPI_MCA_rmaps_base_oversubscribe": "1"}

    def hosts_options(self, hosts: Sequence[str], ssh: Path, *, iface: str | None = None) -> tuple[str, ...]:
        """mpirun's options that place the ranks on `hosts` in turn (rank r on hosts[r % len(hosts)]), one
        proxy (hydra) or daemon (Open MPI) each, started through `ssh`, a stand-in for ssh (the tests'
        fake_ssh.sh or netns_ssh.sh). `iface`: the interface the hosts reach each other on; Open MPI, which
        leaves loopback out of TCP unless it is named, takes `lo` for hosts that are loopback addresses.

        Open MPI names its shared-memory files after the host name, so hosts that share this machine's
        name would share those files: the stand-in gives each host a name of its own (--own-host-name, a
        UTS namespace), which needs root; without it the test is skipped with that reason."""
        if self.kind == HYDRA:
            return ("-launcher", "ssh", "-launcher-exec", str(ssh), "-hosts", ",".join(hosts),
                    *(("-iface", iface) if iface else ()))
        if os.geteuid() != 0:
            pytest.skip("Open MPI keys its shared-memory files by host name: several hosts on this machine need "
                        "names of their own (a UTS namespace per host), which needs root")
        if iface is None and all(ipaddress.ip_address(h).is_loopback for h in hosts):
            iface = "lo"
        network = ("--mca", "btl_tcp_if_include", iface, "--mca", "oob_tcp_if_include", iface) if iface else ()
        return ("--host", ",".join(f"{h}:{SLOTS}" for h in hosts), "--map-by", "node",
                "--mca", "plm_rsh_agent", f"{ssh} --own-host-name", *network)

    def network_env(self, iface: str) -> dict[str, str]:
        """The environment that sends MPI's bytes between hosts over TCP on `iface`: hosts on one machine
        would otherwise meet in shared memory (UCX sees one machine), and no byte would cross it. MPICH: its
        OFI netmod on TCP where it has one (the wheel), else UCX kept to TCP (Debian's is built with UCX only,
        and ignores the netmod asked for); Open MPI: its own TCP transport instead of UCX."""
        if self.kind == HYDRA:
            return {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": iface,
                    "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": iface}
        return {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,vader,tcp", "OMPI_MCA_btl_tcp_if_include": iface,
                "OMPI_MCA_oob_tcp_if_include": iface}

    def srun_env(self) -> dict[str, str]:
        """What sbatch's environment needs for examples/slurm's `srun` to speak this MPI's process interface:
        nothing for MPICH (the scripts' default, PMI-2); PMIx for Open MPI (Debian's build has no PMI-2)."""
        return {} if self.kind == HYDRA else {"SLURM_MPI_TYPE": "pmix"}

    def killed_rank_report(self, *, rank: int, pid: int) -> tuple[str, ...]:
        """Patterns that mpirun's report of rank `rank` (process `pid`) killed by SIGKILL matches, all of
        them: hydra names the process id (flock's `ranks:` line maps it to the rank); Open MPI names the
        rank, and 4.1 with an external PMIx reports the process id as 0."""
        if self.kind == HYDRA:
            return (rf"PID {pid} RUNNING", re.escape("Killed (signal 9)"))
        return (rf"process rank {rank} with PID ({pid}|0) on node \S+ exited on signal 9 \(Killed\)",)


_LIBRARY = "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; print(MPI.Get_library_version())"


@functools.cache
def launcher() -> Launcher:
    """The tests' mpirun and its MPI, found once; RuntimeError (with what it found) where it is neither hydra
    nor Open MPI, or not the MPI that mpi4py is built against (its ranks would each run alone)."""
    path = find_mpirun()
    said = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    version = said.stdout + said.stderr
    if "HYDRA" in version:
        kind = HYDRA
    elif "Open MPI" in version or "OpenRTE" in version:
        kind = OPEN_MPI
    else:
        raise RuntimeError(f"{path} --version: neither MPICH's hydra nor Open MPI: {version.strip()[:300]}")
    library = subprocess.run([sys.executable, "-c", _LIBRARY], capture_output=True, text=True, timeout=60,
                             check=True).stdout.strip()
    if ("Open MPI" in library) != (kind == OPEN_MPI):
        raise RuntimeError(f"{path} is {kind}'s mpirun, but mpi4py is built against {library.splitlines()[0]!r}: "
                           f"make {Path(sys.executable).parent}/mpirun a script that runs the mpirun of mpi4py's "
                           f"MPI, or put that mpirun first on PATH (README, 'The site's MPI')")
    return Launcher(path=path, kind=kind)
