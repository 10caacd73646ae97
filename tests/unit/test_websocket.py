"""
The logic of the WebSocket front door, in memory: output framing, the
Origin check, the CGI environment, and L{WebSocketClient} between a fake
relay and a L{StringTransport}, with a fake clock for the pings.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake

from twisted_closewatch.relay import ConnectionRecord
from twisted_closewatch.web import (
    MAX_VALUE,
    OriginPolicy,
    cgiEnvironment,
    cleanValue,
    normalOrigin,
)
from twisted_closewatch.websocket import (
    ClientState,
    OutputFramer,
    WebSocketClient,
    WebSocketSettings,
)


class OutputFramerTests(TestCase):
    def test_lines(self) -> None:
        framer = OutputFramer(binary=False, maxMessage=100)
        self.assertEqual(framer.messages(b"one\ntw"), ["one"])
        self.assertEqual(framer.messages(b"o\r\n\nthree"), ["two", ""])
        self.assertEqual(framer.flush(), ["three"])
        self.assertEqual(framer.flush(), [])

    def test_longLineSplitAtCharacters(self) -> None:
        """
        A line over the limit is cut into messages of at most the limit,
        never inside a character; the unfinished rest is held, bounded.
        """
        framer = OutputFramer(binary=False, maxMessage=10)
        self.assertEqual(framer.messages("aaaaaaaaaé".encode()), ["aaaaaaaaa"])
        self.assertEqual(framer.messages("€€€€\n".encode()), ["é€€", "€€"])
        self.assertEqual(framer.splitLines, 1)
        self.assertEqual(framer.messages(b"x" * 35), ["x" * 10] * 3)
        self.assertEqual(framer.flush(), ["x" * 5])

    def test_invalidUTF8(self) -> None:
        framer = OutputFramer(binary=False, maxMessage=100)
        self.assertEqual(framer.messages(b"ok\n\xff\xfe\nfine\n"), ["ok", "\ufffd\ufffd", "fine"])
        self.assertEqual(framer.invalidLines, 1)

    def test_binary(self) -> None:
        framer = OutputFramer(binary=True, maxMessage=4)
        self.assertEqual(
            framer.messages(b"\x00\n\xff\x01\x02\x03"), [b"\x00\n\xff\x01", b"\x02\x03"]
        )
        self.assertEqual(framer.flush(), [])


class OriginTests(TestCase):
    def test_normalOrigin(self) -> None:
        self.assertEqual(normalOrigin("HTTPS://Example.COM:443"), "https://example.com")
        self.assertEqual(normalOrigin("http://[::1]:8787"), "http://[::1]:8787")
        for bad in (
            "null",
            "ftp://x",
            "http://",
            "http://x/path",
            "http://u@x",
            "http://x:99999",
        ):
            self.assertIsNone(normalOrigin(bad), bad)

    def test_sameHost(self) -> None:
        policy = OriginPolicy(())
        self.assertTrue(policy.allows("http://127.0.0.1:8787", "127.0.0.1:8787"))
        self.assertTrue(policy.allows("https://Example.com", "example.com:443"))
        self.assertTrue(policy.allows("http://example.com:80", "example.com"))
        self.assertTrue(policy.allows(None, "example.com"))
        self.assertFalse(policy.allows("http://evil.example", "example.com"))
        self.assertFalse(policy.allows("http://example.com:8080", "example.com"))
        self.assertFalse(policy.allows("https://example.com", "example.com:80"))
        self.assertFalse(policy.allows("http://example.com", None))
        self.assertFalse(policy.allows("null", "example.com"))
        self.assertFalse(policy.allows("garbage", "garbage"))

    def test_allowed(self) -> None:
        policy = OriginPolicy(("https://app.example", "null"))
        self.assertTrue(policy.allows("https://APP.example:443", "api.example"))
        self.assertTrue(policy.allows("null", "api.example"))
        self.assertFalse(policy.allows("http://app.example", "api.example"))
        self.assertTrue(OriginPolicy(("*",)).allows("http://evil.example", "api.example"))


class EnvironmentTests(TestCase):
    def test_cgi(self) -> None:
        env = cgiEnvironment(
            b"/a%20b/c?x=1&y=%41",
            [
                (b"Host", b"example.com"),
                (b"X-Forwarded-For", b"1.2.3.4"),
                (b"X-Multi", b"one"),
                (b"x-multi", b"two"),
                (b"Proxy", b"http://evil:3128"),
                (b"X_Under", b"spoof"),
            ],
            IPv4Address("TCP", "192.0.2.1", 5555),
            IPv4Address("TCP", "127.0.0.1", 8787),
            secure=True,
        )
        self.assertEqual(env["REMOTE_ADDR"], "192.0.2.1")
        self.assertEqual(env["REMOTE_PORT"], "5555")
        self.assertEqual(env["SERVER_PORT"], "8787")
        self.assertEqual(env["REQUEST_URI"], "/a%20b/c?x=1&y=%41")
        self.assertEqual(env["PATH_INFO"], "/a b/c")
        self.assertEqual(env["QUERY_STRING"], "x=1&y=%41")
        self.assertEqual(env["HTTPS"], "on")
        self.assertEqual(env["HTTP_HOST"], "example.com")
        self.assertEqual(env["HTTP_X_FORWARDED_FOR"], "1.2.3.4")
        self.assertEqual(env["HTTP_X_MULTI"], "one, two")
        self.assertNotIn("HTTP_PROXY", env)
        self.assertNotIn("HTTP_X_UNDER", env)

    def test_plainHTTP(self) -> None:
        env = cgiEnvironment(b"/", [], IPv4Address("TCP", "192.0.2.1", 1), None, secure=False)
        self.assertNotIn("HTTPS", env)
        self.assertEqual(env["QUERY_STRING"], "")

    def test_cleanValue(self) -> None:
        """
        No control character (a NUL would make the spawn fail), bounded,
        and the bytes themselves kept: the spawn encodes them back.
        """
        self.assertEqual(cleanValue(b"a\x00b\r\nc\x7fd\te"), "abcde")
        self.assertEqual(len(cleanValue(b"x" * 100000)), MAX_VALUE)
        value = cleanValue(b"caf\xc3\xa9 \xff")
        self.assertEqual(value.encode("utf-8", "surrogateescape"), b"caf\xc3\xa9 \xff")
        self.assertEqual(cleanValue(b"%00"), "%00")


class FakeRelay:
    """
    The L{IClientEvents} (and C{clientGone}, C{record}) of a relay, as
    L{WebSocketClient} calls them.
    """

    def __init__(self) -> None:
        self.record = ConnectionRecord(connectionID=7, peer="192.0.2.1:5555")
        self.client: Any = None
        self.received: list[bytes] = []
        self.gone: list[str] = []
        self.finished = 0
        self.lost: list[Failure] = []

    def connect(self, client: Any) -> FakeRelay:
        self.client = client
        return self

    def clientData(self, data: bytes) -> None:
        self.received.append(data)

    def clientFinished(self) -> None:
        self.finished += 1

    def clientGone(self, reason: str) -> None:
        self.gone.append(reason)

    def clientDisconnected(self, reason: Failure) -> None:
        self.lost.append(reason)


class _Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class ClientTests(TestCase):
    """
    L{WebSocketClient} as a transport for the relay.
    """

    def connect(self, spawnFails: bool = False, **settings: Any) -> None:
        self.peer = WSConnection(ConnectionType.CLIENT)
        handshake = H11Handshake(ConnectionType.SERVER)
        handshake.receive_data(self.peer.send(Request(host="example.com", target="/")))
        list(handshake.events())
        self.peer.receive_data(handshake.send(AcceptConnection()))
        list(self.peer.events())
        self.clock = Clock()
        self.relay = FakeRelay()
        self.transport = StringTransport()
        # The HTTP channel's registration, which the upgrade replaces.
        self.transport.registerProducer(_Producer(), True)
        assert handshake.connection is not None
        relay = self.relay

        def connect(client: Any) -> FakeRelay:
            if spawnFails:
                # What relay.SpawnFailed does.
                client.closeGracefully()
            return relay.connect(client)

        self.client = WebSocketClient(
            handshake.connection,
            connect,
            WebSocketSettings(**settings),
            self.clock,
            {},
        )
        self.client.makeConnection(self.transport)

    def fromClient(self, *events: Event) -> None:
        self.client.dataReceived(b"".join(self.peer.send(e) for e in events))

    def toClient(self) -> list[Event]:
        self.peer.receive_data(self.transport.value())
        self.transport.clear()
        return list(self.peer.events())

    def test_connected(self) -> None:
        self.connect()
        self.assertIs(self.relay.client, self.client)
        self.assertIsNone(self.transport.producer)

    def test_messagesAreLines(self) -> None:
        self.connect()
        self.fromClient(TextMessage("select 1"), TextMessage("a", message_finished=False))
        self.fromClient(TextMessage("é"), BytesMessage(b"\x00"))
        self.assertEqual(b"".join(self.relay.received), "select 1\naé\n\x00\n".encode())

    def test_binaryMode(self) -> None:
        self.connect(binary=True)
        self.fromClient(BytesMessage(b"\x00\xff"), TextMessage("x"))
        self.assertEqual(b"".join(self.relay.received), b"\x00\xffx")
        self.client.write(b"\x01\n\x02")
        [message] = self.toClient()
        self.assertEqual(message, BytesMessage(b"\x01\n\x02"))

    def test_output(self) -> None:
        self.connect()
        self.client.write(b'[42]\n{"ok"')
        self.client.write(b": true}\n")
        self.assertEqual(
            [e.data for e in self.toClient() if isinstance(e, TextMessage)],
            ["[42]", '{"ok": true}'],
        )

    def test_tooBig(self) -> None:
        """
        A message over the limit, even in pieces: the client is gone for
        C{websocket-error}, nothing more is delivered, and the close frame
        (once the relay closes) says 1009.
        """
        self.connect(maxMessage=10)
        self.fromClient(TextMessage("12345", message_finished=False))
        self.fromClient(TextMessage("678901"), TextMessage("later"))
        self.assertEqual(self.relay.gone, ["websocket-error"])
        self.assertEqual(b"".join(self.relay.received), b"12345")
        self.assertIs(self.client.state, ClientState.FAILED)
        self.client.write(b"dropped\n")
        self.client.closeGracefully()
        self.assertEqual([type(e) for e in self.toClient()], [CloseConnection])
        self.assertEqual(self.peer.state.name, "REMOTE_CLOSING")
        self.assertTrue(self.transport.disconnecting)

    def test_protocolError(self) -> None:
        self.connect()
        self.client.dataReceived(b"\x8f\x80\x00\x00\x00\x00")  # opcode 0xF
        self.assertEqual(self.relay.gone, ["websocket-error"])
        self.client.closeGracefully()
        [close] = self.toClient()
        self.assertEqual(close.code, 1002)  # type: ignore[attr-defined]

    def test_closeFrame(self) -> None:
        """
        The client's close frame is the client gone at once; the reply goes
        when the relay closes (after the worker's reap).
        """
        self.connect()
        self.fromClient(CloseConnection(1001))
        self.assertEqual(self.relay.gone, ["websocket-closed"])
        self.assertEqual(self.transport.value(), b"")
        self.client.write(b"too late\n")
        self.client.closeGracefully()
        [close] = self.toClient()
        self.assertEqual(close.code, 1000)  # type: ignore[attr-defined]
        self.assertTrue(self.transport.disconnecting)

    def test_workerDone(self) -> None:
        """
        The relay's lingering close: the last line, a close frame 1000, and
        the connection closed once the client's close frame answers.
        """
        self.connect()
        self.client.write(b"last")
        self.client.linger(30)
        # Sent by the client before it saw our close frame: dropped.
        self.fromClient(TextMessage("ignored"))
        events = self.toClient()
        self.assertEqual(events[0], TextMessage("last"))
        self.assertEqual(events[1].code, 1000)  # type: ignore[attr-defined]
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.relay.received, [])
        self.client.dataReceived(self.peer.send(CloseConnection(1000)))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.relay.gone, [])
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.relay.lost), 1)

    def test_spawnFailed(self) -> None:
        """
        A client closed while its relay is being made (its worker could not
        start): close code 1011.
        """
        self.connect(spawnFails=True)
        [close] = self.toClient()
        self.assertEqual(close.code, 1011)  # type: ignore[attr-defined]
        self.assertTrue(self.transport.disconnecting)

    def test_pingAnswered(self) -> None:
        self.connect()
        self.fromClient(Ping(b"hi"))
        self.assertEqual(self.toClient(), [Pong(b"hi")])

    def test_missedPong(self) -> None:
        """
        A ping each interval; no pong by the next one is C{ping-timeout}.
        """
        self.connect(pingInterval=5)
        self.clock.advance(5)
        self.assertEqual(self.toClient(), [Ping(b"closewatch")])
        self.fromClient(Pong(b"closewatch"))
        self.clock.advance(5)
        self.assertEqual(self.toClient(), [Ping(b"closewatch")])
        self.assertEqual(self.relay.gone, [])
        self.clock.advance(5)
        self.assertEqual(self.relay.gone, ["ping-timeout"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pausedExcused(self) -> None:
        """
        While we do not read the client (its pong may sit unread) or it does
        not take our output, a missing pong is not held against it.
        """
        self.connect(pingInterval=5)
        producer = _Producer()
        self.client.registerProducer(producer)
        self.clock.advance(5)
        self.client.pauseReading()
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.relay.gone, [])
        self.client.resumeReading()
        self.transport.producer.pauseProducing()
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.relay.gone, [])
        self.assertEqual(producer.calls, ["pause"])
        self.transport.producer.resumeProducing()
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.relay.gone, ["ping-timeout"])

    def test_connectionLost(self) -> None:
        """
        A FIN (the HTTP channel reports it as the end): the relay hears the
        input finished, then the connection lost.
        """
        self.connect(pingInterval=5)
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.relay.finished, len(self.relay.lost)), (1, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.client.dataReceived(self.peer.send(TextMessage("late")))
        self.assertEqual(self.relay.received, [])
