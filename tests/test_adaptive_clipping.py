"""Adaptive clipping (Andrew et al. 2021): the geometric update of the norm, the noise split between the
count and the update (Theorem 1), the seeded count noise, the server channel's records and checkpoint
state, the clients' bit, the options' rules, and an in-process run whose clients clip to the scheduler's
moving norm."""
import math

import numpy as np
import pytest
import torch

from flock import simulate
from flock.channel import ServerChannel, UpdateChannel
from flock.channel.accounting import Accountant, DpAccounting
from flock.channel.central_noise import CentralNoise
from flock.channel.clip import (
    AdaptiveClip,
    AdaptiveClipping,
    Clip,
    adaptive_clipping_of,
    next_clip,
    update_noise_multiplier,
)
from flock.common.config import Config, parse_config
from flock.common.domain import TRAIN, Plan
from flock.common.errors import ConfigError
from flock.common.streams import clip_count_rng
from protos.convert import plan_from_proto, plan_to_proto
from tests.helpers import make_lm_data


def exact(quantile: float = 0.5, lr: float = 0.2, clip: float = 1.0, clients: int = 4) -> AdaptiveClip:
    """Adaptive clipping without noise on the count (allowed here, not through the options with DP noise)."""
    return AdaptiveClip(AdaptiveClipping(quantile=quantile, lr=lr, count_noise=0.0, initial_clip=clip,
                                         clients_per_round=clients), seed=0)


def test_the_geometric_update_on_a_hand_computed_example():
    clip = exact(quantile=0.5, lr=0.2, clip=1.0, clients=4)
    assert clip.release(0, 3.0) == 0.75                     # 3 of m = 4 unclipped
    assert clip.clip == pytest.approx(0.951229424500714, rel=1e-15)       # exp(-0.2 * (0.75 - 0.5))
    assert clip.release(1, 1.0) == 0.25
    assert clip.clip == pytest.approx(1.0, rel=1e-15)                     # * exp(-0.2 * (0.25 - 0.5))
    assert next_clip(2.0, 0.0, quantile=0.9, lr=0.5) == pytest.approx(3.136624370980338, rel=1e-15)  # 2 e^0.45
    assert next_clip(2.0, 0.9, quantile=0.9, lr=0.5) == 2.0                # at the quantile: unchanged


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_the_norm_settles_at_the_target_quantile_of_the_update_norms(quantile):
    norms = np.random.default_rng(7).lognormal(mean=0.0, sigma=1.0, size=1000)
    clip = exact(quantile=quantile, lr=0.2, clip=0.01, clients=norms.size)     # far below every norm
    for r in range(400):
        clip.release(r, float((norms <= clip.clip).sum()))
    lo, hi = np.quantile(norms, [quantile - 0.03, quantile + 0.03])
    assert lo <= clip.clip <= hi


def test_the_update_noise_multiplier_keeps_the_total_privacy_and_impossible_budgets_are_refused():
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75), rel=1e-15)
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx(1.0050378152592121, rel=1e-15)  # m = 100: m / 20
    for z, sigma_b in [(0.3, 0.2), (1.7, 1.0), (4.0, 50.0)]:
        z_delta = update_noise_multiplier(z, sigma_b)
        assert z_delta > z
        assert (z_delta ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)     # Theorem 1
    assert update_noise_multiplier(0.0, 0.0) == 0.0                   # no DP noise: nothing to split
    for z, sigma_b in [(1.0, 0.5), (1.0, 0.2), (0.5, 0.0)]:
        with pytest.raises(ConfigError, match="--dp-clip-count-noise"):
            update_noise_multiplier(z, sigma_b)


def test_the_count_noise_is_seeded_and_as_noisy_as_the_deployed_cohorts():
    settings = AdaptiveClipping(quantile=0.5, lr=0.2, count_noise=5.0, initial_clip=1.0, clients_per_round=10,
                                noise_cohort=100)       # sigma_b = 100 / 20: a deployed round of 100, simulated with 10
    a, b = AdaptiveClip(settings, seed=4), AdaptiveClip(settings, seed=4)
    fractions = np.array([a.release(r, 6.0) for r in range(4000)])
    assert np.array_equal(fractions, [b.release(r, 6.0) for r in range(4000)])
    noise = fractions - 0.6
    assert noise.std() == pytest.approx(5.0 / 100, rel=0.05) and abs(noise.mean()) < 0.005
    assert noise[3] == pytest.approx(float(clip_count_rng(4, 3).standard_normal()) * 5.0 * 10 / 100 / 10, rel=1e-12)


def test_the_server_noises_with_z_delta_times_the_rounds_norm_and_accounts_z(tmp_path):
    size, z, sigma_b = 200_000, 1.3, 2.0

    def channel() -> ServerChannel:
        adaptive = AdaptiveClip(AdaptiveClipping(quantile=0.5, lr=0.2, count_noise=sigma_b, initial_clip=0.5,
                                                 clients_per_round=8), seed=3)
        accounting = DpAccounting(noise_multiplier=z, cohort=8, population=80, delta=1e-5)
        clip = Clip(0.5, adaptive, update_noise=update_noise_multiplier(z, sigma_b))
        return ServerChannel([Accountant(accounting), clip, CentralNoise(clip, noise_multiplier=clip.update_noise,
                                                                         seed=3, clients_per_round=8)], (size,))

    server = channel()
    z_delta = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    assert server.round_clip == 0.5
    parts, weight, record = server.aggregate(0, [np.zeros(size)], 5.0, {"clients": 5, "unclipped": 2})
    assert weight == 8.0 and parts[-1].std() == pytest.approx(z_delta * 0.5, rel=0.01)
    fraction = (2 + float(clip_count_rng(3, 0).standard_normal()) * sigma_b) / 8
    assert record["dp_clip"] == 0.5 and record["dp_unclipped_fraction"] == pytest.approx(fraction, rel=1e-12)
    assert server.round_clip == pytest.approx(0.5 * math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)
    assert record["epsilon"] == pytest.approx(DpAccounting(noise_multiplier=z, cohort=8, population=80,
                                                           delta=1e-5).epsilon(1), rel=1e-12)
    # the next round's noise follows the moved norm; a channel restored from the checkpoint state goes on alike
    restored = channel()
    restored.load_state_dict(server.state_dict())
    assert restored.round_clip == server.round_clip and restored.stage(Accountant).released == 1
    second = server.aggregate(1, [np.zeros(size)], 6.0, {"clients": 6, "unclipped": 6})
    again = restored.aggregate(1, [np.zeros(size)], 6.0, {"clients": 6, "unclipped": 6})
    assert second[0][-1].std() == pytest.approx(z_delta * record["dp_clip"] * math.exp(-0.2 * (fraction - 0.5)),
                                                rel=0.01)
    assert np.array_equal(second[0][-1], again[0][-1]) and second[2] == again[2]
    assert server.run_fields()["privacy"].items() >= {"noise_multiplier": z, "update_noise_multiplier": z_delta,
                                                      "count_noise": sigma_b, "sampling_rate": 8 / 80}.items()
    # a round where nobody arrived releases nothing: the norm stays
    before = server.round_clip
    assert "dp_unclipped_fraction" not in server.aggregate(2, [], 0.0, {"clients": 0})[2]
    assert server.round_clip == before


def test_clients_clip_to_the_plans_norm_and_report_whether_they_were_clipped():
    channel = UpdateChannel([Clip(1.0)], seed=0)
    update = [torch.full((3, 4), 0.5, dtype=torch.float64)]           # norm sqrt(12 * 0.25) = 1.732
    _, sums = channel.apply("u", update, torch.Generator(), clip=2.0)
    assert sums == {"unclipped": 1.0} and float(update[0].norm()) == pytest.approx(math.sqrt(3), rel=1e-12)
    _, sums = channel.apply("u", update, torch.Generator(), clip=1.2)
    assert sums == {"unclipped": 0.0} and float(update[0].norm()) == pytest.approx(1.2, rel=1e-12)
    _, sums = channel.apply("u", update, torch.Generator())              # outside a run: the configured norm
    assert sums == {"unclipped": 0.0} and float(update[0].norm()) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="clipping norm 0"):
        channel.apply("u", update, torch.Generator(), clip=0.0)
    assert UpdateChannel([], seed=0).apply("u", update, torch.Generator())[1] == {}


def test_the_rounds_norm_travels_in_the_plan():
    plan = Plan(step=3, kind=TRAIN, round=2, day="d", split="train", users=("a",), clip=0.3721)
    assert plan_from_proto(plan_to_proto(plan)) == plan


@pytest.mark.parametrize("argv, message", [
    (["--dp-adaptive-quantile", "0.5"], "--dp-adaptive-quantile need(s) --dp-clip C above 0"),
    (["--dp-clip-lr", "0.5"], "--dp-clip-lr need(s) --dp-adaptive-quantile"),
    (["--dp-clip", "1", "--dp-clip-count-noise", "3"], "--dp-clip-count-noise need(s) --dp-adaptive-quantile"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "1"], "--dp-adaptive-quantile must be below 1"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "-0.1"], "--dp-adaptive-quantile must be at least 0"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "nan"], "--dp-adaptive-quantile must be a finite number"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "0.5", "--dp-clip-lr", "0"], "--dp-clip-lr must be above 0"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "0.5", "--dp-clip-lr", "inf"], "--dp-clip-lr must be a finite"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "0.5", "--dp-clip-count-noise", "-1"],
     "--dp-clip-count-noise must be at least 0"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "0.5", "--secagg"], "not with --secagg"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "0.5", "--dp-local", "--dp-noise-multiplier", "0.1"],
     "not with --dp-local"),
    # the default sigma_b = K / 20 = 0.5 leaves the update nothing of z = 1
    (["--dp-clip", "1", "--dp-adaptive-quantile", "0.5", "--dp-noise-multiplier", "1"], "sigma_b = 0.5"),
    (["--dp-clip", "1", "--dp-adaptive-quantile", "0.5", "--dp-noise-multiplier", "1", "--dp-clip-count-noise",
      "0.4"], "must be more than half the noise multiplier z = 1"),
])
def test_impossible_adaptive_clipping_settings_name_the_option(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_config(["DATA", *argv])
    assert message in str(e.value)


def test_the_options_build_the_papers_defaults():
    config = parse_config(["DATA", "--dp-clip", "0.7", "--dp-adaptive-quantile", "0.5", "--dp-noise-multiplier",
                           "1", "--clients-per-round", "100"])
    assert adaptive_clipping_of(config) == AdaptiveClipping(quantile=0.5, lr=0.2, count_noise=5.0, initial_clip=0.7,
                                                            clients_per_round=100)
    cohort = adaptive_clipping_of(Config(data_dir="D", dp_clip=1.0, dp_adaptive_quantile=0.3, clients_per_round=10,
                                         dp_noise_cohort=1000))
    assert cohort.count_noise == 50.0 and cohort.count_std == pytest.approx(0.5)   # M / 20, scaled by K / M
    assert adaptive_clipping_of(Config(data_dir="D", dp_clip=1.0)) is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


@pytest.mark.parametrize("start, moves", [(1e-3, "up"), (1e2, "down")])     # the update norms: about 0.4 to 1.2
def test_a_run_clips_to_the_schedulers_moving_norm(data, tmp_path, start, moves):
    """Nearly exact counts (tiny count noise, no DP noise): from far below (above) every update norm, the
    norm grows (shrinks) until some clients are (not) clipped, which only happens if the clients clip to
    the scheduler's norm of each round and not to --dp-clip's C_0."""
    lr, quantile = 1.5, 0.5
    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "r"), rounds=10, clients_per_round=4,
                              eval_every=10, checkpoint_every=0, dp_clip=start, dp_adaptive_quantile=quantile,
                              dp_clip_lr=lr, dp_clip_count_noise=1e-6))
    train = history.train
    clips = [r["dp_clip"] for r in train]
    fractions = [r["dp_unclipped_fraction"] for r in train]
    assert clips[0] == start
    for r in range(len(train) - 1):
        assert clips[r + 1] == pytest.approx(clips[r] * math.exp(-lr * (fractions[r] - quantile)), rel=1e-12)
    assert fractions[0] == pytest.approx(0.0 if moves == "up" else 1.0, abs=1e-5)
    if moves == "up":
        assert clips[-1] > 100 * start and max(fractions) >= 0.25
    else:
        assert clips[-1] < start / 20 and min(fractions) <= 0.75
    assert "epsilon" not in train[-1]
