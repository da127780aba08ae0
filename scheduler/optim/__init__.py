"""Server optimizers: what the scheduler does with the round's mean client delta (FedOpt's outer step).
One algorithm per file; `make_server_optimizer` builds one from the run's options."""
from __future__ import annotations

from scheduler.optim.base import ServerOptimizer
from scheduler.optim.fedadagrad import FedAdagrad
from scheduler.optim.fedadam import FedAdam
from scheduler.optim.fedavg import FedAvg
from scheduler.optim.fedavgm import FedAvgM
from scheduler.optim.fedyogi import FedYogi

SERVER_OPTIMIZERS = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
                     "fedadagrad": FedAdagrad}


def make_server_optimizer(name: str, *, server_lr: float, momentum: float = 0.9, beta1: float = 0.9,
                          beta2: float = 0.99, tau: float = 1e-3) -> ServerOptimizer:
    """The server optimizer called `name` (see SERVER_OPTIMIZERS) with the options it takes."""
    if name == "fedavg":
        return FedAvg(server_lr=server_lr)
    if name == "fedavgm":
        return FedAvgM(server_lr=server_lr, momentum=momentum)
    try:
        cls = SERVER_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown server optimizer {name!r}; choose from {sorted(SERVER_OPTIMIZERS)}") from None
    return cls(server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau)
