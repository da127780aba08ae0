"""FL-mobile's Reddit language model: embedding 256, 2-layer LSTM 256, projection to the vocabulary.

All weights uniform(-0.1, 0.1) as FL-mobile initialises them (LSTM biases zero), no dropout.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import nn


class RedditLSTM(nn.Module):
    private_patterns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, vocab_size: int = 10_000, *, embed_dim: int = 256, hidden: int = 256, layers: int = 2,
                 init_scale: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab_size)
        for name, p in self.named_parameters():
            if name.startswith("lstm.bias"):
                nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -init_scale, init_scale)

    @classmethod
    def build(cls, spec: Mapping[str, int]) -> "RedditLSTM":
        return cls(int(spec["vocab_size"]))

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """tokens [batch, seq] -> (logits [batch, seq, vocab], (h, c) each [layers, batch, hidden])."""
        out, state = self.lstm(self.embedding(tokens), state)
        return self.decoder(out), state


class PersonalRedditLSTM(RedditLSTM):
    """RedditLSTM with a private 256-float vector per user (`personal`, zero at first) added to the LSTM's
    output before the projection: a user-specific shift of the next-word distribution, 1 KB of private
    state a user (the shared parameters, and their initialisation, are RedditLSTM's)."""

    private_patterns: ClassVar[tuple[str, ...]] = ("personal",)

    def __init__(self, vocab_size: int = 10_000, *, hidden: int = 256, **kwargs) -> None:
        super().__init__(vocab_size, hidden=hidden, **kwargs)
        self.personal = nn.Parameter(torch.zeros(hidden))

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        out, state = self.lstm(self.embedding(tokens), state)
        return self.decoder(out + self.personal), state
