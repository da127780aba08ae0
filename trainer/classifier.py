"""Image/feature classification: local minibatch SGD over the user's samples, reshuffled every epoch from
the user's own generator (as McMahan et al.'s FedAvg), cross-entropy; accuracy for evaluation.

Inputs: uint8 samples are divided by 255, float samples taken as they are; then, when the reader's spec has
`mean` and `std` (the arrays reader takes them from meta.json), (x - mean) / std, one value for all or one
per channel (a sample's first axis). Without them no normalisation is applied."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Union

import numpy as np
import torch
import torch.nn.functional as F

from trainer.base import LocalSGD, TrainConfig, local_sgd_only

Scale = Union[float, list[float]]


def normalisation(spec: Mapping[str, Any]) -> tuple[Scale, Scale] | None:
    """(mean, std) from a reader's spec, or None when it has none."""
    if "mean" not in spec or "std" not in spec:
        return None
    return spec["mean"], spec["std"]


def as_inputs(x: np.ndarray, device: torch.device, scale: tuple[Scale, Scale] | None = None) -> torch.Tensor:
    """uint8 samples -> floats / 255, float samples as they are; then (x - mean) / std when `scale` is given."""
    t = torch.from_numpy(np.array(x))   # a copy: the reader hands out read-only memory maps
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if scale is not None:
        mean, std = (_per_channel(v, t.dim()) for v in scale)
        t = (t - mean) / std
    return t.to(device)


def _per_channel(value: Scale, dims: int) -> float | torch.Tensor:
    """A number stays a Python float (the same arithmetic as a constant); a list becomes a tensor shaped to
    broadcast over a batch's channel axis (axis 1)."""
    if not isinstance(value, list):
        return float(value)
    return torch.tensor(value, dtype=torch.float32).reshape(-1, *([1] * max(dims - 2, 0)))


class ClassifierTrainer:
    train_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"loss": ("loss_sum", "samples")}
    main_metric: ClassVar[str] = "top1"     # reported per user too (eval_users.json)
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"top1": ("correct", "samples"),
                                                            "loss": ("loss_sum", "samples")}

    # Plain FedAvg as McMahan et al. ran it on MNIST: the server takes the clients' mean (server lr 1.0) and
    # nothing is clipped (clipping at 5 is FL-mobile's guard against an LSTM's exploding gradients); batches of
    # 20, between their B=10 and B=50; client lr 0.05, the rate flock's MNIST tests and notebook train with.
    # FL-mobile's lr 1.0 x server lr 1.85 was tuned for the LSTM, not for these models.
    defaults: ClassVar[Mapping[str, float]] = {"lr": 0.05, "server_lr": 1.0, "max_grad_norm": 0.0, "batch_size": 20}

    def __init__(self, config: TrainConfig, spec: Mapping[str, Any]) -> None:
        self.config = config
        self.scale = normalisation(spec)

    def inputs(self, x: np.ndarray, device: torch.device) -> torch.Tensor:
        """A user's samples as the model's input (see the module docstring)."""
        return as_inputs(x, device, self.scale)

    @local_sgd_only
    def train(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray],
              rng: torch.Generator | None = None) -> dict[str, float]:
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        x, y = self.inputs(samples["x"], device), torch.from_numpy(np.array(samples["y"], dtype=np.int64)).to(device)
        model.train()
        if hasattr(model, "rng"):
            model.rng = rng
        sgd = LocalSGD(params, cfg)
        loss_sum = loss_sq_sum = 0.0
        for _ in range(cfg.local_epochs):
            order = (torch.randperm(len(x), generator=rng) if rng is not None else torch.arange(len(x))).to(device)
            for i in range(0, len(x), cfg.batch_size):
                pick = order[i:i + cfg.batch_size]
                logits = model(x[pick])
                loss = F.cross_entropy(logits, y[pick])
                loss.backward()
                sgd.step()
                loss_sum += float(loss.detach()) * len(pick)
                with torch.no_grad():     # each sample's loss, squared: client selection's utility (Oort)
                    loss_sq_sum += float(F.cross_entropy(logits.detach(), y[pick], reduction="none").square().sum())
        return {"samples": float(len(x)), "loss_sum": loss_sum / cfg.local_epochs,
                "loss_sq_sum": loss_sq_sum / cfg.local_epochs}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        device = next(model.parameters()).device
        model.eval()
        x, y = self.inputs(samples["x"], device), torch.from_numpy(np.array(samples["y"], dtype=np.int64)).to(device)
        correct, loss_sum = 0, 0.0
        for i in range(0, len(x), 500):
            logits = model(x[i:i + 500])
            correct += int((logits.argmax(-1) == y[i:i + 500]).sum())
            loss_sum += float(F.cross_entropy(logits, y[i:i + 500], reduction="sum"))
        return {"samples": float(len(x)), "correct": float(correct), "loss_sum": loss_sum}
