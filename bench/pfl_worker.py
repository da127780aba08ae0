"""pfl-research's CIFAR-10 baseline (benchmarks/image_classification, configs/baseline.yaml) on the users of an
`arrays` folder, timed per central iteration: run by bench/pfl_compare.py under a Python that has pfl 0.6.0
(pfl needs dp-accounting < 0.6, flock pins 0.6, so pfl lives in a venv of its own; see pfl_compare.py).

    python bench/pfl_worker.py DATA_DIR --rounds R --json OUT       one process
    torchrun --standalone --nproc_per_node 2 bench/pfl_worker.py ...  pfl's own multi-process simulation

Only pfl, torch and numpy are imported. The model is pfl-research's `simple_cnn` (benchmarks/model/pytorch/
cnn.py: Transpose2D, conv 3x3 32, conv 3x3 64, max-pool, dropout 0.25, dense 128, dropout 0.5, dense 10;
Glorot-uniform weights), its loss and metrics as the benchmark attaches them; FedAvg (FederatedAveraging,
WeightByUser, central SGD lr 1.0), local SGD lr 0.1, 1 epoch, batch 10, cohort 50, no evaluation. pfl takes
images as (H, W, C), so the arrays' (C, H, W) samples are transposed once at load.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Phases:
    """Wall seconds per named phase, by wrapping methods (`wrap`) or adding measured spans (`add`); what one
    client's life costs, phase by phase, in each contestant (bench/pfl_compare.py --profile). A wrapped call
    inside another counts for its own phase only (self time): the phases add up to the whole."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.clients = 0
        self._inner: list[float] = []      # per open wrapped call: seconds of the wrapped calls inside it

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def wrap(self, owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            self._inner.append(0.0)
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self.add(phase, elapsed - self._inner.pop())
                if self._inner:
                    self._inner[-1] += elapsed

        setattr(owner, name, timed)

    def per_client_ms(self) -> dict[str, float]:
        return {k: v * 1000 / self.clients for k, v in self.seconds.items()}


class Transpose2D(nn.Module):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.permute((0, 3, 1, 2))


def _loss(self, inputs, targets, eval=False):
    self.eval() if eval else self.train()
    return F.cross_entropy(self(inputs), targets, reduction="mean")


@torch.no_grad()
def _metrics(self, inputs, targets, eval=True):
    from pfl.metrics import Weighted

    self.eval() if eval else self.train()
    logits = self(inputs)
    return {"loss": Weighted(F.cross_entropy(logits, targets, reduction="sum").item(), len(inputs)),
            "accuracy": Weighted((logits.argmax(-1) == targets).sum().item(), len(inputs))}


def simple_cnn(input_shape: tuple[int, int, int], num_outputs: int) -> nn.Module:
    """pfl-research's benchmarks/model/pytorch/cnn.py `simple_cnn`, line for line."""
    in_channels = input_shape[-1]
    flatten_size = ((input_shape[0] - 4) // 2) ** 2 * 64
    model = nn.Sequential(Transpose2D(), nn.Conv2d(in_channels, 32, kernel_size=(3, 3)), nn.ReLU(),
                          nn.Conv2d(32, 64, kernel_size=(3, 3)), nn.ReLU(), nn.MaxPool2d((2, 2)), nn.Dropout(0.25),
                          nn.Flatten(), nn.Linear(flatten_size, 128), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(128, num_outputs))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            torch.nn.init.xavier_uniform_(m.weight)
    model.loss = types.MethodType(_loss, model)
    model.metrics = types.MethodType(_metrics, model)
    return model


def main() -> None:
    torch.set_num_threads(1)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops import get_ops
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    class Stopwatch(TrainingProcessCallback):
        """perf_counter at the start and after every central iteration (the worker's view of the round)."""

        def __init__(self, phases: Phases) -> None:
            self.marks: list[float] = []
            self.phases = phases

        def on_train_begin(self, *, model):
            self.marks.append(time.perf_counter())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.marks.append(time.perf_counter())
            if central_iteration == 0:      # the first iteration is warm-up (and pfl evaluates in it)
                self.phases.seconds.clear()
            return False, Metrics()

    p = argparse.ArgumentParser()
    p.add_argument("data_dir")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cohort", type=int, default=50)
    p.add_argument("--json", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="time the phases of each client's life")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    day = Path(args.data_dir) / "20200101" / "train_data"
    x = np.ascontiguousarray(np.load(day / "x.npy").transpose(0, 2, 3, 1))   # (N, H, W, C), as pfl takes them
    y = np.load(day / "y.npy")
    offsets = np.load(day / "offsets.npy")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)     # float32 images, int64 labels
    users = {i: (xt[offsets[i]:offsets[i + 1]], yt[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)}
    train = FederatedDataset.from_slices(users, get_user_sampler("random", range(len(users))))
    model_nn = simple_cnn(tuple(x.shape[1:]), 10)
    params = [q for q in model_nn.parameters() if q.requires_grad]
    model = PyTorchModel(model=model_nn, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(params, 1.0))
    backend = SimulatedBackend(training_data=train, val_data=None, postprocessors=[WeightByUser()])
    phases = Phases()
    if args.profile:
        for name, phase in (("get_parameters", "global parameters in"), ("set_parameters", "global parameters in"),
                            ("new_local_optimizer", "optimizer"), ("_prepare_batch", "data"),
                            ("do_multiple_epochs_of", "training"), ("get_model_difference", "delta")):
            phases.wrap(model, name, phase)
        phases.wrap(backend._aggregator, "accumulate", "accumulate")
        for post in backend._postprocessors:
            phases.wrap(post, "postprocess_one_user", "accumulate")
    watch = Stopwatch(phases)
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=args.rounds + 1,
                                           train_cohort_size=args.cohort, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=0.1, local_num_epochs=1, local_batch_size=10),
        model_eval_params=NNEvalHyperParams(local_batch_size=10000), callbacks=[watch])
    if get_ops().distributed.global_rank == 0:
        Path(args.json).write_text(json.dumps({
            "round_s": [b - a for a, b in zip(watch.marks, watch.marks[1:])], "cohort": args.cohort,
            "workers": get_ops().distributed.world_size, "parameters": sum(q.numel() for q in params),
            "threads": torch.get_num_threads(), "pid": os.getpid(),
            "phases_s": phases.seconds if args.profile else None}))


if __name__ == "__main__":
    main()
