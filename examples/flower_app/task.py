"""flower_app: Flower's PyTorch quickstart (flwr 1.41: `flwr new --framework pytorch`), on MNIST from flock's
reader instead of a downloaded data set. Run by flock's MPI simulator:

    python -m reader.mnist runs/mnist-iid --partition iid --users 100       # once: MNIST in flock's day layout
    mpirun -np 2 python application.py runs/mnist-iid --reader arrays \\
        --flower-app examples.flower_app.client_app:app --flower-server examples.flower_app.server_app:app \\
        --run-config "fraction-train=0.1" --clients-per-round 10 --rounds 5 --lr 0.05 --batch-size 32

`Net`, `train` and `test` are the quickstart's (LeNet for 1x28x28 images); client_app.py and server_app.py
are the quickstart's apps, unchanged but for one line each in client_app.py: the quickstart's
`load_data(partition_id, num_partitions, batch_size)` downloads a partition, this `load_data` takes the
user's samples from flock's reader (`user_samples(context)`). The same apps run in Flower's own simulation
engine on the same users when the run config names the data folder ("flock-data"; see
bench/flower_app_vs_flock.py).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import Context
from torch.utils.data import DataLoader, TensorDataset

from trainer.flower import user_samples


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz', for 1x28x28 images)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def load_data(context: Context, split: str, batch_size: int) -> DataLoader:
    """This user's training ("train") or test ("test") samples from flock's reader, normalized as the
    quickstart does (mean 0.5, std 0.5)."""
    samples = user_samples(context, split)
    x = torch.from_numpy(np.asarray(samples["x"], dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(np.asarray(samples["y"], dtype=np.int64))
    return DataLoader(TensorDataset((x - 0.5) / 0.5, y), batch_size=batch_size, shuffle=split == "train")


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net: nn.Module, testloader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
