"""A restricted unpickler for the traces FedScale ships as Python pickles.

`pickle.load` on a file someone handed you runs whatever code the file names (`os.system`, ...). FedScale's
device-capacity and availability traces are only dicts of lists of numbers and strings, which the pickle
machine builds with its own opcodes; everything that could run code goes through `find_class` (a global
such as `os.system`, a class to build, a copyreg extension) or `persistent_load`. Both refuse here, so the
only objects that can come out are dicts, lists, tuples, sets, numbers, strings, bytes, booleans and None.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from flock.common.errors import DataError


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}; only dicts, lists, tuples, numbers and strings "
                                     f"are admitted")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it refers to a persistent object; only plain data is admitted")


def load_plain_pickle(path: Path | str) -> Any:
    """The plain data in the pickle file at `path`; a file that is truncated, not a pickle, or that would
    build anything but plain data is a DataError naming the file, never code run nor a traceback."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return loads_plain_pickle(data, str(path))


def loads_plain_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """`load_plain_pickle` on bytes; `source` names them in errors."""
    reader = io.BytesIO(data)
    try:
        value = _RestrictedUnpickler(reader).load()
    # a damaged pickle fails in many ways (a stack underflow is an IndexError, a bad opcode a KeyError...)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, RecursionError, UnicodeDecodeError, MemoryError) as e:
        raise DataError(f"{source}: not a plain-data pickle ({type(e).__name__}: {e})") from None
    if reader.tell() != len(data):
        raise DataError(f"{source}: {len(data) - reader.tell()} bytes after the end of the pickle")
    return value
