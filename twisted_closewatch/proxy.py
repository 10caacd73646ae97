"""
Listening behind HAProxy (the PROXY protocol, v1 or v2) without breaking
closewatch's promises.

The PROXY header is a front door (L{twisted_closewatch.handshake}): until it
has been read, a connection holds no worker and no slot, only a place at the
door, for at most C{--handshake-timeout} seconds, with keepalive on its
socket.  The header is parsed strictly by L{twisted_closewatch.proxyheader}
(a header split across reads is reassembled, up to the protocol's maximum
length); a malformed one is a one-line warning and a closed connection.
Once it has been read:

  - the server's protocol is built, by its factory and with the original
    client's address, so the address rules, the rate limit, admission and
    the worker's environment see the real client; a connection that closes
    before sending a header (a load balancer's TCP health check) costs no
    worker;
  - the bytes that came with the header are the client's first;
  - half-closes are passed on to a protocol that can take them.

C{--listen haproxy:ENDPOINT} listens with L{proxyEndpoint}.  Under
C{--direct} the worker gets the socket itself, so not one byte past the
header may be read by the server: L{ExactProxiedConnection} takes exactly
the header off the socket.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReadDescriptor, IStreamServerEndpoint
from zope.interface import implementer

from twisted_closewatch import proxyheader, tcp
from twisted_closewatch.handshake import (
    DoorState,
    FrontDoor,
    FrontDoorEndpoint,
    FrontDoorFactory,
)


class ProxiedConnection(FrontDoor):
    """
    One connection from the load balancer: a PROXY header, then the client's
    bytes.
    """

    what = "PROXY header"
    _source: IPv4Address | IPv6Address | None = None
    _destination: IPv4Address | IPv6Address | None = None

    def connectionMade(self) -> None:
        self._received = bytearray()
        super().connectionMade()

    def atDoorReceived(self, data: bytes) -> None:
        self._received += data
        try:
            header = proxyheader.parse(self._received)
        except proxyheader.ProxyHeaderError as e:
            self.refuse("bad-header", str(e))
            return
        if header is None:
            return
        self._source, self._destination = header.source, header.destination
        received = bytes(self._received[header.length :])
        del self._received
        self.through(self.closewatch.buildProtocol(self.getPeer()), received)

    def getPeer(self) -> Any:
        """
        The original client's address, once the header has named it.
        """
        return self._source or super().getPeer()

    def getHost(self) -> Any:
        """
        The address the original client connected to, once the header has
        named it.
        """
        return self._destination or super().getHost()


#: The most peeked at once: a v2 header's longest.
_PEEK_SIZE = proxyheader.MAX_LENGTH


class ExactProxiedConnection(ProxiedConnection):
    """
    A PROXY header read to its last byte and not one byte further: what
    follows is the worker's to read (C{--direct}).

    The transport does not read; the header is peeked at (C{MSG_PEEK}) on a
    duplicate of the socket, and only bytes known to be the header's are
    taken off it: all of those peeked while the header is incomplete (a
    valid beginning is the header's), exactly the rest of its C{length}
    once it is complete.
    """

    _peeker: _Peeker | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        try:
            sock = tcp.socketOf(self.transport)
        except OSError:
            sock = None
        if sock is None:
            return
        self.transport.pauseProducing()
        self._peeker = _Peeker(sock.dup(), self)
        self.closewatch.reactor.addReader(self._peeker)

    def peek(self, sock: socket.socket) -> None:
        """
        Take what is the header's of what the socket holds now.
        """
        try:
            data = sock.recv(_PEEK_SIZE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._stopPeeking()
            self.transport.abortConnection()
            return
        if not data:
            # Gone before its header (a balancer's health check): no worker.
            self._stopPeeking()
            self.transport.loseConnection()
            return
        try:
            header = proxyheader.parse(self._received + data)
        except proxyheader.ProxyHeaderError as e:
            self.refuse("bad-header", str(e))
            return
        taken = len(data) if header is None else header.length - len(self._received)
        # Peeked already: the whole of it is there to be read.
        self.atDoorReceived(sock.recv(taken))

    def through(self, protocol: Any, received: bytes = b"") -> None:
        """
        Through with nothing read past the header: the protocol built reads
        the transport from here (a refusal's lingering close), or stops it
        at once (a direct connection).
        """
        self._stopPeeking()
        if self.state is DoorState.AT_DOOR:
            self.transport.resumeProducing()
        super().through(protocol, received)

    def _leave(self, state: DoorState) -> bool:
        self._stopPeeking()
        return super()._leave(state)

    def _stopPeeking(self) -> None:
        peeker, self._peeker = self._peeker, None
        if peeker is not None:
            self.closewatch.reactor.removeReader(peeker)
            peeker.close()


@implementer(IReadDescriptor)
class _Peeker:
    """
    A duplicate of a connection's socket in the reactor, for its door to
    peek at.
    """

    def __init__(self, sock: socket.socket, door: ExactProxiedConnection) -> None:
        self._socket = sock
        self._door = door

    def fileno(self) -> int:
        return self._socket.fileno()

    def doRead(self) -> None:
        self._door.peek(self._socket)

    def close(self) -> None:
        self._socket.close()

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "closewatch-proxy-peek"


class ProxyWrappingFactory(FrontDoorFactory):
    """
    Wraps a server factory whose protocols are built once the PROXY header
    has named the client; exactly the header is read under C{--direct}.
    """

    protocol = ProxiedConnection

    def __init__(self, wrappedFactory: Any) -> None:
        super().__init__(wrappedFactory)
        if wrappedFactory.config.direct:
            self.protocol = ExactProxiedConnection


def proxyEndpoint(wrapped: IStreamServerEndpoint) -> FrontDoorEndpoint:
    """
    An endpoint whose connections start with a PROXY header.
    """
    return FrontDoorEndpoint(wrapped, ProxyWrappingFactory)
