"""Importing LEAF Reddit data from a zip archive or a folder into the day layout."""
import json
import subprocess
import sys
import zipfile

import pytest

from flock.common.errors import DataError
from reader.leaf import LeafRedditReader
from reader.leaf_format import leaf_document
from reader.leaf_reddit import import_leaf_reddit
from tests.helpers import ROOT


def docs():
    train_a = leaf_document({"ann": [(1, "hello there".split())], "bob": [(1, "good day to you".split())]})
    train_b = leaf_document({"cid": [(2, "hello again".split())]})
    test = leaf_document({"ann": [(3, "hello you".split())]})
    return train_a, train_b, test


def test_import_zip_without_vocab_builds_one(tmp_path):
    train_a, train_b, test = docs()
    archive = tmp_path / "reddit_subsampled.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("reddit_subsampled/train/train_data_0.json", json.dumps(train_a))
        z.writestr("reddit_subsampled/train/train_data_1.json", json.dumps(train_b))
        z.writestr("reddit_subsampled/val/val_data.json", json.dumps(test))
        z.writestr("reddit_subsampled/test/test_data.json", json.dumps(test))
        z.writestr("__MACOSX/reddit_subsampled/train/._train_data_0.json", "junk")
    out = tmp_path / "lm_data"
    proc = subprocess.run([sys.executable, "-m", "reader.leaf_reddit", "import", str(archive), str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["train_users"] == 3 and summary["test_users"] == 1
    assert summary["skipped"] == ["reddit_subsampled/val/val_data.json"]
    # one output file per source file (one in memory at a time), read back as one split
    assert sorted(p.name for p in (out / "20200101").iterdir()) == ["train_data_00000.json", "train_data_00001.json"]
    assert sorted(p.name for p in (out / "20200102").iterdir()) == ["test_data_00000.json"]
    reader = LeafRedditReader(out)
    assert reader.days() == ["20200101", "20200102"]
    assert reader.index("20200101", "train").users == ("ann", "bob", "cid")
    vocab = reader.vocab
    assert vocab.size == 10_000 and "hello" in vocab.ids and "<BOS>" in vocab.ids
    sample = reader.load("20200102", "test", "ann")
    assert sample["x"][0, 1] == vocab.ids["hello"]


def test_import_folder_keeps_its_vocab_and_refuses_clashes(tmp_path):
    train_a, train_b, test = docs()
    src = tmp_path / "leaf"
    (src / "train").mkdir(parents=True)
    (src / "test").mkdir()
    (src / "train" / "a.json").write_text(json.dumps(train_a))
    (src / "test" / "t.json").write_text(json.dumps(test))
    vocab = {"vocab": {"<PAD>": 0, "<UNK>": 1, "hello": 2}, "size": 3, "pad_symbol": 0, "unk_symbol": 1}
    (src / "vocab.json").write_text(json.dumps(vocab))
    summary = import_leaf_reddit(src, tmp_path / "out")
    assert summary["vocab"] == "archive"
    assert json.loads((tmp_path / "out" / "vocab.json").read_text()) == vocab
    with pytest.raises(DataError, match="already exists"):
        import_leaf_reddit(src, tmp_path / "out")
    (src / "train" / "b.json").write_text(json.dumps(train_a))
    with pytest.raises(DataError, match="user 'ann' is in both train/a.json and train/b.json"):
        import_leaf_reddit(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
