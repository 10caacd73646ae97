"""
Workers die with the server, however the server dies.

Workers are spawned with C{posix_spawn}, so no code runs in the child that
could ask for C{prctl(PR_SET_PDEATHSIG)}; and as session leaders they would
outlive a server killed with C{SIGKILL} or crashed.  Instead, one small
helper process per server, the guardian (L{twisted_closewatch.guardianprocess},
standard library only, so that it starts small), holds the read end of a
pipe from the server.  The server writes C{+PGID} when it spawns a worker
and C{-PGID} just before it reaps one (while the group id cannot be reused
yet).  When the pipe
reaches end-of-file, which the kernel guarantees however the server ended,
the guardian C{SIGKILL}s every group still registered and exits.

The guardian leads its own session, so no worker group kill and no
terminal signal reaches it, and it ignores C{SIGTERM}, C{SIGINT} and
C{SIGHUP}: under systemd's C{KillMode=control-group} it must outlive the
server's own clean stop.  End-of-file on its pipe is its only way out
(short of C{SIGKILL}), so it cannot outlive the server.

A worker's own descendants that left its process group (C{setsid}) are not
covered; under systemd, C{KillMode=control-group} in the shipped unit
covers them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IWriteDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_closewatch import guardianprocess
from twisted_closewatch.pipes import PIPE_SIZE, resizePipe

log = Logger()

#: Seconds the guardian has to exit after its pipe is closed.
STOP_TIMEOUT = 5.0
#: Seconds before a guardian that died is replaced.
RESTART_DELAY = 1.0


@implementer(IWriteDescriptor)
class Guardian:
    """
    The server's side: starts the guardian and keeps it told which worker
    process groups exist.

    Messages are written at once, not on the next reactor iteration, so a
    server killed right after a spawn has still registered the worker; they
    are only queued when the guardian is not keeping up with the pipe.
    """

    _fd: int | None = None
    _process: Any = None
    _restartCall: IDelayedCall | None = None
    _killCall: IDelayedCall | None = None

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._groups: set[int] = set()
        self._pending = b""
        self._stopping = False
        self._stopped: list[defer.Deferred[None]] = []

    @property
    def pid(self) -> int | None:
        """
        The guardian's pid while it runs.
        """
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """
        Start the guardian and register every group known so far.

        @raise OSError: it could not be started.
        """
        readEnd, writeEnd = os.pipe2(os.O_CLOEXEC)
        try:
            self._process = self._reactor.spawnProcess(
                HelperProtocol(self._ended),
                sys.executable,
                # Isolated (-I -S): no PYTHON* variables, no site
                # directories; it needs the standard library only.
                [sys.executable, "-I", "-S", guardianprocess.__file__],
                env=dict(os.environ),
                childFDs={0: readEnd, 1: 2, 2: 2},
            )
        except Exception:
            os.close(writeEnd)
            raise
        finally:
            os.close(readEnd)
        os.set_blocking(writeEnd, False)
        # Room for a second of messages, which the guardian drains once a
        # second (see guardianprocess.DRAIN_INTERVAL_MS).
        resizePipe(writeEnd, PIPE_SIZE)
        self._fd = writeEnd
        self._pending = b""
        self._send(b"".join(b"+%d\n" % pgid for pgid in sorted(self._groups)))
        log.info("guardian {guardian_pid} started", guardian_pid=self.pid)

    def register(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(b"+%d\n" % pgid)

    def unregister(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(b"-%d\n" % pgid)

    def stop(self) -> defer.Deferred[None]:
        """
        Close the pipe: the guardian kills what is still registered (nothing,
        after a clean stop) and exits.

        @return: fires once it has exited.
        """
        self._stopping = True
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
        if self._process is None:
            return defer.succeed(None)
        self._closePipe()
        self._killCall = self._reactor.callLater(STOP_TIMEOUT, self._process.signalProcess, "KILL")
        d: defer.Deferred[None] = defer.Deferred()
        self._stopped.append(d)
        return d

    def _send(self, data: bytes) -> None:
        if self._fd is None or not data:
            # Not running: a restarted guardian is sent every group.
            return
        if self._pending:
            self._pending += data
            return
        self._pending = self._write(data)
        if self._pending:
            log.warn("guardian {guardian_pid} is not keeping up; queueing", guardian_pid=self.pid)
            self._reactor.addWriter(self)

    def _write(self, data: bytes) -> bytes:
        """
        Write what the pipe takes now; return the rest.
        """
        assert self._fd is not None
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            return data
        except BrokenPipeError:
            # It died; its end is being reported and it will be replaced.
            return b""
        return data[written:]

    def _closePipe(self) -> None:
        if self._fd is None:
            return
        if self._pending:
            self._reactor.removeWriter(self)
            self._pending = b""
        os.close(self._fd)
        self._fd = None

    def _ended(self, pid: int, reason: Failure) -> None:
        self._closePipe()
        self._process = None
        if self._stopping:
            if self._killCall is not None and self._killCall.active():
                self._killCall.cancel()
            waiting, self._stopped = self._stopped, []
            for d in waiting:
                d.callback(None)
            return
        log.error(
            "guardian {guardian_pid} ended unexpectedly ({why}): workers would not "
            "die with a crashed server until it is replaced in {delay} s",
            guardian_pid=pid,
            why=reason.getErrorMessage(),
            delay=RESTART_DELAY,
        )
        self._restartCall = self._reactor.callLater(RESTART_DELAY, self._restart)

    def _restart(self) -> None:
        try:
            self.start()
        except OSError as e:
            log.error("cannot start guardian: {error}", error=e)
            self._restartCall = self._reactor.callLater(RESTART_DELAY, self._restart)

    # IWriteDescriptor, while messages are queued.

    def fileno(self) -> int:
        return -1 if self._fd is None else self._fd

    def doWrite(self) -> None:
        self._pending = self._write(self._pending)
        if not self._pending:
            self._reactor.removeWriter(self)

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "closewatch-guardian"


class HelperProtocol(ProcessProtocol):
    """
    A helper process of the server (the guardian, the spawner): its end,
    with its pid, goes to C{ended}.
    """

    def __init__(self, ended: Callable[[int, Failure], None]) -> None:
        self._ended = ended
        self._pid: int | None = None

    def connectionMade(self) -> None:
        self._pid = getattr(self.transport, "pid", None)

    def processEnded(self, reason: Failure) -> None:
        self._ended(self._pid or 0, reason)

