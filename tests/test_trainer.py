"""The language-model trainer: FL-mobile's top-1 rules and local SGD."""
import numpy as np
import torch

from model.lstm import RedditLSTM
from trainer.base import TrainConfig
from trainer.lm import LanguageModelTrainer

PAD, UNK, V = 0, 1, 6
SPEC = {"vocab_size": V, "pad_id": PAD, "unk_id": UNK}


class Oracle(torch.nn.Module):
    """Predicts `pred[i]` for sample i, whatever the input (the sample index rides in x[:, 0])."""

    def __init__(self, pred):
        super().__init__()
        self.pred = torch.as_tensor(pred)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, state=None):
        logits = torch.nn.functional.one_hot(self.pred[x[:, 0]], V).float() * 10
        return logits, (torch.zeros(1, len(x), 1), torch.zeros(1, len(x), 1))


def test_top1_ignores_pad_and_unk_targets_and_counts_non_pad_tokens():
    y = np.array([[2, 3, UNK, 4, PAD],
                  [5, UNK, 2, PAD, PAD]])
    pred = np.array([[2, 4, UNK, 4, PAD],      # right: 2, 4; UNK target predicted UNK: not counted; PAD: not counted
                     [5, UNK, 3, 0, PAD]])     # right: 5 only
    x = np.zeros_like(y)
    x[:, 0] = [0, 1]
    samples = {"x": x, "y": y, "mask": (y != PAD).astype(np.uint8)}
    out = LanguageModelTrainer(TrainConfig(batch_size=1), SPEC).evaluate(Oracle(pred), samples)
    assert out["correct"] == 3
    assert out["tokens"] == 7                 # non-PAD targets, UNK included
    assert out["samples"] == 2


def test_local_sgd_lowers_the_users_loss_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.integers(2, V, size=(12, 10)).astype(np.int32)
    samples = {"x": x, "y": np.roll(x, -1, axis=1), "mask": np.ones_like(x, dtype=np.uint8)}
    trainer = LanguageModelTrainer(TrainConfig(lr=1.0, batch_size=5, local_epochs=3), SPEC)

    def fresh():
        torch.manual_seed(0)
        return RedditLSTM(V, embed_dim=16, hidden=16)

    model = fresh()
    before = trainer.evaluate(model, samples)
    sums = trainer.train(model, samples)
    after = trainer.evaluate(model, samples)
    assert sums["samples"] == 12 and sums["tokens"] == 3 * 120
    assert after["loss_sum"] < before["loss_sum"]
    again = fresh()
    trainer.train(again, samples)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_gradient_is_clipped_to_max_norm():
    torch.manual_seed(0)
    model = RedditLSTM(V, embed_dim=8, hidden=8)
    start = [p.detach().clone() for p in model.parameters()]
    x = np.full((1, 10), 3, dtype=np.int32)
    samples = {"x": x, "y": x, "mask": np.ones_like(x, dtype=np.uint8)}
    LanguageModelTrainer(TrainConfig(lr=1.0, batch_size=5, max_grad_norm=1e-3), SPEC).train(model, samples)
    step = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(model.parameters(), start)])
    assert float(step.norm()) <= 1e-3 * 1.001


def test_fedprox_pulls_the_local_model_towards_the_start():
    rng = np.random.default_rng(1)
    x = rng.integers(2, V, size=(20, 10)).astype(np.int32)
    samples = {"x": x, "y": np.roll(x, -1, axis=1), "mask": np.ones_like(x, dtype=np.uint8)}

    def distance(mu):
        torch.manual_seed(0)
        model = RedditLSTM(V, embed_dim=16, hidden=16)
        start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        LanguageModelTrainer(TrainConfig(lr=0.5, local_epochs=3, prox_mu=mu), SPEC).train(model, samples)
        return float((torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start).norm())

    assert distance(1.0) < distance(0.0)
