"""FedEM's local solver (Marfoq et al. 2021, Algorithm 2), for classification.

Every local epoch: E-step, the responsibility of learner m for sample i,
    q_im = pi_m * p_m(y_i | x_i) / sum_m' pi_m' * p_m'(y_i | x_i);
M-step, pi_m = mean_i q_im (the user's private mixture weights); then each learner takes SGD steps over
the user's samples with its loss weighted by q_im. Evaluation predicts with the pi-weighted mixture.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from trainer.base import LocalSGD, TrainConfig
from trainer.classifier import ClassifierTrainer


class FedEMTrainer:
    train_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"loss": ("loss_sum", "samples")}
    main_metric: ClassVar[str] = ClassifierTrainer.main_metric
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]] = ClassifierTrainer.eval_ratios

    def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None:
        self.config = config
        self._eval = ClassifierTrainer(config, spec)

    @torch.no_grad()
    def responsibilities(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E-step: q [samples, M]."""
        model.eval()
        logp = torch.stack([-F.cross_entropy(learner(x), y, reduction="none") for learner in model.learners], 1)
        return torch.softmax(logp + torch.log(model.pi.clamp_min(1e-12)), dim=1)

    def train(self, model, samples: Mapping[str, np.ndarray], rng: torch.Generator | None = None) -> dict[str, float]:
        cfg = self.config
        device = model.pi.device
        x, y = self._eval.inputs(samples["x"], device), torch.from_numpy(np.asarray(samples["y"], dtype=np.int64)).to(device)
        for learner in model.learners:
            if hasattr(learner, "rng"):
                learner.rng = rng
        sgds = [LocalSGD([p for p in learner.parameters() if p.requires_grad], cfg) for learner in model.learners]
        loss_sum = 0.0
        for _ in range(cfg.local_epochs):
            q = self.responsibilities(model, x, y)
            with torch.no_grad():
                model.pi.copy_(q.mean(0))                                   # M-step for the mixture weights
            model.train()
            order = (torch.randperm(len(x), generator=rng) if rng is not None else torch.arange(len(x))).to(device)
            for i in range(0, len(x), cfg.batch_size):
                pick = order[i:i + cfg.batch_size]
                for m, (learner, sgd) in enumerate(zip(model.learners, sgds)):
                    loss = (F.cross_entropy(learner(x[pick]), y[pick], reduction="none") * q[pick, m]).mean()
                    loss.backward()
                    sgd.step()
                    loss_sum += float(loss.detach()) * len(pick)
        return {"samples": float(len(x)), "loss_sum": loss_sum / cfg.local_epochs}

    def evaluate(self, model, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The mixture's accuracy; `model(x)` returns the mixture's log-probabilities."""
        return self._eval.evaluate(model, samples)
