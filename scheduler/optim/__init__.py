"""Server optimizers: what the scheduler does with the round's mean client delta (FedOpt's outer step)."""
from __future__ import annotations

from scheduler.optim.base import ServerOptimizer
from scheduler.optim.fedavg import FedAvg

SERVER_OPTIMIZERS = {"fedavg": FedAvg}


def make_server_optimizer(name: str, *, server_lr: float) -> ServerOptimizer:
    """The server optimizer called `name` (see SERVER_OPTIMIZERS)."""
    try:
        cls = SERVER_OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown server optimizer {name!r}; choose from {sorted(SERVER_OPTIMIZERS)}") from None
    return cls(server_lr=server_lr)
