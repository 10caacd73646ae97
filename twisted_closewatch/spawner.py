"""
Workers created by a small helper process, the spawner, instead of by the
server itself.

The server's descriptor table and memory grow with its connections, and a
fork (or C{posix_spawn}'s clone) copies them: a spawn from the server gets
slower the busier it is.  The spawner (L{twisted_closewatch.spawnerprocess})
holds a handful of descriptors and a few MB, so a spawn costs the same at
3,000 connections as at none.  It also makes warm Python workers possible:
it imports a C{MODULE:FUNCTION} entry point once and forks a ready child
per connection, and it applies L{Containment} in the child before the
worker starts.

The server keeps what matters on its side: it creates the worker's pipes
and passes their ends over a unix socket (C{SCM_RIGHTS}); it gets the pid
and a pidfd back, watches the pidfd in the reactor (so it sees every exit
at once, as L{twisted_closewatch.spawn} does), and kills the worker itself:
its process group, or its whole cgroup with C{cgroup.kill}.  The spawner is
the workers' parent, so it reaps them and reports their exit status.

A spawner that dies is replaced at once: the workers it had started are
killed (their exit status is lost with it, and nothing would remove their
cgroups or reap their orphans), their connections end, and the server goes
on serving with the new spawner.  Its descriptors and sockets are
close-on-exec in the server; it leads its own session and ignores
C{SIGTERM}, C{SIGINT} and C{SIGHUP}, like the guardian, and when the server
dies (its control socket ends) it kills every worker it started, setsid
daemons included when they have cgroups.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessProtocol, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_closewatch import _compat, containment, spawnerprocess
from twisted_closewatch.containment import Containment
from twisted_closewatch.guardian import Guardian
from twisted_closewatch.helper import Helper, helperCommand
from twisted_closewatch.spawn import PIPE_SIZE, WorkerProcess, _ExitNotifier, resizePipe

log = Logger()

#: Seconds the spawner has to start up (and import a Python worker).
START_TIMEOUT = 30.0
#: Seconds the spawner has to answer a request.
REQUEST_TIMEOUT = 10.0
#: Seconds the spawner has to exit once its control socket is closed.
STOP_TIMEOUT = 10.0
#: The wait status reported for a worker whose spawner died before it did.
KILLED_STATUS = signal.SIGKILL


class SpawnerError(Exception):
    """
    The spawner could not start; its text is one line.
    """


def available() -> bool:
    """
    Whether workers can be started through a spawner here: it needs pidfds
    (Linux 5.3+) and descriptor passing.
    """
    if not (hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


def _command(config: Mapping[str, Any], *flags: str) -> list[str]:
    """
    The spawner's command line; it is given the server's C{sys.path}.
    """
    return helperCommand(spawnerprocess.__file__, *flags, json.dumps(config))


def checkEntryPoint(entryPoint: str) -> str | None:
    """
    Import C{entryPoint} as the spawner will, in a throwaway process.

    @return: why it fails, in one line, or C{None}.
    """
    import subprocess

    result = subprocess.run(
        _command({"sysPath": sys.path, "entryPoint": entryPoint}, "--check"),
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        timeout=START_TIMEOUT,
    )
    if result.returncode == 0:
        return None
    lines = result.stdout.decode("utf-8", "replace").splitlines()
    return lines[0] if lines else f"the check exited with status {result.returncode}"


class Spawner(Helper):
    """
    The server's side of the spawner: starts it, asks it for workers, hears
    their exits, replaces it if it dies.

    @param entryPoint: C{MODULE:FUNCTION} imported once by the spawner,
        run in each worker started without C{argv}.
    @param containment: applied to every worker.
    """

    name = "spawner"
    stopTimeout = STOP_TIMEOUT
    startErrors = (SpawnerError, OSError)

    _control: socket.socket | None = None
    _events: _ExitReports | None = None
    #: The server's own cgroup, and the one it makes there for its workers'.
    cgroupHome: str | None = None
    cgroupParent: str | None = None

    def __init__(
        self, reactor: Any, entryPoint: str | None, containment: Containment,
        guardian: Guardian | None = None,
    ) -> None:
        super().__init__(reactor)
        self.entryPoint = entryPoint
        self.containment = containment
        self.guardian = guardian
        self._ids = itertools.count(1)
        self._answerBuffer = bytearray(spawnerprocess.ANSWER_MAX)
        self._environment: dict[str, str] = {}
        #: request id -> the worker, and its key with the guardian
        self._workers: dict[int, tuple[SpawnedWorker, int | None]] = {}

    def start(self) -> None:
        """
        Start the spawner and wait until it has imported the entry point.

        @raise SpawnerError: it could not start, or the import failed.
        """
        if self.cgroupHome is None and self.containment.cgroup != "off":
            try:
                self.cgroupHome, _ = containment.cgroupBase(self.containment)
                if self.cgroupHome is not None:
                    self.cgroupParent = containment.makeServerCgroup(
                        self.cgroupHome, f"closewatch-{os.getpid()}",
                        self.containment.cgroupLimits,
                    )
            except containment.ContainmentError as e:
                raise SpawnerError(str(e)) from None
        # The spawner's environment (the server's now): requests carry only
        # their differences from it.
        self._environment = dict(os.environ)
        control, controlChild = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        events, eventsChild = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        config = {
            "sysPath": sys.path,
            "entryPoint": self.entryPoint,
            "cgroupParent": self.cgroupParent,
            "cgroupHome": self.cgroupHome,
            "cgroupLimits": self.containment.cgroupLimits,
        }
        try:
            self.spawnHelper(
                _command(config),
                {0: devnull, 1: 2, 2: 2, 3: controlChild.fileno(), 4: eventsChild.fileno()},
                self._environment,
            )
        except OSError as e:
            control.close()
            events.close()
            raise SpawnerError(f"cannot start the spawner: {e}") from None
        finally:
            os.close(devnull)
            controlChild.close()
            eventsChild.close()
        self._control = control
        control.settimeout(START_TIMEOUT)
        try:
            answer = spawnerprocess.decodeMessage(control.recv(spawnerprocess.MESSAGE_MAX))
        except (OSError, ValueError) as e:
            answer = {"error": f"no answer ({e or type(e).__name__})"}
        if not answer.get("ready"):
            self._control = None
            control.close()
            events.close()
            raise SpawnerError(str(answer.get("error", "it ended at start-up")))
        self._events = _ExitReports(self, events)
        self._reactor.addReader(self._events)
        log.info("spawner {spawner_pid} started", spawner_pid=self.pid)

    def spawnWorker(
        self,
        reactor: Any,
        protocol: IProcessProtocol,
        argv: Sequence[str] | None,
        environment: Mapping[str, str],
        pipeSize: int = PIPE_SIZE,
        guardian: Guardian | None = None,
        beforeTeardown: Callable[[], None] = lambda: None,
        stdio: int | None = None,
    ) -> SpawnedWorker:
        """
        Start a worker: C{argv} (C{argv[0]} an absolute path), or the entry
        point if C{argv} is C{None}.  L{twisted_closewatch.spawn.spawnWorker}'s
        signature, for the factory's L{twisted_closewatch.worker.ProcessStarter}:
        the reactor and guardian are the spawner's own.

        @raise OSError: it could not be started.
        """
        return SpawnedWorker(self, protocol, argv, environment, pipeSize, beforeTeardown, stdio)

    def ask(
        self, argv: Sequence[str] | None, environment: Mapping[str, str], fds: Sequence[int]
    ) -> int:
        """
        Ask for a worker with C{fds} as its stdin, stdout and stderr (they
        may be closed once this returns); L{answer} tells how it went.  The
        server may do its own part of the worker's set-up in between, while
        the spawner does its part.

        @return: the request's id.
        @raise OSError: the spawner cannot be asked.
        """
        if self._control is None:
            raise OSError(errno.EAGAIN, "the spawner is not running")
        requestID = next(self._ids)
        cgroupName = f"w{requestID}" if self.cgroupParent is not None else None
        c = self.containment
        changed, unset = spawnerprocess.environmentDelta(self._environment, environment)
        message = spawnerprocess.encodeRequest(
            requestID, argv, changed, unset=unset, cgroup=cgroupName, rlimits=c.rlimits,
            uid=c.uid, gid=c.gid,
        )
        if len(message) > spawnerprocess.MESSAGE_MAX:
            raise OSError(errno.E2BIG, "the worker's environment is too large")
        socket.send_fds(self._control, [message], list(fds))
        return requestID

    def answer(self, requestID: int) -> tuple[int, int, str | None]:
        """
        Wait for the answer to the request C{requestID}.

        @return: the worker's pid, its pidfd and its cgroup's path (if it
            has one).
        @raise OSError: it could not be started.
        """
        control = self._control
        if control is None:
            raise OSError(errno.EPIPE, "the spawner ended")
        control.settimeout(REQUEST_TIMEOUT)
        try:
            while True:
                data, pidfds = spawnerprocess.recvFds(control, 1, self._answerBuffer)
                if not data:
                    raise OSError(errno.EPIPE, "the spawner ended")
                answer = spawnerprocess.decodeMessage(data)
                if answer.get("id") == requestID:
                    break
                # The late answer to a request that timed out.
                for fd in pidfds:
                    os.close(fd)
                _killLate(answer)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, "the spawner did not answer") from None
        if "error" in answer:
            raise OSError(answer["error"], answer.get("message", "spawn failed"))
        path = None
        if self.cgroupParent is not None:
            path = os.path.join(self.cgroupParent, f"w{requestID}")
        return answer["pid"], pidfds[0], path

    def started(self, requestID: int, pid: int, worker: SpawnedWorker) -> None:
        """
        C{worker} has been started as C{pid}: hear of its exit, and have the
        guardian kill its group if the server dies.
        """
        key = None if self.guardian is None else self.guardian.register(pid)
        self._workers[requestID] = (worker, key)

    def exitReported(self, requestID: int, pid: int, status: int) -> None:
        # Read by the reactor only, never while a request waits for its
        # answer: every worker is registered before its report is read.
        worker, key = self._workers.pop(requestID, (None, None))
        if worker is None:
            return
        # Reaped by the spawner: its pid, and group id, may be a new
        # worker's already, whose registration has a key of its own.
        self._unguard(key)
        worker.exitReported(status)

    def _unguard(self, key: int | None) -> None:
        if self.guardian is not None and key is not None:
            self.guardian.unregister(key)

    def hangUp(self) -> None:
        """
        Close the control socket (the spawner kills what is left, nothing
        after a clean stop, removes the cgroups and exits), once the exit
        reports it sent are read.
        """
        if self._events is not None:
            self._events.doRead()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._events is not None:
            self._reactor.removeReader(self._events)
            self._events.close()
            self._events = None

    def helperStopped(self) -> None:
        if self.cgroupParent is not None:
            containment.removeCgroup(self.cgroupParent)

    def helperLost(self, pid: int, reason: Failure) -> None:
        orphans, self._workers = self._workers, {}
        log.error(
            "spawner {spawner_pid} ended unexpectedly ({why}): killing the {count} "
            "worker(s) it had started, starting a new spawner",
            spawner_pid=pid,
            why=reason.getErrorMessage(),
            count=len(orphans),
        )
        for worker, key in orphans.values():
            self._unguard(key)
            worker.spawnerLost()
        self.restart()


def _killLate(answer: Mapping[str, Any]) -> None:
    pid = answer.get("pid")
    if isinstance(pid, int):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


@implementer(IReadDescriptor)
class _ExitReports:
    """
    The events socket in the reactor: the spawner's exit reports.
    """

    def __init__(self, spawner: Spawner, sock: socket.socket) -> None:
        self._spawner = spawner
        self._socket = sock
        sock.setblocking(False)

    def fileno(self) -> int:
        return self._socket.fileno()

    def doRead(self) -> None:
        while True:
            try:
                data = self._socket.recv(spawnerprocess.MESSAGE_MAX)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            report = spawnerprocess.decodeMessage(data)
            self._spawner.exitReported(report["id"], report["pid"], report["status"])

    def close(self) -> None:
        self._socket.close()

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "closewatch-spawner"



class _Exited(_ExitNotifier):
    """
    A spawned worker's pidfd in the reactor: it only says that the worker
    has exited (the spawner, its parent, reaps it and reports the status),
    which is no teardown work yet: nothing is polled first.
    """

    _worker: SpawnedWorker

    def doRead(self) -> None:
        self._worker.exited()


class SpawnedWorker(WorkerProcess):
    """
    A worker the spawner started: Twisted's process transport over its
    three pipes, its exit seen on its pidfd and its status from the
    spawner's report, its kill the server's own (C{killpg}, or
    C{cgroup.kill} for a C{SIGKILL} when it has a cgroup).
    """

    _exitStatus: int | None = None
    _gone = False
    cgroup: str | None = None

    def __init__(
        self,
        spawner: Spawner,
        proto: IProcessProtocol,
        argv: Sequence[str] | None,
        environment: Mapping[str, str],
        pipeSize: int,
        beforeTeardown: Callable[[], None],
        stdio: int | None = None,
    ) -> None:
        self._reactor = spawner._reactor
        self._spawner = spawner
        self.beforeTeardown = beforeTeardown
        _compat.BaseProcess.__init__(self, proto)
        self.pipes = {}
        # Given a socket (--direct), it is the worker's stdin and stdout.
        stdinRead, stdinWrite = os.pipe() if stdio is None else (stdio, -1)
        stdoutRead, stdoutWrite = os.pipe() if stdio is None else (-1, stdio)
        stderrRead, stderrWrite = os.pipe()
        ours = [fd for fd in (stdinWrite, stdoutRead, stderrRead) if fd >= 0]
        try:
            try:
                requestID = spawner.ask(argv, environment, (stdinRead, stdoutWrite, stderrWrite))
            finally:
                for fd in (stdinRead, stdoutWrite, stderrWrite):
                    if fd != stdio:
                        os.close(fd)
            # While the spawner spawns.
            for fd in ours:
                resizePipe(fd, pipeSize)
            pid, pidfd, self.cgroup = spawner.answer(requestID)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        self.pid = pid
        spawner.started(requestID, pid, self)
        reactor = self._reactor
        if stdio is None:
            stdin: Any = _compat.ProcessWriter(reactor, self, 0, stdinWrite, forceReadHack=True)
            self.pipes[0] = stdin
            self.pipes[1] = self.processReaderFactory(reactor, self, 1, stdoutRead)
        self.pipes[2] = self.processReaderFactory(reactor, self, 2, stderrRead)
        self._exitNotifier = _Exited(pidfd, self)
        reactor.addReader(self._exitNotifier)
        protocol: Any = proto
        try:
            protocol.makeConnection(self)
        except Exception:
            log.failure("worker protocol failed to start")

    def reapProcess(self) -> None:
        """
        Called when its pipes close (Twisted's C{maybeCallProcessEnded}):
        it has ended once it is gone and its status known.
        """
        self._maybeEnd()

    def exited(self) -> None:
        """
        The pidfd is readable: the worker has exited.  The pidfd is closed
        here, in its own event's handler, and nowhere else: closed from
        another handler, its number could be given to a new descriptor (a
        new worker's pipe) while the epoll batch being handled still holds
        an event for it, which that descriptor would then receive.
        """
        if self._exitNotifier is not None:
            self._exitNotifier.close(self._reactor)
            self._exitNotifier = None
        self._gone = True
        self._maybeEnd()

    def exitReported(self, status: int) -> None:
        self.beforeTeardown()
        self._exitStatus = status
        self._maybeEnd()

    def spawnerLost(self) -> None:
        """
        The spawner died: its report will never come, so kill the worker
        and end it as killed once it is gone.
        """
        if self._exitStatus is None:
            self._exitStatus = KILLED_STATUS
            try:
                self.signalProcess("KILL")
            except ProcessExitedAlready:
                pass
        self._maybeEnd()

    def _maybeEnd(self) -> None:
        if self.pid is None or not self._gone or self._exitStatus is None:
            return
        self.processEnded(self._exitStatus)

    def signalProcess(self, signalID: str | int) -> None:
        """
        Signal the worker's whole process group and, for a C{SIGKILL}, its
        whole cgroup too if it has one.
        """
        number = getattr(signal, f"SIG{signalID}") if isinstance(signalID, str) else signalID
        self._signalGroup(number)
        if number == signal.SIGKILL:
            self.killStragglers()

    def killGroup(self) -> None:
        """
        C{SIGKILL} the worker's process group: one system call, after which
        the worker dies as soon as with a cgroup (L{killStragglers}).
        """
        self._signalGroup(signal.SIGKILL)

    def killStragglers(self) -> None:
        """
        C{cgroup.kill} the worker's cgroup, if it has one: whatever left its
        process group (a setsid daemon) dies too.
        """
        if self.cgroup is not None:
            spawnerprocess.cgroupKill(self.cgroup)

    def _signalGroup(self, number: int) -> None:
        if self.pid is None or self._gone or self._exitNotifier is None:
            raise ProcessExitedAlready()
        # Once it has exited, and maybe been reaped, its pid may be reused.
        if _readable(self._exitNotifier.fileno()):
            raise ProcessExitedAlready()
        try:
            os.killpg(self.pid, number)
        except ProcessLookupError:
            # No group yet: the child has not called setsid, so it is alone.
            try:
                signal.pidfd_send_signal(self._exitNotifier.fileno(), number)
            except ProcessLookupError:
                raise ProcessExitedAlready() from None


def _readable(fd: int) -> bool:
    """
    Whether C{fd} (a pidfd: its process has exited) is readable now; poll,
    not select, which cannot take descriptors past 1023.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
