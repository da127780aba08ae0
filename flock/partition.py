"""Your own labelled arrays, partitioned over simulated users in flock's `arrays` layout.

    python -m flock.partition IN.npz OUT_DIR --scheme dirichlet --alpha 0.5 --users 20 --test-fraction 0.2
    mpirun -np 2 python application.py OUT_DIR --reader arrays --model cnn --trainer classifier ...

IN is an .npz with arrays `x` (samples, sample axis first: (n, ...), any numeric dtype) and `y` (n integer
labels, 0 or more), or a folder with x.npy and y.npy. Labels go up to 99,999; K = the largest + 1 classes.

Schemes (reader/partitioners.py has the exact rules and where they differ from Flower Datasets):
  iid           a uniform permutation cut into --users runs; sizes by --sizes:
                  constant        n // users each (the first n % users one more),
                  lognormal:SIGMA weights w ~ LogNormal(0, SIGMA),
                  powerlaw:A      weights w = 1 + numpy pareto(A) (Pareto I, x_m = 1, density A w^-(A+1)),
                with weights every user gets 1 sample plus its share of the other n - users, cut at
                floor((n - users) x cumulative weight share);
  dirichlet     Flower's DirichletPartitioner: per label, Dir(--alpha) proportions over users;
                --min-partition-size (default 10, Flower's) redraws (at most 11 draws) until every user
                has that many samples; --self-balancing gives no more of a label to users above n / users;
  pathological  Flower's PathologicalPartitioner: --num-classes-per-partition labels per user, chosen by
                --class-assignment-mode random|deterministic|first-deterministic, each label's samples
                split evenly over its users (a label no user got is left out: partition.json "unassigned");
  shards        McMahan et al.: sorted by label, 2 x users shards, 2 random shards per user.
Then each user's own samples are split: round(--test-fraction x size) of them (half up, at most size - 1),
drawn uniformly, are its test samples (min sizes count before this split). All draws come from one
generator seeded by --seed (flock/common/streams.py `partition`): same input and options, same files, bitwise.

OUT_DIR (new; written beside it as .OUT_DIR.partitioning<pid> and renamed into place, removed on failure):
  meta.json                     num_classes, input_shape, mean and std (the normalisation the classifier
                                trainer applies: computed from the training split, one value per channel
                                for (C, H, W) samples and one value otherwise, uint8 samples in units of
                                1/255; or --mean/--std; none with --no-normalisation), and the options
  20200101/train_data/, 20200102/test_data/   the arrays layout (reader/arrays.py); uint8 x stays uint8,
                                other dtypes are written as float32
  partition.json                {"users": {uid: {label: count}}} of the training split, "test_users" the
                                same for the test split, "sizes" {"train"|"test": {uid: n}}, the scheme and
                                its parameters, seed, test fraction, source, samples, "unassigned"
  partition.png                 with --plot: each user's label mix (the first 200 users)
Every option is checked first; a bad option or input prints one `error: ...` line and exits with status 2,
leaving nothing behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flock.common import streams
from flock.common.config import _flag, _number, _Parser, check_value, opt
from flock.common.errors import ConfigError, DataError, FlockError
from reader import partitioners
from reader.arrays import write_columns
from reader.partitioners import CLASS_ASSIGNMENT_MODES, Partition

TRAIN_DAY, TEST_DAY = "20200101", "20200102"
SCHEMES = ("iid", "dirichlet", "pathological", "shards")
MAX_USERS = 10_000_000
MAX_LABEL = 99_999
MAX_PLOTTED_USERS = 200
CHUNK_BYTES = 1 << 25       # checks and statistics read x in pieces of about this size
# which options each scheme reads (others must keep their defaults)
SCHEME_OPTIONS = {"iid": ("sizes",), "dirichlet": ("alpha", "min_partition_size", "self_balancing"),
                  "pathological": ("num_classes_per_partition", "class_assignment_mode"), "shards": ()}
SIZE_LAW_RANGES = {"lognormal": (0.0, 10.0), "powerlaw": (0.1, 100.0)}     # SIGMA in (0, 10], A in [0.1, 100]


@dataclass(frozen=True)
class PartitionConfig:
    """The command line's options, checked by flock's one rule set (flock/common/config.py: type, finite, range,
    choices) and against each other; a ConfigError names the option."""

    source: str = opt("", "an .npz with arrays x and y, or a folder with x.npy and y.npy")
    out_dir: str = opt("", "the new data folder (must not exist)")
    scheme: str = opt("iid", "how samples go to users", choices=SCHEMES)
    users: int = opt(100, "number of users", lo=1, hi=MAX_USERS)
    alpha: float = opt(0.5, "dirichlet: concentration of the per-label proportions (smaller: more skewed)",
                       lo=1e-6, hi=1e6)
    min_partition_size: int = opt(10, "dirichlet: redraw until every user has at least this many samples "
                                  "(before the test split)", lo=0, hi=2**40)
    self_balancing: bool = opt(False, "dirichlet: give no more of a label to users already above n / users")
    num_classes_per_partition: int = opt(2, "pathological: labels per user", lo=1, hi=MAX_LABEL + 1)
    class_assignment_mode: str = opt("random", "pathological: how labels are chosen per user",
                                     choices=CLASS_ASSIGNMENT_MODES)
    sizes: str = opt("constant", "iid: per-user sizes, constant, lognormal:SIGMA (0 < SIGMA <= 10) or "
                     "powerlaw:A (0.1 <= A <= 100)")
    test_fraction: float = opt(0.2, "each user's share of its own samples held out as its test samples",
                               lo=0, hi=1, lo_open=True, hi_open=True)
    seed: int = opt(0, "seeds every draw: same seed, same partition", lo=0, hi=2**63 - 1)
    mean: str = opt("", "normalisation mean, one number or one per channel (comma-separated); with --std")
    std: str = opt("", "normalisation std, as --mean (positive)")
    no_normalisation: bool = opt(False, "write no mean/std: the trainer gets the inputs as they are "
                                 "(uint8 / 255)")
    plot: bool = opt(False, "also draw each user's label mix into OUT_DIR/partition.png")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name))
        if not self.source or not self.out_dir:
            raise ConfigError("IN and OUT_DIR are required")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        foreign = [_flag(name) for scheme, names in SCHEME_OPTIONS.items() if scheme != self.scheme
                   for name in names if getattr(self, name) != defaults[name]]
        if foreign:
            own = ", ".join(_flag(n) for n in SCHEME_OPTIONS[self.scheme])
            raise ConfigError(f"--scheme {self.scheme} takes no {', '.join(foreign)}"
                              + (f" (its own: {own})" if own else ""))
        self.size_law()
        if bool(self.mean) != bool(self.std):
            raise ConfigError("--mean and --std go together")
        if self.mean and self.no_normalisation:
            raise ConfigError("--mean/--std and --no-normalisation exclude each other")
        for name in ("mean", "std"):
            if getattr(self, name):
                self.given_scale(name)
        if self.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ConfigError("--plot needs matplotlib (./install.sh installs it)") from None

    def size_law(self) -> tuple[str, float]:
        """--sizes as (law, parameter)."""
        law, _, param = self.sizes.partition(":")
        if law == "constant" and not param:
            return law, 0.0
        if law not in SIZE_LAW_RANGES or not param:
            raise ConfigError(f"--sizes {self.sizes!r}: constant, lognormal:SIGMA or powerlaw:A")
        value = _finite(param, "--sizes")
        lo, hi = SIZE_LAW_RANGES[law]
        if not (lo < value <= hi if law == "lognormal" else lo <= value <= hi):
            raise ConfigError(f"--sizes {self.sizes}: {'SIGMA' if law == 'lognormal' else 'A'} must be in "
                              f"{'(' if law == 'lognormal' else '['}{lo:g}, {hi:g}]")
        return law, value

    def given_scale(self, name: str) -> list[float]:
        """--mean or --std as numbers (at most MAX_LABEL of them: channels, not samples)."""
        parts = getattr(self, name).split(",")
        if len(parts) > MAX_LABEL:
            raise ConfigError(f"--{name}: {len(parts)} values is more than any channel count")
        values = [_finite(p, f"--{name}") for p in parts]
        if name == "std" and min(values) <= 0:
            raise ConfigError(f"--std must be positive, got {self.std!r}")
        return values

    def parameters(self) -> dict[str, Any]:
        """The scheme's own options, by their Flower Datasets names."""
        return {name: getattr(self, name) for name in SCHEME_OPTIONS[self.scheme]}


def _finite(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a number") from None
    if not np.isfinite(value):
        raise ConfigError(f"{flag}: {text!r} is not finite")
    return value


# --- reading and checking the input ---------------------------------------------------------------------

_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_labelled(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz or a folder of x.npy / y.npy, checked; a DataError names the file and the fault."""
    if source.is_dir():
        arrays = {}
        for name in ("x", "y"):
            path = source / f"{name}.npy"
            if not path.is_file():
                raise DataError(f"{path}: not found (a folder input holds x.npy and y.npy)")
            try:
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            except _UNREADABLE as e:
                raise DataError(f"{path}: truncated, or not NumPy arrays ({e})") from None
        x, y, where = arrays["x"], arrays["y"], str(source)
    elif source.is_file():
        if source.suffix != ".npz":
            raise DataError(f"{source}: not an .npz file (give np.savez(path, x=..., y=...), or a folder with "
                            f"x.npy and y.npy)")
        try:
            with np.load(source, allow_pickle=False) as archive:
                missing = [k for k in ("x", "y") if k not in archive.files]
                if missing:
                    raise DataError(f"{source}: no array {' or '.join(repr(k) for k in missing)} (it has "
                                    f"{', '.join(archive.files) or 'none'}); save with np.savez(path, x=..., y=...)")
                x, y = archive["x"], archive["y"]
        except _UNREADABLE as e:
            raise DataError(f"{source}: truncated, or not NumPy arrays ({e})") from None
        where = str(source)
    else:
        raise DataError(f"{source}: not found")
    check_labelled(x, y, where)
    return x, y


def check_labelled(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels y have dtype {y.dtype}; they must be integers (y.astype(np.int64))")
    if y.ndim != 1:
        raise DataError(f"{where}: labels y have shape {y.shape}; they must be one per sample, shape (n,)")
    if x.dtype.kind not in "buif":
        raise DataError(f"{where}: samples x have dtype {x.dtype}; they must be numbers")
    if x.ndim < 2:
        raise DataError(f"{where}: samples x have shape {x.shape}; the sample axis comes first, then at least "
                        f"one more: (n, features) or (n, channels, height, width)")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} samples in x but {len(y)} labels in y")
    if len(y) == 0:
        raise DataError(f"{where}: empty (no samples)")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high > MAX_LABEL:
        raise DataError(f"{where}: labels must be in 0..{MAX_LABEL}, found {low if low < 0 else high}")
    if x.dtype.kind == "f":
        for start, piece in _pieces(x):
            bad = ~np.isfinite(piece.reshape(len(piece), -1)).all(axis=1)
            if bad.any():
                raise DataError(f"{where}: x has NaN or infinite values (first in sample {start + int(np.argmax(bad))})")
            if piece.dtype.itemsize > 4 and np.abs(piece).max() > np.finfo(np.float32).max:
                raise DataError(f"{where}: x has values beyond float32's range (flock stores float32)")


def _pieces(x: np.ndarray):
    """(start, x[start:start + step]) in pieces of about CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(1, x[:1].nbytes))
    for start in range(0, len(x), step):
        yield start, x[start:start + step]


def stored(x: np.ndarray) -> np.ndarray:
    """uint8 stays uint8 (the trainer divides by 255); everything else becomes float32."""
    return x if x.dtype == np.uint8 else x.astype(np.float32)


# --- normalisation ----------------------------------------------------------------------------------------

def computed_scale(x: np.ndarray) -> tuple[float | list[float], float | list[float]]:
    """Mean and (population) std of the training samples as the trainer sees them (uint8 / 255), in float64,
    per channel (axis 1) when samples are (C, H, W), else over everything."""
    per_channel = x.ndim == 4
    axes = (0, 2, 3) if per_channel else None
    factor = 1 / 255 if x.dtype == np.uint8 else 1.0
    count = len(x) * (x[0].size // x.shape[1] if per_channel else x[0].size)
    total = sum(np.sum(p.astype(np.float64) * factor, axis=axes) for _, p in _pieces(x))
    mean = total / count
    centre = mean.reshape(1, -1, 1, 1) if per_channel else mean
    squares = sum(np.sum(np.square(p.astype(np.float64) * factor - centre), axis=axes) for _, p in _pieces(x))
    std = np.sqrt(squares / count)
    if np.min(std) <= 0:
        raise DataError("the training samples are constant" + (" in a channel" if per_channel else "")
                        + ": their std is 0; give --mean/--std or --no-normalisation")
    if per_channel:
        return [float(v) for v in mean], [float(v) for v in std]
    return float(mean), float(std)


def _scale_for(config: PartitionConfig, x_train: np.ndarray) -> dict[str, Any]:
    if config.no_normalisation:
        return {}
    if config.mean:
        mean, std = config.given_scale("mean"), config.given_scale("std")
        channels = x_train.shape[1]
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise ConfigError(f"--{name}: {len(values)} values; give one, or one per channel ({channels})")
        return {"mean": mean if len(mean) > 1 else mean[0], "std": std if len(std) > 1 else std[0]}
    mean, std = computed_scale(x_train)
    return {"mean": mean, "std": std}


# --- partitioning and writing -----------------------------------------------------------------------------

def partition_labels(config: PartitionConfig, labels: np.ndarray, rng: np.random.Generator) -> tuple[Partition, dict]:
    """The chosen scheme's partition and notes for partition.json (the Dirichlet draws it took)."""
    if config.scheme == "iid":
        law, param = config.size_law()
        return partitioners.iid(len(labels), config.users, rng, law, param), {}
    if config.scheme == "dirichlet":
        part, draws = partitioners.dirichlet(labels, config.users, rng, alpha=config.alpha,
                                             min_partition_size=config.min_partition_size,
                                             self_balancing=config.self_balancing)
        return part, {"dirichlet_draws": draws}
    if config.scheme == "pathological":
        return partitioners.pathological(labels, config.users, rng,
                                         num_classes_per_partition=config.num_classes_per_partition,
                                         class_assignment_mode=config.class_assignment_mode), {}
    return partitioners.shards(labels, config.users, rng), {}


def label_counts(labels: np.ndarray, part: Partition, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """{uid: {label: count}} with only the labels a user has (one sort of the samples, no users x labels table)."""
    base = MAX_LABEL + 1
    users = np.repeat(np.arange(part.users, dtype=np.int64), part.sizes())
    keys, counts = np.unique(users * base + labels[part.indices], return_counts=True)
    out: dict[str, dict[str, int]] = {name: {} for name in names}
    for key, count in zip(keys.tolist(), counts.tolist()):
        out[names[key // base]][str(key % base)] = count
    return out


def build(config: PartitionConfig) -> dict[str, Any]:
    """Reads, partitions and writes OUT_DIR (atomically); returns a summary."""
    out = Path(config.out_dir)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out}: already exists; partitions are written to a new folder")
    source = Path(config.source)
    x, y = read_labelled(source)
    labels = np.asarray(y, dtype=np.int64)
    rng = streams.partition(config.seed)
    whole, notes = partition_labels(config, labels, rng)
    train, test = partitioners.split_per_user(whole, config.test_fraction, rng)
    width = max(5, len(str(config.users - 1)))
    names = [f"u{u:0{width}d}" for u in range(config.users)]
    x_train = stored(x[train.indices])
    scale = _scale_for(config, x_train)
    num_classes = int(labels.max()) + 1
    assigned = np.zeros(len(labels), dtype=bool)
    assigned[whole.indices] = True
    unassigned = {str(int(v)): int(c) for v, c in zip(*np.unique(labels[~assigned], return_counts=True))}
    record = {"scheme": config.scheme, "parameters": config.parameters(), "seed": config.seed,
              "test_fraction": config.test_fraction, "source": str(source.resolve()), "samples": len(labels),
              "num_classes": num_classes, **notes, "unassigned": unassigned,
              "sizes": {"train": dict(zip(names, train.sizes().tolist())),
                        "test": dict(zip(names, test.sizes().tolist()))},
              "users": label_counts(labels, train, names), "test_users": label_counts(labels, test, names)}
    meta = {"num_classes": num_classes, "input_shape": list(x.shape[1:]), **scale,
            "source": f"{source.name} (python -m flock.partition)", "partition": config.scheme,
            **config.parameters(), "users": config.users, "seed": config.seed, "test_fraction": config.test_fraction}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partitioning{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_columns(tmp, TRAIN_DAY, "train", names, x_train, labels[train.indices], train.offsets)
        del x_train
        write_columns(tmp, TEST_DAY, "test", names, stored(x[test.indices]), labels[test.indices], test.offsets)
        (tmp / "partition.json").write_text(json.dumps(record, indent=1))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if config.plot:
            plot(record, tmp / "partition.png")
        if out.exists():
            raise ConfigError(f"{out}: appeared while partitioning; left as it is")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sizes = train.sizes() + test.sizes()
    return {"out_dir": str(out), "users": config.users, "train_samples": int(train.sizes().sum()),
            "test_samples": int(test.sizes().sum()), "unassigned_samples": int(sum(unassigned.values())),
            "user_size_min": int(sizes.min()), "user_size_max": int(sizes.max()), "num_classes": num_classes,
            **{k: v for k, v in scale.items()}, **notes}


def plot(record: dict, path: Path) -> None:
    """A stacked bar per user (the first MAX_PLOTTED_USERS): its training samples by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    users = list(record["users"])[:MAX_PLOTTED_USERS]
    k = record["num_classes"]
    counts = np.zeros((len(users), k))
    for i, uid in enumerate(users):
        for label, c in record["users"][uid].items():
            counts[i, int(label)] = c
    colours = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "viridis")
    fig, ax = plt.subplots(figsize=(max(7.0, 0.12 * len(users) + 3), 4))
    bottom = np.zeros(len(users))
    for label in range(k):
        if counts[:, label].any():
            ax.bar(np.arange(len(users)), counts[:, label], bottom=bottom, width=0.9,
                   color=colours(label / max(k - 1, 1) if k > 20 else label), label=str(label))
            bottom += counts[:, label]
    shown = "" if len(users) == len(record["users"]) else f" (first {len(users)} of {len(record['users'])} users)"
    params = ", ".join(f"{n}={v}" for n, v in record["parameters"].items())
    ax.set_title(f"{record['scheme']}, seed {record['seed']}{shown}\n{params}", fontsize="medium")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("user")
    ax.set_ylabel("training samples")
    if k <= 20:
        ax.legend(title="label", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> _Parser:
    p = _Parser(prog="python -m flock.partition", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(PartitionConfig)}
    p.add_argument("source", metavar="IN", help=fields["source"].metadata["help"])
    p.add_argument("out_dir", metavar="OUT_DIR", help=fields["out_dir"].metadata["help"])
    for name, f in fields.items():
        if name in ("source", "out_dir"):
            continue
        flag, rule = _flag(name), f.metadata
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=rule["help"])
        elif isinstance(f.default, (int, float)):
            p.add_argument(flag, type=_number(type(f.default), flag), default=f.default, help=rule["help"])
        else:
            p.add_argument(flag, default=f.default, help=rule["help"],
                           **({"metavar": "{" + ",".join(rule["choices"]) + "}"} if rule["choices"] else {}))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = PartitionConfig(**vars(args))
        print(json.dumps(build(config)))
    except FlockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
