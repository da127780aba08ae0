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
from scheduler.aggregate import BLOCK
from simulator.data_server import PrivateStore
from trainer.base import Trainer, simulating

log = logging.getLogger(__name__)
RING_BYTES = 192 << 20    # memory a rank may spend on copies of its shared parameters (ParamRing)
MAX_SLOTS = 8


def exact_scale(alpha: float) -> bool:
    """Whether alpha * x is exact in float64 for every float32 x (24-bit significands): an integer below
    2^29, as a user's sample count is. Then a fused multiply-add and a multiply followed by an add round
    alike, once."""
    return float(alpha).is_integer() and abs(alpha) < 2 ** 29


def add_scaled(dst: torch.Tensor, src: torch.Tensor, alpha: float, spare: torch.Tensor) -> None:
    """dst += alpha * src for a float64 `dst` block and a float32 `src` block of the same size, with the
    bits of `dst.add_(src, alpha=alpha)`. torch runs that mixed-dtype op element by element (it casts on
    the fly), 3x slower than widening `src` into `spare` (a float64 block in cache) and a vectorized
    float64 add, whose fused multiply-add rounds as the other when the product is exact (`exact_scale`);
    other scales keep torch's own op."""
    if exact_scale(alpha):
        widened = spare[:src.numel()]
        widened.copy_(src)
        dst.add_(widened, alpha=alpha)
    else:
        dst.add_(src, alpha=alpha)


def blocks_of(tensors: list[torch.Tensor], block: int = BLOCK) -> list[torch.Tensor]:
    """Each tensor's values as consecutive flat views of at most `block` values: a float32 -> float64 op
    over a block runs from cache, where one over a whole 2.6M-value tensor casts it through memory first
    (4-5x slower, measured on this project's 2-core machine). Elementwise ops give the same values either
    way."""
    return [flat[a:a + block] for t in tensors for flat in (t.view(-1),) for a in range(0, flat.numel(), block)]


class Accumulator:
    """A float64 running sum of alpha_k * theta_k over the shared parameters, and the sum of the users'
    sample counts n_k; threads may add into one accumulator (a lock serializes the adds). The adds go a
    cache-sized block at a time (`blocks_of`); the values are those of one add per tensor."""

    def __init__(self, layout: ParamLayout, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(layout.size, dtype=torch.float64, device=device)
        self.views = [v.view(shape) for v, shape in zip(self.total.split(layout.sizes), layout.shapes)]
        self.blocks = blocks_of(self.views)
        self.weight = 0.0
        self.dirty = False      # whether anything was added since `total` was last zeroed
        self.staged: list[tuple[torch.Tensor, float]] = []     # (flat float32 theta_k, alpha): not in total yet
        self.lock = threading.Lock()
        self._sources: tuple[list[int], list[torch.Tensor]] | None = None
        self._spare = torch.empty(BLOCK, dtype=torch.float64, device=device)     # add_scaled's widened block

    def _blocks(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """`params` in the accumulator's blocks (kept while the same memory comes: a shard adds its own
        parameters every user; a trainer that replaces a parameter's data gets new blocks)."""
        key = [p.data_ptr() for p in params]
        if self._sources is None or self._sources[0] != key:
            self._sources = (key, blocks_of([p.detach() for p in params]))
        return self._sources[1]

    def add(self, params: list[torch.Tensor], alpha: float, samples: float) -> None:
        with self.lock:
            for block, src in zip(self.blocks, self._blocks(params)):
                add_scaled(block, src, alpha, self._spare)
            self.weight, self.dirty = self.weight + samples, True

    def stage(self, flat: torch.Tensor, alpha: float, samples: float) -> None:
        """Adds alpha * `flat` (one user's shared parameters, float32, in the layout's order) later, in the
        order staged, by `flush` or `drain`: `total` is then read and written once for several users, not once
        each. The caller leaves `flat` unchanged until then."""
        with self.lock:
            self.staged.append((flat, alpha))
            self.weight += samples

    def flush(self) -> None:
        """Adds the staged terms into `total` (each value: the bits of one add after the other)."""
        with self.lock:
            if self.staged:
                total = self.total
                for a in range(0, total.numel(), BLOCK):
                    block = total[a:a + BLOCK]
                    for flat, alpha in self.staged:
                        add_scaled(block, flat[a:a + BLOCK], alpha, self._spare)
                self.staged.clear()
                self.dirty = True

    def add_update(self, base: list[torch.Tensor], deltas: list[torch.Tensor], alpha: float, samples: float) -> None:
        """Adds alpha * (base + delta) (a transformed update on the exact global parameters)."""
        with self.lock:
            for acc, b, d in zip(self.views, base, deltas):
                acc.add_(b, alpha=alpha).add_(d, alpha=alpha)
            self.weight, self.dirty = self.weight + samples, True

    def reset(self, *, zeroed: bool = False) -> None:
        """Back to an empty sum (`zeroed`: the caller has zeroed `total` already). A sum nothing was added to
        since it was last zeroed is not zeroed again (no 50 MB pass)."""
        if not zeroed and self.dirty:
            self.total.zero_()
        self.weight, self.dirty = 0.0, False
        self.staged.clear()


def drain(out: np.ndarray, sums: list[Accumulator], starts: list[tuple[float, np.ndarray]],
          block: int = BLOCK) -> None:
    """out = S_1 + S_2 + ... - alpha_1 theta_1 - alpha_2 theta_2 - ..., where S_i is accumulator i's sum
    with its staged terms added in their order (a rank's shards', or one accumulator), and (alpha, float32
    theta) are `starts` in their order; the accumulators are left empty. A cache-sized block at a time: one
    pass over memory instead of one per term, a copy and a reset, with the bits of adding and subtracting
    each term over the whole arrays in turn (alpha theta of a start is computed in float64, where it is exact
    for the integer sample counts that alpha is: each step rounds once either way)."""
    out_t = torch.from_numpy(out)
    totals = [acc.total if acc.total.device.type == "cpu" else acc.total.cpu() for acc in sums]  # an accelerator's once
    with warnings.catch_warnings():    # read-only arrays (the node's shared parameters): only read here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        thetas = [torch.from_numpy(theta) for _, theta in starts]
    spare = torch.empty(min(block, out.size), dtype=torch.float64)
    widened = torch.empty(min(block, out.size), dtype=torch.float64)
    scaled = np.empty(min(block, out.size))
    for a in range(0, out.size, block):
        b = min(a + block, out.size)
        into = out_t[a:b]
        for i, (acc, total) in enumerate(zip(sums, totals)):
            part = into if i == 0 else spare[:b - a]
            part.copy_(total[a:b]) if acc.dirty else part.zero_()
            for flat, alpha in acc.staged:
                add_scaled(part, flat[a:b], alpha, widened)
            if i:
                into.add_(part)
            if acc.dirty and total is acc.total:
                total[a:b] = 0.0       # the reset, while the block is in cache
        term = scaled[:b - a]
        for (alpha, theta), theta_t in zip(starts, thetas):
            if exact_scale(alpha):
                add_scaled(into, theta_t[a:b], -alpha, widened)
            else:       # FedBuff's staleness-weighted counts: exact products, not integers
                np.multiply(theta[a:b], alpha, out=term, dtype=np.float64)
                out[a:b] -= term
    for acc, total in zip(sums, totals):
        acc.reset(zeroed=total is acc.total)


class ParamRing:
    """Up to `slots` float32 copies of a model's shared parameters' memory, the parameters pointing into one
    of them (`use`): a user trains in a slot that holds no staged update, and the slots that do wait there
    for the shard's sum to take several users' updates in one pass (`Accumulator.stage`). A slot is made
    when one is first needed: a shard holds as many as the users it trains in a round, up to `slots`."""

    def __init__(self, params: list[torch.Tensor], slots: int) -> None:
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.slots = slots
        self.flats: list[torch.Tensor] = []
        self.views: list[list[torch.Tensor]] = []
        self.current = -1
        initial = [p.detach() for p in params]       # the parameters' values, in their own memory
        self.use(self._new_slot())
        with torch.no_grad():
            for v, p in zip(self.views[0], initial):
                v.copy_(p)

    def _new_slot(self) -> int:
        flat = torch.empty(sum(self.sizes), dtype=torch.float32, device=self.params[0].device)
        self.flats.append(flat)
        self.views.append([v.view_as(p) for v, p in zip(flat.split(self.sizes), self.params)])
        return len(self.flats) - 1

    def use(self, slot: int) -> None:
        if slot != self.current:
            for p, v in zip(self.params, self.views[slot]):
                p.data = v
            self.current = slot

    def free_slot(self, staged: list[tuple[torch.Tensor, float]]) -> int | None:
        """The current slot if no staged update is in it, else another free one, made if need be; None: all
        `slots` are taken."""
        taken = {id(flat) for flat, _ in staged}
        order = [self.current] + [j for j in range(len(self.flats)) if j != self.current]
        free = next((j for j in order if id(self.flats[j]) not in taken), None)
        if free is None and len(self.flats) < self.slots:
            free = self._new_slot()
        return free


def ring_slots(shared_params: int, shards: int, budget_bytes: int = RING_BYTES) -> int:
    """How many slots a shard's ring gets: as many as `budget_bytes` of float32 copies allow over the
    rank's shards, at most MAX_SLOTS, and 1 (no ring) when not even two fit."""
    slots = budget_bytes // max(1, shared_params * 4 * max(1, shards))
    return int(min(MAX_SLOTS, slots)) if slots >= 2 else 1


class Shard:
    """Loads global + a user's private parameters into its model, trains or evaluates, writes the private
    parameters back, and adds n_k * theta_k of the shared parameters into its float64 running sum
    (`sum`; the rank turns it into sum n_k * delta_k = sum - weight * theta_global once
    per round, which saves a flat copy and a subtraction per user)."""

    def __init__(self, model: torch.nn.Module, trainer: Trainer, layout: ParamLayout,
                 private: tuple[str, ...], store: PrivateStore, private_init: Mapping[str, np.ndarray],
                 finetuner: Trainer | None = None, channel: UpdateChannel | None = None, slots: int = 1) -> None:
        """`slots` > 1: the shared parameters' memory rotates over that many copies (`ParamRing`), so that
        the sum takes several users' updates a pass; only for plain FedAvg into the shard's own sum, with
        float32 parameters, contiguous, on the CPU (with anything else the shard adds each user at once)."""
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
        ringable = (slots > 1 and channel is None and self.shared and self.device.type == "cpu"
                    and all(p.dtype == torch.float32 and p.is_contiguous() for p in self.shared))
        self.ring = ParamRing(self.shared, slots) if ringable else None
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
        it trained (the rank itself `drain`s the shards' sums into sum n_k * delta_k)."""
        self.sum.flush()
        return self.sum.weight, self.sum.total

    def reset_sum(self) -> None:
        self.sum.reset()

    def _load_user(self, uid: str) -> None:
        if self.ring is not None:           # never over an update still waiting in the ring
            slot = self.ring.free_slot(self.sum.staged)
            if slot is None:
                self.sum.flush()
                slot = self.ring.current
            self.ring.use(slot)
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
            if self.ring is not None and into is None:     # a ring only for plain FedAvg: no channel
                self.sum.stage(self.ring.flats[self.ring.current], n * scale, n)
            elif self.channel is None:
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
