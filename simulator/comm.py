"""The few MPI operations the application needs, behind a tiny interface, so business code takes plain
`rank`/`world_size` integers and runs under plain pytest. The only module (besides application.py) that
imports mpi4py."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Protocol

import numpy as np


class Request(Protocol):
    def test(self) -> bool:
        """Whether the operation has completed (drives MPI's progress; never blocks)."""


class SharedArrays(Protocol):
    """One array per rank of a node, all in memory every rank of the node reads and writes directly."""

    def of(self, node_rank: int) -> np.ndarray:
        """The array of the node's rank `node_rank`."""

    def sync(self) -> None:
        """A memory fence: this rank's writes are visible to the node's ranks before its next ones."""

    def free(self) -> None:
        """Releases the memory (collective over the node's ranks)."""


class Comm(Protocol):
    rank: int
    size: int
    local_size: int    # ranks on this node
    threads: bool      # whether any thread may call MPI (MPI_THREAD_MULTIPLE)
    mpi_version: int   # the MPI standard's major version the library implements (3: shared-memory windows)

    def bcast(self, obj: Any, root: int = 0) -> Any: ...
    def gather(self, obj: Any, root: int = 0) -> list[Any] | None: ...
    def allgather(self, obj: Any) -> list[Any]: ...
    def barrier(self) -> None: ...
    def abort(self, code: int) -> None: ...

    # numpy buffers, not pickles: the data plane's bulk bytes
    def Bcast(self, buf: np.ndarray, root: int = 0) -> None: ...
    def Isend(self, buf: np.ndarray, dest: int) -> Request: ...
    def Irecv(self, buf: np.ndarray, source: int) -> Request: ...

    # non-blocking collectives (a waiting rank polls with sleeps: it can time out and leaves its core free)
    def Ibarrier(self) -> Request: ...

    def Ialltoallv(self, send: np.ndarray, send_counts: list[int], recv: np.ndarray, recv_counts: list[int],
                   send_displs: list[int] | None = None) -> Request:
        """Rank r's `send` holds `send_counts[s]` elements for each rank s, at `send_displs[s]` (default: one
        after another); its `recv` gets `recv_counts[s]` elements from each rank s, one after another (float32
        buffers)."""

    def Igatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: list[int], root: int = 0) -> Request:
        """Every rank's `send` (counts[r] float64 elements) into `recv` on `root`, in rank order."""

    def split_node(self) -> tuple["Comm", "Comm | None"]:
        """(the ranks of this node, ordered as in this world; the first rank of every node, or None on the
        others). This world's rank 0 is the first rank of its node. Collective."""

    def allocate_shared(self, count: int, dtype: np.dtype) -> SharedArrays:
        """`count` elements of `dtype` for this rank in node-shared memory (on a node's comm). Collective."""


class SingleComm:
    """A world of one process (no MPI)."""

    rank, size, local_size, threads, mpi_version = 0, 1, 1, True, 3

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

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        pass

    def Isend(self, buf: np.ndarray, dest: int) -> Request:
        raise ValueError("a world of one process has no other rank")

    def Irecv(self, buf: np.ndarray, source: int) -> Request:
        raise ValueError("a world of one process has no other rank")

    def Ibarrier(self) -> Request:
        return _Done()

    def Ialltoallv(self, send: np.ndarray, send_counts: list[int], recv: np.ndarray, recv_counts: list[int],
                   send_displs: list[int] | None = None) -> Request:
        at = send_displs[0] if send_displs else 0
        recv[:recv_counts[0]] = send[at:at + send_counts[0]]
        return _Done()

    def Igatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: list[int], root: int = 0) -> Request:
        recv[:counts[0]] = send
        return _Done()

    def split_node(self) -> tuple["SingleComm", "SingleComm"]:
        return self, self

    def allocate_shared(self, count: int, dtype: np.dtype) -> SharedArrays:
        return _PrivateArrays(np.zeros(count, dtype=dtype))


class _Done:
    def test(self) -> bool:
        return True


class _PrivateArrays:
    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def of(self, node_rank: int) -> np.ndarray:
        return self._array

    def sync(self) -> None:
        pass

    def free(self) -> None:
        pass


class MPIComm:
    def __init__(self, comm=None) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = node.Get_size()
        node.Free()
        self.threads = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self.mpi_version = MPI.Get_version()[0]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self._comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return self._comm.gather(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int) -> None:
        """Ends every rank of the job (a raising rank must not leave the others waiting forever), once
        mpirun has had a moment to pass on what this rank printed (the abort kills its forwarders too)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.25)
        self._comm.Abort(code)

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        self._comm.Bcast(buf, root=root)

    def Isend(self, buf: np.ndarray, dest: int) -> Request:
        return _MPIRequest(self._comm.Isend(buf, dest=dest))

    def Irecv(self, buf: np.ndarray, source: int) -> Request:
        return _MPIRequest(self._comm.Irecv(buf, source=source))

    def Ibarrier(self) -> Request:
        return _MPIRequest(self._comm.Ibarrier())

    def Ialltoallv(self, send: np.ndarray, send_counts: list[int], recv: np.ndarray, recv_counts: list[int],
                   send_displs: list[int] | None = None) -> Request:
        MPI = self._mpi
        displs = _displacements(send_counts) if send_displs is None else send_displs
        return _MPIRequest(self._comm.Ialltoallv([send, (send_counts, displs), MPI.FLOAT],
                                                 [recv, (recv_counts, _displacements(recv_counts)), MPI.FLOAT]))

    def Igatherv(self, send: np.ndarray, recv: np.ndarray | None, counts: list[int], root: int = 0) -> Request:
        MPI = self._mpi
        target = [recv, (counts, _displacements(counts)), MPI.DOUBLE] if self.rank == root else None
        return _MPIRequest(self._comm.Igatherv([send, MPI.DOUBLE], target, root=root))

    def split_node(self) -> tuple["MPIComm", "MPIComm | None"]:
        MPI = self._mpi
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        leaders = self._comm.Split(0 if node.Get_rank() == 0 else MPI.UNDEFINED, key=self.rank)
        return MPIComm(node), (MPIComm(leaders) if leaders != MPI.COMM_NULL else None)

    def allocate_shared(self, count: int, dtype: np.dtype) -> SharedArrays:
        return _MPISharedArrays(self._mpi, self._comm, count, np.dtype(dtype))


def _displacements(counts: list[int]) -> list[int]:
    out, at = [], 0
    for count in counts:
        out.append(at)
        at += count
    return out


class _MPIRequest:
    def __init__(self, request) -> None:
        self._request = request

    def test(self) -> bool:
        return self._request.Test()


class _MPISharedArrays:
    """An MPI-3 shared-memory window (`MPI_Win_allocate_shared`) of one array per rank of a node."""

    def __init__(self, MPI, node, count: int, dtype: np.dtype) -> None:
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")    # each rank's array on its own pages
        self._win = MPI.Win.Allocate_shared(count * dtype.itemsize, dtype.itemsize, info=info, comm=node)
        info.Free()
        self._win.Lock_all(MPI.MODE_NOCHECK)            # a passive epoch for the whole run: sync() is Win_sync
        self._arrays = []
        # each rank's own count: an MPI may round a segment up (Open MPI to whole pages)
        for r, n in enumerate(node.allgather(count)):
            memory, _ = self._win.Shared_query(r)
            self._arrays.append(np.frombuffer(memory, dtype=dtype, count=n))

    def of(self, node_rank: int) -> np.ndarray:
        return self._arrays[node_rank]

    def sync(self) -> None:
        self._win.Sync()

    def free(self) -> None:
        self._arrays = []
        self._win.Unlock_all()
        self._win.Free()


def world() -> Comm:
    """The MPI world when started under mpirun/mpiexec (or when mpi4py is importable), else a single process."""
    try:
        return MPIComm()
    except ImportError:
        return SingleComm()
