"""
C{--direct}: the worker owns the client's socket, and the server only
watches it.

inetd and tcpserver give a worker the client's socket as its stdin and
stdout and never touch a byte, which is as fast as a relay can be, but
then never see the client leave.  A L{DirectConnection} does the same and
keeps a duplicate of the socket (L{tcp.SocketProbe}) in the close watch,
so that a FIN (under C{--half-close kill}), a reset, keepalive or the user
timeout still kill the worker's group (or cgroup) at once.

It is an owner of its own rather than a L{Relay} given a socket-shaped
client and worker: the relay's work is moving bytes (flow control both
ways, read-ahead, heartbeats, the idle clock that follows what it reads,
the worker's output to deliver before the FIN), none of which exists here,
and its one rule that cannot hold here is dropping a gone client's
connection before the worker is reaped: Twisted closes a TCP socket with
C{shutdown(2)}, which acts on the socket for every process holding it, the
worker too.  So the socket is the worker's from the spawn to its reap, and
the server's again only then:

    RUNNING --client gone--> KILLED (the group signalled; the socket left alone)
    KILLED --worker reaped--> CLIENT_GONE (the server's copies closed: FIN or RST)
    RUNNING --worker reaped--> LINGERING (FIN after what it wrote; input drained)
    CLIENT_GONE, LINGERING --connection closed--> WORKER_EXITING
    RUNNING, KILLED --connection closed (by another hand)--> WORKER_EXITING (kill first)
    CLIENT_GONE, LINGERING --worker ended--> CLOSING
    WORKER_EXITING --worker ended--> ENDED
    CLOSING --connection closed--> ENDED

"Client gone" is what it is for a relay: a FIN under C{--half-close kill},
a reset, a dead peer, the idle timeout, C{--max-lifetime}, the server
stopping; under C{--half-close forward} the worker reads the EOF itself and
only a reset or a dead peer is a departure.  The kill comes first; the
reason is read after it.  While the worker runs, the Twisted transport
neither reads nor writes the socket, and the socket is blocking (as a
worker expects its stdin to be: the flag belongs to the open file, so every
copy shares it); it is made non-blocking again at the reap, before the
reactor uses it, and the lingering close then drops the client's input
with reads that never wait, not through the transport: a process the kill
did not reach may share the socket, and its flag, still.  The byte counts
come from C{TCP_INFO}, read at the reap, and the idle timeout from the
kernel's time since the client's last data (L{KernelIdleTimeout}).
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_closewatch.client import IClient, IClientEvents
from twisted_closewatch.closewatch import ICloseWatch
from twisted_closewatch.config import Config
from twisted_closewatch.departure import ClientDeparture
from twisted_closewatch.liveness import KernelIdleTimeout
from twisted_closewatch.record import CLOSE_GRACEFULLY, ConnectionRecord, EndReason
from twisted_closewatch.relay import LINGER_SECONDS, Ended
from twisted_closewatch.tcp import SocketProbe, transferred
from twisted_closewatch.worker import IWorker, IWorkerSink

#: Starts a worker reporting to the given sink, with the given socket as its
#: stdin and stdout.  May raise L{OSError}.
SocketWorkerStarter = Callable[[IWorkerSink, int], IWorker]

#: Ends after which the connection may have been reset (see
#: L{tcp.transferred}).
_RESETS = frozenset({EndReason.CLIENT_RESET, EndReason.KEEPALIVE, EndReason.USER_TIMEOUT})


class State(enum.Enum):
    """
    Where a direct connection is in its life.
    """

    #: The worker owns the socket; the server watches a duplicate.
    RUNNING = "running"
    #: The client is gone and the worker's group signalled; the socket is
    #: left alone until the worker is reaped.
    KILLED = "killed"
    #: The killed worker is reaped: the server's copies are being closed.
    CLIENT_GONE = "client-gone"
    #: The worker exited by itself: a FIN after what it wrote, and the
    #: client's input read and dropped until it closes too.
    LINGERING = "lingering"
    #: The connection is closed; the worker's stderr has not ended yet.
    WORKER_EXITING = "worker-exiting"
    #: The worker has ended; the connection is closing.
    CLOSING = "closing"
    #: Both are done, and the end reported.
    ENDED = "ended"


@implementer(IClientEvents, IWorkerSink)
class DirectConnection:
    """
    One client whose worker owns its socket.

    @ivar record: what will be logged about this connection when it ends.
    @ivar worker: the worker, started when the connection is made.
    @ivar state: a L{State}.
    """

    def __init__(
        self,
        client: IClient,
        record: ConnectionRecord,
        config: Config,
        clock: IReactorTime,
        closeWatch: ICloseWatch,
        startWorker: SocketWorkerStarter,
        ended: Ended,
    ) -> None:
        """
        Hand the client's socket to a new worker, and watch it.

        @raise OSError: the client has no socket of its own to give (TLS,
            or no socket at all), or the worker could not be started.
        """
        self.record = record
        self._client = client
        self._config = config
        self._ended = ended
        probe = client.probe
        if probe is None or client.tellsCloseApart():
            raise OSError(errno.ENOTSOCK, "--direct needs a plain socket (not TLS)")
        self._probe: SocketProbe = probe
        # Not one byte read or written by the server from now on.
        client.pauseReading()
        self._departure = ClientDeparture(probe, config, closeWatch, self._kill, lambda: False)
        self._idle = KernelIdleTimeout(
            clock, config.idleTimeout, self._sinceLastData, probe.unread, self.clientGone
        )
        # What the server read itself (a PROXY header) is not the client's.
        self._consumed = probe.consumed()
        self.state = State.RUNNING
        probe.setBlocking(True)
        try:
            self.worker = startWorker(self, probe.fileno())
        except BaseException:
            probe.setBlocking(False)
            raise
        record.pid = self.worker.pid
        # A worker that exited at once may have been reaped already.
        if self.state is State.RUNNING:
            try:
                self._departure.watch()
            except BaseException:
                # Nobody else would ever kill it (the caller reports a
                # spawn failure): kill it now, let its events find an end.
                self.state = State.ENDED
                self.worker.kill()
                probe.setBlocking(False)
                raise
            self._idle.start()

    def _sinceLastData(self) -> float | None:
        """
        Seconds since the client's last data, or C{None} once it cannot
        tell: no C{TCP_INFO}, or the client's FIN is in (under
        C{--half-close forward}), after which it sends nothing and waits,
        as a relay's idle clock stops at the FIN.
        """
        info = self._probe.info()
        if info is None or info.peerFinished:
            return None
        return info.lastDataRecv

    # Client events: none while the worker owns the socket, which the
    # transport does not read; afterwards, the lingering close's.

    def clientData(self, data: bytes) -> None:
        """
        Not called: the transport is paused for as long as the worker runs,
        and the lingering close takes what comes after.
        """

    def clientFinished(self) -> None:
        """
        Not called, as L{clientData}: the close watch sees the FIN.
        """

    def clientDisconnected(self, reason: Failure) -> None:
        self._kill(lambda: self._departure.lossReason(reason))
        self._idle.stop()
        # The probe's close is the server's last: a worker's SO_LINGER
        # would make it block the reactor.
        self._probe.stopLingering()
        self._departure.close()
        if self.state in (State.KILLED, State.CLIENT_GONE, State.LINGERING):
            self.state = State.WORKER_EXITING
        elif self.state is State.CLOSING:
            self._end()

    def clientGone(self, reason: EndReason) -> None:
        """
        The client is gone (or must go): kill the worker's group at once.
        """
        self._kill(lambda: reason)

    # Worker events.

    def workerOutput(self, data: bytes) -> None:
        """
        Not called: the worker's stdout is the socket.
        """

    def workerLifetimeOver(self) -> None:
        self.clientGone(EndReason.MAX_LIFETIME)

    def workerReaped(self) -> None:
        """
        The worker is gone (and its group killed): the socket is the
        server's again, to close now, so that the client sees its FIN (or
        RST) at once.
        """
        if self.state is State.RUNNING:
            self.state = State.LINGERING
            self._takeBack()
            # Not through the transport: a process the worker's kill did not
            # reach (it left the group, or was sent the socket) may hold the
            # socket still, and make it blocking.
            self._client.linger(LINGER_SECONDS, shared=True)
        elif self.state is State.KILLED:
            self.state = State.CLIENT_GONE
            self._takeBack()
            if self.record.reason in CLOSE_GRACEFULLY:
                self._client.closeGracefully()
            else:
                self._client.abort()

    def workerEnded(self, exitCode: int | None, exitSignal: int | None) -> None:
        self.record.workerEnded(exitCode, exitSignal)
        if self.state in (State.CLIENT_GONE, State.LINGERING):
            self.state = State.CLOSING
        elif self.state is State.WORKER_EXITING:
            self._end()

    # The transitions' shared steps.

    def _kill(self, reason: Callable[[], EndReason]) -> None:
        """
        If the worker runs: kill it, first of all, then record C{reason()}.
        The socket stays the worker's until the reap, under C{--grace} too.
        """
        if self.state is State.RUNNING:
            self.record.seenGone()
            self.worker.kill()
            # What left the group too (the relayed mode leaves that until
            # its burst's dying are reaped).
            self.worker.killStragglers()
            self.state = State.KILLED
            self.record.reason = reason()
            self._idle.stop()

    def _takeBack(self) -> None:
        """
        Stop watching, count what the connection carried, and make the
        socket the reactor's again, with the server's keepalive and user
        timeout whatever the worker set: they bound the close that follows
        (a client that keeps its window shut would otherwise hold it open).
        """
        self._idle.stop()
        self._departure.unwatch()
        self._probe.configure(self._config)
        info = self._probe.info()
        if info is not None:
            received, self.record.bytesOut = transferred(info, self.record.reason in _RESETS)
            self.record.bytesIn = max(received - self._consumed, 0)
        self._probe.setBlocking(False)

    def _end(self) -> None:
        self.state = State.ENDED
        self._ended(self.record)
