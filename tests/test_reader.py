"""The LEAF Reddit reader, the vocabulary and LEAF's sequence cutting, on small files written here."""
import json

import numpy as np
import pytest

from flock.common.errors import DataError
from reader.leaf import LeafRedditReader
from reader.leaf_format import leaf_sequences, write_day
from reader.vocab import build_vocab, load_vocab, save_json_atomic


def test_leaf_sequences_match_leaf_preprocessing():
    x, y, c = leaf_sequences("a b c d e f g h i j k".split())
    assert x == [["<BOS>", "a", "b", "c", "d", "e", "f", "g", "h", "i"],
                 ["j", "k", "<EOS>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>"]]
    assert y == [["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"],
                 ["k", "<EOS>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>", "<PAD>"]]
    assert c == [[1] * 10, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    x, _, _ = leaf_sequences("a b c d e f g h".split())      # exactly 10 with BOS and EOS: no padding
    assert len(x) == 1 and x[0][-1] == "<EOS>"


@pytest.fixture()
def data(tmp_path):
    write_day(tmp_path, "20200101", "train", {"ann": [(1, "a b".split()), (2, "c a b c d e f g h i j".split())],
                                              "bob": [(1, "z".split())]})
    write_day(tmp_path, "20200102", "test", {"ann": [(3, "a".split())]})
    save_json_atomic(tmp_path / "vocab.json", build_vocab("a b c <BOS> <EOS> a a b".split(), 8))
    return tmp_path


def test_index_and_load(data):
    r = LeafRedditReader(data)
    assert r.days() == ["20200101", "20200102"]
    idx = r.index("20200101", "train")
    assert idx.users == ("ann", "bob") and list(idx.counts) == [3, 1]
    v = r.vocab
    s = r.load("20200101", "train", "ann")
    assert s["x"].shape == (3, 10) and s["x"].dtype == np.int32
    assert s["x"][0, :4].tolist() == [v.ids["<BOS>"], v.ids["a"], v.ids["b"], v.ids["<EOS>"]]
    assert s["y"][0, :4].tolist() == [v.ids["a"], v.ids["b"], v.ids["<EOS>"], v.pad_id]
    assert s["x"][1, 5] == v.unk_id                       # "d" is not in the vocabulary
    assert s["mask"][0].tolist() == [1, 1, 1, 1] + [0] * 6
    assert {k: v for k, v in r.spec().items() if k != "vocab_digest"} == {"vocab_size": 8, "pad_id": 0, "unk_id": 1}
    with pytest.raises(DataError, match="no user 'eve'"):
        r.load("20200101", "train", "eve")


def test_cache_follows_the_file(data):
    r = LeafRedditReader(data)
    assert list(r.index("20200101", "train").counts) == [3, 1]
    write_day(data, "20200101", "train", {"cat": [(1, "a".split())]})
    assert LeafRedditReader(data).index("20200101", "train").users == ("cat",)
    assert len(list((data / ".flock_cache" / "20200101").iterdir())) == 1   # the stale cache is gone


@pytest.mark.parametrize("content, message", [
    ('{"users": ["a"], "user_data": {"a": {"x": [[["w"]]]', "not valid JSON"),
    ('[1, 2]', "expected a LEAF object"),
    ('{"users": ["a"], "user_data": {}}', "user 'a' is listed in 'users' but has no user_data"),
    ('{"users": ["a"], "user_data": {"a": {"x": [[["w", "w"]]], "y": []}}}', "1 comments in 'x' but 0 labels"),
    ('{"users": ["a"], "user_data": {"a": {"x": [[["w", "w"]]], "y": [{"target_tokens": [["w"]]}]}}}',
     "sequence 0 is not 2 tokens"),
    ('{"users": ["a"], "user_data": {"a": {"x": [[[1, 2]]], "y": [{"target_tokens": [[1, 2]]}]}}}',
     "tokens must be strings"),
])
def test_malformed_files_name_the_file_and_user(data, content, message):
    path = data / "20200101" / "train_data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        LeafRedditReader(data).index("20200101", "train")
    assert str(path) in str(info.value)


def test_vocab_errors(tmp_path):
    with pytest.raises(DataError, match="vocabulary file not found"):
        load_vocab(tmp_path / "vocab.json")
    (tmp_path / "vocab.json").write_text(json.dumps({"vocab": {"<PAD>": 0, "<UNK>": 1, "a": 5}, "size": 4,
                                                     "pad_symbol": 0, "unk_symbol": 1}))
    with pytest.raises(DataError, match="size 4 is not above the largest id 5"):
        load_vocab(tmp_path / "vocab.json")


def test_build_vocab_orders_by_frequency():
    doc = build_vocab("b a a c c c".split(), 4)
    assert doc["vocab"] == {"<PAD>": 0, "<UNK>": 1, "c": 2, "a": 3}


def test_a_files_users_are_checked_in_one_pass_over_them():
    """A LEAF file's 'users' list is turned into a set once, not once per user (bench/scale.py's cache build of
    100,000 users in files of 50,000 took 302 s that way, 20 s once fixed). Counted, not timed: iterations
    over 'users'."""
    from reader.leaf_format import leaf_users

    class Counted(list):
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    users = Counted(f"u{i}" for i in range(500))
    doc = {"users": users, "num_samples": [1] * 500, "user_data": {u: {"x": [[1]], "y": [{}]} for u in users}}
    Counted.passes = 0
    assert leaf_users(doc, "f.json") == users
    assert Counted.passes <= 5
