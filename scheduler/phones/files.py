"""Reading the phones' input files: a JSON or pickled mapping (FedScale's form or a per-user table), how a
user finds its entry, and the one rule set for the numbers in them.

FedScale's files map client ids (1, 2, ...) to entries and are reused for more clients than they list: its
client manager takes entry number `client_id % len(file)` in the file's order. Here a user whose id is a
key of the file gets that entry; any other user wraps around the file the same way, with
`client_id = int(uid)` for a decimal user id and `crc32(uid)` otherwise. A per-user table (a CSV or a JSON
object of named users) does not wrap: a user it does not list is an error.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from flock.common.errors import DataError
from scheduler.phones.safe_pickle import loads_plain_pickle

Entry = TypeVar("Entry")


def load_mapping(path: Path | str) -> dict[Any, Any]:
    """The top-level mapping of a JSON file or a plain-data pickle (told apart by content: JSON starts with
    '{'); a DataError naming the file when it is unreadable, malformed, empty or not a mapping."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.lstrip()[:1] == b"{":
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as e:    # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise DataError(f"{path}: malformed JSON ({e})") from None
    else:
        value = loads_plain_pickle(data, str(path))
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a mapping of users (or client ids) to entries, got a "
                        f"{type(value).__name__}")
    if not value:
        raise DataError(f"{path}: no entries")
    return value


def number(value: Any, *, where: str, field: str, positive: bool = False) -> float:
    """`value` as a float, which must be a real number (not a bool), finite and >= 0 (> 0 if `positive`);
    otherwise a DataError naming `where` (file and user or line) and `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: {field} must be a number, got {type(value).__name__} {value!r:.40}")
    x = float(value)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise DataError(f"{where}: {field} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return x


def check_keys(entry: Any, *, where: str, required: frozenset[str], optional: frozenset[str] = frozenset()) -> None:
    """`entry` must be a mapping with every `required` key and no key outside `required | optional`."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping with {sorted(required)}, got {type(entry).__name__}")
    unknown = [k for k in entry if k not in required and k not in optional]
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r} (known: {sorted(required | optional)})")
    missing = sorted(required - entry.keys())
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r}")


def fedscale_client_id(uid: str) -> int:
    """The FedScale client id that stands for `uid`: the number itself for a decimal id, else crc32(uid)."""
    return int(uid) if uid.isascii() and uid.isdecimal() else zlib.crc32(uid.encode("utf-8"))


@dataclass(frozen=True)
class UserEntries(Generic[Entry]):
    """Parsed entries of a file, in file order, keyed by the file's keys as strings. `wrap`: users the file
    does not list reuse its entries modulo its length (FedScale's files); otherwise they are an error."""

    source: str
    keys: Mapping[str, int]      # key -> position
    entries: tuple[Entry, ...]
    wrap: bool

    def __post_init__(self) -> None:
        if not self.entries:
            raise DataError(f"{self.source}: no entries")

    def lookup(self, uid: str) -> Entry:
        """`uid`'s entry; a DataError naming the file and the user when the file does not list it and does
        not wrap."""
        position = self.keys.get(uid)
        if position is None:
            if not self.wrap:
                raise DataError(f"{self.source}: no entry for user {uid!r}")
            position = fedscale_client_id(uid) % len(self.entries)
        return self.entries[position]


def check_covers(source: Any, users: Iterable[str], *, what: str) -> None:
    """When `source` holds a file's entries that do not wrap (a per-user table or trace), every one of `users`
    must be listed: a DataError naming the file, how many are missing and the first of them, before the run
    starts (not in the round that first samples such a user)."""
    entries = getattr(source, "entries", None)
    if not isinstance(entries, UserEntries) or entries.wrap:
        return
    missing = [uid for uid in users if uid not in entries.keys]
    if missing:
        raise DataError(f"{entries.source}: no entry for {len(missing)} of the {what}'s users (first: "
                        f"{missing[0]!r}); a per-user file must list every user")


def user_entries(mapping: Mapping[Any, Any], parse: Callable[[Any, str], Entry], *, source: str,
                 wrap: bool) -> UserEntries[Entry]:
    """Parses every value of `mapping` with `parse(value, where)` (`where` names the file and the entry for
    its errors), keyed by the mapping's keys (user ids, or FedScale's integer client ids) as strings."""
    keys: dict[str, int] = {}
    entries: list[Entry] = []
    for key, value in mapping.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise DataError(f"{source}: key {key!r} is neither a user id nor a client id")
        name = str(key)
        if name in keys:
            raise DataError(f"{source}: entry {name!r} appears twice")
        keys[name] = len(entries)
        entries.append(parse(value, f"{source}, entry {name!r}"))
    return UserEntries(source=source, keys=keys, entries=tuple(entries), wrap=wrap)
