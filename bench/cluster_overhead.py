"""Per-round overhead on one host against two hosts joined by a real network (one run each, a table at the end).

    sudo python bench/cluster_overhead.py [DATA_DIR] [--rounds 12] [--nps 2,4]

The overhead of bench/overhead.py (a round's seconds minus its slowest rank's work, in rounds of users
holding one sequence each with the default LSTM on DATA_DIR's vocabulary, 16 clients per round,
`--shards 1`, the MPI data plane; median and mean over the rounds after the first) at each -np, with
every rank on this host, and with the ranks placed in turn on two hosts that are network namespaces joined
by a veth pair (`tests/netns.py`: the scheduler on the first host over TLS, the update sums between the
nodes over MPICH's OFI TCP netmod). Both "hosts" share this machine's cores: the difference is the
network path (a veth pair's TCP, the TLS channel, a second node's sums over MPI), not two machines.
Needs root (namespaces).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from launch import ROOT, app_command, write_table
from throughput import tiny_users_data

from flock.common.recorder import read_metrics
from tests.netns import two_hosts

FLAGS = ("--shards", "1", "--quiet", "--clients-per-round", "16", "--eval-every", "0", "--eval-users", "1",
         "--checkpoint-every", "0", "--data-plane", "mpi")


def overhead(run_dir: Path, warmup: int = 1) -> dict:
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"][warmup:]
    gaps = [r["seconds"] - max(r["rank_work_s"]) for r in train]
    return {"median_s": statistics.median(gaps), "mean_s": sum(gaps) / len(gaps),
            "round_s": sum(r["seconds"] for r in train) / len(train)}


def job(cmd: list[str], env: dict[str, str], label: str) -> None:
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"[{label}] failed with exit code {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default="lm_data")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--nps", default="2,4")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/cluster-overhead-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    if not data_dir.exists():
        from reader import popquotes

        popquotes.build(data_dir)
    tiny = str(tiny_users_data(ROOT / "runs" / "throughput-tiny", data_dir))
    nps = [int(n) for n in args.nps.split(",")]
    results = {}
    for np_ in nps:
        run_dir = out / f"one-host-np{np_}"
        job(app_command(np_, tiny, "--rounds", str(args.rounds), "--run-dir", str(run_dir), *FLAGS), {}, "one host")
        results["one host", np_] = overhead(run_dir)
    with two_hosts("b") as hosts:
        cert, key = out / "cert.pem", out / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=hostA", "-addext",
                        f"subjectAltName=IP:{hosts.addresses[0]}"], check=True, capture_output=True)
        for np_ in nps:
            run_dir = out / f"two-hosts-np{np_}"
            mpirun, *rest = app_command(np_, tiny, "--rounds", str(args.rounds), "--run-dir", str(run_dir), *FLAGS,
                                        "--scheduler-host", hosts.addresses[0], "--tls-cert", str(cert),
                                        "--tls-key", str(key))
            job([*hosts.enter(0), mpirun, *hosts.mpirun_options(), *rest], hosts.env(), "two hosts")
            results["two hosts", np_] = overhead(run_dir)
    cores = len(os.sched_getaffinity(0))
    lines = [f"# Per-round overhead, one host against two namespaced hosts ({args.rounds} rounds, the first "
             "one excluded)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {cores} cores "
             "(both hosts on it)",
             f"- command: `python bench/cluster_overhead.py {args.data_dir} --rounds {args.rounds} --nps {args.nps}`",
             "", "Users of one sequence each, 16 clients per round, `--shards 1`, MPI data plane: round seconds "
             "minus the slowest rank's work. Two hosts: ranks in turn on two network namespaces joined by a "
             "veth pair, the scheduler on the first over TLS.", "",
             "| placement | -np | overhead median (ms) | mean (ms) | round (ms) |", "|---|---:|---:|---:|---:|",
             *[f"| {where} | {np_} | {r['median_s'] * 1000:.0f} | {r['mean_s'] * 1000:.0f} | "
               f"{r['round_s'] * 1000:.0f} |" for (where, np_), r in results.items()]]
    write_table(out, lines)


if __name__ == "__main__":
    main()
