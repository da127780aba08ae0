"""Writing LEAF Reddit JSON exactly as LEAF's preprocessing cuts comments (used by the built-in corpus
builder and by the tests' generated data)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from reader.vocab import BOS, EOS, PAD, save_json_atomic

SEQ_LEN = 10


def leaf_sequences(tokens: Sequence[str], seq_len: int = SEQ_LEN) -> tuple[list[list[str]], list[list[str]], list[list[int]]]:
    """One comment: input <BOS> w.. <EOS>, target w.. <EOS> <PAD>, counts 1 on real inputs; padded to seq_len."""
    x = [BOS, *tokens, EOS]
    y = [*tokens, EOS, PAD]
    counts = [1] * len(x)
    pad = -len(x) % seq_len
    x += [PAD] * pad
    y += [PAD] * pad
    counts += [0] * pad
    cut = range(0, len(x), seq_len)
    return [x[i:i + seq_len] for i in cut], [y[i:i + seq_len] for i in cut], [counts[i:i + seq_len] for i in cut]


def leaf_document(comments_by_user: Mapping[str, Iterable[tuple[int, Sequence[str]]]]) -> dict:
    """{"users", "num_samples", "user_data"} from uid -> [(timestamp, tokens)] (num_samples counts comments)."""
    doc: dict = {"users": [], "num_samples": [], "user_data": {}}
    for uid, comments in comments_by_user.items():
        xs, ys = [], []
        for stamp, tokens in comments:
            x, y, c = leaf_sequences(tokens)
            xs.append(x)
            ys.append({"target_tokens": y, "count_tokens": c, "created_utc": stamp})
        doc["users"].append(uid)
        doc["num_samples"].append(len(xs))
        doc["user_data"][uid] = {"x": xs, "y": ys}
    return doc


def write_day(data_dir: Path, day: str, split: str, comments_by_user) -> Path:
    """Writes DATA_DIR/<day>/<split>_data.json; returns its path."""
    path = Path(data_dir) / day / f"{split}_data.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json_atomic(path, leaf_document(comments_by_user))
    return path
