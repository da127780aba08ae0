"""A doorbell per rank of a node: a rank waiting for another's flag in the node's shared memory sleeps until
that rank rings, instead of looking every half millisecond.

Eight ranks on two cores that each looked 2000 times a second took the cores from the ones still working:
rank 0's server step ran in 33 ms with seven ranks polling for their next plan, against 14 ms alone. A ring
is one datagram to the sleeper's socket (Linux's abstract namespace: no file to create or clean up), sent
after the flag is set; a ring that comes before the sleeper sleeps stays in its socket and ends the sleep
at once. Rings carry nothing: the sleeper looks at its flags again, so a ring too many only costs a look.
A rank has a bell per thread that waits (`BELLS`): a ring that one thread took would be lost to the other.
"""
from __future__ import annotations

import logging
import secrets
import select
import socket
import sys
from typing import Iterable

from simulator.comm import Comm

log = logging.getLogger(__name__)
MAIN, SUM = range(2)     # a rank's bells: its main thread's, and its node-sum thread's
BELLS = 2


class Doorbells:
    """This rank's doorbells and the way to ring those of its node's ranks. Collective to build."""

    def __init__(self, node: Comm) -> None:
        job = node.bcast(secrets.token_hex(8) if node.rank == 0 else None)
        self._addresses = [[f"\0flock-{job}-{r}-{b}" for b in range(BELLS)] for r in range(node.size)]
        self._sockets, self._polls = [], []
        for address in self._addresses[node.rank]:
            bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            bell.bind(address)
            bell.setblocking(False)
            poll = select.poll()      # not select(): no limit on the descriptor's number
            poll.register(bell, select.POLLIN)
            self._sockets.append(bell)
            self._polls.append(poll)
        self._ringer = self._sockets[MAIN]     # sendto on a socket is safe from any thread
        self._told = False
        node.barrier()       # every bell is there before any rank rings one

    @classmethod
    def for_node(cls, node: Comm) -> "Doorbells | None":
        """The node's doorbells, or None where the abstract namespace is not there (outside Linux): the
        ranks then look at their flags with short sleeps. Collective."""
        available = node.bcast(sys.platform.startswith("linux") if node.rank == 0 else None)
        return cls(node) if available else None

    def ring(self, ranks: Iterable[int], bell: int = MAIN) -> None:
        """Wakes the thread `bell` of the node's `ranks` (call after setting the flag it waits for)."""
        for r in ranks:
            try:
                self._ringer.sendto(b"\1", self._addresses[r][bell])
            except BlockingIOError:       # its socket is full of rings already: it will look anyway
                pass
            except OSError as e:          # gone (its death is dealt with elsewhere), or out of reach
                if not self._told:
                    self._told = True
                    log.warning("doorbell of node rank %d: %s; waits fall back to looks every 0.1 s", r, e)

    def wait(self, timeout: float, bell: int = MAIN) -> None:
        """Sleeps until this rank's `bell` is rung or `timeout` seconds pass; forgets the rings that woke it."""
        mine = self._sockets[bell]
        readable = self._polls[bell].poll(max(timeout, 0.0) * 1000)
        while readable:
            try:
                mine.recv(64)
            except BlockingIOError:
                break

    def close(self) -> None:
        for bell in self._sockets:
            bell.close()
