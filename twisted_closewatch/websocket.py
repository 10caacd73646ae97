"""
A WebSocket client as the relay sees it: an L{IClient}, like a TCP one.

L{WebSocketClient} speaks the WebSocket protocol (wsproto) on the connection
an HTTP upgrade handed over (L{twisted_closewatch.web}), and is the relay's
client (L{twisted_closewatch.client.IClient}):

  - C{write}: the worker's output, one text message per line (or, with
    C{--binary}, one binary message per chunk read);
  - C{pauseReading}/C{resumeReading}: reading the connection beneath, so a
    worker that does not read pauses the client;
  - C{registerProducer}: the worker's output, paced by the connection
    beneath, so a client that does not read pauses the worker;
  - C{closeGracefully}: a close frame after the output, then a FIN;
    C{linger}: the worker's last words, a close frame 1000, then the
    client's close frame awaited; C{abort}: a reset;
  - C{probe}: the socket beneath, so that the close watch sees a FIN or a
    reset even while reading is paused.

Events go the other way (L{IClientEvents}): a message is C{clientData} (a
text message is a line: C{\\n} added), a close frame is the client gone for
C{websocket-closed}, a protocol error or a message over C{--max-message}
is C{websocket-error} (and a close frame with the matching code), a ping
not answered within C{--heartbeat} is C{ping-timeout}.

Twisted's own L{twisted.web.websocket} is not used on the server side: it
assembles each message in memory however large before delivering it, and
reports a close frame only once its reply has been flushed, when the
worker should be dead already.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet import error
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IPushProducer,
    ISSLTransport,
)
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from zope.interface import implementer

from twisted_closewatch.client import IClient, IClientEvents
from twisted_closewatch.record import EndReason
from twisted_closewatch.splice import SpliceTarget
from twisted_closewatch.tcp import SocketProbe

log = Logger()

#: What a ping carries; any pong after it proves the client alive (pongs
#: may be coalesced, so their payloads are not matched).
PING_PAYLOAD = b"closewatch"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class WebSocketSettings:
    """
    How messages are framed.

    @ivar binary: raw bytes both ways as binary messages, instead of lines
        as text messages.
    @ivar maxMessage: the largest message either way, in bytes: a larger
        one from the client closes the connection with 1009, a longer line
        from the worker is split.
    @ivar pingInterval: seconds between pings; a ping not answered by the
        next one is a dead client.  0 is off.
    """

    binary: bool = False
    maxMessage: int = 1024 * 1024
    pingInterval: float = 0


def _characterBoundary(data: bytearray | bytes, limit: int) -> int:
    """
    The largest cut at most C{limit} bytes into UTF-8 C{data} (longer than
    that) that does not split a character; C{limit} if the data is not
    UTF-8 there.
    """
    for cut in range(limit, max(limit - 4, 0), -1):
        if data[cut] & 0xC0 != 0x80:
            return cut
    return limit


class OutputFramer:
    """
    Turns a worker's output into WebSocket messages.

    Text mode: each line (C{\\n}, or C{\\r\\n}, removed) is one text
    message; a line longer than C{maxMessage} bytes is split into messages
    of at most that many bytes, at character boundaries.  Output that is
    not UTF-8 is decoded with U+FFFD in place of each bad sequence (and
    counted in L{invalidLines}).  Binary mode: each chunk is one binary
    message (or several, if larger than C{maxMessage}).

    At most C{maxMessage} bytes of an unfinished line are ever held.

    @ivar invalidLines: lines that were not valid UTF-8.
    @ivar splitLines: lines that were longer than a message may be.
    """

    def __init__(self, binary: bool, maxMessage: int) -> None:
        self._binary = binary
        self._max = maxMessage
        self._partial = bytearray()
        self._cutting = False
        self.invalidLines = 0
        self.splitLines = 0

    def messages(self, data: bytes) -> list[str | bytes]:
        """
        The messages C{data} completes.
        """
        if self._binary:
            return [data[i : i + self._max] for i in range(0, len(data), self._max)]
        buffer = self._partial
        buffer += data
        found: list[str | bytes] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            if line.endswith(b"\r"):
                del line[-1:]
            found.extend(self._pieces(line, finished=True))
            start = end + 1
        del buffer[:start]
        found.extend(self._pieces(buffer, finished=False))
        return found

    def flush(self) -> list[str | bytes]:
        """
        The last line, if the worker's output did not end with a newline.
        """
        if not self._partial:
            return []
        line, self._partial = self._partial, bytearray()
        return self._pieces(line, finished=True)

    def _pieces(self, line: bytearray, finished: bool) -> list[str | bytes]:
        """
        Cut what is too long off C{line} as messages (all of it if
        C{finished}), leaving the rest in it.
        """
        pieces: list[str | bytes] = []
        while len(line) > self._max:
            if not self._cutting:
                self._cutting = True
                self.splitLines += 1
            cut = _characterBoundary(line, self._max)
            pieces.append(self._text(line[:cut]))
            del line[:cut]
        if finished:
            pieces.append(self._text(line))
            del line[:]
            self._cutting = False
        return pieces

    def _text(self, line: bytearray) -> str:
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self.invalidLines += 1
            return line.decode("utf-8", "replace")


class ClientState(enum.Enum):
    """
    Where a WebSocket connection is in its closing handshake.
    """

    OPEN = "open"
    #: The client's close frame came: our reply goes once the worker is dead.
    CLOSE_RECEIVED = "close received"
    #: The client broke the protocol: our close frame (with the error's
    #: code) goes once the worker is dead.
    FAILED = "failed"
    #: Our close frame is sent (the worker is done): the client's is awaited.
    CLOSING = "closing"
    #: The connection beneath is closing or closed.
    CLOSED = "closed"


@implementer(IPushProducer)
class _OutputPacing:
    """
    The relay's producer (the worker's stdout), registered with the
    connection beneath: remembers whether the client takes what is sent.
    """

    paused = False

    def __init__(self, producer: IPushProducer) -> None:
        self._producer = producer

    def pauseProducing(self) -> None:
        self.paused = True
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


class _PingTimer:
    """
    A ping every C{interval} seconds; no pong since the last one is a dead
    client.  A client excused (we stopped reading it, so its pong may sit
    unread; or it is not taking our output, so our ping may not have left)
    is not held to it: the close watch, keepalive and the user timeout
    watch that connection instead.
    """

    _call: IDelayedCall | None = None

    def __init__(self, reactor: Any, interval: float, client: WebSocketClient) -> None:
        self._reactor = reactor
        self._interval = interval
        self._client = client
        self._awaiting = False

    def start(self) -> None:
        self._call = self._reactor.callLater(self._interval, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def pongReceived(self) -> None:
        self._awaiting = False

    def _tick(self) -> None:
        self._call = None
        if self._client.excused():
            self._awaiting = False
        elif self._awaiting:
            self._client.pingTimedOut()
            return
        if self._client.ping():
            self._awaiting = True
            self.start()


@implementer(IProtocol, IClient)
class WebSocketClient:
    """
    One WebSocket connection after its upgrade: the protocol on the
    connection beneath, and the client of its relay.

    @ivar transport: the connection beneath (TCP, TLS, or a front door).
    @ivar environment: the worker's CGI-style variables for this client.
    @ivar state: a L{ClientState}.
    """

    transport: Any = None
    probe: SocketProbe | None = None
    host: Any = None
    peer: Any = None
    state = ClientState.OPEN
    #: The relay (or what stands for it), made once connected.
    _events: Any = None
    _pacing: _OutputPacing | None = None
    _lingerCall: IDelayedCall | None = None
    _readingPaused = False
    _invalidReported = False
    _splitReported = False

    def __init__(
        self,
        connection: Connection,
        connect: Callable[[IClient], IClientEvents],
        settings: WebSocketSettings,
        clock: Any,
        environment: dict[str, str],
    ) -> None:
        """
        @param connect: makes the relay for this client, once connected.
        """
        self._ws = connection
        self._connect = connect
        self._settings = settings
        self._clock = clock
        self._framer = OutputFramer(settings.binary, settings.maxMessage)
        self._received = 0
        self._closeCode: int = CloseReason.NORMAL_CLOSURE
        self._closeReason = ""
        self._pingTimer = (
            _PingTimer(clock, settings.pingInterval, self) if settings.pingInterval else None
        )
        self.environment = environment

    # The protocol on the connection beneath.

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        """
        The upgrade is done: connect the relay (which starts the worker).
        The HTTP channel that read the upgrade no longer paces anything.
        """
        transport = self.transport
        transport.unregisterProducer()
        self.host = transport.getHost()
        self.peer = transport.getPeer()
        self.probe = SocketProbe.of(transport)
        self._events = self._connect(self)
        if self._pingTimer is not None and self.state is ClientState.OPEN:
            self._pingTimer.start()

    def dataReceived(self, data: bytes) -> None:
        if self.state not in (ClientState.OPEN, ClientState.CLOSING):
            return
        self._ws.receive_data(data)
        for event in self._ws.events():
            self._eventReceived(event)
            if self.state not in (ClientState.OPEN, ClientState.CLOSING):
                return

    def connectionLost(self, reason: Failure) -> None:
        wasOpen = self.state is ClientState.OPEN
        self.state = ClientState.CLOSED
        if self._pingTimer is not None:
            self._pingTimer.stop()
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        if wasOpen and reason.check(error.ConnectionDone):
            # The HTTP channel cannot be half-closed: Twisted reports the
            # client's FIN as the connection's end.  As for a byte stream,
            # the relay hears of the FIN first (it tells an RST that the
            # epoll reactor took for a FIN from one).
            self._events.clientFinished()
        self._events.clientDisconnected(reason)

    def _eventReceived(self, event: Event) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            self._messageReceived(event)
        elif isinstance(event, CloseConnection):
            self._closeReceived(event)
        elif isinstance(event, Ping):
            self.transport.write(self._ws.send(event.response()))
        elif isinstance(event, Pong) and self._pingTimer is not None:
            self._pingTimer.pongReceived()

    def _messageReceived(self, event: Message[Any]) -> None:
        """
        A piece of a message: on to the worker as it comes (a text message
        ends with a newline), unless the message grows over the limit.
        """
        data = event.data
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._received += len(payload)
        if self._received > self._settings.maxMessage:
            self._fail(
                CloseReason.MESSAGE_TOO_BIG,
                f"message over {self._settings.maxMessage} bytes",
            )
            return
        if event.message_finished:
            self._received = 0
            if not self._settings.binary:
                payload += b"\n"
        if payload and self.state is ClientState.OPEN:
            self._events.clientData(payload)

    def _closeReceived(self, event: CloseConnection) -> None:
        if self._ws.state is ConnectionState.OPEN:
            # Not the client's close frame: wsproto's word for a frame it
            # could not parse (bad framing 1002, bad UTF-8 1007, ...).
            self._fail(event.code, event.reason or "protocol error")
        elif self.state is ClientState.CLOSING:
            # The answer to our close frame: the handshake is complete.
            self._closeBeneath()
        else:
            self.state = ClientState.CLOSE_RECEIVED
            self._events.clientGone(EndReason.WEBSOCKET_CLOSED)

    def _fail(self, code: int, reason: str) -> None:
        """
        The client broke the protocol: it is gone, and is told why once its
        worker is dead.
        """
        if self.state is ClientState.CLOSING:
            self._closeBeneath()
            return
        self.state = ClientState.FAILED
        self._closeCode, self._closeReason = code, reason[:100]
        record = self._events.record
        log.emit(
            LogLevel.warn,
            "[{connection_id}] WebSocket error from {peer}: {error} (close code {code})",
            connection_id=record.connectionID,
            peer=record.peer,
            error=reason,
            code=int(code),
        )
        self._events.clientGone(EndReason.WEBSOCKET_ERROR)

    # Liveness.

    def ping(self) -> bool:
        """
        Send a ping, if the connection is open (else pings are over).
        """
        if self.state is not ClientState.OPEN:
            return False
        self.transport.write(self._ws.send(Ping(PING_PAYLOAD)))
        return True

    def excused(self) -> bool:
        """
        Whether a missing pong says nothing (see L{_PingTimer}).
        """
        return self._readingPaused or self.outputPaused()

    def pingTimedOut(self) -> None:
        self._events.clientGone(EndReason.PING_TIMEOUT)

    # IClient.

    def write(self, data: bytes) -> None:
        if self.state is ClientState.OPEN:
            self._send(self._framer.messages(data))

    def _send(self, messages: list[str | bytes]) -> None:
        send = self._ws.send
        self.transport.writeSequence([send(_message(m)) for m in messages])
        framer = self._framer
        if framer.invalidLines and not self._invalidReported:
            # Once per connection: a worker writing binary in text mode
            # would otherwise log a line per line.
            self._invalidReported = True
            record = self._events.record
            log.error(
                "[{connection_id}] worker {pid} wrote output that is not UTF-8: "
                "sent with U+FFFD in place of each bad sequence (use --binary for "
                "raw bytes)",
                connection_id=record.connectionID,
                pid=record.pid,
            )
        if framer.splitLines and not self._splitReported:
            self._splitReported = True
            record = self._events.record
            log.emit(
                LogLevel.warn,
                "[{connection_id}] worker {pid} wrote a line longer than "
                "--max-message ({max_message} bytes): sent as several messages",
                connection_id=record.connectionID,
                pid=record.pid,
                max_message=self._settings.maxMessage,
            )

    def pauseReading(self) -> None:
        self._readingPaused = True
        self.transport.pauseProducing()

    def resumeReading(self) -> None:
        self._readingPaused = False
        self.transport.resumeProducing()

    def setReadSize(self, size: int) -> None:
        self.transport.bufferSize = size

    def spliceable(self) -> bool:
        """
        Never: the client's bytes are frames, not the worker's input.
        """
        return False

    def spliceInto(self, target: SpliceTarget, spliced: Callable[[int], None]) -> None:
        raise TypeError("a WebSocket client's bytes are frames: they cannot be spliced")

    def idleSocket(self) -> int | None:
        """
        Never: the worker's output goes to the client in frames.
        """
        return None

    def registerProducer(self, producer: IPushProducer) -> None:
        self._pacing = _OutputPacing(producer)
        self.transport.registerProducer(self._pacing, True)

    def unregisterProducer(self) -> None:
        self._pacing = None
        self.transport.unregisterProducer()

    def outputPaused(self) -> bool:
        return self._pacing is not None and self._pacing.paused

    def tellsCloseApart(self) -> bool:
        """
        Under TLS, as for a byte stream: a FIN is left to TLS to tell
        close_notify from a truncation.
        """
        return ISSLTransport.providedBy(self.transport)

    def closeGracefully(self) -> None:
        """
        Close after the output: the worker's last line, a close frame (the
        reply to the client's, or one with our code), then a FIN.
        """
        if self.state is ClientState.CLOSED:
            return
        if self.state is ClientState.OPEN:
            self._flush()
        if self.state is not ClientState.CLOSING:
            self.transport.write(self._ws.send(self._closeFrame()))
        self._closeBeneath()

    def linger(self, limit: float, shared: bool = False) -> None:
        """
        The worker is done: its last line, our close frame (1000), then the
        client's close frame is awaited, C{limit} seconds at most.  (The
        socket is never C{shared}: no worker is given it.)
        """
        if self.state is not ClientState.OPEN:
            self.closeGracefully()
            return
        self._flush()
        self.transport.write(self._ws.send(CloseConnection(CloseReason.NORMAL_CLOSURE)))
        self.state = ClientState.CLOSING
        self._lingerCall = self._clock.callLater(limit, self._closeBeneath)

    def abort(self) -> None:
        self.state = ClientState.CLOSED
        self.transport.abortConnection()

    def _flush(self) -> None:
        self._send(self._framer.flush())

    def _closeFrame(self) -> CloseConnection:
        if self.state is ClientState.CLOSE_RECEIVED:
            return CloseConnection(CloseReason.NORMAL_CLOSURE)
        if self._events is None:
            # Closed while its relay was being made: its worker could not
            # be started.
            return CloseConnection(CloseReason.INTERNAL_ERROR, "cannot start a worker")
        return CloseConnection(self._closeCode, self._closeReason)

    def _closeBeneath(self) -> None:
        """
        Close the connection beneath after what was written.  Under TLS,
        Twisted would then wait for the client's close_notify, which many
        clients never send: the TCP connection at the bottom is closed too,
        after our close_notify (the client has had our close frame, and
        everything before it, or is gone).
        """
        self.state = ClientState.CLOSED
        self.transport.loseConnection()
        if self.tellsCloseApart():
            bottom = self.transport
            while getattr(bottom, "transport", None) is not None:
                bottom = bottom.transport
            bottom.loseConnection()


def _message(message: str | bytes) -> Message[Any]:
    if isinstance(message, str):
        return TextMessage(message)
    return BytesMessage(message)
