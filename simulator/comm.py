"""The few MPI operations the application needs, behind a tiny interface, so business code takes plain
`rank`/`world_size` integers and runs under plain pytest. The only module (besides application.py) that
imports mpi4py."""
from __future__ import annotations

import os
from typing import Any, Protocol


class Comm(Protocol):
    rank: int
    size: int
    local_size: int    # ranks on this node

    def bcast(self, obj: Any, root: int = 0) -> Any: ...
    def gather(self, obj: Any, root: int = 0) -> list[Any] | None: ...
    def allgather(self, obj: Any) -> list[Any]: ...
    def barrier(self) -> None: ...
    def abort(self, code: int) -> None: ...


class SingleComm:
    """A world of one process (no MPI)."""

    rank, size, local_size = 0, 1, 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        os._exit(code)


class MPIComm:
    def __init__(self) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()
        node.Free()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self._comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return self._comm.gather(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int) -> None:
        """Ends every rank of the job (a raising rank must not leave the others waiting forever)."""
        self._comm.Abort(code)


def world() -> Comm:
    """The MPI world when started under mpirun/mpiexec (or when mpi4py is importable), else a single process."""
    try:
        return MPIComm()
    except ImportError:
        return SingleComm()
