"""Simulated secure aggregation: masks cancel to the bit, dropouts are recovered or fail below the threshold,
the decoded aggregate is the plain sum up to the fixed-point rounding, overflows are counted, and a run
with --secagg trains like the same run without it."""
import numpy as np
import pytest

from flock import Config, simulate
from flock.channel.secagg import (
    SecAggFailed,
    SecAggRound,
    client_bytes,
    decode_sum,
    encode_fixed_point,
    fixed_point_fraction_bits,
    masking_graph,
    wrap_signed,
)
from tests.helpers import make_lm_data

USERS = [f"user{i:02d}" for i in range(9)]
BITS, CLIP, SIZE = 32, 1.0, 500


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = fixed_point_fraction_bits(BITS, CLIP, len(USERS))
    values = {u: rng.uniform(-CLIP, CLIP, SIZE) for u in USERS}
    encoded = {u: encode_fixed_point(v, fraction_bits=f, bits=BITS, clip=CLIP, rng=rng) for u, v in values.items()}
    return f, values, encoded


@pytest.mark.parametrize("neighbors", [0, 2, 4])
def test_masks_cancel_to_the_bit(neighbors):
    _, _, encoded = inputs()
    protocol = SecAggRound(seed=1, round_index=3, users=USERS, size=SIZE, bits=BITS, neighbors=neighbors, threshold=5)
    masked = {u: protocol.masked_input(u, x) for u, x in encoded.items()}
    assert all(not np.array_equal(masked[u], encoded[u]) for u in USERS)      # what the server sees is masked
    plain = np.zeros(SIZE, dtype=np.uint64)
    for x in encoded.values():
        plain = (plain + x) % 2**BITS
    assert np.array_equal(protocol.unmask(masked).total, plain)


def test_sparse_graph_is_symmetric_with_about_k_partners():
    graph = masking_graph(USERS, 4)
    assert all(u in graph[v] for u in graph for v in graph[u])
    assert {len(vs) for vs in graph.values()} == {4}
    assert len(masking_graph(USERS, 0)["user00"]) == 8


def test_users_that_drop_after_masking_are_recovered_and_below_the_threshold_the_round_fails():
    _, _, encoded = inputs(1)
    protocol = SecAggRound(seed=2, round_index=0, users=USERS, size=SIZE, bits=BITS, neighbors=4, threshold=6)
    masked = {u: protocol.masked_input(u, x) for u, x in encoded.items()}
    survivors = {u: m for u, m in masked.items() if u not in ("user02", "user05", "user06")}
    result = protocol.unmask(survivors)
    expected = np.zeros(SIZE, dtype=np.uint64)
    for u in survivors:
        expected = (expected + encoded[u]) % 2**BITS
    assert np.array_equal(result.total, expected) and result.dropped == ("user02", "user05", "user06")
    assert result.prg_values > 0
    with pytest.raises(SecAggFailed, match="5 of 9 users survived, the threshold is 6"):
        protocol.unmask({u: m for u, m in list(survivors.items())[:5]})


def test_the_aggregate_differs_from_the_plain_sum_only_by_the_rounding():
    f, values, encoded = inputs(2)
    protocol = SecAggRound(seed=0, round_index=0, users=USERS, size=SIZE, bits=BITS, threshold=1)
    total = protocol.unmask({u: protocol.masked_input(u, x) for u, x in encoded.items()}).total
    decoded, _ = wrap_signed(total.astype(np.int64), BITS)      # residues -> the signed range
    aggregate = decoded * 2.0**-f
    plain = sum(values.values())
    error = np.abs(aggregate - plain)
    assert error.max() < len(USERS) * 2.0**-f                  # each user's stochastic rounding is below 2^-f
    assert error.max() > 0                                     # and it is there
    # decoding a float64 sum of the fixed-point values (what the run does) gives the same numbers
    as_floats = sum(np.where(x >= 2**(BITS - 1), x.astype(np.float64) - 2**BITS, x.astype(np.float64))
                    for x in encoded.values()) * 2.0**-f
    decoded_floats, overflow = decode_sum(as_floats, fraction_bits=f, bits=BITS)
    assert np.array_equal(decoded_floats, aggregate) and overflow == 0


def test_overflow_is_counted():
    f = 20           # 24 bits with 20 fractional ones hold sums in [-8, 8) only
    values = np.array([0.9, -0.9, 0.01, 9.0, -8.5])
    decoded, overflow = decode_sum(values, fraction_bits=f, bits=24)
    assert overflow == 2 and np.allclose(decoded, [0.9, -0.9, 0.01, 9.0 - 16, -8.5 + 16], atol=1e-6)


def test_protocol_bytes():
    down, up = client_bytes(size=1000, bits=32, neighbors=4)
    assert up == 128 + 4 * 100 + 4000 + 4 * 36
    assert down == 4 * 128 + 4 * 100 + 4 * 4
    assert client_bytes(size=1000, bits=16, neighbors=4)[1] == up - 2000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_lm_data(tmp_path_factory.mktemp("lm"))


def test_a_secagg_run_trains_like_the_same_clipped_run_without_it(data, tmp_path):
    common = dict(data_dir=str(data), rounds=3, clients_per_round=4, eval_every=3, checkpoint_every=0, seed=4,
                  dp_clip=0.5)
    plain = simulate(Config(run_dir=str(tmp_path / "plain"), **common))
    masked = simulate(Config(run_dir=str(tmp_path / "secagg"), secagg=True, secagg_bits=32, **common))
    coarse = simulate(Config(run_dir=str(tmp_path / "coarse"), secagg=True, secagg_bits=12, **common))
    for a, b in zip(plain.params.values(), masked.params.values()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(plain.params.values(), coarse.params.values()))
    assert 1e-6 < worst < 0.1            # 12 bits: a visible rounding, still the same model
    assert all(r["secagg_overflow"] == 0 and r["secagg_dropped"] == 0 for r in masked.train)
    assert masked.train[0]["bytes_up"] > plain.train[0]["bytes_up"]     # 32-bit values plus the protocol's messages
