"""
The client side of a relay, as a seam.

The relay talks to its client through L{IClient} and hears from it through
L{IClientEvents}; it never sees a transport.  L{ByteStreamClient} is the
client as a byte stream (TCP, TLS, a unix socket, behind a PROXY header): a
L{Protocol} that turns the transport's calls into events and the relay's
calls into transport calls, one call deep each way, so the byte path costs
what it did when the relay was the protocol.  A message stream (a
WebSocket) is another implementation of the same two interfaces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorFDSet,
    IReactorTime,
    IReadDescriptor,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from twisted_closewatch._compat import writerIdle
from twisted_closewatch.linger import LingeringClose
from twisted_closewatch.splice import SplicedInput, SpliceTarget, spliceable
from twisted_closewatch.tcp import SocketProbe


class IClient(Interface):
    """
    What a relay does to its client.
    """

    host = Attribute("The local address the client connected to (an IAddress).")
    peer = Attribute("The client's address (an IAddress).")
    probe = Attribute("A L{SocketProbe} of the client's socket, or None without one.")

    def write(data: bytes) -> None:
        """
        Send C{data} to the client.
        """

    def pauseReading() -> None:
        """
        Stop reading the client (its sender fills its window).
        """

    def resumeReading() -> None:
        """
        Read the client again.
        """

    def setReadSize(size: int) -> None:
        """
        Read at most C{size} bytes from the client at a time.
        """

    def spliceable() -> bool:
        """
        Whether the client's bytes are the worker's input as they arrive, on
        a socket the kernel can splice from (plain TCP, on Linux), so that
        L{spliceInto} would move them.
        """

    def spliceInto(target: SpliceTarget, spliced: Callable[[int], None]) -> None:
        """
        From now on, while C{target} gives a pipe (and the most to move into
        it), move the client's bytes into it by the kernel, telling
        C{spliced} how many, instead of reporting them as data.  Only for a
        client that is L{spliceable}.
        """

    def idleSocket() -> int | None:
        """
        The descriptor of the client's socket, if it is L{spliceable}, still
        open, and nothing written to it waits in memory (bytes put into the
        socket directly then come next, in order), else C{None}.
        """

    def registerProducer(producer: IPushProducer) -> None:
        """
        Pause C{producer} (the worker's output) while the client does not
        take what is written to it.
        """

    def unregisterProducer() -> None:
        """
        Stop pacing the registered producer.
        """

    def outputPaused() -> bool:
        """
        Whether the client is not taking what is written to it now.
        """

    def tellsCloseApart() -> bool:
        """
        Whether, while it is being read, the client's own protocol tells a
        clean close from a truncation (TLS's close_notify), so that a FIN
        seen beneath it is left to the protocol.
        """

    def closeGracefully() -> None:
        """
        Close after what was written has been sent.
        """

    def linger(limit: float, shared: bool = False) -> None:
        """
        Close after what was written, without the reset that the client's
        unread input would cause: end the output, then drop what the client
        still sends until it closes or goes quiet, C{limit} seconds at most.

        @param shared: whether a process other than the server may still
            hold the socket (C{--direct}: one that left the worker's group,
            or was sent the socket): the client's input is then dropped by
            reads that never wait, not by the transport's, which would block
            the reactor if that process made the socket blocking and read
            the input first.
        """

    def abort() -> None:
        """
        Close at once, dropping what was not sent (a reset).
        """


class IClientEvents(Interface):
    """
    What a client tells its relay.
    """

    def clientData(data: bytes) -> None:
        """
        The client sent C{data}.
        """

    def clientFinished() -> None:
        """
        The client's input ended (a FIN: a close or a half-close).
        """

    def clientDisconnected(reason: Failure) -> None:
        """
        The connection is closed, for C{reason}.
        """


@implementer(IClient, IHalfCloseableProtocol)
class ByteStreamClient(Protocol):
    """
    A client that is a byte-stream transport.

    @ivar _events: the relay (or what stands for it), made by C{connect}
        once the transport is there.
    """

    probe: SocketProbe | None = None
    #: Any stream transport: TCP, TLS, unix, a PROXY wrapper.
    _transport: Any
    _events: IClientEvents
    _linger: LingeringClose | None = None
    _drain: _InputDrain | None = None

    def __init__(
        self,
        connect: Callable[[IClient], IClientEvents],
        clock: IReactorTime,
        probe: Callable[[Any], SocketProbe | None] = SocketProbe.of,
    ) -> None:
        """
        @param connect: makes the relay for this client, once connected.
        @param clock: what the lingering close is timed by (the reactor,
            which also reads a C{shared} socket's lingering input).
        @param probe: finds the transport's socket, if it has one.
        """
        self._connect = connect
        self._clock = clock
        self._probeOf = probe

    # From the transport.

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self._transport = transport
        self.host = transport.getHost()
        self.peer = transport.getPeer()
        self.probe = self._probeOf(transport)
        self._events = self._connect(self)

    def dataReceived(self, data: bytes) -> None:
        if self._linger is None:
            self._events.clientData(data)
        else:
            self._linger.inputReceived()

    def readConnectionLost(self) -> None:
        if self._linger is None:
            self._events.clientFinished()
        else:
            self._linger.inputDone()

    def writeConnectionLost(self) -> None:
        if self._linger is not None:
            self._linger.outputDone()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._drain is not None:
            self._drain.stop()
        if self._linger is not None:
            self._linger.stop()
        self._events.clientDisconnected(reason)

    # IClient.

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def pauseReading(self) -> None:
        self._transport.pauseProducing()

    def resumeReading(self) -> None:
        self._transport.resumeProducing()

    def setReadSize(self, size: int) -> None:
        self._transport.bufferSize = size

    def spliceable(self) -> bool:
        return spliceable(self._transport)

    def spliceInto(self, target: SpliceTarget, spliced: Callable[[int], None]) -> None:
        SplicedInput(self._transport, target, spliced).install()

    def idleSocket(self) -> int | None:
        transport = self._transport
        if not (spliceable(transport) and writerIdle(transport)):
            return None
        fd: int = transport.fileno()
        return fd

    def registerProducer(self, producer: IPushProducer) -> None:
        self._transport.registerProducer(producer, True)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()

    def outputPaused(self) -> bool:
        return bool(getattr(self._transport, "producerPaused", False))

    def tellsCloseApart(self) -> bool:
        return ISSLTransport.providedBy(self._transport)

    def closeGracefully(self) -> None:
        self._transport.loseConnection()

    def linger(self, limit: float, shared: bool = False) -> None:
        unread = (lambda: 0) if self.probe is None else self.probe.unread
        self._linger = LingeringClose(self._transport, self._clock, limit, unread)
        if shared and self.probe is not None:
            self._transport.pauseProducing()
            self._drain = _InputDrain(
                self.probe, self._linger, self._transport, IReactorFDSet(self._clock)
            )
        self._linger.start()

    def abort(self) -> None:
        self._transport.abortConnection()


@implementer(IReadDescriptor)
class _InputDrain:
    """
    A lingering client's input, read and dropped through its probe, never
    waiting (see the C{shared} of L{IClient.linger}), from the moment it is
    made until the input ends or the connection is lost.
    """

    def __init__(
        self, probe: SocketProbe, linger: LingeringClose, transport: Any, reactor: IReactorFDSet
    ) -> None:
        self._probe = probe
        self._linger = linger
        self._transport = transport
        self._reactor: IReactorFDSet | None = reactor
        reactor.addReader(self)

    def fileno(self) -> int:
        return self._probe.fileno()

    def doRead(self) -> None:
        try:
            received = self._probe.dropInput()
        except BlockingIOError:
            return
        except OSError:
            self.stop()
            self._transport.abortConnection()
            return
        if received:
            self._linger.inputReceived()
        else:
            self.stop()
            self._linger.inputDone()

    def stop(self) -> None:
        """
        Read no more (before the probe is closed).
        """
        reactor, self._reactor = self._reactor, None
        if reactor is not None:
            reactor.removeReader(self)

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "closewatch-drain"
