"""The rank's data server: private per-user parameters (FL-mobile's get_param_by_uid / set_param_by_uid).

A user's private parameters live only on its home rank, in memory or, for many users, in SQLite on disk.
They never travel to the scheduler.

Checkpoints: the simulator tells the store which round it is training (`at_round`), and at a checkpoint
round R every rank calls `commit(R)` before it pushes its update, so that when the scheduler writes its
checkpoint for R every store can return to R. `rollback(R)` (on resume) forgets everything written after
round R. The SQLite store keeps versions per (user, round) and prunes those no checkpoint needs; the
memory store writes a snapshot file per committed round (when given a folder).

The SQLite store's work per round follows the users written, not the users stored: reads and writes go
by the primary key (uid, round), a rollback by an index on round, and a commit prunes only the users
written since the previous prune (a million users stored, a thousand trained a round: a thousand looked at).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from flock.common.errors import DataError


class PrivateStore(Protocol):
    def get_param_by_uid(self, uid: str) -> dict[str, np.ndarray] | None:
        """The user's private parameters, or None if it has none stored yet."""

    def set_param_by_uid(self, uid: str, params: Mapping[str, np.ndarray]) -> None:
        """Stores (replaces) the user's private parameters as of the current round; keeps its own copy."""

    def at_round(self, round_index: int) -> None:
        """The round whose training the following writes belong to (1-based)."""

    def commit(self, round_index: int) -> None:
        """Makes the state after `round_index` recoverable by `rollback(round_index)`."""

    def rollback(self, round_index: int) -> None:
        """Returns to the state committed after `round_index` (0: empty)."""

    def __len__(self) -> int: ...

    def close(self) -> None: ...


def _flatten(params: Mapping[str, np.ndarray]) -> tuple[str, bytes]:
    layout = json.dumps([[k, list(np.shape(v))] for k, v in params.items()])
    return layout, b"".join(np.ascontiguousarray(v, dtype="<f4").tobytes() for v in params.values())


def _unflatten(layout: str, blob: bytes) -> dict[str, np.ndarray]:
    flat = np.frombuffer(blob, dtype="<f4")
    out, offset = {}, 0
    for name, shape in json.loads(layout):
        size = int(np.prod(shape))
        out[name] = flat[offset:offset + size].reshape(shape).copy()
        offset += size
    return out


class MemoryStore:
    def __init__(self, snapshot_prefix: Path | None = None) -> None:
        self._data: dict[str, dict[str, np.ndarray]] = {}
        self.snapshot_prefix = Path(snapshot_prefix) if snapshot_prefix else None
        self._committed: list[int] = []

    def get_param_by_uid(self, uid: str) -> dict[str, np.ndarray] | None:
        got = self._data.get(uid)
        return None if got is None else {k: v.copy() for k, v in got.items()}

    def set_param_by_uid(self, uid: str, params: Mapping[str, np.ndarray]) -> None:
        self._data[uid] = {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}

    def at_round(self, round_index: int) -> None:
        pass

    def _snapshot(self, round_index: int) -> Path:
        return self.snapshot_prefix.with_name(f"{self.snapshot_prefix.name}-round{round_index}.npz")

    def commit(self, round_index: int) -> None:
        if self.snapshot_prefix is None:
            return
        self.snapshot_prefix.parent.mkdir(parents=True, exist_ok=True)
        users = list(self._data)
        arrays = {"users": np.array(json.dumps(users))}
        for i, uid in enumerate(users):
            layout, blob = _flatten(self._data[uid])
            arrays[f"{i}/layout"] = np.array(layout)
            arrays[f"{i}/data"] = np.frombuffer(blob, dtype=np.uint8)
        path = self._snapshot(round_index)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._committed.append(round_index)
        for old in self._committed[:-2]:           # the previous checkpoint may still be the scheduler's latest
            self._snapshot(old).unlink(missing_ok=True)
        self._committed = self._committed[-2:]

    def rollback(self, round_index: int) -> None:
        self._data = {}
        if round_index == 0 or self.snapshot_prefix is None:
            return
        path = self._snapshot(round_index)
        if not path.is_file():
            raise DataError(f"{path}: private-parameter snapshot for round {round_index} is missing")
        with np.load(path) as z:
            users = json.loads(str(z["users"]))
            for i, uid in enumerate(users):
                self._data[uid] = _unflatten(str(z[f"{i}/layout"]), z[f"{i}/data"].tobytes())
        self._committed = [round_index]

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        pass


class SQLiteStore:
    """Rows (uid, round) -> the parameters' names and shapes as JSON and their values as one float32 blob.
    One connection per thread (shards run in threads); `close` closes every one of them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._opened_lock = threading.Lock()
        self.round = 0
        with self._conn() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS private (uid TEXT, round INTEGER, layout TEXT, data BLOB, "
                         "PRIMARY KEY (uid, round))")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
            conn.execute("CREATE INDEX IF NOT EXISTS private_round ON private (round)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # used by its thread alone; check_same_thread=False only so that close() can close it from another
            conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            with self._opened_lock:
                self._opened.append(conn)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get_param_by_uid(self, uid: str) -> dict[str, np.ndarray] | None:
        row = self._conn().execute("SELECT layout, data FROM private WHERE uid = ? ORDER BY round DESC LIMIT 1",
                                   (uid,)).fetchone()
        return None if row is None else _unflatten(row[0], row[1])

    def set_param_by_uid(self, uid: str, params: Mapping[str, np.ndarray]) -> None:
        layout, blob = _flatten(params)
        with self._conn() as conn:
            conn.execute("INSERT OR REPLACE INTO private (uid, round, layout, data) VALUES (?, ?, ?, ?)",
                         (uid, self.round, layout, blob))

    def at_round(self, round_index: int) -> None:
        self.round = round_index

    def _meta(self, conn, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def _set_meta(self, conn, key: str, value: int) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def commit(self, round_index: int) -> None:
        """Prunes versions that neither this nor the previous committed round needs. Invariant: no user
        has two versions at or before `pruned`; so only users with a version written after it (the
        rounds since the last prune) can have a new one to drop."""
        with self._conn() as conn:
            previous, pruned = self._meta(conn, "committed"), self._meta(conn, "pruned")
            if previous > pruned:
                conn.execute("DELETE FROM private WHERE uid IN (SELECT uid FROM private WHERE round > ? AND round <= ?) "
                             "AND round < (SELECT MAX(p.round) FROM private p WHERE p.uid = private.uid AND p.round <= ?)",
                             (pruned, previous, previous))
                self._set_meta(conn, "pruned", previous)
            self._set_meta(conn, "committed", round_index)

    def rollback(self, round_index: int) -> None:
        with self._conn() as conn:
            conn.execute("DELETE FROM private WHERE round > ?", (round_index,))
            self._set_meta(conn, "committed", round_index)
            self._set_meta(conn, "pruned", min(round_index, self._meta(conn, "pruned")))

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(DISTINCT uid) FROM private").fetchone()[0]

    def close(self) -> None:
        """Closes the connections of every thread that used the store (call it when they are done)."""
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
        self._local = threading.local()
