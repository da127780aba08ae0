"""Importing the real LEAF Reddit data (e.g. FL-mobile's `reddit_subsampled.zip`) into the day layout.

    python -m reader.leaf_reddit import reddit_subsampled.zip lm_data
    python -m reader.leaf_reddit import path/to/leaf/reddit/data lm_data

Every JSON file whose path says "train" goes to the training day, `lm_data/20200101/train_data_00000.json`,
`train_data_00001.json`, ... in name order, every one that says "test" to `lm_data/20200102/test_data_*.json`
(LEAF's "val" files are left out): LEAF cuts its data into files, and the reader reads a day's files as one
split, so one file is in memory at a time (LEAF's whole Reddit set is 2 GB of JSON a split). A user in two
files of a split is refused. A `vocab.json` in the source is checked and copied; without one the
vocabulary (10,000 words by default) is built from the training day's input tokens, as FL-mobile's reader
does.
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from flock.common.errors import DataError, FlockError
from reader.leaf_format import leaf_users
from reader.vocab import load_vocab, save_json_atomic, vocab_from_counts


def _sources(src: Path) -> Iterator[tuple[str, callable]]:
    """(name, opener) for every file of a zip archive or a folder."""
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            yield str(path.relative_to(src)), (lambda p=path: open(p, "rb"))
    elif zipfile.is_zipfile(src):
        archive = zipfile.ZipFile(src)
        for name in sorted(archive.namelist()):
            if not name.endswith("/"):
                yield name, (lambda n=name: archive.open(n))
    else:
        raise DataError(f"{src}: neither a folder nor a zip archive")


def _role(name: str) -> str | None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    lower = name.lower()
    if lower.endswith("vocab.json"):
        return "vocab"
    if not lower.endswith(".json"):
        return None
    base = parts[-1].lower()
    for role in ("train", "test", "val"):
        if role in base or role in (p.lower() for p in parts[:-1]):
            return role
    return None


def import_leaf_reddit(src: Path, out: Path, *, train_day: str = "20200101", test_day: str = "20200102",
                       vocab_size: int = 10_000) -> dict:
    """Writes `out` (which must not exist); returns a summary of what went where."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DataError(f"{src}: not found")
    if out.exists():
        raise DataError(f"{out}: already exists; import into a new folder")
    owner: dict[tuple[str, str], str] = {}
    vocab_bytes, used, skipped, users = None, {"train": [], "test": []}, [], {"train": 0, "test": 0}
    token_counts: collections.Counter = collections.Counter()    # the training day's input tokens
    tmp = out.with_name(f".{out.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    days = {"train": tmp / train_day, "test": tmp / test_day}
    try:
        for name, opener in _sources(src):
            role = _role(name)
            if role is None:
                continue
            if role == "val":
                skipped.append(name)
                continue
            with opener() as f:
                raw = f.read()
            if role == "vocab":
                vocab_bytes = raw
                continue
            doc = _leaf_doc(src, name, raw, role, owner)
            days[role].mkdir(parents=True, exist_ok=True)
            save_json_atomic(days[role] / f"{role}_data_{len(used[role]):05d}.json", doc)
            used[role].append(name)
            users[role] += len(doc["users"])
            if role == "train" and vocab_bytes is None:
                token_counts.update(_input_tokens(doc))
        for role in ("train", "test"):
            if not used[role]:
                raise DataError(f"{src}: no {role} JSON file found (a path containing '{role}' and ending in .json)")
        if vocab_bytes is not None:
            (tmp / "vocab.json").write_bytes(vocab_bytes)
            repairs = load_vocab(tmp / "vocab.json").repairs   # refuse a broken vocabulary before anything is in place
            vocab_from = "archive" + (f" (flock will repair it when reading: {'; '.join(repairs)})" if repairs else "")
        else:
            save_json_atomic(tmp / "vocab.json", vocab_from_counts(token_counts, vocab_size))
            vocab_from = f"built from the training day ({vocab_size} words)"
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return {"train_files": used["train"], "test_files": used["test"], "skipped": skipped,
            "train_users": users["train"], "test_users": users["test"], "vocab": vocab_from}


def _leaf_doc(src: Path, name: str, raw: bytes, role: str, owner: dict[tuple[str, str], str]) -> dict:
    """One source file as a LEAF document of its users (in its `users` order), checked."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{src}: {name}: not valid JSON ({e})") from None
    out = {"users": [], "num_samples": [], "user_data": {}}
    for uid in leaf_users(doc, f"{src}: {name}"):
        if (role, uid) in owner:
            raise DataError(f"{src}: user {uid!r} is in both {owner[(role, uid)]} and {name}")
        owner[(role, uid)] = name
        out["users"].append(uid)
        out["user_data"][uid] = doc["user_data"][uid]
        out["num_samples"].append(len(doc["user_data"][uid].get("x", [])))
    return out


def _input_tokens(doc: dict) -> Iterator[str]:
    """The input tokens of one LEAF document."""
    for ud in doc["user_data"].values():
        for comment in ud.get("x", []):
            for seq in comment:
                yield from seq


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reader.leaf_reddit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="lay out LEAF Reddit JSON (zip or folder) as day folders")
    imp.add_argument("source", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--train-day", default="20200101")
    imp.add_argument("--test-day", default="20200102")
    imp.add_argument("--vocab-size", type=int, default=10_000)
    args = p.parse_args(argv)
    try:
        summary = import_leaf_reddit(args.source, args.out, train_day=args.train_day, test_day=args.test_day,
                                     vocab_size=args.vocab_size)
    except FlockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
