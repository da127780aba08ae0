"""Attacks (`simulator/attacks.py`): the malicious users, each model attack on hand-checkable slices and the
same bits at any slicing into whole blocks, the data attacks on the arrays reader's read-only samples, and
the refusals naming the option."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flock.common.errors import ConfigError
from flock.common.streams import attack_rng
from reader.arrays import ArrayReader, write_split
from simulator.attacks import (
    ATTACKS,
    TRIGGER_SIZE,
    AttackSettings,
    alie_z_max,
    attack_slice,
    check_attack,
    malicious_users,
    poison_samples,
    trigger_test_samples,
)

MODEL_ATTACKS = ("sign-flip", "scale", "gaussian", "alie")
LEAF_SPEC = {"vocab_size": 100, "pad_id": 0, "unk_id": 1, "vocab_digest": 12345}    # LeafRedditReader.spec()
IMAGE_SPEC = {"num_classes": 10, "input_0": 1, "input_1": 5, "input_2": 5}
SMALL = 8                                    # the tests' block: P = 47 is 6 blocks, the last one short (7)
P = 47


def slice_args(uids, start=0, round_index=3):
    return {"uids": uids, "seed": 11, "round_index": round_index, "start": start, "block": SMALL}


def read_only(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.setflags(write=False)
    return a


# ------------------------------------------------------------------------------------------ settings


def test_settings_defaults_and_kind():
    s = AttackSettings(name="scale", fraction=0, boost=3)
    assert (s.fraction, s.boost, s.std, s.alie_z, s.backdoor_target, s.backdoor_fraction) == (0.0, 3.0, 1.0, 0.0, 0, 0.5)
    assert isinstance(s.fraction, float) and isinstance(s.boost, float)
    assert [AttackSettings(name=n).kind for n in ATTACKS] == ["data", "model", "model", "model", "model", "data"]


@pytest.mark.parametrize("field, value, flag", [
    ("name", "flip", "--attack"), ("name", "", "--attack"),
    ("fraction", 1.0, "--attack-fraction"), ("fraction", -0.1, "--attack-fraction"),
    ("fraction", float("nan"), "--attack-fraction"), ("fraction", True, "--attack-fraction"),
    ("boost", -1.0, "--attack-boost"), ("boost", float("inf"), "--attack-boost"), ("boost", 1e7, "--attack-boost"),
    ("std", 0.0, "--attack-std"), ("std", -1.0, "--attack-std"), ("std", "1", "--attack-std"),
    ("alie_z", -0.5, "--alie-z"), ("alie_z", float("nan"), "--alie-z"), ("alie_z", 1e3, "--alie-z"),
    ("backdoor_target", -1, "--backdoor-target"), ("backdoor_target", 1.5, "--backdoor-target"),
    ("backdoor_target", True, "--backdoor-target"),
    ("backdoor_fraction", 0.0, "--backdoor-fraction"), ("backdoor_fraction", 1.5, "--backdoor-fraction"),
])
def test_settings_refuse_bad_values_naming_the_option(field, value, flag):
    values = {"name": "backdoor", field: value}
    with pytest.raises(ConfigError, match=flag) as e:
        AttackSettings(**values)
    assert e.value.options == (flag,)


# --------------------------------------------------------------------------------------- who attacks


def test_malicious_users_exact_count_any_order_seeded():
    users = [f"u{i:03d}" for i in range(100)]
    chosen = malicious_users(5, users, 0.2)
    assert len(chosen) == 20 and chosen <= set(users)
    shuffled = list(np.random.default_rng(1).permutation(users)) + users[:10]      # order and duplicates
    assert malicious_users(5, shuffled, 0.2) == chosen
    assert malicious_users(6, users, 0.2) != chosen
    assert malicious_users(5, users, 0.0) == frozenset()
    assert len(malicious_users(5, users[:7], 0.3)) == 2                             # round(2.1)
    sorted_ids = sorted(users)
    order = attack_rng(5, "malicious").permutation(100)
    assert chosen == {sorted_ids[i] for i in order[:20]}


# ------------------------------------------------------------------------------------- model attacks


def test_sign_flip_and_scale_by_hand():
    x = read_only(np.array([[1, -2], [3, 4], [0.5, 6]], np.float32))
    uids = ["a", "b", "c"]
    flipped = attack_slice(AttackSettings(name="sign-flip"), x, {"b"}, **slice_args(uids))
    assert flipped.dtype == np.float32
    assert np.array_equal(flipped, [[1, -2], [-3, -4], [0.5, 6]])
    boosted = attack_slice(AttackSettings(name="scale", boost=2.5), x, {"a", "c"}, **slice_args(uids))
    assert np.array_equal(boosted, [[2.5, -5], [3, 4], [1.25, 15]])
    replaced = attack_slice(AttackSettings(name="scale"), x, {"c"}, **slice_args(uids))      # boost 0: K = 3
    assert np.array_equal(replaced, [[1, -2], [3, 4], [1.5, 18]])
    tenth = attack_slice(AttackSettings(name="scale", boost=0.1), x, {"b"}, **slice_args(uids))
    assert tenth[1, 0] == np.float32(3 * 0.1)                # the float64 product, rounded once


def test_gaussian_draws_per_block_of_the_flat_vector():
    x = read_only(np.ones((2, 20), np.float32))
    s = AttackSettings(name="gaussian", std=3.0)
    out = attack_slice(s, x, {"m"}, **slice_args(["h", "m"], start=2 * SMALL))      # blocks 2, 3, 4 (short)
    assert np.array_equal(out[0], x[0])
    want = np.concatenate([attack_rng(11, "gaussian", 3, "m", b).standard_normal(n) * 3.0
                           for b, n in ((2, 8), (3, 8), (4, 4))]).astype(np.float32)
    assert np.array_equal(out[1], want)
    other_round = attack_slice(s, x, {"m"}, **slice_args(["h", "m"], start=2 * SMALL, round_index=4))
    assert not np.array_equal(other_round[1], out[1])


def test_alie_by_hand():
    benign = [[1, 0, 5], [2, 0, 5], [3, 0, 5]]           # mu 2, 0, 5; sigma (ddof 1) 1, 0, 0
    x = read_only(np.array([[9, 9, 9], *benign, [-9, 7, 1]], np.float32))
    uids = ["m1", "b1", "b2", "b3", "m2"]
    out = attack_slice(AttackSettings(name="alie", alie_z=1.5), x, {"m1", "m2"}, **slice_args(uids))
    assert np.array_equal(out[1:4], x[1:4])
    assert np.array_equal(out[[0, 4]], [[0.5, 0, 5], [0.5, 0, 5]])
    z = alie_z_max(5, 2)                                  # s = floor(3.5) - 2 = 1, Phi^-1(4/5)
    out = attack_slice(AttackSettings(name="alie"), x, {"m1", "m2"}, **slice_args(uids))
    assert out[0, 0] == np.float32(2 - z * 1.0) and math.isclose(z, 0.8416212335729144, rel_tol=1e-12)


@pytest.mark.parametrize("clients, malicious, p", [(50, 12, 0.72), (10, 2, 0.6), (5, 1, 0.6), (20, 4, 0.65),
                                                   (2, 1, 0.5), (5, 3, 0.8), (5, 4, 0.8)])
def test_alie_z_max_is_the_papers(clients, malicious, p):
    # s = floor(K/2 + 1) - f, z = Phi^-1((K - s) / K); an attacking majority (s <= 0) counts as s = 1
    quantiles = {0.5: 0.0, 0.6: 0.2533471031357998, 0.65: 0.3853204664075676, 0.72: 0.5828415072712162,
                 0.8: 0.8416212335729144}
    assert math.isclose(alie_z_max(clients, malicious), quantiles[p], rel_tol=1e-12, abs_tol=1e-15)


def test_alie_one_benign_row_and_none():
    x = read_only(np.array([[1, 2], [3, 4], [5, 6]], np.float32))
    out = attack_slice(AttackSettings(name="alie"), x, {"a", "c"}, **slice_args(["a", "b", "c"]))
    assert np.array_equal(out, [[3, 4], [3, 4], [3, 4]])                 # sigma 0: the one benign row
    assert attack_slice(AttackSettings(name="alie"), x, {"a", "b", "c"}, **slice_args(["a", "b", "c"])) is x


def test_nothing_changes_without_a_model_attack_or_an_attacker():
    x = read_only(np.arange(6, dtype=np.float32).reshape(2, 3))
    for name in ("label-flip", "backdoor"):
        assert attack_slice(AttackSettings(name=name), x, {"a"}, **slice_args(["a", "b"])) is x
    for name in MODEL_ATTACKS:
        assert attack_slice(AttackSettings(name=name), x, set(), **slice_args(["a", "b"])) is x
        assert attack_slice(AttackSettings(name=name), x, {"zz"}, **slice_args(["a", "b"])) is x


def test_bad_slices_are_refused():
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="block boundary"):
        attack_slice(AttackSettings(name="gaussian"), x, {"a"}, **slice_args(["a", "b"], start=3))
    with pytest.raises(ValueError, match="K = 3"):
        attack_slice(AttackSettings(name="gaussian"), x, {"a"}, **slice_args(["a", "b", "c"]))


@pytest.mark.parametrize("settings", [AttackSettings(name=n) for n in MODEL_ATTACKS]
                         + [AttackSettings(name="alie", alie_z=0.7), AttackSettings(name="scale", boost=0.3)],
                         ids=lambda s: f"{s.name}")
def test_model_attacks_same_bits_at_any_slicing(settings):
    rng = np.random.default_rng(2)
    uids = [f"c{i}" for i in range(7)]
    x = read_only(rng.normal(0, 1, (7, P)).astype(np.float32))
    bad = {"c1", "c4", "c6"}
    whole = attack_slice(settings, x, bad, **slice_args(uids))
    assert not np.array_equal(whole, x)
    for cuts in ([0, 2, 6], [0, 1, 3, 6]):              # 2 and 3 slices of whole blocks (block indices)
        bounds = [min(c * SMALL, P) for c in cuts]
        parts = [attack_slice(settings, np.ascontiguousarray(x[:, a:b]), bad, **slice_args(uids, start=a))
                 for a, b in zip(bounds, bounds[1:])]
        assert np.concatenate(parts, axis=1).tobytes() == whole.tobytes()


# -------------------------------------------------------------------------------------- data attacks


@pytest.fixture()
def arrays(tmp_path):
    """A tiny arrays data set written and read by the arrays reader: (spec, read-only train samples of u1)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, (40, 1, 5, 5)).astype(np.uint8)
    y = np.arange(40) % 10
    (tmp_path / "meta.json").write_text(json.dumps({"num_classes": 10, "input_shape": [1, 5, 5]}))
    write_split(tmp_path, "20200101", "train", ["u0", "u1"], [x[:10], x[10:]], [y[:10], y[10:]])
    reader = ArrayReader(tmp_path)
    return reader.spec(), reader.load("20200101", "train", "u1")


def test_label_flip(arrays):
    spec, samples = arrays
    assert not samples["x"].flags.writeable and not samples["y"].flags.writeable
    before = np.array(samples["y"])
    out = poison_samples(AttackSettings(name="label-flip"), samples, spec, seed=0, round_index=0, uid="u1")
    assert np.array_equal(out["y"], 9 - before) and out["x"] is samples["x"]
    assert np.array_equal(samples["y"], before)


def test_backdoor_patch_and_seeded_fraction(arrays):
    spec, samples = arrays
    x0, y0 = np.array(samples["x"]), np.array(samples["y"])
    s = AttackSettings(name="backdoor", backdoor_target=7, backdoor_fraction=0.4)
    out = poison_samples(s, samples, spec, seed=1, round_index=2, uid="u1")
    hit = np.flatnonzero((out["x"] != x0).any(axis=(1, 2, 3)) | (out["y"] != y0))
    assert len(hit) == 12                                                 # round(0.4 x 30)
    assert (out["x"][hit][..., -TRIGGER_SIZE:, -TRIGGER_SIZE:] == 255).all() and (out["y"][hit] == 7).all()
    untouched = np.ones(x0.shape, bool)
    untouched[hit, :, -TRIGGER_SIZE:, -TRIGGER_SIZE:] = False
    assert np.array_equal(out["x"][untouched], x0[untouched])
    assert np.array_equal(np.delete(out["y"], hit), np.delete(y0, hit))
    assert np.array_equal(samples["x"], x0) and np.array_equal(samples["y"], y0)      # the reader's maps
    again = poison_samples(s, samples, spec, seed=1, round_index=2, uid="u1")
    assert np.array_equal(again["x"], out["x"]) and np.array_equal(again["y"], out["y"])
    other = poison_samples(s, samples, spec, seed=1, round_index=3, uid="u1")
    assert not np.array_equal(other["x"], out["x"])


def test_backdoor_float_flat_and_channels():
    s = AttackSettings(name="backdoor", backdoor_target=0, backdoor_fraction=1.0)
    flat = read_only(np.zeros((2, 25), np.float32))                       # stored flat, input_shape 1x5x5
    out = poison_samples(s, {"x": flat, "y": read_only(np.array([3, 4]))}, IMAGE_SPEC, seed=0, round_index=0,
                         uid="u")
    images = out["x"].reshape(2, 5, 5)
    assert (images[:, 2:, 2:] == 1.0).all() and images.sum() == 2 * 9
    rgb = read_only(np.zeros((1, 3, 4, 4), np.uint8))
    spec = {"num_classes": 10, "input_0": 3, "input_1": 4, "input_2": 4}
    out = poison_samples(s, {"x": rgb, "y": read_only(np.array([5]))}, spec, seed=0, round_index=0, uid="u")
    assert (out["x"][0, :, 1:, 1:] == 255).all() and out["x"].sum() == 3 * 9 * 255
    one = AttackSettings(name="backdoor", backdoor_fraction=0.1)          # a non-empty user: at least one
    out = poison_samples(one, {"x": rgb, "y": read_only(np.array([5]))}, spec, seed=0, round_index=0, uid="u")
    assert out["y"][0] == 0


def test_model_attacks_leave_samples_alone(arrays):
    spec, samples = arrays
    for name in MODEL_ATTACKS:
        out = poison_samples(AttackSettings(name=name), samples, spec, seed=0, round_index=0, uid="u1")
        assert out is not samples and all(out[k] is samples[k] for k in samples)


def test_trigger_test_samples(arrays):
    spec, samples = arrays
    s = AttackSettings(name="backdoor", backdoor_target=3)
    out = trigger_test_samples(s, samples, spec)
    keep = np.asarray(samples["y"]) != 3
    assert len(out["y"]) == keep.sum() == 27 and (out["y"] == 3).all()
    assert (out["x"][..., -TRIGGER_SIZE:, -TRIGGER_SIZE:] == 255).all()
    assert np.array_equal(out["x"][..., :2, :], np.asarray(samples["x"])[keep][..., :2, :])
    only_target = {"x": read_only(np.zeros((2, 1, 5, 5), np.uint8)), "y": read_only(np.array([3, 3]))}
    assert trigger_test_samples(s, only_target, spec) is None
    with pytest.raises(ValueError, match="backdoor"):
        trigger_test_samples(AttackSettings(name="label-flip"), samples, spec)


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ["label-flip", "backdoor"])
def test_data_attacks_refuse_text(name):
    with pytest.raises(ConfigError, match=f"--attack {name} needs classified samples.*language model") as e:
        check_attack(AttackSettings(name=name), LEAF_SPEC)
    assert e.value.options == ("--attack",)


def test_check_attack_on_image_specs(arrays):
    spec, _ = arrays
    for name in ATTACKS:
        check_attack(AttackSettings(name=name), spec)
    for name in ("sign-flip", "scale", "gaussian", "alie"):
        check_attack(AttackSettings(name=name), LEAF_SPEC)
    features = {"num_classes": 10, "input_0": 784}
    check_attack(AttackSettings(name="label-flip"), features)
    with pytest.raises(ConfigError, match="--attack backdoor stamps a 3x3"):
        check_attack(AttackSettings(name="backdoor"), features)
    with pytest.raises(ConfigError, match="--backdoor-target 10 is not a class") as e:
        check_attack(AttackSettings(name="backdoor", backdoor_target=10), spec)
    assert e.value.options == ("--backdoor-target",)
