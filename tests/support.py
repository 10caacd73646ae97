"""
Running a real closewatch server (twistd in a subprocess) and real clients
against it, with every wait bounded.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: A worker that says who it is, then blocks without ever reading stdin.
PID_WORKER = ["/bin/sh", "-c", "echo $$; exec sleep 100000"]


#: Runs the server with these signals' default dispositions, whatever the
#: test runner ignores (C{nohup}, a background job without job control):
#: the server leaves an ignored C{SIGHUP} or C{SIGINT} ignored.
DEFAULT_SIGNALS = ["env", "--default-signal=HUP,INT"]


def unixSocketPath(testCase: Any) -> str:
    """
    A path short enough for a unix socket (108 bytes), wherever the test
    runner's temporary directory is (trial's is deep), removed after
    C{testCase}.
    """
    directory = tempfile.mkdtemp(prefix="closewatch-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "sock")


def wait(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """
    Poll C{predicate} until it returns something true, for C{timeout}
    seconds at most; return that, or raise C{AssertionError}.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


def unixListening(path: str) -> bool:
    """
    Whether a unix socket bound to C{path} is listening, from
    C{/proc/net/unix} (flag C{__SO_ACCEPTCON}): the file appears at
    C{bind()}, before C{listen()}, and a client that connects in between is
    refused.
    """
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def alive(pid: int) -> bool:
    """
    Whether C{pid} exists and is not a zombie.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def waitGone(pids: Iterable[int], timeout: float = 10.0) -> float:
    """
    Wait until every pid in C{pids} has exited; return the seconds taken.
    """
    started = time.monotonic()
    pids = list(pids)
    wait(lambda: not any(alive(p) for p in pids), timeout)
    return time.monotonic() - started


def pidfdWaitGone(pid: int, timeout: float = 10.0) -> bool:
    """
    Block until C{pid} exits, exactly (a pidfd), for C{timeout} at most.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def readLine(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """
    Read one line from C{sock}, byte by byte (nothing past it is consumed).
    """
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
        if len(data) > 65536:
            raise AssertionError("line too long")
    return data


def readAll(sock: socket.socket, timeout: float = 10.0, limit: int = 1 << 26) -> bytes:
    """
    Read until EOF; raises on a reset or a timeout.
    """
    sock.settimeout(timeout)
    chunks = []
    total = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise AssertionError("more data than expected")


def reset(sock: socket.socket) -> None:
    """
    Close C{sock} with an RST instead of a FIN.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def outq(sock: socket.socket) -> int:
    """
    Bytes in C{sock}'s send queue not yet acknowledged by the peer.
    """
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def openFDs(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """
    The children of C{pid}, whichever of its threads started them.
    """
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return found


def commandLine(pid: int) -> bytes | None:
    """
    C{pid}'s command line as the kernel shows it, or C{None} once it is gone.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def isGuardian(pid: int) -> bool:
    """
    Whether C{pid} is a server's guardian process.
    """
    return b"guardianprocess.py" in (commandLine(pid) or b"")


def isSpawner(pid: int, serverPID: int) -> bool:
    """
    Whether C{pid}, a child of C{serverPID}, is the server's spawner (whose
    forked Python workers share its command line, but not its parent).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rpartition(")")[2].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return False
    return parent == serverPID and b"spawnerprocess.py" in (commandLine(pid) or b"")


def spawners(serverPID: int) -> list[int]:
    """
    The server's spawner processes (one, but for a moment while it is replaced).
    """
    return [p for p in children(serverPID) if isSpawner(p, serverPID)]


def workers(serverPID: int, timeout: float = 5.0) -> list[int]:
    """
    The server's workers: its spawner's children, or where it has no
    spawner its own children other than its guardian.

    Until its C{exec} is done, a child shows the server's command line, then
    for a moment an empty one, and a guardian being started cannot be told
    from a worker: such children are waited for (C{timeout} at most), never
    guessed at.  (A zombie's command line is empty too: it is a worker.)
    """
    server = commandLine(serverPID)

    def settled() -> tuple[list[int]] | None:
        found = []
        for pid in children(serverPID):
            command = commandLine(pid)
            if command is None:
                continue
            if command == server or (not command and alive(pid)):
                return None
            if isSpawner(pid, serverPID):
                found.extend(children(pid))
            elif not isGuardian(pid):
                found.append(pid)
        return (found,)

    return wait(settled, timeout, 0.001)[0]


class Server:
    """
    C{twistd -n closewatch} in a subprocess, logging JSON events to a file.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        command: Sequence[str] = PID_WORKER,
        listen: str | None = "tcp:0:interface=127.0.0.1",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        wrapper: Sequence[str] = (),
        logger: str = "twisted_closewatch.logs.jsonObserver",
    ) -> None:
        """
        @param wrapper: a command that C{exec}s the server (C{setpriv ...}
            to run it as another user), so that its pid is the server's.
        @param logger: twistd's C{--logger}: an observer writing JSON lines.
        """
        self.logPath = tempfile.mktemp(prefix="closewatch-log-", suffix=".jsonl")
        argv = [
            *wrapper,
            *TWISTD,
            "-n",
            "--pidfile=",
            f"--logger={logger}",
            "closewatch",
        ]
        if listen is not None:
            argv += ["--listen", listen]
        argv += list(args)
        if command:
            argv += ["--", *command]
        environ = dict(os.environ)
        environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
        environ.update(env or {})
        self._log = open(self.logPath, "w")
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=cwd or tempfile.gettempdir(),
        )
        self.pid = self.process.pid
        self.port = 0
        if listen is not None and listen.startswith(("tcp:", "tcp6:")):
            self.port = wait(self._listeningPort, 30)

    def _listeningPort(self) -> int:
        if self.process.poll() is not None:
            raise AssertionError(f"server exited: {self.output()}")
        for event in self.events():
            match = re.search(r"starting on (\d+)$", event.get("text", ""))
            if match:
                return int(match.group(1))
        return 0

    def events(self) -> list[dict[str, Any]]:
        events = []
        with open(self.logPath) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        return events

    def output(self) -> str:
        with open(self.logPath) as f:
            return f.read()

    def ends(self) -> list[dict[str, Any]]:
        """
        The end-of-connection events logged so far.
        """
        return [e for e in self.events() if "kill_latency_ms" in e and "reason" in e]

    def endOf(self, connectionID: int, timeout: float = 10.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for e in self.ends():
                if e["connection_id"] == connectionID:
                    return e
            return None

        return wait(find, timeout)

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def connectWorker(self) -> tuple[socket.socket, int]:
        """
        Connect and read the PID line of a L{PID_WORKER}-style worker.
        """
        sock = self.connect()
        line = readLine(sock)
        if not line.strip().isdigit():
            raise AssertionError(f"expected a pid line, got {line!r}: {self.output()[-2000:]}")
        return sock, int(line)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError("server did not stop on SIGTERM")
        finally:
            self._log.close()
        return code

    def cleanup(self) -> None:
        """
        Stop the server if a test left it running: SIGTERM first, so that it
        kills its workers, SIGKILL if it does not stop.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        if os.path.exists(self.logPath):
            os.unlink(self.logPath)


def checkUsageError(test: Any, args: Sequence[str], message: str) -> None:
    """
    C{twistd closewatch ARGS} exits non-zero, with the usage text and
    C{message} in its last line, and no traceback.
    """
    result = runTwistd(args)
    test.assertNotEqual(result.returncode, 0)
    output = result.stdout + result.stderr
    test.assertNotIn("Traceback", output)
    test.assertIn("Usage:", output)
    test.assertIn(message, output.strip().splitlines()[-1])


def scrapeMetrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    The server's Prometheus metrics (C{--metrics tcp:0:...}), by name and
    sorted labels.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def port() -> int | None:
        for event in server.events():
            match = re.search(r"_MetricsSite starting on (\d+)$", event.get("text", ""))
            if match:
                return int(match.group(1))
        return None

    url = f"http://127.0.0.1:{wait(port)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def runTwistd(args: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """
    Run C{twistd -n closewatch ARGS} expecting it to exit by itself.
    """
    environ = dict(os.environ)
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "closewatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
        cwd=tempfile.gettempdir(),
    )
