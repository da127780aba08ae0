"""Per-round overhead as the ranks grow, and the project against the plain-PyTorch floor on short rounds
(one run, tables printed at the end).

    python bench/overhead.py [DATA_DIR] [--rounds 12] [--nps 2,4,8] [--planes mpi,grpc] [--short-clients 6]

- overhead: a round's seconds minus its slowest rank's work (metrics.jsonl's `seconds` and `rank_work_s`),
  in rounds of users holding one sequence each with the default 6.2M-parameter LSTM (so a round is almost
  all overhead: plans, parameters out, updates in, the server step), 16 clients per round, one shard per
  rank, at each -np and data plane (`--data-plane`); median and mean over the rounds after the first.
- short rounds: users cut to their first 15 comments (bench/throughput.py's balanced users), --short-clients
  of them per round (about one second of work per rank at -np 2): the project's client updates/s at -np 2
  against floor_np (2 plain-PyTorch floors side by side, bench/floor.py) x the rounds' balance bound (sum
  of mean rank work / sum of slowest rank work), both timed over the same rounds without the first
  (warm-up) round.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from launch import ROOT, write_table
from throughput import balanced_data, floors, project, tiny_users_data

FLAGS = ("--shards", "1", "--quiet")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default="lm_data")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--nps", default="2,4,8", help="rank counts of the overhead table")
    p.add_argument("--planes", default="mpi,grpc", help="data planes of the overhead table")
    p.add_argument("--short-clients", type=int, default=6, help="clients per short round")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or f"runs/overhead-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    nps, planes = [int(n) for n in args.nps.split(",")], args.planes.split(",")
    tiny = str(tiny_users_data(ROOT / "runs" / "throughput-tiny", Path(args.data_dir)))
    overhead = {(plane, np_): project(tiny, args.rounds, np_, out / f"tiny-{plane}-np{np_}", *FLAGS,
                                      "--clients-per-round", "16", "--data-plane", plane, warmup=1)
                for plane in planes for np_ in nps}
    balanced = str(balanced_data(ROOT / "runs" / "throughput-balanced", Path(args.data_dir)))
    floor_np = floors(balanced, args.rounds, 2, clients_per_round=args.short_clients, warmup=1)
    short = project(balanced, args.rounds, 2, out / "short-np2", *FLAGS, "--clients-per-round",
                    str(args.short_clients), warmup=1)
    lines = [f"# Per-round overhead and short rounds ({args.rounds} rounds, the first one excluded)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {cores} cores",
             f"- command: `python bench/overhead.py {args.data_dir} --rounds {args.rounds} --nps {args.nps} "
             f"--planes {args.planes} --short-clients {args.short_clients}`", "",
             "Users of one sequence each, 16 clients per round, `--shards 1`: round seconds minus the slowest "
             "rank's work.", "",
             "| data plane | -np | overhead median (ms) | mean (ms) | round (ms) |", "|---|---:|---:|---:|---:|",
             *[f"| {plane} | {np_} | {r['overhead_median_s'] * 1000:.0f} | {r['overhead_s'] * 1000:.0f} | "
               f"{r['round_s'] * 1000:.0f} |" for (plane, np_), r in overhead.items()], ""]
    low, high = min(nps), max(nps)
    for plane in planes if high > low else ():
        ratio = overhead[plane, high]["overhead_median_s"] / overhead[plane, low]["overhead_median_s"]
        lines.append(f"- {plane}: median overhead at -np {high} / at -np {low}: {ratio:.2f}")
    lines += ["", f"Short rounds: balanced users (15 comments each), {args.short_clients} clients per round, "
              "-np 2.", "",
              "| variant | value |", "|---|---:|",
              f"| floor_np (2 processes), client updates/s | {floor_np:.3f} |",
              f"| project -np 2, client updates/s | {short['clients_per_s']:.3f} |",
              f"| round (ms); slowest rank's work per round (ms) | {short['round_s'] * 1000:.0f}; "
              f"{(short['round_s'] - short['overhead_s']) * 1000:.0f} |",
              f"| balance bound (mean / slowest rank work) | {short['balance']:.3f} |",
              f"| project -np 2 / (floor_np x balance bound) | "
              f"{short['clients_per_s'] / (floor_np * short['balance']):.3f} |",
              f"| overhead per round, median / mean (ms) | {short['overhead_median_s'] * 1000:.0f} / "
              f"{short['overhead_s'] * 1000:.0f} |"]
    write_table(out, lines)


if __name__ == "__main__":
    main()
