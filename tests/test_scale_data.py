"""Reddit-sized data: the seeded generator, days in several LEAF files, and the compact user table."""
import json
import sys

import numpy as np
import pytest

from flock.common.errors import DataError
from reader import base
from reader.base import DayIndex
from reader.leaf import LeafRedditReader
from reader.leaf_format import leaf_document, leaf_sequences, write_day
from reader.users import UserIds, counts_for
from reader.vocab import build_vocab, save_json_atomic
from simulator.data_server import SQLiteStore
from tests.helpers import ROOT, read_metrics, run_app

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


def test_a_cohort_is_looked_up_at_once():
    table = UserIds.from_list(["bob", "ann", "é-üser", "t2_ff"])
    assert table.positions(["t2_ff", "zed", "ann", "", "bob" * 9, "é-üser"]).tolist() == [3, -1, 1, -1, -1, 2]
    counts = DayIndex(day="d", split="train", users=table, counts=np.array([5, 0, 7, 1])).count_of()
    assert counts_for(counts, ["é-üser", "bob", "ann"]) == [7, 5, 0] == [counts[u] for u in ["é-üser", "bob", "ann"]]
    with pytest.raises(KeyError, match="carl"):
        counts_for(counts, ["bob", "carl"])
    assert counts_for({"a": 1, "b": 2}, ["b", "a"]) == [2, 1]


class TupleReader:
    """The same reader, its indexes as plain tuples (what readers of small data give)."""

    def __init__(self, reader: LeafRedditReader) -> None:
        self.inner = reader

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def index(self, day: str, split: str) -> DayIndex:
        idx = self.inner.index(day, split)
        return DayIndex(day=day, split=split, users=tuple(idx.users), counts=tuple(int(c) for c in idx.counts))


@pytest.mark.parametrize("phones", [False, True])
def test_the_scheduler_plans_alike_from_the_compact_table_and_from_tuples(tmp_path, phones):
    """Plans, the evaluation subset and the checkpoint's data digest must not depend on how the index is
    held: runs and checkpoints stay what they were before the compact table."""
    from flock.common.config import Config
    from flock.common.domain import ParamLayout
    from flock.run import phone_rounds
    from scheduler.optim import make_server_optimizer
    from scheduler.rounds import Synchronous
    from scheduler.state import Scheduler, SchedulerConfig

    data = tmp_path / "d"
    reddit_scale_data.generate(data, users=2000, users_per_file=700, seed=2, progress=False)
    reader = LeafRedditReader(data)
    rounds = 4
    plans = []
    for source in (reader, TupleReader(reader)):
        extra = Config(data_dir=str(data), device_profiles="builtin", availability="round:0.5") if phones else None
        s = Scheduler(SchedulerConfig(world_size=2, rounds=rounds, clients_per_round=50, eval_every=2, eval_users=30,
                                      pin_users=True), reader=source,
                      optimizer=make_server_optimizer("fedavg", server_lr=1.0), train_ratios={}, eval_ratios={},
                      rounds=Synchronous(phone_rounds(extra) if phones else None))
        s.init_params(ParamLayout(names=("w",), shapes=((3,),)), np.zeros(3, dtype=np.float32))
        plans.append(([s._make_plans(step) for step in range(len(s.steps))], s.data_fingerprint))
    assert plans[0] == plans[1]
    trained = {u for step in plans[0][0] for plan in step if plan.kind == "train" for u in plan.users}
    assert len(trained) >= 150 and all(isinstance(u, str) for u in trained)


@pytest.mark.mpi
def test_generated_data_with_private_vectors_gives_the_same_metrics_at_any_number_of_ranks(tmp_path):
    data = tmp_path / "d"
    reddit_scale_data.generate(data, users=2000, users_per_file=700, seed=1, progress=False)
    args = ("--model", "lstm-personal", "--data-server", "sqlite", "--rounds", "2", "--clients-per-round", "6",
            "--eval-users", "12", "--eval-every", "1", "--seed", "3")
    runs = []
    for np_ in (1, 2):
        proc = run_app(np_, data, tmp_path / f"np{np_}", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs.append(read_metrics(tmp_path / f"np{np_}"))
    assert [(r["kind"], r["round"]) for r in runs[0]] == [("train", 1), ("eval", 1), ("train", 2), ("eval", 2)]
    for a, b in zip(*runs):
        for key in ("loss", "samples", "top1", "top1_user_mean", "users"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["kind"], a["round"], key)
    stored = sum(SQLiteStore(tmp_path / "np2" / "private" / f"rank{r}.sqlite").__len__() for r in range(2))
    assert stored == 12          # every user who trained keeps its vector, on its home rank
