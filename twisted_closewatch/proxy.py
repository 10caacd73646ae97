"""
Listening behind HAProxy (the PROXY protocol, v1 or v2) without breaking
closewatch's promises.

Twisted's own C{haproxy:} endpoint wrapper connects the wrapped protocol
the moment the TCP connection is accepted, before the PROXY header has been
read, and is not an L{IHalfCloseableProtocol}.  For closewatch that would
mean a worker spawned with the load balancer's address in C{TCPREMOTEIP},
a per-peer limit counting the load balancer instead of clients, and a
client's half-close turned into a full close before the relay could forward
it.  L{ProxyEndpoint} wraps differently:

  - the server's protocol is built, by its factory and with the original
    client's address, only once the header has been read, so admission and
    the worker's environment see the real client; a connection that closes
    before sending a header (a load balancer's TCP health check) costs no
    worker;
  - half-closes are passed on to a protocol that can take them.

C{--listen haproxy:ENDPOINT} listens with a L{ProxyEndpoint}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocol,
    IStreamServerEndpoint,
)
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
)
from zope.interface import directlyProvides, implementer, providedBy

log = Logger()


class _AwaitingHeader(Protocol):
    """
    Stands in for the server's protocol until the header has been read, and
    keeps the bytes that arrived with it.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


@implementer(IHalfCloseableProtocol)
class ProxiedConnection(HAProxyProtocolWrapper):
    """
    One connection from the load balancer: a PROXY header, then the client's
    bytes.
    """

    factory: ProxyWrappingFactory

    def __init__(self, factory: ProxyWrappingFactory) -> None:
        super().__init__(factory, _AwaitingHeader())

    def makeConnection(self, transport: Any) -> None:
        # Like ProtocolWrapper.makeConnection, without connecting the wrapped
        # protocol: there is none yet.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        super().dataReceived(data)
        if self._proxyInfo is not None:
            self._headerRead()
        elif self.disconnecting:
            log.warn(
                "no valid PROXY header from {peer}: closed",
                peer=self.transport.getPeer(),
            )

    def _headerRead(self) -> None:
        waiting = self.wrappedProtocol
        assert isinstance(waiting, _AwaitingHeader)
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        for data in waiting.received:
            if self.disconnecting or self.wrappedProtocol is None:
                break
            protocol.dataReceived(data)

    def _halfCloseable(self) -> IHalfCloseableProtocol | None:
        if self._proxyInfo is None:
            return None
        return IHalfCloseableProtocol(self.wrappedProtocol, None)

    def readConnectionLost(self) -> None:
        protocol = self._halfCloseable()
        if protocol is None:
            # What the TCP transport does for a protocol that cannot be
            # half-closed (and for a client that never sent a header).
            self.loseConnection()
        else:
            protocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        protocol = self._halfCloseable()
        if protocol is not None:
            protocol.writeConnectionLost()


class ProxyWrappingFactory(HAProxyWrappingFactory):
    """
    Wraps a server factory whose protocols are built once the PROXY header
    has named the client.
    """

    protocol = ProxiedConnection

    def buildProtocol(self, addr: Any) -> IProtocol:
        return self.protocol(self)


@implementer(IStreamServerEndpoint)
class ProxyEndpoint:
    """
    An endpoint whose connections start with a PROXY header.
    """

    def __init__(self, wrapped: IStreamServerEndpoint) -> None:
        self._wrapped = wrapped

    def listen(self, protocolFactory: Factory) -> Deferred[IListeningPort]:
        return self._wrapped.listen(ProxyWrappingFactory(protocolFactory))

