"""A doorbell per rank of a node: a rank waiting for another's flag in the node's shared memory sleeps until
that rank rings, instead of looking every half millisecond.

Eight ranks on two cores that each looked 2000 times a second took the cores from the ones still working:
rank 0's server step ran in 33 ms with seven ranks polling for their next plan, against 14 ms alone. A ring
is one datagram to the sleeper's socket (Linux's abstract namespace: no file to create or clean up), sent
after the flag is set; a ring that comes before the sleeper sleeps stays in its socket and ends the sleep
at once. Rings carry nothing: the sleeper looks at its flags again, so a ring too many only costs a look.
"""
from __future__ import annotations

import secrets
import select
import socket
import sys
from typing import Iterable

from simulator.comm import Comm


class Doorbells:
    """This rank's doorbell and the way to ring the other ranks' of its node. Collective to build."""

    def __init__(self, node: Comm) -> None:
        job = node.bcast(secrets.token_hex(8) if node.rank == 0 else None)
        self._addresses = [f"\0flock-{job}-{r}" for r in range(node.size)]
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self._addresses[node.rank])
        self._socket.setblocking(False)
        node.barrier()       # every bell is there before any rank rings one

    @classmethod
    def for_node(cls, node: Comm) -> "Doorbells | None":
        """The node's doorbells, or None where the abstract namespace is not there (outside Linux): the
        ranks then look at their flags with short sleeps. Collective."""
        available = node.bcast(sys.platform.startswith("linux") if node.rank == 0 else None)
        return cls(node) if available else None

    def ring(self, ranks: Iterable[int]) -> None:
        """Wakes the node's `ranks` (call after setting the flag they wait for)."""
        for r in ranks:
            try:
                self._socket.sendto(b"\1", self._addresses[r])
            except BlockingIOError:       # its socket is full of rings already: it will look anyway
                pass
            except OSError:               # a rank that is gone cannot be woken (its death is dealt with elsewhere)
                pass

    def wait(self, timeout: float) -> None:
        """Sleeps until this rank is rung or `timeout` seconds pass; forgets the rings that woke it."""
        readable, _, _ = select.select([self._socket], [], [], max(timeout, 0.0))
        while readable:
            try:
                self._socket.recv(64)
            except BlockingIOError:
                break

    def close(self) -> None:
        self._socket.close()
