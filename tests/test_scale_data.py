"""Reddit-sized data: the seeded generator, days in several LEAF files, and the compact user table."""
import json
import sys

import numpy as np
import pytest

from common.errors import DataError
from reader import base
from reader.base import DayIndex
from reader.leaf import LeafRedditReader
from reader.leaf_format import leaf_document, leaf_sequences, write_day
from reader.users import UserIds
from reader.vocab import build_vocab, save_json_atomic
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import reddit_scale_data  # noqa: E402


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.json"))
            if p.name != "GENERATED.json"}


def test_the_generator_is_reproducible_from_its_seed(tmp_path):
    a = reddit_scale_data.generate(tmp_path / "a", users=300, users_per_file=120, seed=3, progress=False)
    reddit_scale_data.generate(tmp_path / "b", users=300, users_per_file=120, seed=3, progress=False)
    reddit_scale_data.generate(tmp_path / "c", users=300, users_per_file=120, seed=4, progress=False)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert files_of(tmp_path / "a") != files_of(tmp_path / "c")
    assert sorted(files_of(tmp_path / "a")) == ["20200101/train_data_00000.json", "20200101/train_data_00001.json",
                                                 "20200101/train_data_00002.json", "20200102/test_data_00000.json",
                                                 "20200102/test_data_00001.json", "20200102/test_data_00002.json",
                                                 "vocab.json"]
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text())
    assert vocab["size"] == len(vocab["vocab"]) == 10_000
    assert a["users"] == 300 and a["days"]["20200101"]["comments"] >= 300


def test_the_generator_cuts_comments_as_leaf_does(tmp_path):
    reddit_scale_data.generate(tmp_path / "d", users=50, seed=1, progress=False)
    doc = json.loads((tmp_path / "d" / "20200101" / "train_data_00000.json").read_text())
    assert len(doc["users"]) == len(set(doc["users"])) == 50 and doc["users"] != sorted(doc["users"])
    comments = 0
    for uid, n in zip(doc["users"], doc["num_samples"]):
        user = doc["user_data"][uid]
        assert len(user["x"]) == len(user["y"]) == n >= 1
        for x, y in zip(user["x"], user["y"]):
            tokens = [t for seq in x for t in seq if t not in ("<BOS>", "<EOS>", "<PAD>")]
            want_x, want_y, want_c = leaf_sequences(tokens)
            assert (x, y["target_tokens"], y["count_tokens"]) == (want_x, want_y, want_c)
            comments += 1
    assert comments == sum(doc["num_samples"])


@pytest.fixture()
def split_data(tmp_path):
    """The same users once in one train_data.json and once over three files."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    users = {f"user{i:03d}": [(t, [words[j] for j in rng.integers(0, 30, size=rng.integers(1, 25))])
                              for t in range(int(rng.integers(0, 4)))] for i in range(40)}
    users["é-üser"] = [(0, ["w1", "w2"])]
    save_json_atomic(tmp_path / "vocab.json", build_vocab(words[:20] + ["<BOS>", "<EOS>"], 24))
    one, many = tmp_path / "one", tmp_path / "many"
    for folder in (one, many):
        folder.mkdir()
        (folder / "vocab.json").write_bytes((tmp_path / "vocab.json").read_bytes())
        write_day(folder, "20200102", "test", {"user000": [(0, ["w3"])]})
    write_day(one, "20200101", "train", users)
    names = list(users)
    (many / "20200101").mkdir()
    for part, cut in enumerate((names[:10], names[10:11], names[11:])):
        save_json_atomic(many / "20200101" / f"train_data_{part:05d}.json", leaf_document({u: users[u] for u in cut}))
    return one, many


def test_a_day_in_several_files_reads_as_one(split_data):
    one, many = (LeafRedditReader(p) for p in split_data)
    many.prepare()
    a, b = one.index("20200101", "train"), many.index("20200101", "train")
    assert list(a.users) == list(b.users) and list(a.counts) == list(b.counts)
    assert 0 in list(b.counts)                  # users without comments are listed with 0 samples
    for uid in a.users:
        for key, value in one.load("20200101", "train", uid).items():
            assert np.array_equal(value, many.load("20200101", "train", uid)[key])
    with pytest.raises(DataError, match=r"train_data\*\.json \(3 files\): no user 'nobody'"):
        many.load("20200101", "train", "nobody")
    assert many.days() == ["20200101", "20200102"]


def test_a_user_in_two_files_is_refused(split_data):
    many = split_data[1]
    save_json_atomic(many / "20200101" / "train_data_00003.json", leaf_document({"user005": [(0, ["w1"])]}))
    with pytest.raises(DataError, match="user 'user005' is in more than one file"):
        LeafRedditReader(many).index("20200101", "train")


def test_the_user_table_finds_every_user_and_only_them():
    names = ["bob", "ann", "é-üser", "t2_ff", "a", "annabel"]
    table = UserIds.from_list(names)
    assert list(table) == names and table[2] == "é-üser" and table[1:3] == ["ann", "é-üser"]
    assert [table.position(u) for u in names] == list(range(len(names)))
    for missing in ("", "an", "annabelle", "b", "bobby", "z" * 40):
        assert table.position(missing) is None and missing not in table
    assert table == names and table != names[:-1]
    index = DayIndex(day="d", split="train", users=table, counts=np.array([2, 0, 1, 3, 0, 1]))
    counts = index.count_of()
    assert dict(counts) == {"bob": 2, "ann": 0, "é-üser": 1, "t2_ff": 3, "a": 0, "annabel": 1}
    with pytest.raises(KeyError):
        counts["carl"]
    assert list(index.with_samples()) == ["bob", "é-üser", "t2_ff", "annabel"]
    assert index.with_samples()[1] == "é-üser" and len(index.with_samples()) == 4


@pytest.mark.parametrize("users", [(), ("a",), ("a", "b", "c"), tuple(f"u{i}" for i in range(7))])
def test_index_text_for_digests_is_json_dumps_piece_by_piece(monkeypatch, users):
    monkeypatch.setattr(base, "CHUNK", 2)       # pieces at every second user
    counts = tuple(range(len(users)))
    want = json.dumps(["20200101", "train", list(users), list(counts)])
    for table in (users, UserIds.from_list(users) if users else users):
        index = DayIndex(day="20200101", split="train", users=table, counts=np.array(counts, dtype=np.int64))
        assert "".join(index.json_chunks()) == want
