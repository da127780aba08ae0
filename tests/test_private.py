"""Private per-user parameters: both data-server backends, and the shard keeping them on the rank."""
import numpy as np
import pytest
import torch

from flock.common.domain import ParamLayout
from model.base import private_names
from model.lstm import PersonalRedditLSTM, RedditLSTM
from simulator.data_server import MemoryStore, SQLiteStore
from simulator.shard import Shard
from trainer.base import TrainConfig
from trainer.lm import LanguageModelTrainer

SPEC = {"vocab_size": 8, "pad_id": 0, "unk_id": 1}


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryStore(tmp_path / "rank0-memory") if request.param == "memory" else SQLiteStore(tmp_path / "rank0.sqlite")
    yield s
    s.close()


class TestStore:
    def test_get_set_roundtrip(self, store):
        assert store.get_param_by_uid("ann") is None
        w = np.arange(6, dtype=np.float32).reshape(2, 3)
        store.set_param_by_uid("ann", {"head.w": w, "head.b": np.ones(2, dtype=np.float32)})
        w[0, 0] = 99                          # the store kept its own copy
        got = store.get_param_by_uid("ann")
        np.testing.assert_array_equal(got["head.w"], np.arange(6).reshape(2, 3))
        np.testing.assert_array_equal(got["head.b"], np.ones(2))
        store.set_param_by_uid("ann", {"head.w": np.zeros((2, 3)), "head.b": np.zeros(2)})
        assert len(store) == 1 and not store.get_param_by_uid("ann")["head.w"].any()

    def test_rollback_returns_to_a_committed_round(self, store):
        def put(round_index, uid, value):
            store.at_round(round_index)
            store.set_param_by_uid(uid, {"p": np.full(2, value, dtype=np.float32)})

        put(1, "ann", 1.0)
        store.commit(2)                 # checkpoint after round 2
        put(3, "ann", 3.0)
        put(3, "bob", 3.0)
        store.commit(4)                 # checkpoint after round 4 (the one after 2 must still be recoverable)
        put(5, "ann", 5.0)
        assert store.get_param_by_uid("ann")["p"][0] == 5.0
        store.rollback(4)
        assert store.get_param_by_uid("ann")["p"][0] == 3.0 and store.get_param_by_uid("bob") is not None
        store.rollback(2)
        assert store.get_param_by_uid("ann")["p"][0] == 1.0 and store.get_param_by_uid("bob") is None
        store.rollback(0)
        assert len(store) == 0

    def test_sqlite_prunes_as_a_full_scan_would(self, tmp_path):
        """The commit looks only at users written since the last prune; the rows it keeps must be exactly
        what pruning every user keeps (all versions after the previous commit, and each user's newest one
        at or before it), through random rounds, commits and rollbacks."""
        rng = np.random.default_rng(0)
        store = SQLiteStore(tmp_path / "r.sqlite")
        conn = store._conn()
        committed, history = [0], {}          # history: uid -> the rounds it was written in, not rolled back
        for round_index in range(1, 60):
            store.at_round(round_index)
            for uid in (f"u{i}" for i in rng.choice(30, size=5, replace=False)):
                store.set_param_by_uid(uid, {"p": np.full(2, round_index, dtype=np.float32)})
                history.setdefault(uid, []).append(round_index)
            if rng.random() < 0.4:
                before = committed[-1]
                store.commit(round_index)
                committed.append(round_index)
                for uid, rounds in history.items():
                    old = [r for r in rounds if r <= before]
                    history[uid] = [r for r in rounds if r > before] + ([max(old)] if old else [])
                want = {(uid, r) for uid, rounds in history.items() for r in rounds}
                assert set(conn.execute("SELECT uid, round FROM private").fetchall()) == want, round_index
            if rng.random() < 0.15 and len(committed) > 1:
                back = committed[-2] if rng.random() < 0.5 else committed[-1]
                store.rollback(back)
                committed = [c for c in committed if c <= back]
                history = {u: [r for r in rs if r <= back] for u, rs in history.items()}
                history = {u: rs for u, rs in history.items() if rs}
                for uid, rounds in history.items():
                    assert store.get_param_by_uid(uid)["p"][0] == max(rounds)
        assert len(committed) > 5
        store.close()

    def test_sqlite_survives_reopening(self, tmp_path):
        path = tmp_path / "r.sqlite"
        a = SQLiteStore(path)
        a.set_param_by_uid("u", {"p": np.full(3, 2.5, dtype=np.float32)})
        a.close()
        np.testing.assert_array_equal(SQLiteStore(path).get_param_by_uid("u")["p"], [2.5, 2.5, 2.5])


def test_private_names_from_model_and_option():
    model = RedditLSTM(8, embed_dim=4, hidden=4, layers=1)
    assert private_names(model) == ()
    assert private_names(model, ["decoder.*"]) == ("decoder.weight", "decoder.bias")


def test_shard_keeps_private_params_per_user_and_out_of_the_update(store):
    torch.manual_seed(0)
    model = RedditLSTM(8, embed_dim=4, hidden=4, layers=1)
    private = private_names(model, ["decoder.bias"])
    named = dict(model.named_parameters())
    shared = [n for n in named if n not in private]
    layout = ParamLayout(names=tuple(shared), shapes=tuple(tuple(named[n].shape) for n in shared))
    assert "decoder.bias" not in layout.names
    init = {n: named[n].detach().numpy().copy() for n in private}
    shard = Shard(model, LanguageModelTrainer(TrainConfig(), SPEC), layout, private, store, init)
    glob = layout.flatten({n: named[n].detach().numpy() for n in shared})
    shard.set_global(glob)

    def samples(seed):
        x = np.random.default_rng(seed).integers(2, 8, size=(6, 10)).astype(np.int32)
        return {"x": x, "y": x, "mask": np.ones_like(x, dtype=np.uint8)}

    shard.train_user("ann", samples(1))
    shard.train_user("bob", samples(2))
    ann, bob = store.get_param_by_uid("ann"), store.get_param_by_uid("bob")
    assert set(ann) == {"decoder.bias"}
    assert not np.allclose(ann["decoder.bias"], init["decoder.bias"])
    assert not np.allclose(ann["decoder.bias"], bob["decoder.bias"])      # each user its own copy
    assert shard.sum.total.numel() == layout.size                      # the update holds shared params only
    # the rank's update, sum n_k (theta_k - theta), against a hand computation with fresh models
    expected = torch.zeros(layout.size, dtype=torch.float64)
    for seed in (1, 2):             # ann trained on samples(1), bob on samples(2)
        torch.manual_seed(0)
        ref = RedditLSTM(8, embed_dim=4, hidden=4, layers=1)
        n = LanguageModelTrainer(TrainConfig(), SPEC).train(ref, samples(seed))["samples"]
        ref_named = dict(ref.named_parameters())
        theta_k = torch.cat([ref_named[name].detach().reshape(-1) for name in layout.names])
        expected += n * (theta_k.double() - torch.from_numpy(glob).double())
    weight, weighted_sum = shard.contribution()
    got = weighted_sum - weight * torch.from_numpy(glob).double()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # bob started from the global params and the initial private values, not from ann's training
    torch.manual_seed(0)
    fresh = RedditLSTM(8, embed_dim=4, hidden=4, layers=1)
    LanguageModelTrainer(TrainConfig(), SPEC).train(fresh, samples(2))
    np.testing.assert_allclose(bob["decoder.bias"], fresh.decoder.bias.detach().numpy(), rtol=1e-6)
    # evaluation reads the user's own private values back
    shard.evaluate_user("ann", samples(1))
    np.testing.assert_array_equal(model.decoder.bias.detach().numpy(), ann["decoder.bias"])


def test_a_diverged_user_is_dropped_not_averaged():
    class Exploding(LanguageModelTrainer):
        def train(self, model, samples, rng=None):
            out = super().train(model, samples, rng)
            with torch.no_grad():
                model.decoder.weight.fill_(float("nan"))
            return out

    torch.manual_seed(0)
    model = RedditLSTM(8, embed_dim=4, hidden=4, layers=1)
    named = dict(model.named_parameters())
    layout = ParamLayout(names=tuple(named), shapes=tuple(tuple(p.shape) for p in named.values()))
    shard = Shard(model, Exploding(TrainConfig(), SPEC), layout, (), MemoryStore(), {})
    shard.set_global(layout.flatten({n: p.detach().numpy() for n, p in named.items()}))
    x = np.full((2, 10), 3, dtype=np.int32)
    assert shard.train_user("ann", {"x": x, "y": x, "mask": np.ones_like(x, dtype=np.uint8)}) == {"diverged": 1.0}
    assert shard.sum.weight == 0 and not shard.sum.total.any()


def test_the_personal_lstm_adds_a_private_vector_to_the_shared_lstm():
    torch.manual_seed(0)
    plain = RedditLSTM(8)
    torch.manual_seed(0)
    personal = PersonalRedditLSTM(8)
    assert private_names(personal) == ("personal",) and personal.personal.shape == (256,)
    shared = {n: p for n, p in personal.named_parameters() if n != "personal"}
    assert all(torch.equal(p, shared[n]) for n, p in plain.named_parameters())   # the same initial model
    tokens = torch.tensor([[2, 3, 4]])
    assert torch.equal(plain(tokens)[0], personal(tokens)[0])          # zero: no user-specific shift yet
    with torch.no_grad():
        personal.personal.fill_(0.5)
    assert not torch.allclose(plain(tokens)[0], personal(tokens)[0])
