"""The LM benchmark's workload in Flower's simulation engine (Ray backend, 1 CPU per virtual client), for
bench/throughput.py's comparison. Needs the optional extra: `pip install -r requirements-extras.txt`.

    python bench/flower_lm.py [DATA_DIR] [--rounds 10] [--json OUT.json]

The same data, model, trainer code and hyper-parameters as flock's LM benchmark, and the same users: the
strategy picks the round's users with flock's seeded sampler and names each virtual client's user in its
fit config (a client trains whichever user it is told). The client is written as Flower's tutorials write
one (a NumPyClient made per call by client_fn), except that each Ray worker keeps one model object instead
of building it per call, which only helps Flower. Aggregation is Flower's FedAvg (server lr 1; flock's
benchmark uses 1.85: the server step is a few vector operations either way). Throughput counts client
updates over the rounds, from the first configure_fit to the last aggregate_fit (start-up excluded and
reported separately, as for flock).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import launch  # noqa: F401  (puts the repository root on sys.path)

DAY = "20200101"
_WORKER: dict = {}


def worker_state(data_dir: str):
    """One reader, model and trainer per Ray worker process."""
    if not _WORKER:
        import torch

        from model.lstm import RedditLSTM
        from reader.leaf import LeafRedditReader
        from trainer.base import TrainConfig
        from trainer.lm import LanguageModelTrainer

        torch.set_num_threads(1)
        reader = LeafRedditReader(Path(data_dir))
        spec = reader.spec()
        _WORKER.update(reader=reader, model=RedditLSTM.build(spec), trainer=LanguageModelTrainer(TrainConfig(), spec))
    return _WORKER


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", default="lm_data")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--json", default="")
    args = p.parse_args()
    launched = time.time()

    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, FitIns, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from model.lstm import RedditLSTM
    from reader.leaf import LeafRedditReader
    from scheduler.sampling import sample_clients

    data_dir = str(Path(args.data_dir).resolve())
    reader = LeafRedditReader(Path(data_dir))
    idx = reader.index(DAY, "train")
    users = [u for u, n in zip(idx.users, idx.counts) if n]
    torch.manual_seed(0)
    initial = [p.detach().numpy() for p in RedditLSTM.build(reader.spec()).parameters()]

    class LMClient(NumPyClient):
        def fit(self, parameters, config):
            state = worker_state(data_dir)
            model = state["model"]
            with torch.no_grad():
                for p, a in zip(model.parameters(), parameters):
                    p.copy_(torch.from_numpy(a))
            sums = state["trainer"].train(model, state["reader"].load(DAY, "train", str(config["user"])))
            return [p.detach().numpy() for p in model.parameters()], int(sums["samples"]), {}

    def client_fn(context: Context):
        return LMClient().to_client()

    times: dict[str, list[float]] = {"start": [], "end": [], "clients": []}

    class SameUsersFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            times["start"].append(time.time())
            picked = sample_clients(0, server_round - 1, users, args.clients_per_round)
            proxies = client_manager.sample(num_clients=len(picked))
            return [(proxy, FitIns(parameters, {"user": uid})) for proxy, uid in zip(proxies, picked)]

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} Flower clients failed: {failures[:1]}")
            out = super().aggregate_fit(server_round, results, failures)
            times["end"].append(time.time())
            times["clients"].append(len(results))
            return out

    def server_fn(context: Context):
        strategy = SameUsersFedAvg(fraction_fit=0.0, fraction_evaluate=0.0, min_fit_clients=args.clients_per_round,
                                   min_evaluate_clients=0, min_available_clients=args.clients_per_round,
                                   initial_parameters=ndarrays_to_parameters(initial))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    cores = len(os.sched_getaffinity(0))
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=len(users), backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                              "init_args": {"num_cpus": cores}})
    if len(times["end"]) != args.rounds:
        raise SystemExit(f"Flower ran {len(times['end'])} of {args.rounds} rounds")
    seconds = sum(e - s for s, e in zip(times["start"], times["end"]))
    round_s = [e - s for s, e in zip(times["start"], times["end"])]
    later = sum(round_s[1:])
    result = {"clients_per_s": sum(times["clients"]) / seconds, "mean_round_s": seconds / args.rounds,
              "round_s": round_s, "clients_per_s_after_first": sum(times["clients"][1:]) / later if later else None,
              "startup_s": times["start"][0] - launched, "rounds": args.rounds, "virtual_clients": len(users),
              "cpus": cores, "flwr": __import__("flwr").__version__}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
