"""
Spawning workers at a cost that does not grow with the server's open fds.

Twisted's own C{spawnProcess} asks the kernel about every open descriptor of
the server before each spawn and, on every C{SIGCHLD}, calls C{waitpid} for
every live child.  With thousands of connections that makes each spawn take
milliseconds of reactor time.  L{WorkerProcess} keeps Twisted's pipe handling
and L{IProcessTransport} behaviour but:

  - spawns with C{posix_spawn(..., setsid=True)}: the worker leads a new
    session and process group, so a kill reaches its children too;
  - relies on every server descriptor being close-on-exec (see
    L{closeOnExecSweep}) instead of closing them one by one in the child;
  - learns of the worker's exit from a pidfd (Linux 5.3+) registered with the
    reactor, so a child's exit costs one C{waitpid}, not one per worker.

Where pidfds are missing it falls back to Twisted's C{SIGCHLD} reaping.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessProtocol, IReactorCore, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from twisted_closewatch import _compat
from twisted_closewatch.pipes import PIPE_SIZE, resizePipe

if TYPE_CHECKING:
    from twisted_closewatch.guardian import Guardian

log = Logger()

#: How much one read from a worker's stdout takes at most.  Twisted reads
#: 8 KiB; larger reads cut the per-byte overhead of the relay.
READ_SIZE = 128 * 1024

def closeOnExecSweep() -> int:
    """
    Mark every descriptor above 2 close-on-exec, and make sure 0-2 are open.

    Python opens descriptors close-on-exec already; this catches the ones the
    server inherited (a systemd socket, a shell's stray fd), once, so that no
    spawn needs to look at them again.  Open standard descriptors keep a
    worker's pipes from landing on 0-2, where the spawn's C{dup2}s would
    clobber each other.

    @return: how many descriptors had to be changed.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        try:
            fds = [int(name) for name in os.listdir("/dev/fd")]
        except OSError:
            fds = list(range(3, 1024))
    changed = 0
    for fd in fds:
        if fd <= 2:
            continue
        try:
            if os.get_inheritable(fd):
                os.set_inheritable(fd, False)
                changed += 1
        except OSError:
            pass
    return changed


def raiseFileLimit() -> int:
    """
    Raise this process's soft descriptor limit to its hard limit: a worker
    per connection costs about five descriptors (socket, its watch duplicate,
    three pipes), and the usual soft limit of 1024 would cap a server at
    about 200 connections.

    @return: the soft limit now in force.
    """
    try:
        import resource
    except ImportError:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


class _WorkerOutput(_compat.ProcessReader):
    """
    A worker's stdout or stderr, read in large chunks.
    """

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, READ_SIZE)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            return _compat.CONNECTION_LOST
        if not data:
            self.proc.beforeTeardown()
            return _compat.CONNECTION_DONE
        self.dataReceived(data)
        return None

    def drain(self, reads: int = 16) -> None:
        """
        Deliver what is in the pipe now, without waiting for more (at most
        C{reads} reads: a process outside the group may still be writing).
        """
        for _ in range(reads):
            try:
                data = os.read(self.fd, READ_SIZE)
            except OSError:
                return
            if not data:
                return
            self.dataReceived(data)


@implementer(IReadDescriptor)
class _ExitNotifier:
    """
    A pidfd in the reactor: readable once the worker has exited.
    """

    def __init__(self, pidfd: int, worker: WorkerProcess) -> None:
        self._pidfd = pidfd
        self._worker = worker

    def fileno(self) -> int:
        return self._pidfd

    def doRead(self) -> None:
        self._worker.beforeTeardown()
        self._worker.reapProcess()

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "closewatch-pidfd"

    def close(self, reactor: Any) -> None:
        reactor.removeReader(self)
        os.close(self._pidfd)


#: Every signal a worker starts with at its default disposition.  An ignored
#: disposition survives exec (Python ignores SIGPIPE, which a worker must
#: not inherit); resetting them all is as cheap as finding the ignored ones,
#: and stays right if the server's dispositions change.
_DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


class WorkerProcess(_compat.Process):
    """
    A worker: a session leader with stdin, stdout and stderr pipes.

    Kills are delivered to the whole process group; when the leader exits,
    whatever it left behind in its group is killed before it is reaped, so
    a connection never leaves processes behind it.
    """

    processReaderFactory = _WorkerOutput
    _exitNotifier: _ExitNotifier | None = None
    _guardianKey: int | None = None

    def __init__(
        self,
        reactor: IReactorCore,
        executable: str,
        args: Sequence[str],
        environment: Mapping[str, str],
        proto: IProcessProtocol,
        pipeSize: int = PIPE_SIZE,
        guardian: Guardian | None = None,
        beforeTeardown: Callable[[], None] = lambda: None,
        stdio: int | None = None,
    ) -> None:
        self._guardian = guardian
        self.beforeTeardown = beforeTeardown
        # Given a socket, it is the worker's stdin and stdout; stderr is
        # still a pipe, to the log.
        childFDs = None if stdio is None else {0: stdio, 1: stdio, 2: "r"}
        super().__init__(
            reactor, executable, list(args), dict(environment), None, proto, childFDs=childFDs
        )
        for pipe in self.pipes.values():
            resizePipe(pipe.fileno(), pipeSize)
        if self.pid is not None:
            self._watchExit(reactor, self.pid)

    def _trySpawnInsteadOfFork(
        self,
        path: object,
        uid: object,
        gid: object,
        executable: str,
        args: list[str],
        environment: dict[str, str],
        kwargs: dict[str, Any],
    ) -> bool:
        fdmap: dict[int, int] = kwargs["fdmap"]
        self.pid = os.posix_spawn(
            executable,
            args,
            environment,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, parentFD, childFD)
                for childFD, parentFD in sorted(fdmap.items())
            ],
            setsigdef=_DEFAULT_SIGNALS,
            setsid=True,
        )
        # At once: a server killed from here on still takes the worker along.
        if self._guardian is not None:
            self._guardianKey = self._guardian.register(self.pid)
        self.status = -1
        return True

    def _watchExit(self, reactor: Any, pid: int) -> None:
        pidfdOpen = getattr(os, "pidfd_open", None)
        if pidfdOpen is None:
            return
        try:
            pidfd = pidfdOpen(pid)
        except OSError:
            return
        # Twisted registered us for SIGCHLD reaping; the pidfd replaces that.
        _compat.unregisterReapHandler(pid, self)
        self._exitNotifier = _ExitNotifier(pidfd, self)
        reactor.addReader(self._exitNotifier)

    def _leaderExited(self, pid: int) -> bool:
        try:
            result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return result is not None

    def reapProcess(self) -> None:
        """
        Reap the leader if it has exited, killing what is left of its group
        first: while the leader is an unreaped zombie its pid, and so the
        group id, cannot be reused by an unrelated process.
        """
        if self.pid is None:
            return
        if not self._leaderExited(self.pid):
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        if self._guardian is not None and self._guardianKey is not None:
            self._guardian.unregister(self._guardianKey)
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
            log.warn("worker {pid} was reaped elsewhere", pid=self.pid)
        if not pid:
            return
        if self._exitNotifier is not None:
            self._exitNotifier.close(self._reactor)
            self._exitNotifier = None
        else:
            _compat.unregisterReapHandler(pid, self)
        self.processEnded(status)

    def mute(self) -> None:
        """
        Stop watching the pipes of a worker that was just sent C{SIGKILL}.
        Its exit closes them before it wakes its pidfd, and each close would
        wake the reactor, which Linux then runs ahead of the dying worker on
        its CPU (see the "Kill path" section of C{bench/README.md}): the
        pidfd is what tells of the exit.  Once the worker is reaped,
        L{drainStderr} delivers its last words and C{loseConnection} ends the
        pipes.
        """
        for pipe in self.pipes.values():
            pipe.stopReading()
            # Not a stdin being closed (--half-close forward): it ends only
            # once it is written to, and a reap's loseConnection would not
            # start it writing again.
            if not pipe.disconnecting:
                pipe.stopWriting()

    def drainStderr(self) -> None:
        """
        Deliver what the worker wrote to its stderr and was not read yet.
        """
        stderr = self.pipes.get(2)
        if isinstance(stderr, _WorkerOutput):
            stderr.drain()

    def killGroup(self) -> None:
        """
        C{SIGKILL} the worker's process group, and nothing more (see
        L{killStragglers}).

        @raise ProcessExitedAlready: it has exited.
        """
        self.signalProcess(signal.SIGKILL)

    def killStragglers(self) -> None:
        """
        Kill what left the worker's group: nothing can be found here.
        """

    def signalProcess(self, signalID: str | int) -> None:
        """
        Signal the worker's whole process group.
        """
        number = getattr(signal, f"SIG{signalID}") if isinstance(signalID, str) else signalID
        if self.pid is None:
            raise ProcessExitedAlready()
        try:
            os.killpg(self.pid, number)
        except ProcessLookupError:
            raise ProcessExitedAlready() from None


def spawnWorker(
    reactor: IReactorCore,
    protocol: IProcessProtocol,
    argv: Sequence[str],
    environment: Mapping[str, str],
    pipeSize: int = PIPE_SIZE,
    guardian: Guardian | None = None,
    beforeTeardown: Callable[[], None] = lambda: None,
    stdio: int | None = None,
) -> WorkerProcess:
    """
    Start C{argv} (C{argv[0]} an absolute path) as a new session leader
    connected to C{protocol}, registered with C{guardian} if given.
    C{beforeTeardown} is called before the work of the worker's exit (its
    pipes' ends, its reaping) is done, so that a server can first act on
    what is more urgent.  Given C{stdio} (a socket), the worker's stdin
    and stdout are that descriptor instead of pipes.

    @raise OSError: the worker could not be started (missing executable,
        out of descriptors or processes).
    """
    return WorkerProcess(
        reactor, argv[0], argv, environment, protocol, pipeSize, guardian, beforeTeardown, stdio
    )
