"""
The front doors in memory: the TLS gate and the PROXY header reader, with
a fake clock and string transports; the server's factory builds a recording
protocol instead of a relay.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from twisted_closewatch import limits
from twisted_closewatch.access import parseNetwork
from twisted_closewatch.config import Config
from twisted_closewatch.factory import CloseWatchFactory
from twisted_closewatch.handshake import DoorState, TLSGate, TLSGateFactory
from twisted_closewatch.metrics import ServerMetrics
from twisted_closewatch.proxy import ProxiedConnection, ProxyWrappingFactory
from twisted_closewatch.proxyheader import V1_MAX_LENGTH

BALANCER = IPv4Address("TCP", "127.0.0.1", 40000)
LOCAL = IPv4Address("TCP", "127.0.0.1", 8787)
V1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n"


@implementer(IHalfCloseableProtocol)
class Ready(Protocol):
    """
    Stands in for a relay: records what it is given.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.events: list[str] = []

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.events.append("read-lost")

    def writeConnectionLost(self) -> None:
        self.events.append("write-lost")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.events.append("lost")


class RecordingFactory(CloseWatchFactory):
    """
    The server's factory, with L{Ready} for a relay.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__(config, reactor, ServerMetrics())
        self.ready: list[tuple[Any, Ready]] = []

    def connectionReady(self, addr: Any) -> Protocol:
        if self.limits.active >= self.config.maxWorkers:
            return super().connectionReady(addr)
        protocol = Ready()
        self.ready.append((addr, protocol))
        return protocol

    def refusals(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "closewatch_connections_refused_total", {"reason": reason}
        )
        return value


def config(**kwargs: Any) -> Config:
    return Config(argv=["/bin/true"], handshakeTimeout=10, **kwargs)


class FrontDoorTestsMixin:
    doorFactory: Any

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def connect(self, factory: RecordingFactory, peer: Any = BALANCER) -> tuple[Any, StringTransport]:
        door = self.doorFactory(factory).buildProtocol(peer)
        transport = StringTransport(hostAddress=LOCAL, peerAddress=peer)
        door.makeConnection(transport)
        return door, transport


class TLSGateTests(FrontDoorTestsMixin, TestCase):
    doorFactory = TLSGateFactory

    def test_readyOnlyAfterHandshake(self) -> None:
        """
        Nothing is built for the connection until its handshake is done; it
        holds a place at the door meanwhile, and gives it back then.
        """
        factory = RecordingFactory(config(), self.reactor)
        gate, transport = self.connect(factory)
        self.assertIsInstance(gate, TLSGate)
        self.assertEqual(factory.ready, [])
        self.assertEqual(factory.limits.handshaking, 1)
        gate.handshakeCompleted()
        [(addr, ready)] = factory.ready
        self.assertEqual(addr, BALANCER)
        self.assertEqual(ready.events, ["made"])
        self.assertIs(ready.transport, gate)
        self.assertEqual(factory.limits.handshaking, 0)
        gate.dataReceived(b"query")
        self.assertEqual(ready.received, [b"query"])
        self.reactor.advance(100)
        self.assertFalse(transport.disconnecting)

    def test_timeout(self) -> None:
        factory = RecordingFactory(config(), self.reactor)
        gate, transport = self.connect(factory)
        self.reactor.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.refusals("handshake-timeout"), 1)
        self.assertEqual(factory.limits.handshaking, 0)
        gate.handshakeCompleted()
        gate.connectionLost(Failure(Exception("aborted")))
        self.assertEqual(factory.ready, [])
        self.assertEqual(gate.state, DoorState.GONE)

    def test_clientLeaves(self) -> None:
        factory = RecordingFactory(config(), self.reactor)
        gate, _ = self.connect(factory)
        gate.connectionLost(Failure(Exception("gone")))
        self.assertEqual(factory.limits.handshaking, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_maxHandshakes(self) -> None:
        factory = RecordingFactory(config(maxHandshakes=2), self.reactor)
        self.connect(factory)
        self.connect(factory)
        refused, transport = self.connect(factory)
        self.assertIsInstance(refused, limits.Rejection)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.refusals("max-handshakes"), 1)

    def test_deniedBeforeHandshake(self) -> None:
        factory = RecordingFactory(config(deny=[parseNetwork("127.0.0.1")]), self.reactor)
        refused, transport = self.connect(factory)
        self.assertIsInstance(refused, limits.Rejection)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.refusals("denied"), 1)
        self.assertEqual(factory.limits.handshaking, 0)

    def test_busyAfterHandshake(self) -> None:
        """
        The worker slot is taken once the handshake is done: silent
        connections at the gate take none.
        """
        factory = RecordingFactory(config(maxWorkers=1), self.reactor)
        silent = [self.connect(factory) for _ in range(5)]
        gate, _ = self.connect(factory)
        gate.handshakeCompleted()
        self.assertEqual(len(factory.ready), 1)
        self.assertEqual(len(silent), 5)
        self.assertEqual(factory.refusals("max-workers"), 0)


class ProxyHeaderTests(FrontDoorTestsMixin, TestCase):
    doorFactory = ProxyWrappingFactory

    def test_byteByByte(self) -> None:
        """
        A header sent a byte at a time is reassembled; the client's own
        bytes that follow it reach the protocol, in order.
        """
        factory = RecordingFactory(config(), self.reactor)
        reader, _ = self.connect(factory)
        self.assertIsInstance(reader, ProxiedConnection)
        for byte in V1 + b"ab":
            reader.dataReceived(bytes([byte]))
        [(addr, ready)] = factory.ready
        self.assertEqual(addr, IPv4Address("TCP", "192.0.2.7", 56324))
        self.assertEqual(reader.getPeer(), addr)
        self.assertEqual(reader.getHost(), IPv4Address("TCP", "198.51.100.1", 443))
        self.assertEqual(b"".join(ready.received), b"ab")

    def test_dataWithHeader(self) -> None:
        factory = RecordingFactory(config(), self.reactor)
        reader, _ = self.connect(factory)
        reader.dataReceived(V1 + b"first")
        reader.dataReceived(b"second")
        [(_, ready)] = factory.ready
        self.assertEqual(ready.received, [b"first", b"second"])
        self.assertEqual(factory.limits.handshaking, 0)

    def test_unknownUsesSocketAddresses(self) -> None:
        factory = RecordingFactory(config(), self.reactor)
        reader, _ = self.connect(factory)
        reader.dataReceived(b"PROXY UNKNOWN\r\n")
        [(addr, _)] = factory.ready
        self.assertEqual(addr, BALANCER)
        self.assertEqual(reader.getHost(), LOCAL)

    def test_malformed(self) -> None:
        """
        A malformed header is one warning, a count, and a closed connection;
        nothing is built.
        """
        factory = RecordingFactory(config(), self.reactor)
        reader, transport = self.connect(factory)
        reader.dataReceived(b"PROXY TCP4 999.1.2.3 198.51.100.1 1 2\r\nhello")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.ready, [])
        self.assertEqual(factory.refusals("bad-header"), 1)
        reader.dataReceived(b"more")
        self.assertEqual(factory.refusals("bad-header"), 1)

    def test_tooLong(self) -> None:
        factory = RecordingFactory(config(), self.reactor)
        reader, transport = self.connect(factory)
        for _ in range(V1_MAX_LENGTH):
            reader.dataReceived(b"PROXY " if not reader._received else b"x")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.refusals("bad-header"), 1)

    def test_partialHeaderTimeout(self) -> None:
        factory = RecordingFactory(config(), self.reactor)
        reader, transport = self.connect(factory)
        reader.dataReceived(V1[:20])
        self.reactor.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.refusals("handshake-timeout"), 1)
        self.assertEqual(factory.ready, [])

    def test_rulesApplyToOriginalClient(self) -> None:
        factory = RecordingFactory(config(allow=[parseNetwork("192.0.2.0/24")]), self.reactor)
        reader, transport = self.connect(factory)
        reader.dataReceived(V1)
        self.assertEqual(len(factory.ready), 1)
        reader, transport = self.connect(factory)
        reader.dataReceived(b"PROXY TCP4 203.0.113.9 198.51.100.1 1 2\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.refusals("denied"), 1)

    def test_halfCloseAfterHeader(self) -> None:
        factory = RecordingFactory(config(), self.reactor)
        reader, transport = self.connect(factory)
        reader.dataReceived(V1)
        reader.readConnectionLost()
        reader.writeConnectionLost()
        [(_, ready)] = factory.ready
        self.assertEqual(ready.events, ["made", "read-lost", "write-lost"])
        self.assertFalse(transport.disconnecting)

    def test_closeBeforeHeader(self) -> None:
        factory = RecordingFactory(config(), self.reactor)
        reader, transport = self.connect(factory)
        reader.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        reader.connectionLost(Failure(Exception("gone")))
        self.assertEqual(factory.limits.handshaking, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
