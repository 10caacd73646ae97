"""
Workers die with the server, however the server dies.

Workers are spawned with C{posix_spawn}, so no code runs in the child that
could ask for C{prctl(PR_SET_PDEATHSIG)}; and as session leaders they would
outlive a server killed with C{SIGKILL} or crashed.  Instead, one small
helper process per server, the guardian (L{twisted_closewatch.guardianprocess},
standard library only, so that it starts small), holds the read end of a
pipe from the server.  The server writes C{+KEY PGID} when it spawns a
worker and C{-KEY} once it is gone, C{KEY} a number of its own for each
registration: a worker's group id may be reused by a new worker before the
old one's C{-KEY} is written (a spawner reaps its workers before the server
hears of it), and a key names one registration only.  When the pipe reaches
end-of-file, which the kernel guarantees however the server ended, the
guardian C{SIGKILL}s every group still registered and exits.

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

import itertools
import os
from typing import Any

from twisted.internet.interfaces import IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_closewatch import guardianprocess
from twisted_closewatch.helper import Helper, helperCommand
from twisted_closewatch.pipes import PIPE_SIZE, resizePipe

log = Logger()

#: Seconds before a guardian that died is replaced.
RESTART_DELAY = 1.0


@implementer(IWriteDescriptor)
class Guardian(Helper):
    """
    The server's side: starts the guardian and keeps it told which worker
    process groups exist.

    Messages are written at once, not on the next reactor iteration, so a
    server killed right after a spawn has still registered the worker; they
    are only queued when the guardian is not keeping up with the pipe.
    """

    name = "guardian"
    stopTimeout = 5.0

    _fd: int | None = None

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self._groups: dict[int, int] = {}
        self._keys = itertools.count(1)
        self._pending = b""

    def start(self) -> None:
        """
        Start the guardian and register every group known so far.

        @raise OSError: it could not be started.
        """
        readEnd, writeEnd = os.pipe2(os.O_CLOEXEC)
        try:
            self.spawnHelper(
                helperCommand(guardianprocess.__file__), {0: readEnd, 1: 2, 2: 2}
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
        self._send(b"".join(b"+%d %d\n" % item for item in sorted(self._groups.items())))
        log.info("guardian {guardian_pid} started", guardian_pid=self.pid)

    def register(self, pgid: int) -> int:
        """
        Have the group C{pgid} killed if the server dies.

        @return: the key that unregisters it.
        """
        key = next(self._keys)
        self._groups[key] = pgid
        self._send(b"+%d %d\n" % (key, pgid))
        return key

    def unregister(self, key: int) -> None:
        """
        Forget the group registered as C{key}.
        """
        if self._groups.pop(key, None) is not None:
            self._send(b"-%d\n" % key)

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

    def hangUp(self) -> None:
        if self._fd is None:
            return
        if self._pending:
            self._reactor.removeWriter(self)
            self._pending = b""
        os.close(self._fd)
        self._fd = None

    def helperLost(self, pid: int, reason: Failure) -> None:
        log.error(
            "guardian {guardian_pid} ended unexpectedly ({why}): workers would not "
            "die with a crashed server until it is replaced in {delay} s",
            guardian_pid=pid,
            why=reason.getErrorMessage(),
            delay=RESTART_DELAY,
        )
        self._retryCall = self._reactor.callLater(RESTART_DELAY, self.restart)

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
