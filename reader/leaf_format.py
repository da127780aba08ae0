"""Writing LEAF Reddit JSON exactly as LEAF's preprocessing cuts comments (used by the built-in corpus
builder and by the tests' generated data)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from flock.common.errors import DataError
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


def leaf_users(doc: object, where: str) -> list[str]:
    """The users of a LEAF document, checked for what contradicts itself: `users` (when present) must list
    every user of `user_data` exactly once and nothing else, and `num_samples` (when present) must give each
    listed user's number of comments (its `x` entries). A DataError names the file (`where`) and the user."""
    if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
        raise DataError(f"{where}: expected a LEAF object with a 'user_data' mapping")
    user_data = doc["user_data"]
    users = doc.get("users", list(user_data))
    if not isinstance(users, list) or not all(isinstance(u, str) and "\0" not in u for u in users):
        raise DataError(f"{where}: 'users' must be a list of user ids (strings without NUL)")
    listed = set(users)
    if len(listed) != len(users):
        raise DataError(f"{where}: 'users' lists a user twice")
    unlisted = [uid for uid in user_data if uid not in listed]
    if unlisted:
        raise DataError(f"{where}: {len(unlisted)} user(s) have user_data but are not in 'users' (first: "
                        f"{unlisted[0]!r}); their data would be left out")
    missing = [uid for uid in users if uid not in user_data]
    if missing:
        raise DataError(f"{where}: user {missing[0]!r} is listed in 'users' but has no user_data "
                        f"({len(missing)} such user(s))")
    if "num_samples" in doc:
        counts = doc["num_samples"]
        if not isinstance(counts, list) or len(counts) != len(users):
            raise DataError(f"{where}: 'num_samples' must be a list with one count per user of 'users' "
                            f"({len(users)}), got {type(counts).__name__} of "
                            f"{len(counts) if isinstance(counts, list) else 'no'} length")
        for uid, count in zip(users, counts):
            x = user_data[uid].get("x") if isinstance(user_data[uid], dict) else None
            if isinstance(x, list) and count != len(x):
                raise DataError(f"{where}: user {uid!r}: num_samples says {count!r} but user_data has {len(x)} "
                                f"comments")
    return users
