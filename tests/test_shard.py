"""The per-client path's arithmetic, made cheaper without changing a bit: the shard's float64 running sum added
a cache-sized block at a time, and local clipping without torch's multiplication by exactly 1.0."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flock.common.domain import ParamLayout
from simulator.shard import Accumulator, blocks_of
from trainer.base import clip_grad_norm

SHAPES = ((300, 700), (70_001,), (13,), (2, 3, 5))      # 210,000 and 70,001 values: several blocks each


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 10.0 ** float(torch.randint(-5, 5, (), generator=g)) for shape in SHAPES]


@torch.no_grad()
def test_the_running_sum_in_blocks_has_the_bits_of_one_add_per_tensor():
    layout = ParamLayout(names=tuple(f"p{i}" for i in range(len(SHAPES))), shapes=SHAPES)
    acc = Accumulator(layout)
    assert len(acc.blocks) > len(SHAPES)          # the big tensors really are split
    whole = torch.zeros(layout.size, dtype=torch.float64)
    views = [v.view(shape) for v, shape in zip(whole.split(layout.sizes), layout.shapes)]
    params = _params(0)
    for user, alpha in enumerate((17.0, 1.0, 0.3, 1013.0 / 3.0)):       # integer weights, and staleness-scaled
        for p, q in zip(params, _params(user + 1)):
            p.copy_(q)                                     # a shard's parameters: the same tensors, new values
        acc.add(params, alpha, 1.0)
        for v, p in zip(views, params):
            v.add_(p, alpha=alpha)
    assert torch.equal(acc.total, whole) and acc.weight == 4.0


@torch.no_grad()
def test_parameters_given_new_memory_are_read_from_it():
    layout = ParamLayout(names=("a", "b"), shapes=((100_000,), (7,)))
    acc = Accumulator(layout)
    params = [torch.ones(100_000), torch.ones(7)]
    acc.add(params, 2.0, 1.0)
    params[0].data = torch.full((100_000,), 3.0)           # a trainer that replaces a parameter's data
    acc.add(params, 1.0, 1.0)
    assert acc.total[:100_000].eq(5.0).all() and acc.total[100_000:].eq(3.0).all()


@torch.no_grad()
def test_a_sum_is_zeroed_once_and_only_when_something_was_added():
    acc = Accumulator(ParamLayout(names=("a",), shapes=((10,),)))
    acc.add([torch.ones(10)], 1.0, 1.0)
    acc.reset()
    assert not acc.total.any() and acc.weight == 0.0 and not acc.dirty
    acc.total.fill_(7.0)          # a pass that zeroed it is trusted: nothing was added since
    acc.reset()
    assert acc.total.eq(7.0).all()
    acc.add([torch.ones(10)], 1.0, 1.0)
    acc.reset()
    assert not acc.total.any()


def test_blocks_cover_each_tensor_in_order():
    t = [torch.arange(10.0), torch.arange(5.0)]
    assert [b.tolist() for b in blocks_of(t, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3], [4]]


@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 10.0, 1e3, 1e25, float("inf"), float("nan")])
def test_local_clipping_has_torchs_bits(scale):
    g = torch.Generator().manual_seed(7)
    ours = [torch.nn.Parameter(torch.randn(50, 7, generator=g)), torch.nn.Parameter(torch.randn(13, generator=g))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape, generator=g) * scale
        q.grad = p.grad.clone()
    ours[1].grad[3] = scale          # one extreme value, not only a scaled tensor
    theirs[1].grad[3] = scale
    torch.nn.utils.clip_grad_norm_(theirs, 5.0)
    clip_grad_norm(ours, [p.grad for p in ours], 5.0)
    for p, q in zip(ours, theirs):
        assert np.array_equal(p.grad.numpy(), q.grad.numpy(), equal_nan=True)


class _CopiedLM:
    """The LM trainer, unmarked (`local_sgd_only`): a shard copies the global parameters in for each user."""

    def __new__(cls, config, spec):
        from trainer.lm import LanguageModelTrainer

        class Copied(LanguageModelTrainer):
            def train(self, model, samples, rng=None):
                return super().train(model, samples, rng)

        return Copied(config, spec)


def _tiny_lm_shard(slots: int, private: tuple[str, ...] = (), *, trainer=None, config=None):
    from model.lstm import RedditLSTM
    from simulator.data_server import MemoryStore
    from simulator.shard import Shard
    from trainer.base import TrainConfig
    from trainer.lm import LanguageModelTrainer

    torch.manual_seed(0)
    model = RedditLSTM(50, embed_dim=8, hidden=8, layers=1)
    named = dict(model.named_parameters())
    shared = [n for n in named if n not in private]
    layout = ParamLayout(names=tuple(shared), shapes=tuple(tuple(named[n].shape) for n in shared))
    init = {n: named[n].detach().numpy().copy() for n in private}
    spec = {"vocab_size": 50, "pad_id": 0, "unk_id": 1}
    trainer = (trainer or LanguageModelTrainer)(config or TrainConfig(), spec)
    shard = Shard(model, trainer, layout, private, MemoryStore(), init, slots=slots)
    glob = layout.flatten({n: named[n].detach().numpy() for n in shared})
    return shard, glob


def _user(seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).integers(2, 50, size=(1 + seed % 4, 7)).astype(np.int32)
    return {"x": x, "y": x, "mask": np.ones_like(x, dtype=np.uint8)}


@pytest.mark.parametrize("private", [(), ("decoder.bias",)])
@pytest.mark.parametrize("copied", [False, True])
@pytest.mark.parametrize("momentum, prox_mu", [(0.0, 0.0), (0.9, 0.1)])
def test_a_ring_of_parameter_slots_gives_the_bits_of_adding_each_user_at_once(private, copied, momentum, prox_mu):
    """Users whose updates wait (more users than slots: the sum is flushed in between), an evaluation between
    them, two rounds: the rank's update equals the one-add-per-user shard's, bit for bit, whether the users
    start on the global parameters themselves (the LM trainer: `local_sgd_only`) or on a copy of them in a
    slot; and the lent global parameters are never written."""
    from simulator.shard import drain
    from trainer.base import TrainConfig

    config = TrainConfig(momentum=momentum, prox_mu=prox_mu, batch_size=2)
    plain, glob = _tiny_lm_shard(1, private, config=config)
    ringed, _ = _tiny_lm_shard(3, private, trainer=_CopiedLM if copied else None, config=config)
    assert plain.ring is None and ringed.ring is not None and ringed.lend_global is not copied
    for rnd in range(2):
        outs = []
        glob.flags.writeable = False
        before = glob.copy()
        for shard in (plain, ringed):
            shard.set_global(glob, rnd)
            for user in range(7):
                shard.train_user(f"u{user}", _user(user + 10 * rnd), seed=user, round_index=rnd + 1)
                if user == 4:
                    shard.evaluate_user("u0", _user(0))      # loads the model: never over a waiting update
            out = np.empty(glob.size)
            drain(out, [shard.sum], [(shard.sum.weight, glob)])
            outs.append(out)
            assert not shard.sum.staged and not shard.sum.total.any() and shard.sum.weight == 0
        assert np.array_equal(glob, before)
        assert np.array_equal(outs[0], outs[1])
        glob = (glob + outs[0] / 7).astype(np.float32)
        if private:
            for user in range(7):
                a, b = plain.store.get_param_by_uid(f"u{user}"), ringed.store.get_param_by_uid(f"u{user}")
                assert np.array_equal(a["decoder.bias"], b["decoder.bias"])


def test_a_lent_user_that_takes_no_step_adds_the_global_parameters_themselves():
    from simulator.shard import drain
    from trainer.base import local_sgd_only
    from trainer.lm import LanguageModelTrainer

    class NoStep(LanguageModelTrainer):
        @local_sgd_only
        def train(self, model, samples, rng=None):
            return {"samples": 3.0}

    shard, glob = _tiny_lm_shard(3, trainer=NoStep)
    shard.set_global(glob, 0)
    shard.train_user("u0", _user(0))
    assert shard.sum.staged[0][0][0].data_ptr() == shard._global.data_ptr()      # not a copy
    out = np.empty(glob.size)
    assert shard.sum.weight == 3.0
    drain(out, [shard.sum], [(shard.sum.weight, glob)])
    assert not out.any()


def test_lent_parameters_are_written_out_of_place_from_any_thread():
    """A marked trainer that steps in a thread of its own: the mark is on the parameters, so the global
    parameters are never written, and the update equals a copying shard's."""
    from concurrent.futures import ThreadPoolExecutor

    from simulator.shard import drain
    from trainer.base import local_sgd_only
    from trainer.lm import LanguageModelTrainer

    class Threaded(LanguageModelTrainer):
        @local_sgd_only
        def train(self, model, samples, rng=None):
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(LanguageModelTrainer.train, self, model, samples, rng).result()

    outs = []
    for trainer in (_CopiedLM, Threaded):
        shard, glob = _tiny_lm_shard(3, trainer=trainer)
        glob.flags.writeable = False
        before = glob.copy()
        shard.set_global(glob, 0)
        for user in range(4):
            shard.train_user(f"u{user}", _user(user), seed=user, round_index=1)
        out = np.empty(glob.size)
        drain(out, [shard.sum], [(shard.sum.weight, glob)])
        assert np.array_equal(glob, before) and shard.lend_global is (trainer is Threaded)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])


def test_a_diverged_user_is_left_out_whether_or_not_updates_wait():
    """A user whose update is not finite and one whose values are huge (their squares overflow float32), on
    a shard whose updates wait (more users than slots) and on one that adds each at once: both are dropped,
    and the sums of the others are equal, bit for bit."""
    from simulator.shard import drain
    from trainer.base import current_call, local_sgd_only
    from trainer.lm import LanguageModelTrainer

    class Diverges(LanguageModelTrainer):
        @local_sgd_only
        def train(self, model, samples, rng=None):
            from dataclasses import replace

            keep, user = self.config, current_call().user
            if user in ("u1", "u6"):
                self.config = replace(keep, lr=float("inf") if user == "u1" else 1e30)
            try:
                return super().train(model, samples, rng)
            finally:
                self.config = keep

    outs = []
    for slots in (1, 3):
        shard, glob = _tiny_lm_shard(slots, trainer=Diverges)
        shard.set_global(glob, 0)
        results = {f"u{user}": shard.train_user(f"u{user}", _user(user), seed=user, round_index=1)
                   for user in range(7)}
        assert sorted(u for u, r in results.items() if r == {"diverged": 1.0}) == ["u1", "u6"]
        assert shard.sum.weight == sum(len(_user(u)["x"]) for u in (0, 2, 3, 4, 5))
        out = np.empty(glob.size)
        drain(out, [shard.sum], [(shard.sum.weight, glob)])
        outs.append(out)
    assert np.isfinite(outs[0]).all() and np.array_equal(outs[0], outs[1])


def test_drain_has_the_bits_of_whole_passes():
    """A rank's shards: each sum (added users, then staged ones, in order), summed in shard order, less the
    start versions' alpha * theta (FedBuff's staleness-weighted sample counts included)."""
    from scheduler.phones.asynchronous import exact_weight
    from scheduler.phones.fedbuff import staleness_weight
    from simulator.shard import drain

    rng = np.random.default_rng(5)
    size = 10_000
    layout = ParamLayout(names=("w",), shapes=((size,),))
    sums = [Accumulator(layout) for _ in range(3)]
    expected_parts = []
    for i, acc in enumerate(sums):
        whole = torch.zeros(size, dtype=torch.float64)
        for j in range(i + 1):               # the first accumulator only staged, the others added and staged
            theta = torch.from_numpy((rng.normal(size=size) * 10.0 ** rng.integers(-6, 6, size=size)).astype(np.float32))
            alpha = float(rng.integers(1, 2000))
            if j and j % 2:
                acc.add([theta], alpha, alpha)
            else:
                acc.stage([theta.clone()], alpha, alpha)
            whole.add_(theta, alpha=alpha)
        expected_parts.append(whole)
    starts = [(exact_weight(staleness_weight(s)) * n, rng.normal(size=size).astype(np.float32))
              for s, n in ((0, 17), (3, 1013), (7, 2))]
    expected = expected_parts[0].clone()
    for part in expected_parts[1:]:
        expected += part
    for alpha, theta in starts:
        expected.sub_(torch.from_numpy(theta), alpha=alpha)
    out = np.empty(size)
    drain(out, sums, starts, block=768)
    assert np.array_equal(out, expected.numpy())
    assert all(not acc.total.any() and not acc.staged and acc.weight == 0 for acc in sums)


def test_many_waiting_updates_and_the_start_have_the_bits_of_torchs_adds_in_turn():
    """One sum with 7 waiting updates (the kernels' passes of three, then one) and the start joined to them,
    over parameters of several sizes and blocks that end inside them: torch's whole-array adds, in turn."""
    from simulator.shard import drain

    rng = np.random.default_rng(9)
    layout = ParamLayout(names=("a", "b", "c"), shapes=((1000,), (7,), (2500,)))
    acc = Accumulator(layout)
    expected = torch.zeros(layout.size, dtype=torch.float64)
    for _ in range(7):
        theta = [torch.from_numpy((rng.normal(size=n) * 10.0 ** rng.integers(-6, 6, size=n)).astype(np.float32))
                 for n in layout.sizes]
        alpha = float(rng.integers(1, 3000))
        acc.stage(theta, alpha, alpha)
        expected.add_(torch.cat(theta), alpha=alpha)
    start = rng.normal(size=layout.size).astype(np.float32)
    expected.sub_(torch.from_numpy(start), alpha=acc.weight)
    out = np.empty(layout.size)
    drain(out, [acc], [(acc.weight, start)], block=768)
    assert np.array_equal(out, expected.numpy())


def test_ring_slots_fit_the_budget():
    from simulator.shard import MAX_SLOTS, ring_slots

    assert ring_slots(6_182_672, 1, 192 << 20) == 8           # the LM: 24.7 MB a copy
    assert ring_slots(6_182_672, 2, 192 << 20) == 4           # two shards share the budget
    assert ring_slots(1000, 1) == MAX_SLOTS
    assert ring_slots(100_000_000, 1) == 1                    # a 400 MB model: no ring


@pytest.mark.parametrize("copied, made", [(True, 3), (False, 1)])
def test_a_ring_makes_the_slots_it_needs_only(copied, made):
    """Copies: a slot a user of the round (3 of the 8 allowed); lent global parameters: none beyond the first
    (each user's update waits in the memory its first step wrote)."""
    shard, glob = _tiny_lm_shard(8, trainer=_CopiedLM if copied else None)
    shard.set_global(glob, 0)
    for round_index in (1, 2):
        for user in range(3):
            shard.train_user(f"u{user}", _user(user), seed=user, round_index=round_index)
        out = np.empty(glob.size)
        from simulator.shard import drain
        drain(out, [shard.sum], [(shard.sum.weight, glob)])
    assert len(shard.ring.flats) == made


@pytest.mark.parametrize("env, expected", [({}, "True True"), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "False False")])
def test_the_allocator_keeps_freed_memory_unless_the_user_set_malloc(env, expected):
    import os
    import platform
    import subprocess
    import sys

    from tests.helpers import ROOT

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", "from flock.common.memory import keep_freed_memory as k; "
                           "print(k(), k())"], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected.split()


@pytest.mark.parametrize("lr, clip, momentum, prox_mu", [(1.0, 5.0, 0.0, 0.0), (0.5, 0.1, 0.9, 0.0),
                                                         (3.0, 1.0, 0.5, 0.2), (-1.0, 5.0, 0.0, 0.0),
                                                         (1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)])
def test_lent_parameters_record_a_bound_on_how_far_their_steps_moved_them(lr, clip, momentum, prox_mu):
    """`moved` bounds max |theta - theta_start| after LocalSGD's steps (clipping on); it is inf when a step's
    norm is unknown (no clipping) and 0 before any step."""
    from trainer.base import LocalSGD, TrainConfig, lent_params, moved

    g = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(40, 3, generator=g)), torch.nn.Parameter(torch.randn(9, generator=g))]
    start = [p.detach().clone() for p in params]
    opt = LocalSGD(params, TrainConfig(lr=lr, max_grad_norm=clip, momentum=momentum, prox_mu=prox_mu))
    with lent_params(params):
        assert moved(params) == 0.0
        for k in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 10 ** (k % 3)
            opt.step()
        bound = moved(params)
    actual = max(float((p.detach() - s).abs().max()) for p, s in zip(params, start))
    assert actual > 0 or lr == 0
    if clip > 0:
        assert actual <= bound < math.inf
        assert bound <= abs(lr) * clip * sum(momentum ** j for j in range(6)) * 6 * (1 + 1e-6)
    else:
        assert bound == math.inf
    assert moved(params) == math.inf       # outside the block: unknown


def test_a_lent_user_whose_steps_stay_far_from_diverging_is_not_scanned_again(monkeypatch):
    """The divergence check reads the shared parameters only when the recorded bound cannot rule it out; the
    private ones always."""
    import simulator.shard as shard_module
    from trainer.base import TrainConfig

    seen = []
    real = shard_module.bounded
    monkeypatch.setattr(shard_module, "bounded", lambda tensors: seen.append(len(tensors)) or real(tensors))
    for lr, scanned in ((1.0, False), (1e21, True)):
        shard, glob = _tiny_lm_shard(3, ("decoder.bias",), config=TrainConfig(lr=lr))
        shard.set_global(glob, 0)
        seen.clear()
        shard.train_user("u0", _user(2), seed=0, round_index=1)
        assert seen == [1 + len(shard.shared) if scanned else 1]


@pytest.mark.parametrize("lr, masked", [(float("nan"), False), (float("inf"), True)])
def test_a_step_bound_that_is_nan_never_skips_the_check(lr, masked):
    """A NaN learning rate, or an infinite one times gradients of exactly zero, gives a NaN bound: with a
    frozen shared parameter (bound 0) listed first, Python's max would have hidden it. The user is dropped."""
    from trainer.base import TrainConfig, local_sgd_only
    from trainer.lm import LanguageModelTrainer

    class FrozenEmbedding(LanguageModelTrainer):
        @local_sgd_only
        def train(self, model, samples, rng=None):
            next(model.parameters()).requires_grad_(False)
            return super().train(model, samples, rng)

    shard, glob = _tiny_lm_shard(3, trainer=FrozenEmbedding, config=TrainConfig(lr=lr))
    shard.set_global(glob, 0)
    user = _user(2)
    if masked:
        user["mask"] = np.zeros_like(user["mask"])
    assert shard.train_user("u0", user, seed=0, round_index=1) == {"diverged": 1.0}
