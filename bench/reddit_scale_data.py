"""Reddit-sized LEAF data, generated from a seed: LEAF Reddit's 1,660,820 users by default.

    python bench/reddit_scale_data.py OUT [--users 1660820] [--seed 0] [--users-per-file 50000]
                                          [--vocab FILE] [--quiet]

What it writes (flock's `lm_data` layout, several LEAF JSON files per day as LEAF's own splits are):

    OUT/vocab.json                              10,000 entries (<PAD> 0, <UNK> 1, <BOS>, <EOS>, 9,996 words)
    OUT/20200101/train_data_00000.json ...      the training day, `--users-per-file` users a file
    OUT/20200102/test_data_00000.json ...       the test day: the same users, fewer comments
    OUT/GENERATED.json                          the options and what was drawn (users, comments, sequences)

The distributions (stated, and drawn per file from `[seed, day, file]`, so files are independent):

- comments per user, training day: Zipf with exponent 2.3, capped at 1,000 (mean about 2.6, median 1,
  1% of users above 20; LEAF's real data has a heavier mean of 34 sequences a user: this keeps the total
  on this machine's disk); test day: Zipf 3.0 capped at 100 (mean about 1.35), every user at least one.
- words per comment: lognormal with median 8 and sigma 0.8, clipped to 1..60 (about 1.6 sequences of
  10 tokens a comment after LEAF's <BOS>/<EOS> cut, `reader.leaf_format.leaf_sequences`).
- words: Zipf-like frequencies (p ~ 1 / (rank + 10)) over 10,800 words of which the 800 rarest are not in
  the vocabulary, so a little text is <UNK> as in the real data.

User ids look like Reddit account ids (`t2_` and 8 hex digits, a bijection of the user number), so the
files' user order is not their sorted order. The JSON is streamed a comment at a time: memory stays at
one file's user counts whatever `--users` is. The output folder appears only when complete.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SEQ_LEN = 10
VOCAB_SIZE = 10_000
OOV_WORDS = 800
SPECIAL = ("<PAD>", "<UNK>", "<BOS>", "<EOS>")
DAYS = (("20200101", "train", 2.3, 1000), ("20200102", "test", 3.0, 100))   # day, split, Zipf exponent, cap
WORDS_MEDIAN, WORDS_SIGMA, WORDS_MAX = 8.0, 0.8, 60
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "str"]


def user_id(i: int) -> str:
    """A Reddit-looking account id; distinct for distinct i < 2**32 (odd multiplier mod 2**32)."""
    return f"t2_{(i * 2654435761) % 2**32:08x}"


def make_words(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct pronounceable words, drawn from `rng`."""
    words: dict[str, None] = {}
    while len(words) < count:
        n = int(rng.integers(1, 5))
        words.setdefault("".join(SYLLABLES[j] for j in rng.integers(0, len(SYLLABLES), size=n)), None)
    return list(words)


def make_vocab(seed: int, vocab_file: Path | None) -> tuple[dict, list[str]]:
    """The vocab.json document and the words text is drawn from, most frequent first (the vocabulary's
    words then `OOV_WORDS` that are not in it)."""
    rng = np.random.default_rng([seed, 0x766F6361])
    if vocab_file is not None:
        doc = json.loads(vocab_file.read_text(encoding="utf-8"))
        known = [w for w, _ in sorted(doc["vocab"].items(), key=lambda wi: wi[1]) if w not in SPECIAL]
        extra = [w for w in make_words(rng, len(known) + OOV_WORDS) if w not in doc["vocab"]][:OOV_WORDS]
        return doc, known + extra
    words = make_words(rng, VOCAB_SIZE - len(SPECIAL) + OOV_WORDS)
    vocab = {s: i for i, s in enumerate(SPECIAL)}
    vocab.update({w: i + len(SPECIAL) for i, w in enumerate(words[:VOCAB_SIZE - len(SPECIAL)])})
    return {"vocab": vocab, "size": VOCAB_SIZE, "pad_symbol": 0, "unk_symbol": 1}, words


def comments_per_user(rng: np.random.Generator, n: int, exponent: float, cap: int) -> np.ndarray:
    return np.minimum(rng.zipf(exponent, size=n), cap)


def words_per_comment(rng: np.random.Generator, n: int) -> np.ndarray:
    drawn = rng.lognormal(math.log(WORDS_MEDIAN), WORDS_SIGMA, size=n)
    return np.clip(np.rint(drawn), 1, WORDS_MAX).astype(np.int64)


class SequenceText:
    """LEAF's cut of a comment into 10-token sequences, written straight as JSON text (the same sequences
    as `reader.leaf_format.leaf_sequences`, without building lists of lists)."""

    def __init__(self, words: list[str]) -> None:
        self.quoted = [json.dumps(w) for w in words]
        self.pad, self.bos, self.eos = (json.dumps(s) for s in ("<PAD>", "<BOS>", "<EOS>"))
        # count_tokens of a sequence with r real input tokens
        self.counts = ["[" + ", ".join(["1"] * r + ["0"] * (SEQ_LEN - r)) + "]" for r in range(SEQ_LEN + 1)]

    def comment(self, word_ids: np.ndarray, stamp: int) -> tuple[str, str]:
        """(x, y) JSON of one comment: x a list of sequences, y its labels dict."""
        tokens = [self.quoted[t] for t in word_ids.tolist()]
        x = [self.bos, *tokens, self.eos]
        y = [*tokens, self.eos, self.pad]
        real = len(x)
        pad = -real % SEQ_LEN
        x += [self.pad] * pad
        y += [self.pad] * pad
        cuts = range(0, len(x), SEQ_LEN)
        xs = ", ".join("[" + ", ".join(x[i:i + SEQ_LEN]) + "]" for i in cuts)
        ys = ", ".join("[" + ", ".join(y[i:i + SEQ_LEN]) + "]" for i in cuts)
        cs = ", ".join(self.counts[min(SEQ_LEN, max(0, real - i))] for i in cuts)
        return f"[{xs}]", f'{{"target_tokens": [{ys}], "count_tokens": [{cs}], "created_utc": {stamp}}}'


def write_file(path: Path, first_user: int, users: int, rng: np.random.Generator, *, exponent: float, cap: int,
               text: SequenceText, word_cdf: np.ndarray, stamp: int) -> tuple[int, int]:
    """One LEAF JSON file of users first_user.. first_user + users - 1; returns (comments, sequences)."""
    comments = comments_per_user(rng, users, exponent, cap)
    lengths = words_per_comment(rng, int(comments.sum()))
    words = np.searchsorted(word_cdf, rng.random(int(lengths.sum())), side="right")
    uids = [user_id(i) for i in range(first_user, first_user + users)]
    sequences = int(((lengths + 2 + SEQ_LEN - 1) // SEQ_LEN).sum())
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f'{{"users": {json.dumps(uids)}, "num_samples": {json.dumps(comments.tolist())}, "user_data": {{')
        c = w = 0
        for k, uid in enumerate(uids):
            xs, ys = [], []
            for _ in range(int(comments[k])):
                x, y = text.comment(words[w:w + lengths[c]], stamp + c)
                xs.append(x)
                ys.append(y)
                w += int(lengths[c])
                c += 1
            f.write(f'{", " if k else ""}"{uid}": {{"x": [{", ".join(xs)}], "y": [{", ".join(ys)}]}}')
        f.write("}}")
    os.replace(tmp, path)
    return int(comments.sum()), sequences


def generate(out: Path, *, users: int, seed: int = 0, users_per_file: int = 50_000, vocab_file: Path | None = None,
             progress: bool = True) -> dict:
    """Writes the data set into `out` (which must not exist); returns what GENERATED.json says."""
    if out.exists():
        raise SystemExit(f"{out} already exists: remove it or choose another folder")
    if users < 1 or users_per_file < 1:
        raise SystemExit("--users and --users-per-file must be at least 1")
    started = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab, words = make_vocab(seed, vocab_file)
    (tmp / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    weights = 1.0 / (np.arange(len(words)) + 10.0)
    word_cdf = np.cumsum(weights) / weights.sum()
    text = SequenceText(words)
    files = math.ceil(users / users_per_file)
    summary: dict = {"users": users, "seed": seed, "users_per_file": users_per_file, "vocab_size": vocab["size"],
                     "days": {}}
    for d, (day, split, exponent, cap) in enumerate(DAYS):
        (tmp / day).mkdir()
        totals = [0, 0]
        for i in range(files):
            first = i * users_per_file
            rng = np.random.default_rng([seed, d, i])
            got = write_file(tmp / day / f"{split}_data_{i:05d}.json", first, min(users_per_file, users - first), rng,
                             exponent=exponent, cap=cap, text=text, word_cdf=word_cdf, stamp=1_577_836_800 + d * 86_400)
            totals = [totals[0] + got[0], totals[1] + got[1]]
            if progress:
                print(f"\r{day} {split}: {i + 1}/{files} files, {min(first + users_per_file, users):,} users, "
                      f"{time.perf_counter() - started:.0f} s", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        summary["days"][day] = {"split": split, "files": files, "comments": totals[0], "sequences": totals[1],
                                "comments_per_user": f"Zipf({exponent}) capped at {cap}"}
    summary["words_per_comment"] = f"lognormal(median {WORDS_MEDIAN:g}, sigma {WORDS_SIGMA}) in 1..{WORDS_MAX}"
    summary["bytes"] = sum(p.stat().st_size for p in tmp.rglob("*.json"))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (tmp / "GENERATED.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    tmp.rename(out)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--users", type=int, default=1_660_820)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users-per-file", type=int, default=50_000)
    p.add_argument("--vocab", type=Path, default=None, help="take the vocabulary from this vocab.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    summary = generate(args.out, users=args.users, seed=args.seed, users_per_file=args.users_per_file,
                       vocab_file=args.vocab, progress=not args.quiet)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
