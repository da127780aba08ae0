"""DP-FedAvg and compressed updates: the client channel (clipping, local noise, quantization, top-k with error
feedback), the server's noise and accountant, the exact bytes, and how the options combine."""
import math

import numpy as np
import pytest
import torch

from application import main
from flock import simulate
from flock.channel import ServerChannel, UpdateChannel, server_channel, update_channel
from flock.channel.accounting import Accountant, DpAccounting
from flock.channel.central_noise import CentralNoise
from flock.channel.clip import Clip
from flock.channel.compress import RESIDUAL, Compress, stochastic_levels
from flock.channel.local_noise import LocalNoise
from flock.common.codecs import Codec, parse_codec
from flock.common.config import Config, parse_config
from flock.common.errors import ConfigError
from tests.helpers import make_lm_data

SHAPES = ((30, 20), (20,), (7, 3))
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


def deltas(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) * scale for s in SHAPES]


def norm(ts) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts)))


def test_clipped_norms_are_at_most_c_and_small_updates_pass_unchanged():
    channel = UpdateChannel([Clip(0.7)], seed=0)
    for seed in range(20):
        big = deltas(seed, scale=3.0)
        before = norm(big)
        channel.apply("u", big, torch.Generator().manual_seed(seed))
        assert before > 0.7 and norm(big) <= 0.7 * (1 + 1e-12)
        assert norm(big) == pytest.approx(0.7, rel=1e-12)
    small = deltas(1, scale=1e-3)
    copy = [t.clone() for t in small]
    channel.apply("u", small, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(small, copy))


def test_server_noise_std_is_sigma_times_c_and_the_denominator_is_k():
    size = 200_000

    def noisy(cohort: int = 0) -> ServerChannel:
        clip = Clip(0.5)
        return ServerChannel([Accountant(None), clip, CentralNoise(clip, noise_multiplier=1.3, seed=3,
                                                                   clients_per_round=8, noise_cohort=cohort)], (size,))

    server = noisy()
    parts, weight, record = server.aggregate(0, [np.zeros(size)], 5.0, {"clients": 5})
    noise = parts[-1]
    assert weight == 8.0                      # the fixed denominator: the cohort K, not the 5 that arrived
    assert noise.std() == pytest.approx(1.3 * 0.5, rel=0.01) and abs(noise.mean()) < 0.01
    again = noisy()
    assert np.array_equal(again.aggregate(0, [np.zeros(size)], 5.0, {"clients": 5})[0][-1], noise)   # seeded
    cohort = noisy(cohort=80)
    assert cohort.aggregate(1, [np.zeros(size)], 5.0, {"clients": 5})[0][-1].std() == pytest.approx(1.3 * 0.5 / 10,
                                                                                                     rel=0.01)
    assert record["bytes_up"] == 5 * 4 * size and record["bytes_down"] == 5 * 4 * size


def test_local_dp_noise_is_added_by_each_client_and_not_by_the_server():
    config = Config(data_dir="D", dp_clip=2.0, dp_noise_multiplier=0.3, dp_local=True, clients_per_round=4)
    channel = update_channel(config)
    assert [type(s) for s in channel.stages] == [Clip, LocalNoise] and channel.stages[1].std == pytest.approx(0.6)
    zero = [torch.zeros(400, 500, dtype=torch.float64)]
    channel.apply("u", zero, torch.Generator().manual_seed(4))
    assert float(zero[0].std()) == pytest.approx(0.6, rel=0.01)
    server = server_channel(config, (10,), population=100)
    parts, weight, _ = server.aggregate(0, [np.ones(10)], 4.0, {"clients": 4})
    assert len(parts) == 1 and weight == 4.0


def test_epsilon_is_the_accountants_own_for_the_runs_parameters(data, tmp_path):
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "r"), rounds=4, clients_per_round=3,
                              eval_every=4, checkpoint_every=0, dp_clip=0.5, dp_noise_multiplier=0.9))
    q = 3 / 12          # the fixture has 12 users on its one training day
    for r in history.train:
        accountant = rdp.RdpAccountant()
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(0.9)), r["round"])
        assert r["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert history.evals[-1]["epsilon"] == history.train[-1]["epsilon"]
    # PLD (--dp-accountant pld) is tighter than RDP's bound
    pld_accountant = pld.PLDAccountant()
    pld_accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(0.9)), 4)
    assert pld_accountant.get_epsilon(1e-5) <= history.train[-1]["epsilon"]
    pld_run = DpAccounting(noise_multiplier=0.9, cohort=3, population=12, delta=1e-5, kind="pld")
    assert pld_run.epsilon(4) == pytest.approx(pld_accountant.get_epsilon(1e-5), rel=1e-12)


def test_target_epsilon_calibrates_the_noise_before_the_run(data, tmp_path, caplog):
    caplog.set_level("INFO")
    history = simulate(Config(data_dir=str(data), run_dir=str(tmp_path / "r"), rounds=3, clients_per_round=3,
                              eval_every=3, checkpoint_every=0, dp_clip=0.5, dp_target_epsilon=4.0))
    assert history.train[-1]["epsilon"] == pytest.approx(4.0, rel=2e-3) and history.train[-1]["epsilon"] <= 4.0 + 1e-3
    assert "--dp-target-epsilon 4: noise multiplier" in caplog.text
    accounting = DpAccounting(noise_multiplier=0, cohort=3, population=12, delta=1e-5)
    z = accounting.calibrate(4.0, 3)
    assert accounting.epsilon(3, z) == pytest.approx(4.0, rel=2e-3)
    assert accounting.epsilon(3, z * 0.9) > 4.0        # the smallest such noise, to the calibration's tolerance


def test_an_unreachable_target_epsilon_exits_2_naming_the_option(data, tmp_path, capsys):
    status = main([str(data), "--run-dir", str(tmp_path / "r"), "--rounds", "3", "--clients-per-round", "3",
                   "--dp-clip", "1", "--dp-target-epsilon", "1e-7", "--dp-delta", "1e-12", "--quiet"])
    assert status == 2
    err = capsys.readouterr()
    assert "--dp-target-epsilon 1e-07 is unreachable in 3 rounds" in err.out + err.err


@pytest.mark.parametrize("argv, message", [
    (["--dp-clip", "-1"], "--dp-clip must be at least 0"),
    (["--dp-noise-multiplier", "1"], "--dp-noise-multiplier need(s) --dp-clip C above 0"),
    (["--dp-clip", "0", "--secagg"], "--secagg need(s) --dp-clip C above 0"),
    (["--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-target-epsilon", "2"], "give it or --dp-noise-multiplier"),
    (["--compress-up", "q33"], "--compress-up q33: b must be in 1..32"),
    (["--compress-up", "q0"], "--compress-up q0: b must be in 1..32"),
    (["--compress-up", "topk:0"], "topk:F needs a fraction 0 < F <= 1"),
    (["--compress-up", "zip"], "--compress-up 'zip': use fp32, fp16, qB"),
    (["--compress-down", "topk:0.1"], "a sparse model is not a model"),
    (["--dp-clip", "1", "--secagg", "--compress-up", "q8"], "--secagg sends updates in fixed point"),
    (["--secagg-bits", "16"], "--secagg-bits need(s) --secagg"),
    (["--dp-clip", "1", "--dp-noise-cohort", "2", "--clients-per-round", "4"], "less than --clients-per-round 4"),
    (["--dp-clip", "1", "--secagg", "--secagg-bits", "8", "--clients-per-round", "200"], "--secagg-bits 8: too few bits"),
    (["--dp-clip", "1", "--async-buffer", "2"], "not with --async-buffer"),
    (["--dp-delta", "1"], "--dp-delta must be below 1"),
])
def test_impossible_settings_name_the_option(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_config(["DATA", *argv])
    assert message in str(e.value)


def test_a_bad_option_exits_2_with_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path), "--compress-up", "q40"]) == 2
    out = capsys.readouterr()
    assert "--compress-up q40" in out.out + out.err


def test_exact_bytes_of_each_codec():
    sizes = (600, 20, 21)
    assert parse_codec("fp32", "--x").bytes(sizes) == 4 * 641
    assert parse_codec("fp16", "--x").bytes(sizes) == 2 * 641
    assert parse_codec("q8", "--x").bytes(sizes) == (600 + 4) + (20 + 4) + (21 + 4)
    assert parse_codec("q4", "--x").bytes(sizes) == (300 + 4) + (10 + 4) + (11 + 4)       # ceil(21 * 4 / 8) = 11
    assert parse_codec("q1", "--x").bytes(sizes) == (75 + 4) + (3 + 4) + (3 + 4)
    assert parse_codec("topk:0.01", "--x").bytes(sizes) == 8 * 7                          # ceil(6.41) values + indices
    channel = server_channel(Config(data_dir="D", compress_up="q8", compress_down="fp16"), sizes, population=100)
    assert (channel.bytes_down, channel.bytes_up) == (2 * 641, 653)


def test_stochastic_quantization_is_unbiased_and_on_its_levels():
    x = torch.linspace(-1.3, 0.9, 50, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stochastic_levels(x, 2, torch.rand(50, generator=g, dtype=torch.float64))
                         for _ in range(4000)])
    step = 2 * 1.3 / 3
    levels = torch.tensor([-1.3 + i * step for i in range(4)], dtype=torch.float64)
    assert bool(((draws.unsqueeze(-1) - levels).abs().min(-1).values < 1e-6).all())     # 4 levels for 2 bits
    assert torch.allclose(draws.mean(0), x, atol=0.03)                                   # unbiased


def test_top_k_sends_k_values_and_keeps_the_rest_as_the_users_residual():
    channel = UpdateChannel([Compress(Codec("topk", fraction=0.05), Codec(), seed=0)], seed=0)
    d = deltas(2)
    original = [t.clone() for t in d]
    state, _ = channel.apply("u", d, torch.Generator(), None, NAMES)
    total = sum(t.numel() for t in d)
    assert sum(int((t != 0).sum()) for t in d) == math.ceil(0.05 * total)
    for name, sent, orig in zip(NAMES, d, original):
        np.testing.assert_allclose(sent.numpy() + state[RESIDUAL + name], orig.numpy(), atol=1e-6)
    # next round: the residual joins the new update, so nothing is lost over rounds
    d2 = [torch.zeros_like(t) for t in d]
    state2, _ = channel.apply("u", d2, torch.Generator(), state, NAMES)
    for name, sent in zip(NAMES, d2):
        np.testing.assert_allclose(sent.numpy() + state2[RESIDUAL + name], state[RESIDUAL + name], atol=1e-6)


def test_the_model_broadcast_is_compressed_once_per_version_the_same_for_everyone():
    flat = torch.randn(641, generator=torch.Generator().manual_seed(1))
    a = UpdateChannel([Compress(Codec(), Codec("q", bits=8), seed=5)], seed=5)
    b = UpdateChannel([Compress(Codec(), Codec("q", bits=8), seed=5)], seed=5)
    sizes = (600, 20, 21)
    first = a.received_model(flat, sizes, 3)
    assert first is a.received_model(flat, sizes, 3) and torch.equal(first, b.received_model(flat, sizes, 3))
    assert not torch.equal(first, a.received_model(flat, sizes, 4))
    assert float((first - flat).abs().max()) <= 2 * float(flat.abs().max()) / 255 + 1e-6


def test_no_option_means_no_channel_and_the_plain_fedavg_path():
    assert update_channel(Config(data_dir="D")) is None
    assert update_channel(Config(data_dir="D", compress_up="fp16")) is not None


def test_compression_bytes_reach_the_records_and_the_virtual_clock(data, tmp_path):
    common = dict(data_dir=str(data), rounds=2, clients_per_round=3, eval_every=2, checkpoint_every=0,
                  device_profiles="builtin", seed=2)
    full = simulate(Config(run_dir=str(tmp_path / "fp32"), **common))
    small = simulate(Config(run_dir=str(tmp_path / "q4"), compress_up="q4", compress_down="fp16", **common))
    plain = simulate(Config(run_dir=str(tmp_path / "plain"), **{**common, "device_profiles": ""}))
    size = int(full.records[0]["bytes_up"] / full.records[0]["completed"])
    assert size % 4 == 0 and all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in plain.train)
    assert plain.train[0]["bytes_up"] == plain.train[0]["clients"] * size
    assert small.train[0]["bytes_down"] == small.train[0]["selected"] * size // 2
    assert small.train[0]["bytes_up"] < full.train[0]["bytes_up"] / 7
    assert small.train[-1]["sim_time"] < full.train[-1]["sim_time"]       # less to send, sooner done
