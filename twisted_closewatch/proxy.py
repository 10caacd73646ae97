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

C{--listen haproxy:ENDPOINT} listens with L{proxyEndpoint}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IStreamServerEndpoint

from twisted_closewatch import proxyheader
from twisted_closewatch.handshake import FrontDoor, FrontDoorEndpoint, FrontDoorFactory


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


class ProxyWrappingFactory(FrontDoorFactory):
    """
    Wraps a server factory whose protocols are built once the PROXY header
    has named the client.
    """

    protocol = ProxiedConnection


def proxyEndpoint(wrapped: IStreamServerEndpoint) -> FrontDoorEndpoint:
    """
    An endpoint whose connections start with a PROXY header.
    """
    return FrontDoorEndpoint(wrapped, ProxyWrappingFactory)
