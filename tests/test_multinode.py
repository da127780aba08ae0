"""The multi-node set-up on one machine: mpirun places ranks on two "hosts" (127.0.0.2 and 127.0.0.3, one
hydra proxy each, started through a stand-in for ssh), the scheduler binds rank 0's host address, and the
ranks reach it over TLS with the run's token."""
import os
import subprocess
import sys

import pytest

from tests.helpers import FAKE_HOSTS, ROOT, make_lm_data, mpirun, read_metrics

pytestmark = pytest.mark.mpi   # every test here starts mpirun


def test_two_hosts_tls_and_token(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=nodeA", "-addext", "subjectAltName=IP:127.0.0.2"],
                   check=True, capture_output=True)
    data = make_lm_data(tmp_path / "data")
    cmd = [mpirun(), *FAKE_HOSTS, "-np", "4", sys.executable, str(ROOT / "application.py"), str(data),
           "--run-dir", str(tmp_path / "run"), "--rounds", "2", "--clients-per-round", "4",
           "--scheduler-host", "127.0.0.2", "--tls-cert", str(cert), "--tls-key", str(key)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scheduler on 127.0.0.2:" in proc.stdout and "4 rank(s)" in proc.stdout
    assert [r["kind"] for r in read_metrics(tmp_path / "run")] == ["train", "train", "eval"]
