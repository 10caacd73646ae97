"""
The relay: one client connection, one worker process, bytes both ways.

L{WorkerRelay} is the client side (a L{Protocol}); L{WorkerProcessProtocol}
is the worker side (a L{ProcessProtocol}).  Flow control runs both ways with
bounded buffers: a worker that stops reading its stdin pauses the client
transport (and a close watch takes over noticing the client's departure); a
client that stops reading pauses the worker's stdout.  Whatever way the
client goes, the worker's process group is killed at once.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import TYPE_CHECKING, Any

import attr
from twisted.internet import error
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_closewatch import liveness
from twisted_closewatch.linger import LingeringClose

if TYPE_CHECKING:
    from twisted_closewatch.factory import CloseWatchFactory
    from twisted_closewatch.spawn import WorkerProcess

log = Logger()

#: How long a connection whose worker has exited waits, its output sent,
#: for the client to close its side too.
LINGER_SECONDS = 30.0
#: Ends after which the client still gets what was sent to it, then a FIN.
#: After the others it is dead or not worth waiting for (a stopping server
#: must not wait on a client that does not read): it gets a reset.
_CLOSE_GRACEFULLY = frozenset({"client-closed", "max-lifetime"})
#: Longest a gone client's connection waits for its killed worker's reap
#: before it is closed anyway (see L{WorkerRelay.clientGone}).
DROP_DELAY = 0.1
#: Longest stderr line logged as one event; longer lines are cut.
STDERR_LINE_MAX = 4096
#: Stderr lines logged per connection per second; the rest are counted.
STDERR_LINES_PER_SECOND = 50


@attr.s(auto_attribs=True)
class ConnectionRecord:
    """
    What the end-of-connection log event says about one connection.
    """

    connectionID: int
    peer: str
    started: float = attr.ib(factory=time.monotonic)
    pid: int | None = None
    reason: str | None = None
    goneAt: float | None = None
    exitCode: int | None = None
    exitSignal: int | None = None
    bytesIn: int = 0
    bytesOut: int = 0
    killLatencyMS: float | None = None
    stderrDropped: int = 0


class _StderrLogger:
    """
    Turns a worker's stderr into one log event per line, bounded in line
    length and in rate so that a flooding worker cannot flood the log.
    """

    def __init__(self, record: ConnectionRecord) -> None:
        self._record = record
        self._partial = b""
        self._window = 0
        self._logged = 0

    def dataReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > STDERR_LINE_MAX:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line)

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""

    def _emit(self, line: bytes) -> None:
        window = int(time.monotonic())
        if window != self._window:
            self._window, self._logged = window, 0
        if self._logged >= STDERR_LINES_PER_SECOND:
            self._record.stderrDropped += 1
            return
        self._logged += 1
        log.info(
            "[{connection_id}] worker {pid} stderr: {line}",
            connection_id=self._record.connectionID,
            pid=self._record.pid,
            line=line[:STDERR_LINE_MAX].decode("utf-8", "replace").rstrip("\r"),
        )


@implementer(IPushProducer)
class _ClientReading:
    """
    Registered with the worker's stdin: a full stdin pauses reading the client.

    Twisted's process transport has no C{stopProducing}, which is why this
    adapter sits between it and the relay instead of the transports being
    registered with each other directly.
    """

    def __init__(self, relay: WorkerRelay) -> None:
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay.pauseClient()

    def resumeProducing(self) -> None:
        self._relay.resumeClient()

    def stopProducing(self) -> None:
        self._relay.workerStdinClosed()


@implementer(IPushProducer)
class _WorkerReading:
    """
    Registered with the client transport: a client that does not read pauses
    reading the worker's stdout.
    """

    def __init__(self, worker: WorkerProcess) -> None:
        self._worker = worker

    def pauseProducing(self) -> None:
        stdout = self._worker.pipes.get(1)
        if stdout is not None:
            stdout.stopReading()

    def resumeProducing(self) -> None:
        stdout = self._worker.pipes.get(1)
        # Not a pipe being closed (see WorkerRelay.workerExited): reading it
        # again could end it twice.
        if stdout is not None and not stdout.disconnecting:
            stdout.startReading()

    def stopProducing(self) -> None:
        # The client transport is gone: read (and drop) the rest, or a
        # stdout paused by a full client buffer would never show the killed
        # worker's EOF, and its end would never be reported.
        self.resumeProducing()


class WorkerProcessProtocol(ProcessProtocol):
    """
    The worker's side of a relay.
    """

    def __init__(self, relay: WorkerRelay) -> None:
        self._relay = relay
        self._stderr = _StderrLogger(relay.record)

    def outReceived(self, data: bytes) -> None:
        self._relay.workerOutput(data)

    def errReceived(self, data: bytes) -> None:
        self._stderr.dataReceived(data)

    def processExited(self, reason: Failure) -> None:
        self._relay.workerExited()

    def processEnded(self, reason: Failure) -> None:
        self._stderr.flush()
        self._relay.workerEnded(reason)


@implementer(IHalfCloseableProtocol)
class WorkerRelay(Protocol):
    """
    The client's side of a relay, and the owner of the connection's fate.

    @ivar record: what will be logged about this connection when it ends.
    @ivar worker: the worker's process transport, once spawned.
    """

    factory: CloseWatchFactory
    worker: WorkerProcess | None = None
    _probe: socket.socket | None = None
    _paused = False
    _connected = False
    _workerRunning = False
    _workerReaped = False
    _clientFinished = False
    _linger: LingeringClose | None = None
    _workerReading: _WorkerReading | None = None
    _dropCall: IDelayedCall | None = None

    def __init__(self, factory: CloseWatchFactory, connectionID: int) -> None:
        self.factory = factory
        self.record = ConnectionRecord(connectionID=connectionID, peer="")
        self._liveness = liveness.ConnectionLiveness(factory.reactor, factory.config, self)

    # Client side.

    def connectionMade(self) -> None:
        self._connected = True
        transport = self.transport
        self.record.peer = describeAddress(transport.getPeer())
        self._probe = _probeSocket(transport)
        if self._probe is not None:
            self._liveness.configureSocket(self._probe)
        # One read from the client is at most a quarter of the read-ahead;
        # the worker's stdin buffer pauses the client past the other three
        # quarters, so at most the read-ahead is ever held for the worker.
        transport.bufferSize = readSize = _clientReadSize(self.factory.config.readAhead)
        try:
            self.worker = self.factory.spawnWorker(self)
        except OSError as e:
            self.record.reason = "spawn-failed"
            log.error(
                "[{connection_id}] cannot start worker for {peer}: {error}",
                connection_id=self.record.connectionID,
                peer=self.record.peer,
                error=e.strerror or str(e),
                reason="spawn-failed",
            )
            transport.loseConnection()
            return
        self._workerRunning = True
        self.record.pid = self.worker.pid
        self.worker.pipes[0].bufferSize = self.factory.config.readAhead - readSize
        self.worker.registerProducer(_ClientReading(self), True)
        self._workerReading = _WorkerReading(self.worker)
        transport.registerProducer(self._workerReading, True)
        self._liveness.start()
        if self._probe is not None:
            self.factory.closeWatch.watch(
                self._probe.fileno(), self._clientClosed, self._clientDead
            )

    def dataReceived(self, data: bytes) -> None:
        if self._linger is not None:
            self._linger.inputReceived()
            return
        self.record.bytesIn += len(data)
        self._liveness.clientSent()
        if self._workerRunning:
            self.worker.write(data)

    def readConnectionLost(self) -> None:
        """
        The client sent a FIN: a close or a half-close, which look the same.
        """
        self._clientFinished = True
        if self._linger is not None:
            self._linger.inputDone()
            return
        if self.factory.config.halfClose == "forward" and self._workerRunning:
            # Twisted reads no more after the FIN: the close watch is what
            # still sees this client die (keepalive, user timeout, RST).
            self._liveness.clientFinished()
            self.worker.closeStdin()
        else:
            # The kill before the getsockopt that tells a FIN from an RST
            # (and none at all when the close watch saw this FIN first).
            self._killWorker()
            if self.record.reason is None:
                self.clientGone(_finReason(self._probe))

    def writeConnectionLost(self) -> None:
        """
        Our FIN is out, after all the worker's output.
        """
        if self._linger is not None:
            self._linger.outputDone()

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        clientWentFirst = self._workerRunning and self.record.reason is None
        if clientWentFirst:
            # The kill before any clean-up, and before the probing (TCP_INFO,
            # SO_ERROR) that names the reason.
            self._killWorker()
        self._connected = False
        if self._dropCall is not None and self._dropCall.active():
            self._dropCall.cancel()
        if self._linger is not None:
            self._linger.stop()
        self._unwatch()
        self._liveness.stop()
        if clientWentFirst:
            self.clientGone(self._lossReason(reason))
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        self._maybeFinished()

    def _lossReason(self, reason: Failure) -> str:
        if reason.check(error.ConnectionDone):
            return "client-closed"
        return liveness.lossReason(self._probe, self.factory.config)

    # Flow control.

    def pauseClient(self) -> None:
        """
        The worker's stdin is full: stop reading the client.  The close
        watch still sees it go.
        """
        if self._paused or not self._connected:
            return
        self._paused = True
        self._liveness.paused()
        self.transport.pauseProducing()

    def resumeClient(self) -> None:
        if not self._paused or not self._connected:
            return
        self._paused = False
        self._liveness.resumed()
        self.transport.resumeProducing()

    def _unwatch(self) -> None:
        if self._probe is not None:
            self.factory.closeWatch.unwatch(self._probe.fileno())

    def _clientClosed(self) -> None:
        """
        The close watch saw a FIN, possibly behind data not read yet.  Under
        C{forward} it is delivered in order, after that data, by the
        transport.  Under TLS, a transport that is reading is left to tell a
        clean close (close_notify) from a truncation.
        """
        if self.factory.config.halfClose == "forward":
            return
        if ISSLTransport.providedBy(self.transport) and not self._paused:
            return
        self.clientGone("client-closed")

    def _clientDead(self) -> None:
        """
        The close watch saw a reset or a timeout, which the socket's pending
        error still names (the transport has not read it yet).
        """
        if self._workerRunning:
            # The kill before the SO_ERROR and TCP_INFO reads that name it.
            self._killWorker()
            self.clientGone(liveness.lossReason(self._probe, self.factory.config))

    def workerStdinClosed(self) -> None:
        """
        The worker closed its stdin: what the client sends from now on is
        dropped, and the client is read again so that its close is seen.
        """
        self.resumeClient()

    # Worker side.

    def workerOutput(self, data: bytes) -> None:
        if self.record.goneAt is not None:
            return
        self.record.bytesOut += len(data)
        self._liveness.clientWritten()
        self.transport.write(data)

    def workerExited(self) -> None:
        """
        The worker is reaped and its group killed; its pipes end when the
        last process holding them does, and that may be one that left the
        group (a daemon that called setsid).  Once the client is gone nobody
        needs the rest, so stop waiting for it.
        """
        self._workerReaped = True
        worker = self.worker
        if self.record.goneAt is not None and worker is not None:
            if self._dropCall is not None:
                self._dropClient()
            worker.drainStderr()
            worker.loseConnection()

    def workerEnded(self, reason: Failure) -> None:
        self._workerRunning = False
        status = reason.value
        self.record.exitCode = getattr(status, "exitCode", None)
        self.record.exitSignal = getattr(status, "signal", None)
        if self.record.goneAt is not None:
            self.record.killLatencyMS = (time.monotonic() - self.record.goneAt) * 1000
        else:
            self.record.reason = "worker-exited"
        self.factory.workerReaped(self)
        self._liveness.stop()
        self._detachWorkerOutput()
        if self._connected and self.record.goneAt is None:
            # A client found gone is being dropped by clientGone instead.
            self._closeAfterOutput()
        self._maybeFinished()

    def _closeAfterOutput(self) -> None:
        """
        The worker is done: deliver the rest of its output and close, without
        the reset that unread client input would cause (see L{linger}).
        """
        self.resumeClient()
        if self._clientFinished:
            self.transport.loseConnection()
            return
        self._linger = LingeringClose(
            self.transport, self.factory.reactor, LINGER_SECONDS, self._probe
        )
        self._linger.start()

    # The end.

    def clientGone(self, reason: str) -> None:
        """
        The client is gone (or must go): kill the worker's group at once and
        drop the connection.  The first reason given is the one recorded.

        The drop waits for the worker's reap (L{workerExited}), at most
        L{DROP_DELAY}, when a C{SIGKILL} was just sent: Linux mostly wakes
        the killed worker on this CPU, where it can only die once the server
        blocks, and the drop (epoll updates, producers, the transport's
        C{shutdown} and C{close}: 150-250 us, see the "Kill path" section of
        C{bench/README.md}) would otherwise run first; in a burst of closes
        it would also run between the kills.  For the same reason the
        client is no longer read meanwhile (when the close watch saw the FIN
        or RST, the reactor need not read it again), nor the worker's pipes,
        whose closing by the dying worker would wake the server ahead of it.
        """
        if self.record.reason is not None:
            return
        self._killWorker()
        self.record.reason = reason
        if self._workerRunning and self._workerReaped:
            self.worker.loseConnection()
        if not self._connected:
            return
        worker = self.worker
        if (
            worker is not None
            and self._workerRunning
            and not self._workerReaped
            and not self.factory.config.grace
        ):
            self.pauseClient()
            worker.mute()
            self._dropCall = self.factory.reactor.callLater(DROP_DELAY, self._dropClient)
        else:
            self._dropClient()

    def _dropClient(self) -> None:
        """
        Close the connection of a client found gone: after all that was sent
        to it if it left cleanly, else with a reset.
        """
        if self._dropCall is not None:
            if self._dropCall.active():
                self._dropCall.cancel()
            self._dropCall = None
        if not self._connected:
            return
        self._unwatch()
        self._detachWorkerOutput()
        if self.record.reason in _CLOSE_GRACEFULLY:
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def _killWorker(self) -> None:
        """
        Signal the worker's group now, once: the first thing done whenever
        the client is found gone.  Every other step (the reason, which may
        take C{getsockopt} calls; unwatching; unregistering producers; the
        transport's close; logging) waits until the signal is sent, because
        each of them is time the worker keeps running after its client left.
        C{record.goneAt} marks the kill (and the time latencies count from);
        C{record.reason} is set by L{clientGone} right after.
        """
        if self.record.goneAt is not None:
            return
        self.record.goneAt = time.monotonic()
        if self._workerRunning:
            self.factory.killWorker(self.worker)

    def _detachWorkerOutput(self) -> None:
        """
        The worker's output is no longer paced by the client: unregister it
        (before the transport starts closing: Twisted's TLS layer fails on an
        unregistration after that) and read the rest, so that the worker's
        end is seen; after the client is gone, the rest is dropped.
        """
        if self._workerReading is not None:
            self.transport.unregisterProducer()
            self._workerReading.resumeProducing()
            self._workerReading = None

    def _maybeFinished(self) -> None:
        if self._connected or self._workerRunning:
            return
        self.factory.connectionEnded(self)


def _finReason(probe: socket.socket | None) -> str:
    """
    Why Twisted reported the end of the client's input: C{client-closed}
    for a FIN, C{client-reset} if an RST's error is pending on the socket.
    Twisted's epoll reactor takes an error event without readable data for
    a clean end of input, and Linux shows an arriving RST that way for a
    moment (the soak sees it about once in a thousand resets).
    """
    if probe is not None:
        try:
            if probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in liveness.RESET_ERRORS:
                return "client-reset"
        except OSError:
            pass
    return "client-closed"


def _clientReadSize(readAhead: int) -> int:
    return max(min(readAhead // 4, 64 * 1024), 1)


def _probeSocket(transport: Any) -> socket.socket | None:
    """
    A duplicate of the client's socket, ours to poll and to query after the
    transport has closed its own descriptor, so that a connection loss can
    be told apart (reset, keepalive, user timeout) and a watched descriptor
    number can never be reused under the close watch.

    Under TLS the transport's handle is the TLS connection, not the socket:
    the socket is the handle of the transport beneath it.
    """
    try:
        sock = liveness.socketOf(transport)
        return None if sock is None else sock.dup()
    except OSError as e:
        if e.errno != errno.EBADF:
            log.warn("cannot watch client socket: {error}", error=e)
        return None


def describeAddress(address: Any) -> str:
    """
    How a peer is named in the log: C{host:port} (C{[host]:port} for IPv6),
    a unix socket client's path, or C{unix peer} for the usual unix client,
    which has none.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        path = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        return path or "unix peer"
    return str(address)
