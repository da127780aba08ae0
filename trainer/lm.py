"""FL-mobile's language-model trainer: plain SGD over a user's sequences in order, LSTM state carried
from batch to batch, global-norm gradient clipping; FL-mobile's top-1 for evaluation."""
from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from trainer.base import LocalSGD, TrainConfig, local_sgd_only


def _batches(samples: Mapping[str, np.ndarray], batch_size: int, device: torch.device):
    x = torch.from_numpy(np.ascontiguousarray(samples["x"], dtype=np.int64)).to(device)
    y = torch.from_numpy(np.ascontiguousarray(samples["y"], dtype=np.int64)).to(device)
    mask = torch.from_numpy(np.ascontiguousarray(samples["mask"], dtype=np.float32)).to(device)
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size], mask[i:i + batch_size]


def _fit_state(state, batch: int):
    """The carried LSTM state, cut to a final short batch."""
    if state is None or state[0].shape[1] == batch:
        return state
    return tuple(s[:, :batch] for s in state)


class LanguageModelTrainer:
    train_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"loss": ("loss_sum", "tokens")}
    main_metric: ClassVar[str] = "top1"     # FL-mobile's number: reported per user too
    eval_ratios: ClassVar[Mapping[str, tuple[str, str]]] = {"top1": ("correct", "tokens"),
                                                            "loss": ("loss_sum", "tokens")}

    # FL-mobile's Reddit setting: client lr 1.0, server lr 1.85, clipping at norm 5, batches of 5 sequences
    defaults: ClassVar[Mapping[str, float]] = {"lr": 1.0, "server_lr": 1.85, "max_grad_norm": 5.0, "batch_size": 5}

    def __init__(self, config: TrainConfig, spec: Mapping[str, int]) -> None:
        self.config = config
        self.pad_id = int(spec["pad_id"])
        self.unk_id = int(spec["unk_id"])

    @local_sgd_only
    def train(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray],
              rng: torch.Generator | None = None) -> dict[str, float]:
        """One user's local epochs. Objective as FL-mobile: masked cross-entropy averaged over all positions
        (plus FedProx's term when configured). Reported loss: cross-entropy per counted token; "loss_sq_sum", the sum of its squares per token, is
        what client selection (Oort) reads."""
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        model.train()
        sgd = LocalSGD(params, cfg)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        loss_sq_sum = torch.zeros((), dtype=torch.float64, device=device)   # client selection's utility
        tokens = 0.0
        for _ in range(cfg.local_epochs):
            state = None
            for x, y, mask in _batches(samples, cfg.batch_size, device):
                logits, state = model(x, _fit_state(state, len(x)))
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
                masked = ce * mask.reshape(-1)
                loss = masked.sum() / masked.numel()
                loss.backward()
                sgd.step()
                with torch.no_grad():
                    loss_sum += masked.sum().double()
                    loss_sq_sum += masked.square().sum().double()
                tokens += float(mask.sum())
                state = tuple(s.detach() for s in state)
        return {"samples": float(len(samples["x"])), "loss_sum": float(loss_sum), "loss_sq_sum": float(loss_sq_sum),
                "tokens": tokens}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, samples: Mapping[str, np.ndarray]) -> dict[str, float]:
        """FL-mobile's top-1: a prediction counts if it is right and the target is neither UNK nor PAD;
        the denominator is the non-PAD target tokens. Batches and carried state as in training."""
        device = next(model.parameters()).device
        model.eval()
        correct = tokens = 0
        loss_sum = 0.0
        state = None
        for x, y, _ in _batches(samples, self.config.batch_size, device):
            logits, state = model(x, _fit_state(state, len(x)))
            real = y != self.pad_id
            hit = (logits.argmax(-1) == y) & real & (y != self.unk_id)
            correct += int(hit.sum())
            tokens += int(real.sum())
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            loss_sum += float((ce * real.reshape(-1)).sum())
        return {"samples": float(len(samples["x"])), "correct": float(correct), "tokens": float(tokens),
                "loss_sum": loss_sum}
