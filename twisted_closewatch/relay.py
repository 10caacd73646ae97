"""
The relay: the one owner of a connection's fate.

A L{Relay} joins one client (an L{IClient}: bytes or, later, messages) to
one worker (an L{IWorker}) and decides, in one place, when the worker is
killed and when the connection has ended.  Its states and transitions:

    RUNNING --client FIN, --half-close forward--> INPUT_DONE
    RUNNING, INPUT_DONE --client gone--> KILLED (SIGKILL sent)
    KILLED --worker reaped and the burst's dying reaped, or DROP_DELAY--> CLIENT_GONE
    KILLED --worker ended--> REAPED
    REAPED --the burst's dying reaped, or DROP_DELAY--> CLOSING
    RUNNING, INPUT_DONE --client gone, under --grace--> CLIENT_GONE
    KILLED, CLIENT_GONE --connection closed--> WORKER_EXITING
    REAPED --connection closed--> ENDED
    WORKER_EXITING --worker ended--> ENDED
    CLIENT_GONE --worker ended--> CLOSING
    RUNNING --worker ended--> LINGERING (its output delivered, then a FIN)
    INPUT_DONE --worker ended--> CLOSING
    LINGERING, CLOSING --connection closed--> ENDED

"Client gone" is whatever way the client leaves or must go: a FIN (under
C{--half-close kill}), a reset, a dead peer, the close watch seeing either
while the client is paused, the idle timeout, C{--max-lifetime}, the
server stopping.  The kill is the first thing done then (the worker's
group signalled, its pipes no longer watched); the reason is read after
the signal is sent, and the client is no longer read.  The rest waits in
the server's L{Aftermath}: the drop's timer until every kill of the
reactor turn has been sent; the kill of what left the worker's group (its
cgroup) and the connection's drop (epoll updates, producers, the
transport's C{shutdown} and C{close}, and after it the end's log line)
until the worker is reaped and no other killed worker is still dying, at
most L{DROP_DELAY} after the kill.  A worker sent C{SIGKILL} needs the CPU
to die, and in a burst of a hundred closes that work would otherwise run
between the kills and the deaths.

Flow control (L{Pacing}) and the worker's input, spooled while the worker
does not read (L{SpooledInput}), the close watch and the reasons read from the
client's socket (L{ClientDeparture}), and the idle timeout and heartbeat
(L{ConnectionLiveness}) are the relay's helpers; it tells them what
happens, and they tell it nothing but "the client is gone".  How a client
closes without a reset after its worker's last words is the client's own
business (L{IClient.linger}).

A plain TCP client's bytes are spliced into the worker's stdin whenever
nothing waits before them (L{SpooledInput} decides), and the worker's
output into the client's socket whenever nothing written to it waits in
memory (the relay decides, while it relays; L{twisted_closewatch.splice}).

The relay is given everything at construction (its collaborators, a clock,
a worker starter) and reports one thing: its end, with its record.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_closewatch.aftermath import Aftermath
from twisted_closewatch.client import IClient, IClientEvents
from twisted_closewatch.closewatch import ICloseWatch
from twisted_closewatch.config import Config
from twisted_closewatch.departure import ClientDeparture
from twisted_closewatch.liveness import ConnectionLiveness
from twisted_closewatch.pacing import Pacing
from twisted_closewatch.record import CLOSE_GRACEFULLY, ConnectionRecord, EndReason
from twisted_closewatch.spool import SpoolBudget, SpooledInput
from twisted_closewatch.worker import IWorkerSink, WorkerStarter

log = Logger()

#: How long a connection whose worker has exited waits, its output sent,
#: for the client to close its side too.
LINGER_SECONDS = 30.0

#: Longest a gone client's connection waits for its killed worker's reap
#: before it is dropped anyway (see L{Relay._leave}).
DROP_DELAY = 0.1

#: The most of a worker's output moved to its client by one splice: its
#: stdout pipe's default capacity.
OUTPUT_SPLICE_SIZE = 1024 * 1024

#: Called once with the record of a connection that has ended.
Ended = Callable[[ConnectionRecord], None]


class State(enum.Enum):
    """
    Where a connection is in its life.
    """

    #: The worker runs; the client is connected and read.
    RUNNING = "running"
    #: C{--half-close forward}: the client's FIN was the worker's EOF; the
    #: worker's output still goes to the client.
    INPUT_DONE = "input-done"
    #: The client is gone and its worker was sent C{SIGKILL}: the connection
    #: is not read, and is dropped once the worker is reaped.
    KILLED = "killed"
    #: The killed worker has ended; its client's connection is not dropped
    #: yet (the other killed workers of a burst are still dying).
    REAPED = "reaped"
    #: The client is gone: its worker is killed, its connection closing.
    CLIENT_GONE = "client-gone"
    #: The client's connection is closed; the killed worker is exiting.
    WORKER_EXITING = "worker-exiting"
    #: The worker ended by itself: its output is delivered, then a FIN, and
    #: the client's input is read and dropped until it closes too.
    LINGERING = "lingering"
    #: The worker has ended; the client's connection is closing.
    CLOSING = "closing"
    #: Both sides are done, and the end reported.
    ENDED = "ended"


@implementer(IClientEvents, IWorkerSink)
class Relay:
    """
    One connection and its worker.

    @ivar record: what will be logged about this connection when it ends.
    @ivar worker: the worker, started when the relay is made.
    @ivar state: a L{State}.
    """

    #: In L{State.KILLED}, once the kill's follow-up has run: the drop, at
    #: the latest.
    _dropCall: IDelayedCall | None = None

    def __init__(
        self,
        client: IClient,
        record: ConnectionRecord,
        config: Config,
        clock: IReactorTime,
        closeWatch: ICloseWatch,
        startWorker: WorkerStarter,
        ended: Ended,
        aftermath: Aftermath,
        spool: SpoolBudget | None = None,
    ) -> None:
        """
        Start the worker and relay.

        @param aftermath: where the work that follows a kill waits.
        @param spool: where the client's bytes go while the worker does not
            read them, if anywhere.
        @raise OSError: the worker could not be started.
        """
        self.record = record
        self._client = client
        self._config = config
        self._clock = clock
        self._ended = ended
        self._aftermath = aftermath
        client.setReadSize(config.clientReadSize)
        self._liveness = ConnectionLiveness(clock, config, client, self.clientGone)
        # Running before the worker starts: one that exits at once may be
        # reaped before the spawn returns.
        self.state = State.RUNNING
        self.worker = startWorker(self)
        record.pid = self.worker.pid
        try:
            self._pacing = Pacing(client, self.worker, self._liveness)
            self._input = SpooledInput(
                self.worker,
                client,
                self._pacing,
                record,
                spool,
                clock,
                self._spoolFailed,
                config.clientReadSize,
                config.readAhead,
            )
            self._input.spliceFrom(self._clientSpliced)
            if client.spliceable():
                self.worker.spliceOutput(
                    self._outputTarget, self._workerSpliced, self._socketFailed
                )
            self._departure = ClientDeparture(
                client.probe, config, closeWatch, self._leave, self._pacing.clientReadsItsClose
            )
            self._liveness.start()
            self._departure.watch()
        except BaseException:
            # No relay will own this worker (the caller reports a spawn
            # failure): kill it now, and let its events find an ended relay.
            self.state = State.ENDED
            self._liveness.stop()
            self.worker.kill()
            raise

    # Client events.

    def clientData(self, data: bytes) -> None:
        if self.state is State.RUNNING:
            self.record.bytesIn += len(data)
            self._liveness.clientSent()
            self._input.write(data)

    def _clientSpliced(self, size: int) -> None:
        """
        The client's next C{size} bytes went into the worker's stdin by the
        kernel (L{SpooledInput.spliceFrom}).
        """
        self.record.bytesIn += size
        self.record.bytesSpliced += size
        self._liveness.clientSent()

    def clientFinished(self) -> None:
        """
        The client sent a FIN: a close or a half-close, which look the same.
        """
        if self.state is State.RUNNING:
            if self._config.halfClose == "forward":
                # Twisted reads no more after the FIN: the close watch is
                # what still sees this client die (keepalive, user timeout,
                # RST).
                self.state = State.INPUT_DONE
                self._liveness.clientFinished()
                self._input.closeStdin()
            else:
                self._leave(self._departure.finReason)

    def clientDisconnected(self, reason: Failure) -> None:
        if (self.state is State.KILLED or self.state is State.REAPED) and self._dropCall:
            self._dropCall.cancel()
        self._kill(lambda: self._departure.lossReason(reason))
        self._departure.close()
        self._liveness.stop()
        self._pacing.clientDisconnected()
        self._input.discard()
        if self.state is State.KILLED or self.state is State.CLIENT_GONE:
            self.state = State.WORKER_EXITING
        elif self.state in (State.LINGERING, State.CLOSING, State.REAPED):
            self._end()

    def clientGone(self, reason: EndReason) -> None:
        """
        The client is gone (or must go): kill the worker's group at once and
        drop the connection.  The first reason given is the one recorded.
        """
        self._leave(lambda: reason)

    def _spoolFailed(self) -> None:
        self.clientGone(EndReason.SPOOL_ERROR)

    # Worker events.

    def workerOutput(self, data: bytes) -> None:
        state = self.state
        if state is State.RUNNING or state is State.INPUT_DONE:
            self.record.bytesOut += len(data)
            self._liveness.clientWritten()
            self._client.write(data)

    def _outputTarget(self) -> tuple[int, int] | None:
        """
        Whether the worker's next output may go into the client's socket by
        a splice now: only while it is relayed, and nothing written to the
        client waits before it.
        """
        state = self.state
        if state is State.RUNNING or state is State.INPUT_DONE:
            fd = self._client.idleSocket()
            if fd is not None:
                return fd, OUTPUT_SPLICE_SIZE
        return None

    def _workerSpliced(self, size: int) -> None:
        """
        The worker's next C{size} bytes of output went into the client's
        socket by the kernel.
        """
        self.record.bytesOut += size
        self.record.bytesSplicedOut += size
        self._liveness.clientWritten()

    def _socketFailed(self) -> None:
        """
        A splice of the worker's output found the client's socket failed:
        it is gone, for the reason its socket still tells (its error was
        consumed: a reset unless it timed out).
        """
        self._leave(self._departure.deathReason)

    def workerLifetimeOver(self) -> None:
        self.clientGone(EndReason.MAX_LIFETIME)

    def workerReaped(self) -> None:
        self._aftermath.reaped(self)
        if self.state is State.KILLED:
            self._aftermath.teardown(self._dropKilled)

    def workerEnded(self, exitCode: int | None, exitSignal: int | None) -> None:
        self.record.workerEnded(exitCode, exitSignal)
        state = self.state
        if state is State.RUNNING or state is State.INPUT_DONE:
            self._liveness.stop()
            self._input.discard()
            self._pacing.detachWorkerOutput()
            self._pacing.resumeClient()
            if state is State.INPUT_DONE:
                self.state = State.CLOSING
                self._client.closeGracefully()
            else:
                self.state = State.LINGERING
                self._client.linger(LINGER_SECONDS)
        elif state is State.CLIENT_GONE:
            self.state = State.CLOSING
        elif state is State.KILLED:
            self.state = State.REAPED
        elif state is State.WORKER_EXITING:
            self._end()

    # The transitions' shared steps.

    def _leave(self, reason: Callable[[], EndReason]) -> None:
        """
        The client is gone while connected: kill, then drop the connection,
        once a worker sent C{SIGKILL} is reaped (L{State.KILLED}).  Only
        the first departure acts: a later one (a reset after the FIN, the
        server stopping) would schedule a second drop.
        """
        if self.state is not State.RUNNING and self.state is not State.INPUT_DONE:
            return
        if self._kill(reason) is State.CLIENT_GONE:
            self._drop()

    def _kill(self, reason: Callable[[], EndReason]) -> State:
        """
        If the worker runs for a client still there: kill it, first of all,
        then record C{reason()} and enter L{State.KILLED} (the worker is
        dying, the rest waits for L{_killed}) or L{State.CLIENT_GONE}.
        """
        if self.state is State.RUNNING or self.state is State.INPUT_DONE:
            self.record.seenGone()
            if self.worker.kill():
                self.state = State.KILLED
                # One epoll_ctl, or the reactor reads again, later in this
                # very turn, the FIN the close watch has acted on.
                self._pacing.pauseClient()
                self._aftermath.killed(self)
                self._aftermath.afterKills(self._killed)
                self._aftermath.teardown(self.worker.killStragglers)
            else:
                self.state = State.CLIENT_GONE
            self.record.reason = reason()
            self._liveness.stop()
            self._input.stop()
        return self.state

    def _killed(self) -> None:
        """
        Every kill of the reactor turn has been sent: if the client is still
        connected, bound the wait for its drop.
        """
        if self.state is State.KILLED:
            self._dropCall = self._clock.callLater(DROP_DELAY, self._drop)

    def _dropKilled(self) -> None:
        """
        The killed worker has been reaped, and the burst's dying too.
        """
        if self.state is State.KILLED or self.state is State.REAPED:
            if self._dropCall is not None:
                self._dropCall.cancel()
            self._drop()

    def _drop(self) -> None:
        """
        Close the connection of a client found gone: after all that was sent
        to it if it left cleanly, else with a reset.
        """
        self.state = State.CLOSING if self.state is State.REAPED else State.CLIENT_GONE
        self._departure.unwatch()
        self._pacing.detachWorkerOutput()
        self._input.discard()
        if self.record.reason in CLOSE_GRACEFULLY:
            self._client.closeGracefully()
        else:
            self._client.abort()

    def _end(self) -> None:
        self._input.discard()
        self.state = State.ENDED
        self._ended(self.record)


@implementer(IClientEvents)
class SpawnFailed:
    """
    A connection whose worker could not be started: closed at once, and
    reported once closed.
    """

    def __init__(self, client: IClient, record: ConnectionRecord, ended: Ended) -> None:
        self.record = record
        self._ended = ended
        record.reason = EndReason.SPAWN_FAILED
        if client.probe is not None:
            client.probe.close()
        client.closeGracefully()

    def clientData(self, data: bytes) -> None:
        pass

    def clientFinished(self) -> None:
        pass

    def clientDisconnected(self, reason: Failure) -> None:
        self._ended(self.record)

    def clientGone(self, reason: EndReason) -> None:
        pass


_Owner = TypeVar("_Owner")


def connect(
    client: IClient, record: ConnectionRecord, ended: Ended, relay: Callable[[], _Owner]
) -> _Owner | SpawnFailed:
    """
    The C{relay} (or other owner) made for C{client}, or, if its worker
    cannot be started, a connection that is logged and closed.
    """
    try:
        return relay()
    except OSError as e:
        log.error(
            "[{connection_id}] cannot start worker for {peer}: {error}",
            connection_id=record.connectionID,
            peer=record.peer,
            error=e.strerror or str(e),
            reason=EndReason.SPAWN_FAILED,
        )
        return SpawnFailed(client, record, ended)
