"""
Admission: how many connections may hold a worker, overall and per client
address, and how many may be at a front door (a TLS handshake, a PROXY
header) at once.

A connection takes a L{Slot} when it is ready for a worker (at accept, or
once past its front door) and gives it back when its
worker has been reaped, or, if it never had one (spawn failure), when the
connection has ended.  The factory releases it in the two places every
connection passes through, whatever way it ended (client close, reset or
half-close, worker exit, spawn failure, max lifetime, server stop), and a
release is idempotent, so no path can leak a slot or free one twice.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_closewatch.addresses import peerKey
from twisted_closewatch.linger import LingeringClose

#: Seconds a refused client gets to close after reading the busy message
#: before its connection is closed anyway.
REFUSAL_LINGER = 2.0


class Refused(Exception):
    """
    A connection may not have a worker.

    @ivar reason: C{"max-workers"}, C{"max-per-peer"} or
        C{"max-handshakes"}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Slot:
    """
    One admitted connection's share of the limits.
    """

    def __init__(self, limits: Limits, peer: str | None) -> None:
        self._limits = limits
        self.peer = peer
        self._held = True

    def release(self) -> None:
        """
        Give the slot back; calling this again does nothing, so a second end
        notification can never free someone else's slot.
        """
        if self._held:
            self._held = False
            self._limits._release(self)


class Handshake:
    """
    One connection's place at a front door, given back once it is through
    or gone; like L{Slot.release}, L{release} is idempotent.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limits.handshaking -= 1


class Limits:
    """
    Counts the slots held, overall and per peer address, and the
    connections at a front door.

    @ivar active: slots held now.
    @ivar handshaking: connections at a front door now.
    """

    def __init__(self, maxWorkers: int, maxPerPeer: int = 0, maxHandshakes: int = 0) -> None:
        self.maxWorkers = maxWorkers
        self.maxPerPeer = maxPerPeer
        self.maxHandshakes = maxHandshakes
        self.active = 0
        self.handshaking = 0
        self._perPeer: Counter[str] = Counter()

    def startHandshake(self) -> Handshake:
        """
        Take a place at a front door; C{maxHandshakes} of 0 is no limit.

        @raise Refused: all are taken.
        """
        if self.maxHandshakes and self.handshaking >= self.maxHandshakes:
            raise Refused("max-handshakes")
        self.handshaking += 1
        return Handshake(self)

    def perPeer(self, peer: str) -> int:
        """
        Slots C{peer} holds now.
        """
        return self._perPeer[peer]

    def __len__(self) -> int:
        """
        How many peers hold at least one slot (entries are dropped at zero,
        so a stream of distinct clients does not grow this forever).
        """
        return len(self._perPeer)

    def admit(self, address: Any) -> Slot:
        """
        Take a slot for a connection from C{address}.

        @raise Refused: a limit is reached.
        """
        if self.active >= self.maxWorkers:
            raise Refused("max-workers")
        peer = peerKey(address) if self.maxPerPeer else None
        if peer is not None and self._perPeer[peer] >= self.maxPerPeer:
            raise Refused("max-per-peer")
        self.active += 1
        if peer is not None:
            self._perPeer[peer] += 1
        return Slot(self, peer)

    def _release(self, slot: Slot) -> None:
        self.active -= 1
        if slot.peer is not None:
            self._perPeer[slot.peer] -= 1
            if not self._perPeer[slot.peer]:
                del self._perPeer[slot.peer]


class Rejection(Protocol):
    """
    What a client refused at the door gets: an immediate close, nothing
    said.  Under TLS, before any handshake work.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class Refusal(Protocol):
    """
    What a refused client gets: the busy message, then a lingering close
    (L{LingeringClose}), so that the kernel does not reset the connection
    over the client's unread input and destroy the message with it.
    """

    _linger: LingeringClose

    def __init__(self, message: bytes, reactor: Any) -> None:
        self._message = message
        self._reactor = reactor

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self._message:
            transport.write(self._message)
        self._linger = LingeringClose(transport, self._reactor, REFUSAL_LINGER)
        self._linger.start()

    def dataReceived(self, data: bytes) -> None:
        self._linger.inputReceived()

    def readConnectionLost(self) -> None:
        self._linger.inputDone()

    def writeConnectionLost(self) -> None:
        self._linger.outputDone()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._linger.stop()
