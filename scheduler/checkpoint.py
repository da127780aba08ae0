"""The scheduler's checkpoint: one .npz file (parameters, server-optimizer arrays, JSON metadata), written
to a temporary file, fsynced and renamed over the old one, so a crash leaves either the old or the new."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from flock.common.errors import DataError

META_KEYS = ("round", "version", "step", "seed", "rounds", "world_size", "data", "layout")


def save_checkpoint(path: Path, *, params: np.ndarray, meta: dict[str, Any],
                    optimizer_state: dict[str, Any], versions: dict[int, np.ndarray] | None = None) -> None:
    """`versions`: older parameter versions a resumed run needs (asynchronous tasks pending at the
    checkpoint train again from them)."""
    arrays = {"params": params, **{f"version/{v}": a for v, a in (versions or {}).items()}}
    scalars = {}
    for key, value in optimizer_state.items():
        if isinstance(value, np.ndarray):
            arrays[f"opt/{key}"] = value
        else:
            scalars[key] = value
    arrays["meta"] = np.array(json.dumps({**meta, "optimizer_scalars": scalars}))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """(params, meta, optimizer_state); a damaged file is a DataError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            params = z["params"].astype(np.float32)
            state = {k[4:]: z[k] for k in z.files if k.startswith("opt/")}
        if not isinstance(meta, dict) or params.ndim != 1:
            raise ValueError("malformed metadata or parameters")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"metadata lacks {', '.join(missing)}")
        state.update(meta.pop("optimizer_scalars", {}))
    except Exception as e:     # zip, zlib, EOF, JSON and format errors alike: the file is damaged
        raise DataError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); it is left as it is") from None
    if not np.isfinite(params).all():
        raise DataError(f"{path}: checkpoint holds non-finite parameters")
    return params, meta, state


def load_versions(path: Path) -> dict[int, np.ndarray]:
    """The older parameter versions saved with the checkpoint (read-only float32 arrays by version)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            versions = {int(k.split("/", 1)[1]): z[k].astype(np.float32) for k in z.files if k.startswith("version/")}
    except Exception as e:
        raise DataError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); it is left as it is") from None
    for v, a in versions.items():
        if a.ndim != 1 or not np.isfinite(a).all():
            raise DataError(f"{path}: parameters of version {v} are malformed or not finite")
        a.flags.writeable = False
    return versions
