"""The rank's data server: private per-user parameters (FL-mobile's get_param_by_uid / set_param_by_uid).

A user's private parameters live only on its home rank, in memory or, for many users, in SQLite on disk.
They never travel to the scheduler.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np


class PrivateStore(Protocol):
    def get_param_by_uid(self, uid: str) -> dict[str, np.ndarray] | None:
        """The user's private parameters, or None if it has none stored yet."""

    def set_param_by_uid(self, uid: str, params: Mapping[str, np.ndarray]) -> None:
        """Stores (replaces) the user's private parameters; the store keeps its own copy."""

    def __len__(self) -> int: ...

    def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self._data: dict[str, dict[str, np.ndarray]] = {}

    def get_param_by_uid(self, uid: str) -> dict[str, np.ndarray] | None:
        got = self._data.get(uid)
        return None if got is None else {k: v.copy() for k, v in got.items()}

    def set_param_by_uid(self, uid: str, params: Mapping[str, np.ndarray]) -> None:
        self._data[uid] = {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        pass


class SQLiteStore:
    """One row per user: the parameters' names and shapes as JSON, their values as one float32 blob.
    One connection per thread (shards run in threads)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS private (uid TEXT PRIMARY KEY, layout TEXT, data BLOB)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get_param_by_uid(self, uid: str) -> dict[str, np.ndarray] | None:
        row = self._conn().execute("SELECT layout, data FROM private WHERE uid = ?", (uid,)).fetchone()
        if row is None:
            return None
        layout, flat = json.loads(row[0]), np.frombuffer(row[1], dtype="<f4")
        out, offset = {}, 0
        for name, shape in layout:
            size = int(np.prod(shape))
            out[name] = flat[offset:offset + size].reshape(shape).copy()
            offset += size
        return out

    def set_param_by_uid(self, uid: str, params: Mapping[str, np.ndarray]) -> None:
        layout = [[k, list(np.shape(v))] for k, v in params.items()]
        blob = b"".join(np.ascontiguousarray(v, dtype="<f4").tobytes() for v in params.values())
        with self._conn() as conn:
            conn.execute("INSERT OR REPLACE INTO private (uid, layout, data) VALUES (?, ?, ?)",
                         (uid, json.dumps(layout), blob))

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM private").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
