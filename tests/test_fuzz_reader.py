"""Fuzzing the LEAF reader: a mutated file either loads or raises the project's DataError, nothing else."""
import copy
import json
import random
import shutil

import pytest

from flock.common.errors import DataError
from reader.leaf import LeafRedditReader
from tests.helpers import make_lm_data

ODD_VALUES = [None, 0, -1, 1.5, "", "w1", [], {}, [[]], [["w1"]], {"x": []}, True]


def mutate_structure(doc, rng: random.Random):
    """Replaces or deletes one random node of the JSON tree."""
    doc = copy.deepcopy(doc)
    parent, key, node = None, None, doc
    for _ in range(rng.randint(1, 7)):
        if isinstance(node, dict) and node:
            parent, key = node, rng.choice(list(node))
        elif isinstance(node, list) and node:
            parent, key = node, rng.randrange(len(node))
        else:
            break
        node = parent[key]
    if parent is None:
        return rng.choice(ODD_VALUES)
    if rng.random() < 0.3 and isinstance(parent, dict):
        del parent[key]
    else:
        parent[key] = rng.choice(ODD_VALUES)
    return doc


def mutate_bytes(text: str, rng: random.Random) -> bytes:
    data = bytearray(text.encode())
    choice = rng.random()
    if choice < 0.4:
        return bytes(data[:rng.randrange(len(data))])                  # truncated, as by a crash
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice(b'{}[]",:0a\\\xff ')
    return bytes(data)


def load_everything(data_dir):
    reader = LeafRedditReader(data_dir)
    idx = reader.index("20200101", "train")
    for uid in idx.users:
        reader.load("20200101", "train", uid)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_files_load_or_raise_data_error(tmp_path, seed):
    base = make_lm_data(tmp_path / "base", users=3)
    path = base / "20200101" / "train_data.json"
    original = json.loads(path.read_text())
    rng = random.Random(seed)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(60):
        content = (json.dumps(mutate_structure(original, rng)).encode() if i % 2 else
                   mutate_bytes(json.dumps(original), rng))
        path.write_bytes(content)
        shutil.rmtree(base / ".flock_cache", ignore_errors=True)
        try:
            load_everything(base)
            outcomes["loaded"] += 1
        except DataError as e:
            assert "train_data.json" in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0
