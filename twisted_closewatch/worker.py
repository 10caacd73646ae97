"""
A worker, as the relay sees it: a handle that owns the process, its kill and
its timers.

L{WorkerHandle} is to one worker what procmon's service is to its
processes: it owns the pid, the kill (the whole process group, C{SIGTERM}
then, after C{--grace}, C{SIGKILL}: procmon's C{killTime} and "murder"
timer), and the C{--max-lifetime} timer, and cancels both when the worker
is reaped.  It tells its relay (an L{IWorkerSink}) what the worker does.
The relay sees it through L{IWorker} only, so that another way of starting
workers (a spawner) or a fake in a test can stand in for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from twisted_closewatch import _compat, spawn
from twisted_closewatch.addresses import ucspiEnvironment
from twisted_closewatch.config import Config
from twisted_closewatch.record import ConnectionRecord
from twisted_closewatch.splice import SplicedOutput, SpliceTarget

if TYPE_CHECKING:
    from twisted_closewatch.client import IClient
    from twisted_closewatch.guardian import Guardian
    from twisted_closewatch.spawner import Spawner

log = Logger()

#: Longest stderr line logged as one event; longer lines are cut.
STDERR_LINE_MAX = 4096
#: Stderr lines logged per connection per second; the rest are counted.
STDERR_LINES_PER_SECOND = 50


class IWorkerSink(Interface):
    """
    What a worker tells its relay.
    """

    def workerOutput(data: bytes) -> None:
        """
        The worker wrote C{data} to its stdout.
        """

    def workerLifetimeOver() -> None:
        """
        The worker has run for C{--max-lifetime}.
        """

    def workerReaped() -> None:
        """
        The worker has been reaped (its output may not have ended yet).
        """

    def workerEnded(exitCode: int | None, exitSignal: int | None) -> None:
        """
        The worker has been reaped and its output has ended.
        """


class IWorker(Interface):
    """
    What a relay does to its worker.
    """

    pid = Attribute("The worker's process id (and process group id).")
    outputProducer = Attribute(
        "An IPushProducer pausing the worker's output while the client does not read."
    )

    def write(data: bytes) -> None:
        """
        Write C{data} to the worker's stdin.
        """

    def closeStdin() -> None:
        """
        End the worker's input (EOF).
        """

    def paceInput(producer: IPushProducer) -> None:
        """
        Pause C{producer} (reading the client) while the worker's stdin is
        full, resume it when it drains, stop it when the worker closes it.
        """

    def drainOutput() -> None:
        """
        Read the rest of the worker's output, unpaced, so that its end is seen.
        """

    def idleStdin() -> int | None:
        """
        The descriptor of the worker's stdin pipe, if it is open and nothing
        written to it waits in memory (bytes put into the pipe directly
        then come next, in order), else C{None}.
        """

    def spliceOutput(
        target: SpliceTarget, spliced: Callable[[int], None], failed: Callable[[], None]
    ) -> None:
        """
        From now on, while C{target} gives a socket (and the most to move
        into it), move the worker's output into it by the kernel, telling
        C{spliced} how many bytes, instead of reporting them as output, and
        C{failed} if the socket fails.
        """

    def kill() -> bool:
        """
        Kill the worker's whole process group (after C{--grace}, if any); the
        rest of its output is not needed any more.

        A C{SIGKILL} goes to the group at once, and stops the watching of
        its pipes; what left the group is killed later (L{killStragglers}).

        @return: whether it was sent C{SIGKILL} and is dying now, so that its
            reap will be told very soon (L{IWorkerSink.workerReaped}).
        """

    def killStragglers() -> None:
        """
        Kill what left the killed worker's group (its cgroup, if any); the
        spawner does it too before it reaps the worker.
        """


#: Starts a worker reporting to the given sink.  May raise L{OSError}.
WorkerStarter = Callable[[IWorkerSink], IWorker]


class _StderrLogger:
    """
    Turns a worker's stderr into one log event per line, bounded in line
    length and in rate so that a flooding worker cannot flood the log.
    """

    def __init__(self, clock: IReactorTime, record: ConnectionRecord) -> None:
        self._clock = clock
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
        window = int(self._clock.seconds())
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
class _WorkerReading:
    """
    Registered with the client: a client that does not read pauses reading
    the worker's stdout.
    """

    def __init__(self, process: Any) -> None:
        self._process = process

    def pauseProducing(self) -> None:
        stdout = self._process.pipes.get(1)
        if stdout is not None:
            stdout.stopReading()

    def resumeProducing(self) -> None:
        stdout = self._process.pipes.get(1)
        # Not a pipe being closed (see WorkerHandle.kill): reading it again
        # could end it twice.
        if stdout is not None and not stdout.disconnecting:
            stdout.startReading()

    def stopProducing(self) -> None:
        # The client is gone: read (and drop) the rest, or a stdout paused
        # by a full client buffer would never show the killed worker's EOF,
        # and its end would never be reported.
        self.resumeProducing()


class _WorkerProtocol(ProcessProtocol):
    """
    The worker's process protocol: its events, to its handle and sink.
    """

    pid: int

    def __init__(self, handle: WorkerHandle, sink: IWorkerSink, stderr: _StderrLogger) -> None:
        self._handle = handle
        self._sink = sink
        self._stderr = stderr

    def connectionMade(self) -> None:
        # Now: Twisted may reap a worker that exits at once before the spawn
        # returns, and the pid is forgotten then.
        self.pid = getattr(self.transport, "pid", 0)

    def outReceived(self, data: bytes) -> None:
        self._sink.workerOutput(data)

    def errReceived(self, data: bytes) -> None:
        self._stderr.dataReceived(data)

    def processExited(self, reason: Failure) -> None:
        self._handle._reaped()

    def processEnded(self, reason: Failure) -> None:
        self._stderr.flush()
        self._handle._ended(reason)


@implementer(IWorker)
class WorkerHandle:
    """
    One worker process, its kill and its timers.

    @param spawn: starts the process with the given protocol and returns
        its process transport (whose C{signalProcess} signals the group).
    @param onEnded: called once the worker is reaped, before the sink hears
        of it (the server gives the worker's slot back).
    """

    _graceCall: IDelayedCall | None = None
    _lifetimeCall: IDelayedCall | None = None

    def __init__(
        self,
        clock: IReactorTime,
        config: Config,
        sink: IWorkerSink,
        record: ConnectionRecord,
        spawn: Callable[[ProcessProtocol], Any],
        onEnded: Callable[[], None] = lambda: None,
    ) -> None:
        self._clock = clock
        self._grace = config.grace
        self._sink = sink
        self._onEnded = onEnded
        self._isReaped = False
        self._abandoned = False
        protocol = _WorkerProtocol(self, sink, _StderrLogger(clock, record))
        self._process = spawn(protocol)
        self.pid = protocol.pid
        self.outputProducer = _WorkerReading(self._process)
        stdin = self._process.pipes.get(0)
        if stdin is not None:  # not under --direct, where stdin is the socket
            # Paused as soon as it holds what the pipe has not taken: the
            # read-ahead waits in the worker's input (SpooledInput), which
            # can move it to the spool, not in this buffer, which cannot.
            stdin.bufferSize = 0
        if config.maxLifetime:
            self._lifetimeCall = clock.callLater(config.maxLifetime, sink.workerLifetimeOver)

    def write(self, data: bytes) -> None:
        """
        Into the stdin pipe at once, as much as it takes, if nothing waits
        before C{data} in Twisted's writer (which would write it only on the
        reactor's next turn, and so be busy whenever the client is read
        again: no splice then); the rest to the writer.  An error is left
        to the writer's own next write to see (a full pipe, or its reader
        gone: the worker closed its stdin).
        """
        fd = self.idleStdin()
        if fd is not None:
            try:
                written = os.write(fd, data)
            except OSError:
                written = 0
            if written == len(data):
                return
            data = data[written:]
        self._process.write(data)

    def closeStdin(self) -> None:
        self._process.closeStdin()

    def paceInput(self, producer: IPushProducer) -> None:
        self._process.registerProducer(producer, True)

    def drainOutput(self) -> None:
        self.outputProducer.resumeProducing()

    def idleStdin(self) -> int | None:
        stdin = self._process.pipes.get(0)
        if stdin is None or not _compat.writerIdle(stdin):
            return None
        fd: int = stdin.fileno()
        return fd

    def spliceOutput(
        self, target: SpliceTarget, spliced: Callable[[int], None], failed: Callable[[], None]
    ) -> None:
        stdout = self._process.pipes.get(1)
        if stdout is not None:
            SplicedOutput(stdout, target, spliced, failed).install()

    def kill(self) -> bool:
        """
        The signal first: with C{SIGKILL} to the group at once or, given a
        grace period, with C{SIGTERM} first and C{SIGKILL} once the grace
        is over, unless it is reaped before.

        A worker sent C{SIGKILL} is muted until its reap, at once: its
        pipes' closing would wake the server, which Linux then runs ahead of
        the dying worker on its CPU, delaying its exit's last steps (see the
        "Kill path" section of C{bench/README.md}); its stderr is drained at
        the reap.
        """
        dying = False
        if not self._grace:
            try:
                self._process.killGroup()
            except ProcessExitedAlready:
                pass
            else:
                dying = not self._isReaped
                if dying:
                    self._process.mute()
        elif self._graceCall is None and self._signal("TERM"):
            self._graceCall = self._clock.callLater(self._grace, self._signal, "KILL")
        self._abandoned = True
        if self._isReaped:
            self._process.loseConnection()
        return dying

    def killStragglers(self) -> None:
        if not (self._grace or self._isReaped):
            self._process.killStragglers()

    def _signal(self, name: str) -> bool:
        """
        Signal the worker's group; C{False} if it is gone already.
        """
        try:
            self._process.signalProcess(name)
        except ProcessExitedAlready:
            return False
        return True

    def _reaped(self) -> None:
        """
        The worker is reaped and its group killed; its pipes end when the
        last process holding them does, and that may be one that left the
        group (a daemon that called setsid).  Once the client is gone nobody
        needs the rest, so stop waiting for it.
        """
        self._isReaped = True
        if self._abandoned:
            self._process.drainStderr()
            self._process.loseConnection()
        self._sink.workerReaped()

    def _ended(self, reason: Failure) -> None:
        for call in (self._lifetimeCall, self._graceCall):
            if call is not None and call.active():
                call.cancel()
        self._onEnded()
        status = reason.value
        self._sink.workerEnded(getattr(status, "exitCode", None), getattr(status, "signal", None))


class ProcessStarter:
    """
    Starts each connection's worker as a process: its environment, its
    spawn (L{spawn.spawnWorker}, or a stand-in with its signature), and the
    L{WorkerHandle} that owns it.

    @param guardian: the guardian workers are registered with, if any, when
        they start (the service sets it after the factory is made).
    @param beforeTeardown: what a worker's exit runs before its own
        teardown (the close watch's poll: kills first).
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        guardian: Callable[[], Guardian | None],
        beforeTeardown: Callable[[], None],
        spawnProcess: Callable[..., Any] = spawn.spawnWorker,
        spawner: Callable[[], Spawner | None] = lambda: None,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._guardian = guardian
        self._beforeTeardown = beforeTeardown
        self._spawnProcess = spawnProcess
        self._spawner = spawner
        self._serverEnvironment = dict(os.environ)

    def environment(self, client: IClient, connectionID: int) -> dict[str, str]:
        """
        The server's environment (as it was when the starter was made), the
        connection's UCSPI variables and id, then C{--env}.
        """
        env = self._serverEnvironment.copy()
        env.update(ucspiEnvironment(client.host, client.peer))
        env["CLOSEWATCH_CONNECTION_ID"] = str(connectionID)
        env.update(self._config.env)
        return env

    def start(
        self,
        sink: IWorkerSink,
        client: IClient,
        record: ConnectionRecord,
        onEnded: Callable[[], None],
        stdio: int | None = None,
    ) -> WorkerHandle:
        """
        Start the worker of C{client}'s connection; given C{stdio} (the
        client's socket, under C{--direct}), as the worker's stdin and
        stdout.

        @raise OSError: it could not be started.
        """
        spawnProcess = self._spawnProcess
        argv: tuple[str, ...] | None = self._config.argv
        spawner = self._spawner()
        if spawner is not None:
            # Through the spawner (which registers with the guardian): the
            # command, or its Python entry point when it has one.
            spawnProcess = spawner.spawnWorker
            argv = None if self._config.pythonWorker else argv
        socket = {} if stdio is None else {"stdio": stdio}
        return WorkerHandle(
            self._reactor,
            self._config,
            sink,
            record,
            partial(
                spawnProcess,
                self._reactor,
                argv=argv,
                environment=self.environment(client, record.connectionID),
                pipeSize=self._config.pipeSize,
                guardian=self._guardian(),
                beforeTeardown=self._beforeTeardown,
                **socket,
            ),
            onEnded,
        )
