"""Two "hosts" on one machine joined by a real network: two network namespaces made for the test, a veth
pair between them (each end named `flock0`, 10.231.0.1/24 and 10.231.0.2/24), and nothing else: no route
out of either, so a test's traffic stays inside them. Every process the test started in them is ended and
both namespaces (with the pair) are removed on the way out, on success and on failure.

A host's commands run in it through `tests/netns_enter.sh` (`nsenter --net=/run/netns/NAME` with a /sys of
the host's own, where UCX finds the host's network devices; not `ip netns exec`, whose fresh /sys hides the
cgroup mounts slurmd needs); mpirun reaches the second host through `tests/netns_ssh.sh`, a stand-in for
ssh that does the same.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.launcher import launcher

ROOT = Path(__file__).resolve().parent.parent
ADDRESSES = ("10.231.0.1", "10.231.0.2")
IFACE = "flock0"


@dataclass(frozen=True)
class TwoHosts:
    namespaces: tuple[str, str]
    addresses: tuple[str, str] = ADDRESSES
    iface: str = IFACE

    def enter(self, host: int) -> list[str]:
        """The command prefix that runs a command on host 0 or 1."""
        return [str(ROOT / "tests" / "netns_enter.sh"), self.namespaces[host]]

    def env(self) -> dict[str, str]:
        """What the launch needs in its environment: where netns_ssh.sh finds each host, and MPI's bytes
        between the hosts over TCP on the pair (Launcher.network_env: UCX sees one machine and would use
        shared memory, so the bytes between nodes would not cross the veth pair)."""
        return {"FLOCK_NETNS": " ".join(f"{a}={n}" for a, n in zip(self.addresses, self.namespaces)),
                **launcher().network_env(self.iface)}

    def mpirun_options(self) -> tuple[str, ...]:
        """mpirun's options that place the ranks on the two hosts in turn, one proxy (or daemon) each."""
        return launcher().hosts_options(self.addresses, ROOT / "tests" / "netns_ssh.sh", iface=self.iface)

    def received_bytes(self, host: int) -> int:
        """Bytes the host's end of the pair has received so far."""
        out = _ip("-n", self.namespaces[host], "-s", "-o", "link", "show", self.iface).stdout
        return int(out.split("RX:")[1].split("\\")[1].split()[0])


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def end_processes_in(namespace: str) -> None:
    """Ends what still runs in a namespace of the test's own (SIGTERM, then SIGKILL after 5 s)."""
    def pids() -> list[int]:
        out = _ip("netns", "pids", namespace, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)


def _wait_until_up(hosts: TwoHosts, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for name in hosts.namespaces:
        while "LOWER_UP" not in _ip("-n", name, "-o", "link", "show", IFACE).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the veth pair's end in {name} did not come up in {timeout:.0f} s")
            time.sleep(0.05)


@contextmanager
def two_hosts(tag: str) -> Iterator[TwoHosts]:
    """Two namespaced hosts joined by a veth pair; skips the test with the reason where the kernel (or
    the lack of root) refuses namespaces or iproute2 is missing."""
    if shutil.which("ip") is None or shutil.which("nsenter") is None or shutil.which("unshare") is None:
        pytest.skip("two namespaced hosts need iproute2's `ip` and util-linux's `nsenter` and `unshare`")
    if os.geteuid() != 0:
        pytest.skip("two namespaced hosts need root (network namespaces and a veth pair)")
    hosts = TwoHosts(namespaces=(f"flock{os.getpid()}{tag}a", f"flock{os.getpid()}{tag}b"))
    made: list[str] = []
    try:
        for name in hosts.namespaces:
            added = _ip("netns", "add", name, check=False)
            if added.returncode != 0:
                pytest.skip(f"the kernel refuses network namespaces here: ip netns add: {added.stderr.strip()}")
            made.append(name)
        a, b = hosts.namespaces
        pair = _ip("link", "add", IFACE, "netns", a, "type", "veth", "peer", "name", IFACE, "netns", b, check=False)
        if pair.returncode != 0:
            pytest.skip(f"the kernel refuses a veth pair here: ip link add: {pair.stderr.strip()}")
        for name, address in zip(hosts.namespaces, hosts.addresses):
            # IPv4 only: a fresh IPv6 link-local address is "tentative" for a while, and MPI's libfabric
            # trips over it on the first launch
            _ip("-n", name, "link", "set", IFACE, "addrgenmode", "none")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", IFACE)
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "link", "set", IFACE, "up")
        _wait_until_up(hosts)
        yield hosts
    finally:
        for name in made:
            end_processes_in(name)
            _ip("netns", "del", name, check=False)     # takes the veth pair with it
