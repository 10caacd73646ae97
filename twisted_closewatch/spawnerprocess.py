"""
The spawner process (see L{twisted_closewatch.spawner}): creates every
worker for the server, so that a spawn costs what a small process's fork
costs, not what copying the server's descriptor table and memory map does.

Standard library only until it is told the server's C{sys.path}, and run
isolated (C{python -I -S}), so that it starts small.  Its descriptors: 0-2,
the control socket (fd 3: requests in, answers out, both with the
descriptors they carry as C{SCM_RIGHTS}), the events socket (fd 4: exit
reports) and its own wake-up pipe.

The wire format is one JSON object per C{SOCK_SEQPACKET} message:

  - request (server to spawner), with the worker's stdin, stdout and stderr
    as three descriptors: C{{"id": N, "argv": [...] or null, "env": {...},
    "unset": [...], "cwd": str or null, "cgroup": NAME or null, "rlimits": [[RESOURCE,
    LIMIT], ...], "uid": int or null, "gid": int or null}}; C{argv} null
    runs the Python entry point the spawner was started with; the worker's
    environment is the spawner's own (the server's, when it started the
    spawner) with C{env} set and C{unset} removed (L{environmentDelta}):
    the few variables of a connection, not the whole environment, are
    encoded, sent and decoded per spawn;
  - answer: C{{"id": N, "pid": PID}} with the worker's pidfd, or C{{"id":
    N, "error": ERRNO, "message": "..."}};
  - exit report (spawner to server, events socket): C{{"id": N, "pid":
    PID, "status": WAITSTATUS}}, sent once the worker is reaped (by request
    id: a pid may be reused before the server has read the report).

The worker's group (and cgroup) is killed before the worker is reaped, so
that its group id cannot be reused while something may still signal it.
When the control socket ends (the server stopped, or died however it did)
the spawner kills every worker it started, removes their cgroups and exits.
"""

from __future__ import annotations

import array
import collections
import errno
import gc
import json
import math
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: The spawner's end of the control and events sockets.
CONTROL_FD = 3
EVENTS_FD = 4
#: Largest message either way.
MESSAGE_MAX = 1 << 20
#: Largest answer (a pid).
ANSWER_MAX = 4096
#: Exit status of a worker whose set-up failed in the child, before it ran.
SETUP_FAILED = 127
#: Seconds a worker's cgroup may take to empty after its kill before the
#: spawner gives up removing it (and says so on its stderr).
CGROUP_REMOVE_TIMEOUT = 10.0

#: A worker that exits alone is reaped (its group and cgroup killed, its
#: exit reported) at once.  One that exits within REAP_QUIET seconds of the
#: last reap is part of a burst (a hundred clients leaving at once): it is
#: reaped once none has exited for REAP_QUIET seconds, REAP_DELAY after the
#: first at the latest, so that the dying workers get the CPUs first, and
#: their reaps (a dozen system calls each, and a cgroup's removal) and
#: reports (each one waking the server) come after them, in one go.  The
#: window is short: the deaths of a burst come a few hundred microseconds
#: apart, while one client connecting after another (a few hundred a
#: second) must not look like a burst, or its workers' reaps, reports and
#: teardowns would all wait, and come together every REAP_DELAY.
REAP_QUIET = 0.001
REAP_DELAY = 0.05

#: Every signal a worker starts with at its default disposition: an ignored
#: disposition survives exec, and the spawner ignores some.
DEFAULT_SIGNALS = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def environmentDelta(
    base: Mapping[str, str], env: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """
    What makes C{base} into C{env}: the variables to set, and the names to
    remove (L{applyEnvironment} undoes it).
    """
    changed = {name: value for name, value in env.items() if base.get(name) != value}
    return changed, [name for name in base if name not in env]


def applyEnvironment(
    base: Mapping[str, str], changed: Mapping[str, str], unset: Sequence[str]
) -> dict[str, str]:
    """
    C{base} with C{changed} set and C{unset} removed.
    """
    env = dict(base)
    env.update(changed)
    for name in unset:
        env.pop(name, None)
    return env


def encodeRequest(
    requestID: int,
    argv: Sequence[str] | None,
    env: Mapping[str, str],
    *,
    unset: Sequence[str] = (),
    cwd: str | None = None,
    cgroup: str | None = None,
    rlimits: Sequence[tuple[int, int]] = (),
    uid: int | None = None,
    gid: int | None = None,
) -> bytes:
    """
    One request to start a worker (its three pipe ends travel beside it):
    C{env} and C{unset} say how its environment differs from the spawner's.
    """
    return json.dumps(
        {
            "id": requestID,
            "argv": None if argv is None else list(argv),
            "env": dict(env),
            "unset": list(unset),
            "cwd": cwd,
            "cgroup": cgroup,
            "rlimits": [list(pair) for pair in rlimits],
            "uid": uid,
            "gid": gid,
        },
        separators=(",", ":"),
    ).encode("utf-8")


def decodeMessage(data: bytes) -> dict[str, Any]:
    """
    A message of either side.

    @raise ValueError: not one JSON object.
    """
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("a spawner message must be a JSON object")
    return message


def recvFds(
    sock: socket.socket, maxfds: int, buffer: bytearray
) -> tuple[bytes, list[int]]:
    """
    One message and the descriptors it carries, received close-on-exec
    (C{socket.recv_fds} ignores its C{flags} before Python 3.13, and a
    descriptor received inheritable would leak into every worker spawned
    meanwhile), into C{buffer}, the largest message expected: kept by the
    caller, so that no message costs an allocation of that size.

    @raise ValueError: the message was larger than C{buffer} (its
        descriptors are closed).
    """
    fds = array.array("i")
    size, ancillary, flags, _ = sock.recvmsg_into(
        [buffer], socket.CMSG_LEN(maxfds * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if flags & socket.MSG_TRUNC:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"a message longer than {len(buffer)} bytes")
    return bytes(buffer[:size]), list(fds)


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8")


def cgroupKill(path: str) -> bool:
    """
    Kill every process in the cgroup at C{path} (C{cgroup.kill}, Linux
    5.14+); C{False} if the cgroup is gone.
    """
    # A cgroup being removed (the spawner reaped its worker between the
    # server's last look and now) fails the open or the write with ENOENT
    # or ENODEV: it is empty.
    try:
        fd = os.open(os.path.join(path, "cgroup.kill"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENODEV):
            raise
        return False
    return True


def _writeFile(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _callEntryPoint(function: Callable[[], Any]) -> int:
    """
    Run a Python worker's function as the interpreter would run a script:
    its return value (or C{SystemExit}'s code) is the exit status, an
    exception is a traceback on stderr and status 1.
    """
    try:
        result = function()
    except SystemExit as e:
        result = e.code
    except BaseException:
        traceback.print_exc()
        return 1
    if result is None:
        return 0
    if isinstance(result, int):
        return result & 0xFF
    print(result, file=sys.stderr)
    return 1


def _standardStreams() -> None:
    """
    New C{sys.stdin}, C{sys.stdout} and C{sys.stderr} on fds 0-2, buffered
    as an interpreter's own (pipes: block-buffered output, line-buffered
    stderr).
    """
    encoding = sys.getfilesystemencoding()
    streams = {
        "stdin": open(0, encoding=encoding, closefd=False),  # noqa: SIM115
        "stdout": open(1, "w", encoding=encoding, closefd=False),  # noqa: SIM115
        "stderr": open(  # noqa: SIM115
            2, "w", encoding=encoding, errors="backslashreplace", closefd=False, buffering=1
        ),
    }
    for name, stream in streams.items():
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


class ReapSchedule:
    """
    When the children that have exited are reaped: at once, or in a burst
    once the exits pause (see L{REAP_QUIET}).
    """

    def __init__(self) -> None:
        self._at: float | None = None
        self._by = 0.0
        self._last = -REAP_QUIET

    def exited(self, now: float) -> bool:
        """
        A child has exited (a C{SIGCHLD}).

        @return: whether to reap (one) now.
        """
        if self._at is None and now - self._last >= REAP_QUIET:
            return True
        self.more(now)
        return False

    def more(self, now: float) -> None:
        """
        More children have exited than are reaped now: a burst.
        """
        if self._at is None:
            self._by = now + REAP_DELAY
        self._at = min(now + REAP_QUIET, self._by)

    def due(self, now: float) -> bool:
        """
        Whether a reap put off is due.
        """
        return self._at is not None and now >= self._at

    def timeout(self, now: float, timeout: int | None) -> int | None:
        """
        C{timeout} (ms, or C{None}: none) for a wait, cut to the reap's.
        """
        if self._at is None:
            return timeout
        # To the microsecond first: float noise must not add a millisecond.
        wait = max(0, math.ceil(round((self._at - now) * 1000, 3)))
        return wait if timeout is None else min(timeout, wait)

    def reaped(self, now: float) -> None:
        self._at = None
        self._last = now


class Spawner:
    """
    The spawner's state: the workers it started, and the cgroups being
    removed.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._cgroupParent: str | None = config.get("cgroupParent")
        self._cgroupHome: str | None = config.get("cgroupHome")
        self._changedSignals: list[int] = []
        self._cgroupLimits: dict[str, str] = dict(config.get("cgroupLimits") or {})
        self._entryPoint: Callable[[], Any] | None = None
        #: pid -> (request id, cgroup path or None)
        self._workers: dict[int, tuple[int, str | None]] = {}
        self._removing: dict[str, float] = {}
        for fd in (CONTROL_FD, EVENTS_FD):
            # Given to it as inheritable descriptors; no worker may get them.
            os.set_inheritable(fd, False)
        self._control = socket.socket(fileno=CONTROL_FD)
        self._events = socket.socket(fileno=EVENTS_FD)
        # Exit reports never block the spawner: the server may be waiting
        # for an answer from it, and not reading them, at that moment.
        self._events.setblocking(False)
        self._reports: collections.deque[bytes] = collections.deque()
        self._reaps = ReapSchedule()
        self._wakeRead, self._wakeWrite = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._buffer = bytearray(MESSAGE_MAX)
        self._spawnerCwd = os.getcwd()
        #: What every worker's environment is made from: the spawner's own,
        #: as the server gave it (before a Python worker's import changes it).
        self._environment = dict(os.environ)

    def load(self, entryPoint: str | None) -> None:
        """
        Import the Python worker's module, once.

        @raise Exception: anything its import raises, or L{AttributeError}.
        """
        if entryPoint is not None:
            self._entryPoint = _loadEntryPoint(entryPoint)

    def run(self) -> None:
        """
        Serve requests until the server's end of the control socket closes.
        """
        self._adoptCgroups()
        signal.set_wakeup_fd(self._wakeWrite)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        # What a child has to put back: resetting only these is much cheaper
        # than resetting every signal in every child.
        self._changedSignals = [
            signum for signum in DEFAULT_SIGNALS
            if signal.getsignal(signum) not in (signal.SIG_DFL, None)
        ]
        # Objects imported so far are never collected: no child's collection
        # writes to (and so copies) the pages they share with the spawner.
        gc.freeze()
        poller = select.poll()
        poller.register(self._control.fileno(), select.POLLIN)
        poller.register(self._wakeRead, select.POLLIN)
        poller.register(self._events.fileno(), 0)
        self._reap()
        while True:
            timeout = self._reaps.timeout(time.monotonic(), 20 if self._removing else None)
            poller.modify(self._events.fileno(), select.POLLOUT if self._reports else 0)
            try:
                ready = poller.poll(timeout)
            except InterruptedError:
                ready = []
            for fd, _ in ready:
                if fd == self._wakeRead:
                    _drain(self._wakeRead)
                    # The first exit at once; a second one waiting means a
                    # burst, reaped once it pauses.
                    if self._reaps.exited(time.monotonic()) and self._reap(limit=1):
                        self._reaps.more(time.monotonic())
                elif fd == self._events.fileno():
                    self._flushReports()
                elif not self._serveOne():
                    self._shutdown()
                    return
            if self._reaps.due(time.monotonic()):
                self._reap()
            self._removeCgroups()

    def _adoptCgroups(self) -> None:
        """
        Kill and remove the worker cgroups a spawner before this one left
        (it died, and the server killed its workers).
        """
        if self._cgroupParent is None:
            return
        deadline = time.monotonic() + CGROUP_REMOVE_TIMEOUT
        for entry in os.scandir(self._cgroupParent):
            if entry.is_dir():
                cgroupKill(entry.path)
                self._removing[entry.path] = deadline

    def _serveOne(self) -> bool:
        try:
            data, fds = recvFds(self._control, 3, self._buffer)
        except InterruptedError:
            return True
        except ConnectionError:
            return False
        except ValueError as e:
            self._control.send(_encode({"id": None, "error": errno.EMSGSIZE, "message": str(e)}))
            return True
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        request: dict[str, Any] = {}
        pid = None
        try:
            request = decodeMessage(data)
            if len(fds) != 3:
                raise OSError(errno.EINVAL, "a request needs three descriptors")
            pid = self._spawn(request, fds)
        except OSError as e:
            answer = {"id": request.get("id"), "error": e.errno or errno.EIO, "message": str(e)}
        except (ValueError, TypeError, KeyError) as e:
            answer = {"id": request.get("id"), "error": errno.EINVAL, "message": str(e)}
        else:
            answer = {"id": request["id"], "pid": pid}
        try:
            if pid is None:
                self._control.send(_encode(answer))
            else:
                pidfd = os.pidfd_open(pid)
                try:
                    socket.send_fds(self._control, [_encode(answer)], [pidfd])
                finally:
                    os.close(pidfd)
        finally:
            # After the answer, which the server is waiting for.
            for fd in fds:
                os.close(fd)
        return True

    def _spawn(self, request: Mapping[str, Any], fds: Sequence[int]) -> int:
        argv = request["argv"]
        env = applyEnvironment(
            self._environment,
            {str(k): str(v) for k, v in request["env"].items()},
            [str(name) for name in request.get("unset", ())],
        )
        cgroup = self._makeCgroup(request.get("cgroup"))
        contained = bool(
            request["rlimits"] or request["uid"] is not None
            or request["gid"] is not None
            or (request["cwd"] not in (None, self._spawnerCwd))
        )
        if argv is not None and not contained:
            pid = self._posixSpawn(argv, env, fds, cgroup)
        else:
            if argv is None and self._entryPoint is None:
                raise OSError(errno.EINVAL, "no Python entry point was loaded")
            errorRead, errorWrite = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:
                os.close(errorRead)
                self._child(request, env, fds, errorWrite, cgroup)
            os.close(errorWrite)
            try:
                # Empty once the command is exec'd (close-on-exec), or at
                # once for a Python worker, which does not report here.
                failure = _readAll(errorRead) if argv is not None else b""
            finally:
                os.close(errorRead)
            if failure:
                os.waitpid(pid, 0)
                if cgroup is not None:
                    os.rmdir(cgroup)
                number, _, text = failure.decode("utf-8", "replace").partition(":")
                raise OSError(int(number) if number.isdigit() else errno.EIO, text)
            if cgroup is not None:
                # The child joins it first thing too, so that nothing it
                # starts escapes; this join, before the server hears of the
                # worker, makes sure that the server's first kill finds it.
                try:
                    _writeFile(os.path.join(cgroup, "cgroup.procs"), str(pid))
                except OSError:
                    os.kill(pid, signal.SIGKILL)
                    self._workers[pid] = (request["id"], cgroup)
                    raise
        self._workers[pid] = (request["id"], cgroup)
        return pid

    def _posixSpawn(
        self, argv: Sequence[str], env: dict[str, str], fds: Sequence[int], cgroup: str | None
    ) -> int:
        """
        Start a command the cheap way (no fork of the spawner's memory).  A
        child is born in its parent's cgroup, so for a worker with a cgroup
        the spawner steps into it for the spawn and back out after: nothing
        the worker starts, however early, is outside it.
        """
        if cgroup is not None:
            _writeFile(os.path.join(cgroup, "cgroup.procs"), "0")
        try:
            pid = os.posix_spawn(
                argv[0],
                list(argv),
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)],
                setsigdef=DEFAULT_SIGNALS,
                setsid=True,
            )
        except OSError:
            if cgroup is not None:
                self._goHome()
                os.rmdir(cgroup)
            raise
        if cgroup is not None:
            self._goHome()
        return pid

    def _goHome(self) -> None:
        assert self._cgroupHome is not None
        _writeFile(os.path.join(self._cgroupHome, "cgroup.procs"), "0")

    def _makeCgroup(self, name: str | None) -> str | None:
        if name is None:
            return None
        if self._cgroupParent is None or not name.isidentifier():
            raise OSError(errno.EINVAL, f"bad cgroup name {name!r}")
        path = os.path.join(self._cgroupParent, name)
        os.mkdir(path)
        try:
            for file, value in self._cgroupLimits.items():
                _writeFile(os.path.join(path, file), value)
        except OSError:
            os.rmdir(path)
            raise
        return path

    def _child(
        self,
        request: Mapping[str, Any],
        env: dict[str, str],
        fds: Sequence[int],
        errors: int,
        cgroup: str | None,
    ) -> None:
        """
        In the forked child: become the worker.  Never returns.  A command
        that cannot be started is reported on C{errors} as C{ERRNO:TEXT}; a
        Python worker's set-up failure goes to its stderr.
        """
        status = SETUP_FAILED
        try:
            if cgroup is not None:
                _writeFile(os.path.join(cgroup, "cgroup.procs"), "0")
            signal.set_wakeup_fd(-1)
            for signum in self._changedSignals:
                signal.signal(signum, signal.SIG_DFL)
            os.setsid()
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
            if request["argv"] is None:
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            else:
                os.closerange(3, errors)
                os.closerange(errors + 1, os.sysconf("SC_OPEN_MAX"))
            for resourceNumber, limit in request["rlimits"]:
                resource.setrlimit(resourceNumber, (limit, limit))
            if request["cwd"] is not None:
                os.chdir(request["cwd"])
            if request["uid"] is not None or request["gid"] is not None:
                os.setgroups([])
            if request["gid"] is not None:
                os.setgid(request["gid"])
            if request["uid"] is not None:
                os.setuid(request["uid"])
            argv = request["argv"]
            if argv is not None:
                os.execve(argv[0], argv, env)
            os.environ.clear()
            os.environ.update(env)
            # Python's own dispositions, as a freshly started interpreter has.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            gc.unfreeze()
            _standardStreams()
            assert self._entryPoint is not None
            status = _callEntryPoint(self._entryPoint)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        except BaseException as e:
            try:
                if request["argv"] is not None:
                    number = getattr(e, "errno", None) or errno.EIO
                    os.write(errors, f"{number}:{getattr(e, 'strerror', None) or e}".encode())
                else:
                    os.write(2, f"closewatch spawner: cannot start the worker: {e}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(status)

    def _reap(self, limit: int | None = None) -> bool:
        """
        Report every worker that has exited (at most C{limit}), its group and
        cgroup killed first.

        @return: whether another has exited and is left for later.
        """
        self._reaps.reaped(time.monotonic())
        reaped = 0
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            if reaped == limit:
                self._flushReports()
                return True
            reaped += 1
            pid = info.si_pid
            ours = pid in self._workers
            if ours:
                requestID, cgroup = self._workers.pop(pid)
                _killGroup(pid)
                # An exited leader no longer populates its cgroup: one that
                # can be removed held nothing else, and one that cannot has
                # stragglers to kill.
                if cgroup is not None and not _removeEmpty(cgroup):
                    cgroupKill(cgroup)
                    self._removing[cgroup] = time.monotonic() + CGROUP_REMOVE_TIMEOUT
            _, status = os.waitpid(pid, 0)
            if ours:
                self._reports.append(_encode({"id": requestID, "pid": pid, "status": status}))
        self._flushReports()
        return False

    def _flushReports(self) -> None:
        """
        Send the exit reports the events socket takes now; keep the rest.
        """
        while self._reports:
            try:
                self._events.send(self._reports[0])
            except BlockingIOError:
                return
            except OSError:
                # The server is gone: the control socket's end says so.
                self._reports.clear()
                return
            self._reports.popleft()

    def _removeCgroups(self) -> None:
        now = time.monotonic()
        for path, deadline in list(self._removing.items()):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.EBUSY and now < deadline:
                    continue
                print(f"closewatch spawner: cannot remove cgroup {path}: {e}", file=sys.stderr)
            del self._removing[path]

    def _shutdown(self) -> None:
        """
        The server is gone: kill every worker (and its cgroup) and wait
        until all are reaped and their cgroups removed.
        """
        for pid, (_, cgroup) in list(self._workers.items()):
            _killGroup(pid)
            if cgroup is not None:
                cgroupKill(cgroup)
        deadline = time.monotonic() + CGROUP_REMOVE_TIMEOUT
        while (self._workers or self._removing) and time.monotonic() < deadline:
            self._reap()
            self._removeCgroups()
            time.sleep(0.005)
        if self._cgroupParent is not None:
            try:
                os.rmdir(self._cgroupParent)
            except OSError:
                pass


def _loadEntryPoint(entryPoint: str) -> Callable[[], Any]:
    """
    Import C{MODULE:FUNCTION}'s module and find its function.
    """
    import importlib

    moduleName, _, functionName = entryPoint.partition(":")
    module = importlib.import_module(moduleName)
    function = getattr(module, functionName)
    if not callable(function):
        raise TypeError(f"{entryPoint} is not callable")
    return function


def _oneLine(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0] if text.strip() else type(error).__name__


def _removeEmpty(cgroup: str) -> bool:
    """
    Remove C{cgroup} if nothing lives in it; whether it is gone.
    """
    try:
        os.rmdir(cgroup)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _killGroup(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _readAll(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def main(argv: Sequence[str]) -> int:
    """
    The spawner: C{argv[1]} is its configuration (JSON): the server's
    C{sys.path}, the Python entry point (C{MODULE:FUNCTION}) if any, the
    cgroup parent and per-worker cgroup limits if any.  It answers on the
    control socket with C{{"ready": true}} or C{{"error": "..."}}.
    """
    config = json.loads(argv[-1])
    sys.path[:] = config["sysPath"]
    if argv[1] == "--check":
        try:
            _loadEntryPoint(config["entryPoint"])
        except BaseException as e:
            print(_oneLine(e))
            return 1
        return 0
    try:
        os.setsid()
    except PermissionError:
        pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    spawner = Spawner(config)
    try:
        spawner.load(config.get("entryPoint"))
    except BaseException as e:
        spawner._control.send(_encode({"error": _oneLine(e)}))
        return 1
    spawner._control.send(_encode({"ready": True, "pid": os.getpid()}))
    spawner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
