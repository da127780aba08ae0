"""The physical floor the benchmarks compare against: plain PyTorch FedAvg with no FL machinery. One model,
one torch thread; for each user load the global weights, train locally with the project's own trainer,
add the weighted delta; then the server step."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import launch  # noqa: F401  (puts the repository root on sys.path)


class PlainFedAvg:
    def __init__(self, data_dir: Path, *, day: str = "20200101", server_lr: float = 1.85) -> None:
        import torch

        from model.lstm import RedditLSTM
        from reader.leaf import LeafRedditReader
        from trainer.base import TrainConfig
        from trainer.lm import LanguageModelTrainer

        torch.set_num_threads(1)
        self.reader = LeafRedditReader(Path(data_dir))
        self.day, self.server_lr = day, server_lr
        spec = self.reader.spec()
        torch.manual_seed(0)
        self.model = RedditLSTM.build(spec)
        self.trainer = LanguageModelTrainer(TrainConfig(), spec)
        self.params = list(self.model.parameters())
        self.global_flat = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
        self._global_views = self._views(self.global_flat)
        self._total = torch.zeros_like(self.global_flat, dtype=torch.float64)
        self._total_views = self._views(self._total)
        idx = self.reader.index(day, "train")
        self.users = [u for u, n in zip(idx.users, idx.counts) if n]

    def _views(self, flat):
        return [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def round(self, users: Sequence[str]) -> None:
        """One FedAvg round over `users`, starting from and updating the global weights: per user, load the
        global weights and add n_k * theta_k into a float64 sum (no flat copies), then the server step."""
        import torch

        self._total.zero_()
        weight = 0.0
        for uid in users:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self._global_views)
            n = self.trainer.train(self.model, self.reader.load(self.day, "train", uid))["samples"]
            with torch.no_grad():
                for acc, p in zip(self._total_views, self.params):
                    acc.add_(p, alpha=n)
            weight += n
        self._total.sub_(self.global_flat, alpha=weight)       # sum n_k (theta_k - theta)
        self.global_flat = (self.global_flat.double() + self.server_lr * self._total / weight).float()
        self._global_views = self._views(self.global_flat)
