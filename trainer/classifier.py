"""Image/feature classification: local minibatch SGD over the user's samples, reshuffled every epoch from
the user's own generator (as McMahan et al.'s FedAvg), cross-entropy; accuracy for evaluation."""
from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from trainer.base import LocalSGD, TrainConfig

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def as_inputs(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 images -> normalised floats; float features pass through."""
    t = torch.from_numpy(np.array(x))   # a copy: the reader hands out read-only memory maps
    if t.dtype == torch.uint8:
        t = (t.float() / 255.0 - MNIST_MEAN) / MNIST_STD
    return t.float().to(device)


class ClassifierTrainer:
    train_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"loss": ("loss_sum", "samples")}
    main_metric: ClassVar[str] = "top1"     # reported per user too (eval_users.json)
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"top1": ("correct", "samples"),
                                                            "loss": ("loss_sum", "samples")}

    def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None:
        self.config = config

    def train(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray],
              rng: torch.Generator | None = None) -> dict[str, float]:
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        x, y = as_inputs(samples["x"], device), torch.from_numpy(np.asarray(samples["y"], dtype=np.int64)).to(device)
        model.train()
        if hasattr(model, "rng"):
            model.rng = rng
        sgd = LocalSGD(params, cfg)
        loss_sum = 0.0
        for _ in range(cfg.local_epochs):
            order = (torch.randperm(len(x), generator=rng) if rng is not None else torch.arange(len(x))).to(device)
            for i in range(0, len(x), cfg.batch_size):
                pick = order[i:i + cfg.batch_size]
                loss = F.cross_entropy(model(x[pick]), y[pick])
                loss.backward()
                sgd.step()
                loss_sum += float(loss.detach()) * len(pick)
        return {"samples": float(len(x)), "loss_sum": loss_sum / cfg.local_epochs}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        device = next(model.parameters()).device
        model.eval()
        x, y = as_inputs(samples["x"], device), torch.from_numpy(np.asarray(samples["y"], dtype=np.int64)).to(device)
        correct, loss_sum = 0, 0.0
        for i in range(0, len(x), 500):
            logits = model(x[i:i + 500])
            correct += int((logits.argmax(-1) == y[i:i + 500]).sum())
            loss_sum += float(F.cross_entropy(logits, y[i:i + 500], reduction="sum"))
        return {"samples": float(len(x)), "correct": float(correct), "loss_sum": loss_sum}
