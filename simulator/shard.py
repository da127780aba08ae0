"""A shard: one trainer with one reusable model object that plays many phones, one after another."""
from __future__ import annotations

import logging
import math
import threading
import warnings
from typing import Mapping

import numpy as np
import torch

from flock.channel import UpdateChannel
from flock.common import kernels
from flock.common.domain import ParamLayout
from flock.common.streams import channel_seed
from scheduler.aggregate import BLOCK
from simulator.data_server import PrivateStore
from trainer.base import Trainer, lent_params, moved, simulating

log = logging.getLogger(__name__)
RING_BYTES = 192 << 20    # memory a rank may spend on copies of its shared parameters (ParamRing)
MAX_SLOTS = 8
# values a pass over the waiting updates (flush, drain) takes at a time: 2 MiB of float64, held in the L3
# cache; per-call costs make smaller blocks slower (5 LM updates: 7.7 ms at 1 << 16, 7.0 at 1 << 18)
PASS_BLOCK = 1 << 18


def exact_scale(alpha: float) -> bool:
    """Whether alpha * x is exact in float64 for every float32 x (24-bit significands): an integer below
    2^29, as a user's sample count is. Then a fused multiply-add and a multiply followed by an add round
    alike, once."""
    return float(alpha).is_integer() and abs(alpha) < 2 ** 29


# A user's update counts as diverged when a parameter is not finite or at least this large in magnitude: its
# square overflows float32, so no float32 norm, loss or step of it is finite (a float32 norm of the update,
# the check flock made before, overflowed there too).
DIVERGED = float(np.finfo(np.float32).max) ** 0.5


def add_terms(dst: torch.Tensor, terms: list[tuple[torch.Tensor, float]], spare: torch.Tensor) -> None:
    """dst += alpha_1 src_1, then += alpha_2 src_2, ... for a float64 `dst` block and float32 `src` blocks of
    its size, with the bits of `dst.add_(src, alpha=alpha)` in turn. On the CPU, terms whose product is exact
    (`exact_scale`) go through `flock.common.kernels`, three a pass over `dst`: 2.6x faster than torch (5
    waiting LM updates and the start: 7 ms against 18.6). Others (a product that is not exact, an
    accelerator, other dtypes or sizes: torch's checks): torch's mixed-dtype op where the product is not
    exact, else `src` widened into `spare` (a float64 block) then a float64 add."""
    cpu = (dst.device.type == "cpu" and dst.dtype == torch.float64
           and all(src.device.type == "cpu" and src.dtype == torch.float32 and src.numel() == dst.numel()
                   for src, _ in terms))
    i = 0
    while i < len(terms):
        group = terms[i:i + 3]
        if cpu and len(group) == 3 and all(exact_scale(alpha) for _, alpha in group):
            (s0, a0), (s1, a1), (s2, a2) = group
            kernels.axpy3(dst.numpy(), s0.numpy(), a0, s1.numpy(), a1, s2.numpy(), a2)
            i += 3
            continue
        src, alpha = terms[i]
        if not exact_scale(alpha):
            dst.add_(src, alpha=alpha)
        elif cpu:
            kernels.axpy1(dst.numpy(), src.numpy(), alpha)
        else:
            widened = spare[:src.numel()]
            widened.copy_(src)
            dst.add_(widened, alpha=alpha)
        i += 1


def peak(tensors: list[torch.Tensor]) -> float:
    """The largest magnitude among these float tensors' values (inf if one is NaN; 0 for no values), with
    one synchronisation with an accelerator."""
    extremes = [x for t in tensors if t.numel() for x in torch.aminmax(t.detach())]
    if not extremes:
        return 0.0
    top = float(torch.stack([x.double().abs() for x in extremes]).max())     # max propagates NaN
    return top if not math.isnan(top) else math.inf


def bounded(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of these float tensors is finite and below `DIVERGED` in magnitude."""
    return peak(tensors) < DIVERGED


def blocks_of(tensors: list[torch.Tensor], block: int = BLOCK) -> list[torch.Tensor]:
    """Each tensor's values as consecutive flat views of at most `block` values: a float32 -> float64 op
    over a block runs from cache, where one over a whole 2.6M-value tensor casts it through memory first
    (4-5x slower, measured on this project's 2-core machine). Elementwise ops give the same values either
    way."""
    return [flat[a:a + block] for t in tensors for flat in (t.view(-1),) for a in range(0, flat.numel(), block)]


def spans(sizes: list[int], block: int) -> list[tuple[int, int, int, int]]:
    """The blocks of a pass over parameters of these sizes laid end to end, none across two of them:
    (parameter k, start and end within it, its offset in the flat vector)."""
    out, offset = [], 0
    for k, size in enumerate(sizes):
        out += [(k, a, min(a + block, size), offset) for a in range(0, size, block)]
        offset += size
    return out


class Accumulator:
    """A float64 running sum of alpha_k * theta_k over the shared parameters, and the sum of the users'
    sample counts n_k; threads may add into one accumulator (a lock serializes the adds). The adds go a
    cache-sized block at a time (`blocks_of`); the values are those of one add per tensor."""

    def __init__(self, layout: ParamLayout, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(layout.size, dtype=torch.float64, device=device)
        self.sizes = list(layout.sizes)
        self.views = [v.view(shape) for v, shape in zip(self.total.split(layout.sizes), layout.shapes)]
        self.blocks = blocks_of(self.views)
        self.weight = 0.0
        self.dirty = False      # whether anything was added since `total` was last zeroed
        self.staged: list[tuple[list[torch.Tensor], float]] = []     # (float32 theta_k, alpha): not in total yet
        self.lock = threading.Lock()
        self._sources: tuple[list[int], list[torch.Tensor]] | None = None
        self._spare = torch.empty(PASS_BLOCK, dtype=torch.float64, device=device)     # add_terms' widened block

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
                add_terms(block, [(src, alpha)], self._spare)
            self.weight, self.dirty = self.weight + samples, True

    def stage(self, params: list[torch.Tensor], alpha: float, samples: float) -> None:
        """Adds alpha * `params` (one user's shared parameters, float32, contiguous, in the layout's order)
        later, in the order staged, by `flush` or `drain`: `total` is then read and written once for several
        users, not once each. The caller leaves their memory unchanged until then."""
        with self.lock:
            self.staged.append(([p.detach().view(-1) for p in params], alpha))
            self.weight += samples

    def flush(self) -> None:
        """Adds the staged terms into `total` (each value: the bits of one add after the other)."""
        with self.lock:
            if self.staged:
                for k, a, b, offset in spans(self.sizes, PASS_BLOCK):
                    add_terms(self.total[offset + a:offset + b],
                              [(params[k][a:b], alpha) for params, alpha in self.staged], self._spare)
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
          block: int = PASS_BLOCK) -> None:
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
    # the starts' terms join the only sum's in its pass when all are exact (the same adds, in the same order)
    joined = len(sums) == 1 and all(exact_scale(alpha) for alpha, _ in starts)
    for k, a, b, offset in spans(sums[0].sizes, block):
        lo, hi = offset + a, offset + b
        into = out_t[lo:hi]
        theta_terms = [(theta_t[lo:hi], -alpha) for (alpha, _), theta_t in zip(starts, thetas)]
        for i, (acc, total) in enumerate(zip(sums, totals)):
            part = into if i == 0 else spare[:hi - lo]
            part.copy_(total[lo:hi]) if acc.dirty else part.zero_()
            add_terms(part, [(params[k][a:b], alpha) for params, alpha in acc.staged]
                      + (theta_terms if joined else []), widened)
            if i:
                into.add_(part)
            if acc.dirty and total is acc.total:
                total[lo:hi] = 0.0       # the reset, while the block is in cache
        if joined:
            continue
        term = scaled[:hi - lo]
        for (alpha, theta), theta_term in zip(starts, theta_terms):
            if exact_scale(alpha):
                add_terms(into, [theta_term], widened)
            else:       # FedBuff's staleness-weighted counts: exact products, not integers
                np.multiply(theta[lo:hi], alpha, out=term, dtype=np.float64)
                out[lo:hi] -= term
    for acc, total in zip(sums, totals):
        acc.reset(zeroed=total is acc.total)


class ParamRing:
    """Up to `slots` float32 copies of a model's shared parameters' memory, the parameters pointing into one
    of them (`use`) or lent the global parameters (`lend`). A user whose trainer needs a copy trains in a
    slot that holds no waiting update, and the slots that do wait there for the shard's sum to take several
    users' updates in one pass (`Accumulator.stage`). A slot is made when one is first needed: a shard holds
    as many as the users it trains in a round, up to `slots` (with lent parameters: one, for evaluation)."""

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

    def free_slot(self, staged: list[tuple]) -> int | None:
        """The current slot if no staged update is in it, else another free one, made if need be; None: all
        `slots` are taken."""
        taken = {entry[0][0].data_ptr() for entry in staged}
        order = sorted(range(len(self.flats)), key=lambda j: j != self.current)
        free = next((j for j in order if self.flats[j].data_ptr() not in taken), None)
        if free is None and len(self.flats) < self.slots:
            free = self._new_slot()
        return free

    def lend(self, views: list[torch.Tensor]) -> None:
        """Points the parameters at memory outside the ring (`views`: the global parameters, only read)."""
        for p, v in zip(self.params, views):
            p.data = v
        self.current = -1


def ring_slots(shared_params: int, shards: int, budget_bytes: int = RING_BYTES) -> int:
    """How many slots a shard's ring gets: as many as `budget_bytes` of float32 copies allow over the
    rank's shards, at most MAX_SLOTS, and 1 (no ring) when not even two fit."""
    slots = budget_bytes // max(1, shared_params * 4 * max(1, shards))
    return int(min(MAX_SLOTS, slots)) if slots >= 2 else 1


class Shard:
    """Loads global + a user's private parameters into its model, trains or evaluates, writes the private
    parameters back, and adds n_k * theta_k of the shared parameters into its float64 running sum
    (`sum`; the rank turns it into sum n_k * delta_k = sum - weight * theta_global once per round, which
    saves a flat copy and a subtraction per user). With plain FedAvg the updates wait (`Accumulator.stage`)
    and a trainer marked `local_sgd_only` starts on the global parameters themselves (`lent_params`)."""

    def __init__(self, model: torch.nn.Module, trainer: Trainer, layout: ParamLayout,
                 private: tuple[str, ...], store: PrivateStore, private_init: Mapping[str, np.ndarray],
                 finetuner: Trainer | None = None, channel: UpdateChannel | None = None, slots: int = 1) -> None:
        """`slots` > 1: up to that many users' updates wait, so that the sum takes several a pass (in the
        memory the lent parameters' first step wrote, or in a `ParamRing` slot each); only for plain FedAvg
        into the shard's own sum, with float32 parameters, contiguous, on the CPU (with anything else the
        shard adds each user at once)."""
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
        # a trainer that writes the parameters only through LocalSGD starts each user on the global ones
        self.lend_global = (self.ring is not None
                            and getattr(getattr(type(trainer), "train", None), "local_sgd_only", False))
        self._global: torch.Tensor | None = None
        self._global_views: list[torch.Tensor] = []
        self._global_src: np.ndarray | None = None
        self._global_version: int | None = None
        self._global_peak: float | None = None     # max |theta_global|, once a lent user needs it

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
            self._global_peak = None

    def _peak(self) -> float:
        """max |theta_global| (one pass per global version)."""
        if self._global_peak is None:
            self._global_peak = peak([self._global]) if self._global is not None else math.inf
        return self._global_peak

    def contribution(self) -> tuple[float, torch.Tensor]:
        """This step's (sum of n_k, sum of n_k * theta_k over the shared parameters, float64) of the users
        it trained (the rank itself `drain`s the shards' sums into sum n_k * delta_k)."""
        self.sum.flush()
        return self.sum.weight, self.sum.total

    def reset_sum(self) -> None:
        self.sum.reset()

    def _load_user(self, uid: str, *, training: bool = False) -> bool:
        """The global (+ the user's private) parameters into the model; whether the shared ones are the global
        parameters themselves, lent (`lend_global`, in training), rather than a copy."""
        lend = training and self.lend_global
        if self.ring is not None:           # never over an update still waiting
            if lend:
                if len(self.sum.staged) >= self.ring.slots:     # as many updates held as the ring has slots
                    self.sum.flush()
                self.ring.lend(self._global_views)
            else:
                slot = self.ring.free_slot(self.sum.staged)
                if slot is None:
                    self.sum.flush()
                    slot = self.ring.free_slot(self.sum.staged)
                self.ring.use(slot)
        with torch.no_grad():
            if not lend:
                torch._foreach_copy_(self.shared, self._global_views)  # copies: the global vector stays intact
            if self.private:
                stored = self.store.get_param_by_uid(uid)
                for name, p in self.private.items():
                    src = torch.from_numpy(stored[name]) if stored is not None else self.private_init[name]
                    p.copy_(src)
        return lend

    def train_user(self, uid: str, samples: Mapping[str, np.ndarray], seed: int = 0, round_index: int = 0, *,
                   into: Accumulator | None = None, scale: float = 1.0, clip: float | None = None) -> dict[str, float]:
        """`seed`: the user's random stream for this round (see `user_seed`); `round_index`: 1-based. The
        user's n * scale * theta goes into `into` (default: the shard's own sum), n into its weight. `clip`:
        the round's clipping norm from the plan (None: the channel's configured one)."""
        lent = self._load_user(uid, training=True)
        received = self._received_model() if self.channel is not None else None     # channel hook
        rng = torch.Generator(device="cpu")
        rng.manual_seed(seed)
        with simulating(uid, round_index, clip or 0.0), lent_params(self.shared if lent else []):
            sums = self.trainer.train(self.model, samples, rng)
            shift = moved(self.shared) if lent else math.inf
        n = float(sums["samples"])
        state: dict[str, np.ndarray] = {}
        with torch.no_grad():
            # the shared parameters need no pass of their own when LocalSGD's steps could not have taken them
            # from the global ones to DIVERGED: a rounded step moves a value by at most twice its exact size,
            # and a quarter leaves that factor and the norms' own rounding room
            ruled_out = shift < math.inf and self._peak() + shift < DIVERGED / 4
            if not bounded((self.shared if not ruled_out else []) + list(self.private.values())):
                # one diverged phone must not poison the model: its update is dropped and counted (`DIVERGED`)
                log.debug("user %r: diverged (a non-finite or huge value after local training); dropped from "
                          "the round", uid)
                return {"diverged": 1.0}
            if self.ring is not None and into is None:     # a ring only for plain FedAvg: no channel
                self.sum.stage(self.shared, n * scale, n)     # the slot's memory, or the user's own if lent
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
