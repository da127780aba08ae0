"""A Flower client as Flower's tutorials write it (PyTorch, NumPyClient), run by flock's MPI simulator:

    python -m reader.mnist runs/mnist-iid --partition iid --users 100       # once: MNIST in flock's day layout
    mpirun -np 2 python application.py runs/mnist-iid --reader arrays \\
        --flower-client examples.flower_client:client_fn --server-lr 1 --lr 0.05 --batch-size 32 --rounds 20

`FlowerClient` is plain Flower code and would run unchanged in Flower's own simulation (`app` below);
only `client_fn`'s data loading is flock's: `user_samples(context)` gives the user's samples from
flock's reader instead of downloading a partition.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context
from torch.utils.data import DataLoader, TensorDataset

from trainer.flower import user_samples


class Net(nn.Module):
    """A small MLP for 28x28 images."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
    return total / max(seen, 1)


@torch.no_grad()
def test(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    net.eval()
    loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        out = net(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    return loss / max(seen, 1), correct / max(seen, 1)


class FlowerClient(NumPyClient):
    def __init__(self, net: nn.Module, loader: DataLoader) -> None:
        self.net = net
        self.loader = loader

    def get_parameters(self, config):
        return [v.cpu().numpy() for v in self.net.state_dict().values()]

    def set_parameters(self, parameters) -> None:
        keys = self.net.state_dict().keys()
        self.net.load_state_dict({k: torch.tensor(v) for k, v in zip(keys, parameters)}, strict=True)

    def fit(self, parameters, config):
        self.set_parameters(parameters)
        loss = train(self.net, self.loader, int(config["local_epochs"]), float(config["lr"]))
        return self.get_parameters({}), len(self.loader.dataset), {"train_loss": loss}

    def evaluate(self, parameters, config):
        self.set_parameters(parameters)
        loss, accuracy = test(self.net, self.loader)
        return loss, len(self.loader.dataset), {"accuracy": accuracy}


def to_loader(samples, batch_size: int, shuffle: bool) -> DataLoader:
    x = torch.from_numpy(np.asarray(samples["x"], dtype=np.float32) / 255.0)
    y = torch.from_numpy(np.asarray(samples["y"], dtype=np.int64))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def client_fn(context: Context):
    samples = user_samples(context)   # flock: this user's data for this call
    loader = to_loader(samples, int(context.run_config.get("batch-size", 32)), shuffle=True)
    return FlowerClient(Net(), loader).to_client()


app = ClientApp(client_fn=client_fn)
