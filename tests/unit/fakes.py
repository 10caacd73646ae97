"""
In-memory stand-ins for what a relay talks to: a worker, a close watch, a
socket probe, a half-closeable transport, a worker process; and a harness
that connects a relay to them on a fake clock.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_closewatch.aftermath import Aftermath
from twisted_closewatch.client import ByteStreamClient, IClient, IClientEvents
from twisted_closewatch.closewatch import ICloseWatch
from twisted_closewatch.config import Config
from twisted_closewatch.record import ConnectionRecord, EndReason
from twisted_closewatch.relay import Relay, SpawnFailed, connect
from twisted_closewatch.spool import SpoolBudget
from twisted_closewatch.worker import IWorker, IWorkerSink


@implementer(IPushProducer)
class FakeProducer:
    def __init__(self) -> None:
        self.paused = False
        self.drained = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = False


class PipeWriter(FileDescriptor):
    """
    Twisted's own write buffer, as the worker's stdin has it (paused as soon
    as it holds anything), in front of a pipe of C{capacity} bytes that the
    worker empties when the test says so.
    """

    bufferSize = 0

    def __init__(self, capacity: int) -> None:
        super().__init__(MemoryReactor())
        self.connected = True
        self.capacity = capacity
        self.inPipe = 0
        #: Whether the pipe was closed: the worker reads its EOF.
        self.closed = False

    def writeSomeData(self, data: bytes) -> int:
        taken = min(len(data), self.capacity - self.inPipe)
        self.inPipe += taken
        return taken

    def holding(self) -> int:
        """
        The bytes this buffer keeps alive: those the pipe has not taken, and
        those it has of the piece being written.
        """
        return len(self.dataBuffer) + self._tempDataLen

    def emptied(self) -> None:
        """
        The worker read the pipe; the reactor then lets the buffer write
        (and close, if it was told to once it is empty).
        """
        self.inPipe = 0
        if self in self.reactor.getWriters():
            why = self.doWrite()
            if why is not None:
                self.connectionLost(Failure(why))

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        super().connectionLost(reason)


@implementer(IWorker)
class FakeWorker:
    """
    A worker that records what the relay does to it; the test plays its
    events through the relay's L{IWorkerSink} methods.
    """

    pid = 4242
    #: Whether a kill leaves it dying (C{SIGKILL}), not in a grace period.
    dying = True
    #: Like a process transport's C{bufferSize}: written and not read past
    #: this pauses the producer (if set).
    stdinLimit: int | None = None
    #: How much of C{stdin} the worker has read.
    consumed = 0
    #: A real pipe's write end standing for the stdin's, if a test splices.
    stdinFD: int | None = None
    #: Whether the stdin's writer holds nothing (a test says).
    writerIdle = True

    def __init__(self, sink: IWorkerSink, actions: list[str], pipe: int | None = None) -> None:
        """
        @param pipe: if given, its stdin is Twisted's write buffer in front
            of a pipe of this capacity (L{PipeWriter}), not C{stdinLimit}.
        """
        self.sink = sink
        self.actions = actions
        self.writer = None if pipe is None else PipeWriter(pipe)
        self.stdin = b""
        self._stdinClosed = False
        self.kills = 0
        self.outputProducer = FakeProducer()
        self.inputPacedProducer: Any = None

    def write(self, data: bytes) -> None:
        self.stdin += data
        if self.writer is not None:
            self.writer.write(data)
        elif self.stdinLimit is not None and len(self.stdin) - self.consumed > self.stdinLimit:
            self.stdinFull()

    def readsAll(self) -> None:
        """
        The worker reads what was written: its stdin is drained.
        """
        written = len(self.stdin)
        if self.writer is None:
            self.consumed = written
            self.stdinDrained()
            return
        for _ in range(10_000):
            self.consumed += self.writer.inPipe
            self.writer.emptied()
            if self.consumed >= written:
                return
        raise AssertionError(f"the worker's stdin holds {written - self.consumed} bytes still")

    def closeStdin(self) -> None:
        if self.writer is None:
            self._stdinClosed = True
        else:
            self.writer.loseConnection()

    @property
    def stdinClosed(self) -> bool:
        """
        Whether the worker's stdin was closed (with a pipe, once the worker
        can read the EOF).
        """
        return self.writer.closed if self.writer is not None else self._stdinClosed

    def paceInput(self, producer: IPushProducer) -> None:
        self.inputPacedProducer = producer
        if self.writer is not None:
            self.writer.registerProducer(producer, True)

    def stdinFull(self) -> None:
        self.inputPacedProducer.pauseProducing()

    def stdinDrained(self) -> None:
        self.inputPacedProducer.resumeProducing()

    def stdinClosedByWorker(self) -> None:
        self.inputPacedProducer.stopProducing()

    def drainOutput(self) -> None:
        self.outputProducer.drained = True

    def idleStdin(self) -> int | None:
        if not self.writerIdle or (self.writer is not None and self.writer.holding()):
            return None
        return self.stdinFD

    def spliceOutput(self, target: Any, spliced: Any, failed: Any) -> None:
        self.outputSplice = (target, spliced, failed)

    def kill(self) -> bool:
        self.kills += 1
        self.actions.append("kill")
        return self.dying

    def killStragglers(self) -> None:
        self.actions.append("stragglers")


@implementer(ICloseWatch)
class FakeCloseWatch:
    def __init__(
        self, actions: list[str] | None = None, watchError: OSError | None = None
    ) -> None:
        self.watched: dict[int, tuple[Any, Any]] = {}
        self.polls = 0
        self.actions = [] if actions is None else actions
        self._watchError = watchError

    def watch(self, fd: int, onClosed: Any, onReset: Any) -> None:
        if self._watchError is not None:
            raise self._watchError
        self.watched[fd] = (onClosed, onReset)

    def unwatch(self, fd: int) -> None:
        if self.watched.pop(fd, None) is not None:
            self.actions.append("unwatch")

    def poll(self) -> None:
        self.polls += 1

    def stop(self) -> None:
        self.watched.clear()

    def sawClose(self, fd: int) -> None:
        self.watched[fd][0]()

    def sawReset(self, fd: int) -> None:
        onReset = self.watched.pop(fd)[1]
        onReset()


class FakeProbe:
    """
    A client socket's facts, as the test sets them.
    """

    fd = 17

    def __init__(self, actions: list[str]) -> None:
        self.actions = actions
        self.fin = EndReason.CLIENT_CLOSED
        self.loss = EndReason.CLIENT_RESET
        self.unreadBytes = 0
        self.closed = False
        self.configuredWith: Config | None = None

    def configure(self, config: Config) -> None:
        self.configuredWith = config

    def fileno(self) -> int:
        return self.fd

    def finReason(self) -> EndReason:
        self.actions.append("probe")
        return self.fin

    def lossReason(self, config: Config) -> EndReason:
        self.actions.append("probe")
        return self.loss

    def unread(self) -> int:
        return self.unreadBytes

    def close(self) -> None:
        self.closed = True


class HalfCloseableTransport(StringTransport):
    """
    A L{StringTransport} that can send a FIN and keep reading, and that
    (like Twisted's TCP transport) may be resumed while closing.
    """

    writeClosed = False
    producerPaused = False

    def __init__(self, peerAddress: Any = None) -> None:
        super().__init__(peerAddress=peerAddress, lenient=True)

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class Harness:
    """
    A relay connected to a L{HalfCloseableTransport} through a
    L{ByteStreamClient}, to a L{FakeWorker}, a L{FakeCloseWatch} and a
    L{FakeProbe}, on a L{MemoryReactorClock}.
    """

    clientType: type[ByteStreamClient] = ByteStreamClient

    def __init__(
        self,
        spawnError: OSError | None = None,
        dying: bool = True,
        reapedWhileSpawning: bool = False,
        watchError: OSError | None = None,
        transport: HalfCloseableTransport | None = None,
        clock: MemoryReactorClock | None = None,
        aftermath: Aftermath | None = None,
        spool: SpoolBudget | None = None,
        pipe: int | None = None,
        **config: Any,
    ) -> None:
        """
        @param clock: and C{aftermath}: another harness's, to play the
            relays of one server.
        @param pipe: the capacity of the worker's stdin pipe behind
            Twisted's write buffer (L{PipeWriter}), if it has one.
        """
        self._pipe = pipe
        self._dying = dying
        self._spool = spool
        self._reapedWhileSpawning = reapedWhileSpawning
        self.actions: list[str] = []
        self.clock = MemoryReactorClock() if clock is None else clock
        self.config = Config(argv=("/bin/cat",), **config)
        self.watch = FakeCloseWatch(self.actions, watchError)
        self.aftermath = Aftermath(self.clock, self.watch.poll) if aftermath is None else aftermath
        self.probe = self.makeProbe()
        self.record = ConnectionRecord(7, "192.168.1.1:54321")
        self.ended: list[ConnectionRecord] = []
        self.workers: list[FakeWorker] = []
        self._spawnError = spawnError
        self.transport = transport or HalfCloseableTransport()
        self.client = self.clientType(
            self._connect, self.clock, probe=lambda transport: self.probe
        )
        self.client.makeConnection(self.transport)

    def makeProbe(self) -> FakeProbe:
        return FakeProbe(self.actions)

    def makeOwner(self, client: IClient) -> Any:
        """
        The connection's owner: a relay.
        """
        return Relay(
            client,
            self.record,
            self.config,
            self.clock,
            self.watch,
            self._startWorker,
            self.ended.append,
            self.aftermath,
            self._spool,
        )

    def _connect(self, client: IClient) -> IClientEvents:
        self.connection = connect(
            client, self.record, self.ended.append, lambda: self.makeOwner(client)
        )
        return self.connection

    def makeWorker(self, sink: IWorkerSink) -> FakeWorker:
        return FakeWorker(sink, self.actions, self._pipe)

    def _startWorker(self, sink: IWorkerSink) -> FakeWorker:
        if self._spawnError is not None:
            raise self._spawnError
        worker = self.makeWorker(sink)
        worker.dying = self._dying
        self.workers.append(worker)
        if self._reapedWhileSpawning:
            sink.workerReaped()
        return worker

    @property
    def relay(self) -> Relay:
        assert isinstance(self.connection, Relay)
        return self.connection

    @property
    def worker(self) -> FakeWorker:
        return self.workers[0]

    def turn(self) -> None:
        """
        The reactor's next turn: what waited for every kill of this one to
        be sent, and the teardowns of reaped workers, run.
        """
        self.clock.advance(0)

    def workerExits(self, code: int = 0) -> None:
        self.turn()
        self.relay.workerReaped()
        self.relay.workerEnded(code, None)
        self.turn()

    def workerKilled(self) -> None:
        self.turn()
        self.relay.workerReaped()
        self.relay.workerEnded(None, 9)
        self.turn()

    def workerStops(self) -> None:
        """
        The worker stops reading: its stdin holds a piece its pipe does not
        take, and the client fills the read-ahead behind it (the client is
        paused then, unless its bytes are spooled).
        """
        self.worker.stdinFull()
        self.client.dataReceived(b"s" * self.config.readAhead)

    def reap(self) -> None:
        """
        The killed worker is reaped (its output has not ended yet).
        """
        self.turn()
        self.relay.workerReaped()
        self.turn()

    def connectionLost(self, reason: Failure) -> None:
        self.client.connectionLost(reason)


def spawnFailure() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


def processEnded(code: int | None = 0, signal: int | None = None) -> Failure:
    if signal is None and code == 0:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(code, signal))


class FakePipe:
    #: No descriptor behind it: a handle writes through the process, never
    #: into the pipe directly.
    connected = False

    def __init__(self) -> None:
        self.reading = True
        self.disconnecting = False
        #: Twisted's default, which the worker's stdin must not keep.
        self.bufferSize = 2**16

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False


class FakeProcess:
    """
    A worker process transport, as L{twisted_closewatch.spawn.WorkerProcess}
    is one: signals reach its group until it has exited.
    """

    pid = 5151

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.pipes = {0: FakePipe(), 1: FakePipe(), 2: FakePipe()}
        self.signals: list[str] = []
        self.stdin = b""
        self.stdinClosed = False
        self.lost = False
        self.exited = False
        self.muted = False
        self.stderrDrained = False
        self.producer: Any = None
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        self.stdin += data

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def killGroup(self) -> None:
        self.signalProcess("KILL")

    def killStragglers(self) -> None:
        self.signals.append("stragglers")

    def loseConnection(self) -> None:
        self.lost = True

    def mute(self) -> None:
        self.muted = True

    def drainStderr(self) -> None:
        self.stderrDrained = True

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        """
        Reaped, then its pipes end.
        """
        self.exited = True
        self.protocol.processExited(processEnded(code, signal))
        self.protocol.processEnded(processEnded(code, signal))


__all__ = ["Harness", "SpawnFailed"]
