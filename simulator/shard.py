"""A shard: one trainer with one reusable model object that plays many phones, one after another."""
from __future__ import annotations

import logging
import threading
import warnings
from typing import Mapping

import numpy as np
import torch

from flock.channel import UpdateChannel
from flock.common.domain import ParamLayout
from flock.common.streams import channel_seed
from simulator.data_server import PrivateStore
from trainer.base import Trainer, simulating

log = logging.getLogger(__name__)


class Accumulator:
    """A float64 running sum of alpha_k * theta_k over the shared parameters, and the sum of the users'
    sample counts n_k; threads may add into one accumulator (a lock serializes the adds)."""

    def __init__(self, layout: ParamLayout, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(layout.size, dtype=torch.float64, device=device)
        self.views = [v.view(shape) for v, shape in zip(self.total.split(layout.sizes), layout.shapes)]
        self.weight = 0.0
        self.lock = threading.Lock()

    def add(self, params: list[torch.Tensor], alpha: float, samples: float) -> None:
        with self.lock:
            for acc, p in zip(self.views, params):
                acc.add_(p, alpha=alpha)
            self.weight += samples

    def add_update(self, base: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float, samples: float) -> None:
        """Adds alpha * (base + delta) (a transformed update on the exact global parameters)."""
        with self.lock:
            for acc, b, d in zip(self.views, base, deltas):
                acc.add_(b, alpha=alpha).add_(d, alpha=alpha)
            self.weight += samples

    def reset(self, *, zeroed: bool = False) -> None:
        """Back to an empty sum (`zeroed`: the caller has zeroed `total` already)."""
        if not zeroed:
            self.total.zero_()
        self.weight = 0.0


class Shard:
    """Loads global + a user's private parameters into its model, trains or evaluates, writes the private
    parameters back, and adds n_k * theta_k of the shared parameters into its float64 running sum
    (`sum`; the rank turns it into sum n_k * delta_k = sum - weight * theta_global once
    per round, which saves a flat copy and a subtraction per user)."""

    def __init__(self, model: torch.nn.Module, trainer: Trainer, layout: ParamLayout,
                 private: tuple[str, ...], store: PrivateStore, private_init: Mapping[str, np.ndarray],
                 finetuner: Trainer | None = None, channel: UpdateChannel | None = None) -> None:
        self.model = model
        self.trainer = trainer
        self.finetuner = finetuner
        self.channel = channel     # privacy/compression (flock/channel/); None: plain FedAvg
        named = dict(model.named_parameters())
        self.shared = [named[n] for n in layout.names]
        self.private = {n: named[n] for n in private}
        self.store = store
        self.device = self.shared[0].device if self.shared else torch.device("cpu")
        self.private_init = {n: torch.from_numpy(np.array(v, dtype=np.float32)).to(self.device)
                             for n, v in private_init.items()}
        self.layout = layout
        self.sum = Accumulator(layout, self.device)
        self._global: torch.Tensor | None = None
        self._global_views: list[torch.Tensor] = []
        self._global_src: np.ndarray | None = None
        self._global_version: int | None = None

    def set_global(self, flat: np.ndarray, version: int | None = None) -> None:
        """The step's global parameters (float32; copied into the model per user). On the CPU the shard
        reads `flat` itself, which must stay unchanged while `version` is current: every shard of every
        rank of a node may share one array."""
        if self._global_src is not flat or self._global_version != version:
            if flat.dtype != np.float32 or flat.shape != (self.layout.size,):
                raise ValueError(f"global parameters: expected {self.layout.size} float32 values")
            with warnings.catch_warnings():    # a read-only array: the shard only ever reads it
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                self._global = torch.from_numpy(flat).to(self.device)
            self._global_views = [v.view(shape) for v, shape in
                                  zip(self._global.split(self.layout.sizes), self.layout.shapes)]
            self._global_src, self._global_version = flat, version

    def contribution(self) -> tuple[float, torch.Tensor]:
        """This step's (sum of n_k, sum of n_k * theta_k over the shared parameters, float64) of the users
        it trained; the rank turns the shards' parts into sum n_k * delta_k."""
        return self.sum.weight, self.sum.total

    def reset_sum(self) -> None:
        self.sum.reset()

    def _load_user(self, uid: str) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.shared, self._global_views)  # copies: the global vector stays intact
            if self.private:
                stored = self.store.get_param_by_uid(uid)
                for name, p in self.private.items():
                    src = torch.from_numpy(stored[name]) if stored is not None else self.private_init[name]
                    p.copy_(src)

    def train_user(self, uid: str, samples: Mapping[str, np.ndarray], seed: int = 0, round_index: int = 0, *,
                   into: Accumulator | None = None, scale: float = 1.0, clip: float | None = None) -> dict[str, float]:
        """`seed`: the user's random stream for this round (see `user_seed`); `round_index`: 1-based. The
        user's n * scale * theta goes into `into` (default: the shard's own sum), n into its weight. `clip`:
        the round's clipping norm from the plan (None: the channel's configured one)."""
        self._load_user(uid)
        received = self._received_model() if self.channel is not None else None     # channel hook
        rng = torch.Generator(device="cpu")
        rng.manual_seed(seed)
        with simulating(uid, round_index, clip or 0.0):
            sums = self.trainer.train(self.model, samples, rng)
        n = float(sums["samples"])
        state: dict[str, np.ndarray] = {}
        with torch.no_grad():
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm(self.shared))).all()):
                # one diverged phone must not poison the model: its update is dropped and counted
                log.warning("user %r: non-finite update after local training; dropped from the round", uid)
                return {"diverged": 1.0}
            if self.channel is None:
                (into or self.sum).add(self.shared, n * scale, n)
            else:       # channel hook: the user's transformed update on the exact global parameters
                state, report = self._send(uid, received, seed, into or self.sum,
                                           (1.0 if self.channel.uniform_weights else n), scale, clip)
                sums = {**report, **sums}     # a client that clipped itself reports its own bit (Flower's mod)
        if self.private or state:
            self.store.set_param_by_uid(uid, {**{k: p.detach().cpu().numpy() for k, p in self.private.items()},
                                              **state})
        return sums

    def _received_model(self) -> list[torch.Tensor]:
        """The shared parameters as the user received them (--compress-down), loaded into the model."""
        flat = self.channel.received_model(self._global, self.layout.sizes, self._global_version or 0)
        if flat is None:
            return self._global_views
        views = [v.view(shape) for v, shape in zip(flat.split(self.layout.sizes), self.layout.shapes)]
        with torch.no_grad():
            torch._foreach_copy_(self.shared, views)
        return views

    def _send(self, uid: str, received: list[torch.Tensor], seed: int, into: Accumulator, weight: float,
              scale: float, clip: float | None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Runs the user's update delta = theta_user - theta_received through the channel and adds
        weight * scale * (theta_global + delta') into `into`; returns the user's private channel state and
        the channel's sums (whether it was clipped)."""
        deltas = [p.detach().double() - r.double() for p, r in zip(self.shared, received)]
        stored = self.store.get_param_by_uid(uid) if self.channel.error_feedback else None
        rng = torch.Generator(device="cpu").manual_seed(channel_seed(seed))
        state, report = self.channel.apply(uid, deltas, rng, stored, self.layout.names, clip=clip)
        into.add_update(self._global_views, deltas, weight * scale, weight)
        return state, report

    def evaluate_user(self, uid: str, samples: Mapping[str, np.ndarray], round_index: int = 0) -> dict[str, float]:
        self._load_user(uid)
        with simulating(uid, round_index):
            return self.trainer.evaluate(self.model, samples)

    def finetune_and_evaluate(self, uid: str, train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray],
                              seed: int) -> dict[str, float]:
        """Local adaptation: the user fine-tunes the global (+ its private) model on its training data, then
        evaluates. Nothing is stored: the data server and the round's update are untouched."""
        self._load_user(uid)
        with simulating(uid, 0):
            self.finetuner.train(self.model, train, torch.Generator().manual_seed(seed))
            return self.trainer.evaluate(self.model, test)
