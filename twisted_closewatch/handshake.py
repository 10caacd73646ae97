"""
Front doors: what a connection must get through before it is ready for a
worker, a TLS handshake (here) or a PROXY header (L{twisted_closewatch.proxy}).

A connection at a front door holds no worker and no slot: it holds one of
C{--max-handshakes} places (over that bound it is closed at once) for at
most C{--handshake-timeout} seconds (then it is closed), with keepalive and
the user timeout on its socket from the start.  Once through, the server's
factory builds the real protocol (a relay, or a refusal) and the front door
becomes a pass-through, like the wrappers of L{twisted.protocols.policies}:
the relay never sees a connection that is not ready for a worker.

A TLS listener (C{ssl:}) is wrapped so that TLS is outermost and the gate is
the protocol TLS wraps: TLS calls L{IHandshakeListener.handshakeCompleted}
on it, and only then is the relay built.  Address rules and the rate limit
are applied at TCP accept, before any handshake work.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from twisted_closewatch import limits, tcp

if TYPE_CHECKING:
    from twisted_closewatch.factory import CloseWatchFactory


class DoorState(enum.Enum):
    """
    Where a connection is: at the door (from accept), then through it or
    turned away, and gone in the end (from any of them).
    """

    AT_DOOR = "at the door"
    THROUGH = "through"
    TURNED_AWAY = "turned away"
    GONE = "gone"


@implementer(IHalfCloseableProtocol)
class FrontDoor(ProtocolWrapper):
    """
    One connection at a front door, then a pass-through to the protocol
    built for it.  Subclasses say what the door is (L{what}), take what
    arrives at the door (L{atDoorReceived}), and call L{through} or
    L{refuse}.

    @cvar what: what the connection must get through, for the log.
    @ivar state: a L{DoorState}.
    """

    factory: FrontDoorFactory
    # A TCP or TLS transport, with more than ITransport says (abortConnection,
    # bufferSize, getHandle).
    transport: Any
    wrappedProtocol: IProtocol | None  # type: ignore[assignment]
    what = "front door"
    state = DoorState.AT_DOOR
    _timeout: IDelayedCall | None = None

    def __init__(self, factory: FrontDoorFactory, handshake: limits.Handshake) -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]
        self._handshake = handshake

    @property
    def closewatch(self) -> CloseWatchFactory:
        """
        The server's factory.
        """
        return self.factory.wrappedFactory

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection, without connecting the wrapped
        # protocol: there is none yet.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        config = self.closewatch.config
        try:
            sock = tcp.socketOf(self.transport)
        except OSError:
            sock = None
        if sock is not None:
            tcp.applySocketOptions(sock, config)
        self._timeout = self.closewatch.reactor.callLater(
            config.handshakeTimeout, self._timedOut
        )

    def _timedOut(self) -> None:
        self._timeout = None
        self.refuse(
            "handshake-timeout",
            f"{self.what} not done within {self.closewatch.config.handshakeTimeout:g} s",
        )

    def _leave(self, state: DoorState) -> bool:
        """
        Leave the door for C{state}, if the connection is at the door (or
        for good, from anywhere): its place there is free.

        @return: whether the connection was at the door.
        """
        wasAtDoor = self.state is DoorState.AT_DOOR
        if wasAtDoor or state is DoorState.GONE:
            self.state = state
        if wasAtDoor:
            if self._timeout is not None and self._timeout.active():
                self._timeout.cancel()
            self._timeout = None
            self._handshake.release()
        return wasAtDoor

    def through(self, protocol: IProtocol, received: bytes = b"") -> None:
        """
        Through the door: connect C{protocol} (built by the server's
        factory) to this connection and give it C{received}, the bytes that
        came with what opened the door.
        """
        if not self._leave(DoorState.THROUGH):
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(cast(ITransport, self))
        if received and self.connected and not self.disconnecting:
            protocol.dataReceived(received)

    def refuse(self, reason: str, detail: str) -> None:
        """
        Not through the door: log one line, count it, close the connection.
        """
        if not self._leave(DoorState.TURNED_AWAY):
            return
        self.closewatch.refused(self.getPeer(), reason, detail)
        self.disconnecting = True
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.state is DoorState.THROUGH:
            self.wrappedProtocol.dataReceived(data)  # type: ignore[union-attr]
        elif self.state is DoorState.AT_DOOR:
            self.atDoorReceived(data)

    def atDoorReceived(self, data: bytes) -> None:
        """
        Bytes that arrived before the door was passed; dropped unless the
        door is made of them.
        """

    def _halfCloseable(self) -> IHalfCloseableProtocol | None:
        if self.state is not DoorState.THROUGH:
            return None
        return IHalfCloseableProtocol(self.wrappedProtocol, None)

    def readConnectionLost(self) -> None:
        protocol = self._halfCloseable()
        if protocol is None:
            # What the TCP transport does for a protocol that cannot be
            # half-closed, and for a client that left at the door.
            self.loseConnection()
        else:
            protocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        protocol = self._halfCloseable()
        if protocol is not None:
            protocol.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        wasThrough = self.state is DoorState.THROUGH
        self._leave(DoorState.GONE)
        if wasThrough:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    @property
    def bufferSize(self) -> int:
        """
        The transport's read size, which the relay sets to bound its
        read-ahead.
        """
        return int(self.transport.bufferSize)

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        self.transport.bufferSize = size


class FrontDoorFactory(WrappingFactory):
    """
    Wraps the server's factory: each new connection takes a place at the
    front door (or is refused for C{max-handshakes}).
    """

    protocol: type[FrontDoor] = FrontDoor
    wrappedFactory: CloseWatchFactory

    def buildProtocol(self, addr: Any) -> Protocol:  # type: ignore[override]
        # A wrapper, or a Rejection for a connection that gets no further.
        try:
            handshake = self.wrappedFactory.limits.startHandshake()
        except limits.Refused as refused:
            self.wrappedFactory.refused(addr, refused.reason)
            return limits.Rejection()
        return self.protocol(self, handshake)


@implementer(IHandshakeListener)
class TLSGate(FrontDoor):
    """
    A TLS connection until its handshake is complete.
    """

    what = "TLS handshake"

    def handshakeCompleted(self) -> None:
        if self.state is DoorState.AT_DOOR:
            self.through(self.closewatch.connectionReady(self.getPeer()))


class TLSGateFactory(FrontDoorFactory):
    """
    Screens a TLS client at TCP accept, then holds it at the gate until its
    handshake is done.
    """

    protocol = TLSGate

    def buildProtocol(self, addr: Any) -> Protocol:  # type: ignore[override]
        refusal = self.wrappedFactory.screen(addr)
        if refusal is not None:
            return refusal
        return super().buildProtocol(addr)


@implementer(IStreamServerEndpoint)
class FrontDoorEndpoint:
    """
    An endpoint whose connections pass a front door first: it listens with
    a C{doorFactory} wrapping the server's factory.
    """

    def __init__(
        self, wrapped: IStreamServerEndpoint, doorFactory: type[FrontDoorFactory]
    ) -> None:
        self._wrappedEndpoint = wrapped
        self._doorFactory = doorFactory

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._wrappedEndpoint.listen(self._doorFactory(protocolFactory))

