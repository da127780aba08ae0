"""What the per-client path costs: per-round overhead with the 6.2M-parameter LSTM at K clients a round and
-np ranks, per-client rules against FedAvg's linear path, and each rank's peak memory (one run; table at the
end).

    python bench/per_client_cost.py [DATA_DIR] [--rounds 8] [--nps 2,4,8] [--clients 10,50] [--rules fedavg,median,geomed]

Users hold one sequence each (bench/throughput.py's tiny users, the built-in vocabulary: the same 24.7 MB
model), one shard per rank, so a round is almost all overhead: plans, parameters out, the exchange of the
clients' slices, the rule, the slices' gather and the server step. Overhead: a round's seconds minus its
slowest rank's work (metrics.jsonl's `seconds` and `rank_work_s`), median over the rounds after the first.
Peak memory: resources.json (each rank's peak resident set). The per-client path holds about K x P x 4 /
world bytes of slices per rank, beside its own clients' updates until the exchange.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from launch import ROOT, write_table
from throughput import project, tiny_users_data

FLAGS = ("--shards", "1", "--quiet")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default="lm_data")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--nps", default="2,4,8")
    p.add_argument("--clients", default="10,50")
    p.add_argument("--rules", default="fedavg,median,geomed")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/per-client-cost-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tiny = str(tiny_users_data(ROOT / "runs" / "throughput-tiny", Path(args.data_dir)))
    rows = []
    for clients in [int(k) for k in args.clients.split(",")]:
        for np_ in [int(n) for n in args.nps.split(",")]:
            for rule in args.rules.split(","):
                run_dir = out / f"{rule}-k{clients}-np{np_}"
                r = project(tiny, args.rounds, np_, run_dir, *FLAGS, "--clients-per-round", str(clients),
                            "--aggregator", rule, warmup=1)
                peak = json.loads((run_dir / "resources.json").read_text())["peak_rss_mb"]
                rows.append((clients, np_, rule, r, peak))
                print(f"K={clients} -np {np_} {rule}: overhead {r['overhead_median_s'] * 1000:.0f} ms, peak "
                      f"{max(peak):.0f} MB", flush=True)
    base = {(k, n): r["overhead_median_s"] for k, n, rule, r, _ in rows if rule == "fedavg"}
    lines = [f"# The per-client path's cost ({args.rounds} rounds, the first one excluded)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, "
             f"{len(os.sched_getaffinity(0))} cores",
             f"- command: `python bench/per_client_cost.py {args.data_dir} --rounds {args.rounds} --nps {args.nps} "
             f"--clients {args.clients} --rules {args.rules}`",
             "- data: 200 users of one sequence each, the built-in vocabulary (6,182,672 shared parameters, "
             "24.7 MB); `--shards 1`", "",
             "| K | -np | aggregator | overhead median (ms) | x FedAvg | round (ms) | peak RSS per rank (MB) |",
             "|---:|---:|---|---:|---:|---:|---|"]
    for clients, np_, rule, r, peak in rows:
        ratio = r["overhead_median_s"] / base[(clients, np_)] if (clients, np_) in base else float("nan")
        lines.append(f"| {clients} | {np_} | {rule} | {r['overhead_median_s'] * 1000:.0f} | {ratio:.2f} | "
                     f"{r['round_s'] * 1000:.0f} | {' '.join(f'{m:.0f}' for m in peak)} |")
    write_table(out, lines)


if __name__ == "__main__":
    main()
