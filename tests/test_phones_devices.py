"""Device profiles: the built-in seeded distributions, FedScale's pickles, per-user tables, the restricted
unpickler, and every kind of bad input."""
import json
import math
import os
import pickle
import statistics

import numpy as np
import pytest

from flock.common import streams
from flock.common.errors import ConfigError, DataError
from scheduler.phones.devices import BuiltinProfiles, DeviceProfile, FileProfiles, load_profiles, profiles_from_option
from scheduler.phones.files import fedscale_client_id
from scheduler.phones.safe_pickle import load_plain_pickle, loads_plain_pickle


def test_builtin_profiles_are_a_function_of_seed_and_user():
    a, b = BuiltinProfiles(seed=3), BuiltinProfiles(seed=3)
    assert a.profile("alice") == b.profile("alice")
    assert a.profile("alice") != a.profile("bob")
    assert a.profile("alice") != BuiltinProfiles(seed=4).profile("alice")
    # asking in another order, or for other users first, changes nothing (no shared generator state)
    for uid in ("x", "y", "alice"):
        a.profile(uid)
    assert a.profile("alice") == b.profile("alice")


def test_builtin_profiles_follow_the_documented_medians_and_spreads():
    source = BuiltinProfiles(seed=0)
    phones = [source.profile(f"user{i}") for i in range(4000)]
    # the median of a lognormal sample is within a few percent of the distribution's at n = 4000
    for field, median in (("seconds_per_sample", 0.005 * math.e), ("downlink_bps", 20e6), ("uplink_bps", 5e6),
                          ("latency_s", 0.05)):
        got = statistics.median(getattr(p, field) for p in phones)
        assert got == pytest.approx(median, rel=0.06), field
    sigma = statistics.stdev(math.log(p.seconds_per_sample) for p in phones)
    assert sigma == pytest.approx(0.6, rel=0.06)
    assert statistics.stdev(math.log(p.uplink_bps) for p in phones) == pytest.approx(0.8, rel=0.06)


def test_phone_streams_do_not_meet_flocks_other_streams():
    # SeedSequence pads with zeros: [seed, round] draws what [seed, round, 0, 0] draws. The phones' second
    # word is one no round reaches, and each purpose has its own third word.
    assert streams.PHONES > 2**31
    ours = np.random.SeedSequence([0, streams.PHONES, 0, 0]).generate_state(2)
    assert not np.array_equal(ours, np.random.SeedSequence([0, 7]).generate_state(2))
    assert streams.online_coin(0, 1, "u") != streams.hourly_coin(0, 1, "u")


def test_builtin_options_are_validated():
    with pytest.raises(ConfigError, match="medians"):
        BuiltinProfiles(seed=0, downlink_median_bps=0)
    with pytest.raises(ValueError):
        DeviceProfile(seconds_per_sample=0.1, downlink_bps=0, uplink_bps=1)
    assert profiles_from_option("", 0) is None
    assert isinstance(profiles_from_option("builtin", 0), BuiltinProfiles)
    with pytest.raises(ConfigError, match="--device-profiles nowhere.pkl"):
        profiles_from_option("nowhere.pkl", 0)


def _fedscale_capacity(n):
    # FedScale's client_device_capacity: {client id (from 1): {"computation": ms/sample, "communication": kbps}}
    return {i: {"computation": 10.0 * i, "communication": 1000.0 * i} for i in range(1, n + 1)}


def test_fedscale_capacity_pickle(tmp_path):
    path = tmp_path / "client_device_capacity"
    path.write_bytes(pickle.dumps(_fedscale_capacity(4)))
    profiles = load_profiles(path)
    p = profiles.profile("3")       # a listed client id is its own entry
    # training costs 3 x FedScale's inference time; kbps is both directions
    assert p == DeviceProfile(seconds_per_sample=0.09, downlink_bps=3e6, uplink_bps=3e6, latency_s=0.0)
    # ids beyond the file wrap around it in file order, as FedScale's client manager does: id % 4
    assert profiles.profile("6") == profiles.profile("3")    # 6 % 4 = 2 -> the third entry (id 3)
    assert profiles.profile("8") == profiles.profile("1")    # 8 % 4 = 0 -> the first entry
    # other ids wrap by crc32
    assert profiles.profile("alice") == profiles.entries.entries[fedscale_client_id("alice") % 4]
    # a pickle of protocol 0 (text) reads the same
    path.write_bytes(pickle.dumps(_fedscale_capacity(4), protocol=0))
    assert load_profiles(path).profile("3") == p


def test_fedscale_capacity_as_json_and_per_user_tables(tmp_path):
    fs = tmp_path / "capacity.json"
    fs.write_text(json.dumps({str(k): v for k, v in _fedscale_capacity(2).items()}))
    assert load_profiles(fs).profile("5").seconds_per_sample == pytest.approx(0.06)   # 5 % 2 = 1 -> id 2
    table = tmp_path / "phones.json"
    table.write_text(json.dumps({"alice": {"ms_per_sample": 20, "downlink_kbps": 8000, "uplink_kbps": 2000,
                                           "latency_ms": 100},
                                 "bob": {"ms_per_sample": 5, "downlink_kbps": 1000, "uplink_kbps": 1000}}))
    t = load_profiles(table)
    assert t.profile("alice") == DeviceProfile(seconds_per_sample=0.02, downlink_bps=8e6, uplink_bps=2e6,
                                               latency_s=0.1)
    assert t.profile("bob").latency_s == 0
    with pytest.raises(DataError, match=r"phones.json: no entry for user 'carol'"):
        t.profile("carol")
    csv_path = tmp_path / "phones.csv"
    csv_path.write_text("user,ms_per_sample,downlink_kbps,uplink_kbps,latency_ms\n"
                        "alice,20,8000,2000,100\n\nbob,5,1000,1000,\n")
    c = load_profiles(csv_path)
    assert isinstance(c, FileProfiles)
    assert c.profile("alice") == t.profile("alice") and c.profile("bob") == t.profile("bob")
    with pytest.raises(DataError, match="no entry for user 'carol'"):
        c.profile("carol")


@pytest.mark.parametrize("content, message", [
    ({1: {"computation": -1.0, "communication": 5.0}}, r"entry '1': computation must be a finite number >= 0"),
    ({1: {"computation": 1.0, "communication": 0}}, r"entry '1': communication must be a finite number > 0"),
    ({1: {"computation": float("nan"), "communication": 5.0}}, r"computation must be a finite"),
    ({1: {"computation": float("inf"), "communication": 5.0}}, r"computation must be a finite"),
    ({1: {"computation": "fast", "communication": 5.0}}, r"computation must be a number, got str"),
    ({1: {"computation": True, "communication": 5.0}}, r"computation must be a number, got bool"),
    ({1: {"computation": 1.0, "communication": 5.0}, 2: {"computation": 1.0, "communication": 5.0, "gpu": 1}},
     r"entry '2': unknown field 'gpu'"),
    ({1: {"computation": 1.0, "communication": 5.0}, 2: {"computation": 1.0}},
     r"entry '2': missing field 'communication'"),
    ({1: [1.0, 5.0]}, r"entry '1': expected a mapping"),
    ({1: {"computation": 1.0, "communication": 5.0}, "1": {"computation": 1.0, "communication": 5.0}},
     r"entry '1' appears twice"),
    ({(1, 2): {"computation": 1.0, "communication": 5.0}}, r"neither a user id nor a client id"),
    ([{"computation": 1.0, "communication": 5.0}], r"expected a mapping of users"),
    ({}, r"no entries"),
])
def test_bad_profile_pickles_name_the_file_entry_and_field(tmp_path, content, message):
    path = tmp_path / "capacity.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=message) as e:
        load_profiles(path)
    assert str(path) in str(e.value)


def test_missing_table_fields_are_named(tmp_path):
    path = tmp_path / "phones.json"
    path.write_text(json.dumps({"alice": {"ms_per_sample": 1, "downlink_kbps": 1}}))
    with pytest.raises(DataError, match=r"phones.json, entry 'alice': missing field 'uplink_kbps'"):
        load_profiles(path)


@pytest.mark.parametrize("text, message", [
    ("user,ms_per_sample,downlink_kbps\nalice,1,1\n", r"line 1: missing column 'uplink_kbps'"),
    ("user,ms_per_sample,downlink_kbps,uplink_kbps,cpu\n", r"line 1: unknown column 'cpu'"),
    ("user,ms_per_sample,downlink_kbps,uplink_kbps\nalice,1,1,1\nbob,1,-2,1\n",
     r"line 3, user 'bob': downlink_kbps must be a finite number > 0"),
    ("user,ms_per_sample,downlink_kbps,uplink_kbps\nalice,fast,1,1\n", r"line 2, user 'alice': ms_per_sample must"),
    ("user,ms_per_sample,downlink_kbps,uplink_kbps\nalice,nan,1,1\n", r"line 2, user 'alice': ms_per_sample must"),
    ("user,ms_per_sample,downlink_kbps,uplink_kbps\nalice,1,1\n", r"line 2: 3 cells, the header has 4"),
    ("user,ms_per_sample,downlink_kbps,uplink_kbps\nalice,1,1,1\nalice,1,1,1\n", r"line 3: user 'alice' appears twice"),
    ("user,ms_per_sample,downlink_kbps,uplink_kbps\n", r"no users"),
    ("", r"line 1: missing column 'user'"),
])
def test_bad_profile_csv_names_the_line_user_and_field(tmp_path, text, message):
    path = tmp_path / "phones.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        load_profiles(path)
    assert str(path) in str(e.value)


def test_malformed_json_and_truncated_pickles_are_data_errors(tmp_path):
    path = tmp_path / "phones.json"
    path.write_text('{"alice": {"ms_per_sample": 1,')
    with pytest.raises(DataError, match="malformed JSON"):
        load_profiles(path)
    whole = pickle.dumps(_fedscale_capacity(50))
    for cut in (1, 2, len(whole) // 3, len(whole) - 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=f"cut{cut}.pkl: not a plain-data pickle"):
            load_profiles(path)
    path = tmp_path / "garbage"
    path.write_bytes(os.urandom(200))
    with pytest.raises(DataError, match="garbage"):
        load_profiles(path)
    with pytest.raises(DataError, match="cannot read"):
        load_profiles(tmp_path / "missing")


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_restricted_unpickler_runs_no_code(tmp_path):
    witness = tmp_path / "pwned"
    payload = pickle.dumps({1: {"computation": _Exploit(witness), "communication": 1.0}})
    assert b"system" in payload
    path = tmp_path / "client_device_capacity"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=r"client_device_capacity: not a plain-data pickle .*system"):
        load_profiles(path)
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(DataError, match="only dicts, lists, tuples, numbers and strings"):
            loads_plain_pickle(pickle.dumps(_Exploit(witness), protocol=protocol))
    assert not witness.exists()
    # classes and other globals are refused as well; plain data passes
    for value in (complex(1, 2), np.float64(1.0), DeviceProfile(seconds_per_sample=1, downlink_bps=1,
                                                                         uplink_bps=1)):
        with pytest.raises(DataError):
            loads_plain_pickle(pickle.dumps(value))
    plain = {"a": [1, 2.5, ("x", None, True)], 3: b"raw", "s": {1, 2}}
    assert loads_plain_pickle(pickle.dumps(plain)) == plain
    path.write_bytes(pickle.dumps(plain) + b"extra")
    with pytest.raises(DataError, match="5 bytes after the end"):
        load_plain_pickle(path)
