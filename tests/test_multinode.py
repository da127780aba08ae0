"""The multi-node set-up on one machine, across a real network interface: mpirun places the ranks on two
hosts, network namespaces joined by a veth pair (10.231.0.1 and 10.231.0.2, one hydra proxy each, started
through a stand-in for ssh; `tests/netns.py`); the scheduler binds rank 0's host address, the ranks of the
other host reach it over TLS with the run's token, and the MPI data plane's bytes between the nodes cross
the pair. The metrics are the one-host run's, bitwise. Skipped, with the reason, where the kernel refuses
namespaces."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, make_lm_data, mpirun, run_app, untimed_metrics
from tests.netns import two_hosts

pytestmark = pytest.mark.mpi   # every test here starts mpirun

ARGS = ("--rounds", "2", "--clients-per-round", "4", "--shards", "1")


def self_signed(tmp_path, address: str):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=nodeA", "-addext", f"subjectAltName=IP:{address}"],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize("plane", ["mpi", "grpc"])
def test_two_hosts_on_a_veth_pair_tls_and_token(tmp_path, plane):
    data = make_lm_data(tmp_path / "data")
    alone = run_app(4, data, tmp_path / "one-host", *ARGS, "--data-plane", plane)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    with two_hosts("m") as hosts:
        cert, key = self_signed(tmp_path, hosts.addresses[0])
        received = hosts.received_bytes(0)
        cmd = [*hosts.enter(0), mpirun(), *hosts.mpirun_options(), "-np", "4", sys.executable,
               str(ROOT / "application.py"), str(data), "--run-dir", str(tmp_path / "run"), *ARGS,
               "--data-plane", plane, "--scheduler-host", hosts.addresses[0], "--tls-cert", str(cert),
               "--tls-key", str(key)]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **hosts.env(), "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        received = hosts.received_bytes(0) - received
    assert f"scheduler on {hosts.addresses[0]}:" in proc.stdout and "4 rank(s)" in proc.stdout
    ranks = next(line for line in proc.stdout.splitlines() if "ranks: " in line)
    assert ranks.count("@") == 4      # rank=pid@host for each rank
    rows = untimed_metrics(tmp_path / "run")
    assert [r["kind"] for r in rows] == ["train", "train", "eval"]
    assert rows == untimed_metrics(tmp_path / "one-host")
    # the other host's update sums (float64, one per training round) came to rank 0's host over the pair
    size = json.loads((tmp_path / "run" / "config.json").read_text())["shared_params"]
    assert received > 2 * 8 * size, (received, size)
