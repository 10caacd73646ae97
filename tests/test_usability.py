"""
A new user's first steps, end to end: start-up mistakes are one line with
and without C{-n}, the JSON log of real runs, C{--version}, the
C{closewatch} command and C{python -m twisted_closewatch}, unix clients in
the log, and the README's examples run as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

import twisted_closewatch
from tests.support import (
    PID_WORKER,
    ROOT,
    TWISTD,
    Server,
    commandLine,
    readAll,
    readLine,
    unixListening,
    wait,
    waitGone,
    workers,
)

#: The console script installed next to this interpreter.
CLOSEWATCH = os.path.join(os.path.dirname(sys.executable), "closewatch")
#: twistd with pyOpenSSL made unimportable, as in a base install.
TWISTD_WITHOUT_TLS = [
    sys.executable,
    "-c",
    (
        "import sys; sys.modules['OpenSSL'] = None; sys.argv[0] = 'twistd'; "
        "from twisted.scripts.twistd import run; run()"
    ),
]
LOOPBACK = "tcp:0:interface=127.0.0.1"


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def freePort() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port: int = s.getsockname()[1]
        return port


def processesMentioning(text: str) -> list[int]:
    """
    Processes whose command line contains C{text}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and text.encode() in (commandLine(int(entry)) or b""):
            found.append(int(entry))
    return found


class Run:
    """
    A command in a subprocess, its output in a file, stopped at clean-up.
    """

    def __init__(self, test: TestCase, argv: Sequence[str], cwd: str | None = None) -> None:
        self.path = os.path.abspath(test.mktemp())
        self._out = open(self.path, "w")  # noqa: SIM115 (open while the process runs)
        self.process = subprocess.Popen(
            list(argv),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=environment(),
            cwd=cwd or tempfile.gettempdir(),
        )
        test.addCleanup(self.cleanup)

    def output(self) -> str:
        with open(self.path) as f:
            return f.read()

    def waitFor(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        def find() -> re.Match[str] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode}: {self.output()}")
            return re.search(pattern, self.output())

        return wait(find, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._out.close()


class StartupErrorTests(TestCase):
    """
    Every start-up failure a user can cause is one line naming the option or
    endpoint and the reason, exit status non-zero, no traceback, with C{-n}
    and daemonized; the daemon never hangs and leaves nothing running.
    """

    def run_(self, args: Sequence[str], daemon: bool, twistd: Sequence[str] = TWISTD) -> str:
        """
        Run twistd closewatch with C{args}, expecting it to fail; its output.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pidfile = os.path.join(directory, "twistd.pid")
        if daemon:
            mode = [f"--pidfile={pidfile}", f"--logfile={directory}/twistd.log"]
        else:
            mode = ["-n", "--pidfile="]
        try:
            result = subprocess.run(
                [*twistd, *mode, "closewatch", *args],
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
                env=environment(),
                cwd=directory,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{args} (daemon: {daemon}): twistd did not exit")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.exists(pidfile))
        self.assertEqual(processesMentioning(directory), [])
        return output

    def assertOneLine(self, args: Sequence[str], expected: str) -> None:
        for daemon in (False, True):
            output = self.run_(args, daemon)
            self.assertEqual(output.strip().splitlines(), [expected], f"daemon: {daemon}")

    def assertUsageError(self, args: Sequence[str], expected: str) -> None:
        for daemon in (False, True):
            output = self.run_(args, daemon)
            self.assertIn("Usage:", output)
            self.assertTrue(output.strip().splitlines()[-1].endswith(expected), output[-300:])

    def test_portInUse(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as busy:
            listen = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
            self.assertOneLine(
                ["--listen", listen, "--", "/bin/cat"],
                f"closewatch: --listen '{listen}': cannot listen: Address already in use",
            )
            self.assertOneLine(
                ["--listen", LOOPBACK, "--metrics", listen, "--", "/bin/cat"],
                f"closewatch: --metrics '{listen}': cannot listen: Address already in use",
            )

    def test_missingUnixDirectory(self) -> None:
        self.assertOneLine(
            ["--listen", "unix:/no/such/dir/x.sock", "--", "/bin/cat"],
            "closewatch: --listen 'unix:/no/such/dir/x.sock': cannot listen: "
            "No such file or directory",
        )

    def test_endpointValues(self) -> None:
        self.assertUsageError(["--listen", "tcp:abc"], "--listen 'tcp:abc': 'abc' is not a whole number")
        self.assertUsageError(
            ["--listen", LOOPBACK, "--idle-timeout", "abc"],
            "--idle-timeout: 'abc' is not a number of seconds",
        )
        self.assertUsageError(
            ["--listen", LOOPBACK, "--grace", "-1"],
            "--grace: '-1': seconds must be a finite number >= 0",
        )

    def test_tlsWithoutPyOpenSSL(self) -> None:
        output = self.run_(
            ["--listen", "ssl:0:privateKey=key.pem"], daemon=False, twistd=TWISTD_WITHOUT_TLS
        )
        self.assertIn(
            "--listen 'ssl:0:privateKey=key.pem': TLS needs pyOpenSSL: "
            "pip install '.[production]' in a closewatch checkout",
            output.strip().splitlines()[-1],
        )


def assertSchema(test: TestCase, lines: list[str]) -> list[dict[str, Any]]:
    """
    Every line is a JSON object with the documented keys; the records.
    """
    test.assertTrue(lines)
    records = []
    for line in lines:
        record = json.loads(line)
        test.assertIsInstance(record["text"], str)
        test.assertIsInstance(record["namespace"], str)
        test.assertIn(record["level"], ("debug", "info", "warn", "error", "critical"), line)
        when = datetime.fromisoformat(record["time"])
        test.assertEqual(when.utcoffset(), timedelta(0))
        test.assertLess(abs(time.time() - when.timestamp()), 600)
        test.assertNotIn("log_format", record)
        records.append(record)
    return records


def assertEnd(test: TestCase, records: list[dict[str, Any]], pid: int) -> None:
    [end] = [r for r in records if r.get("pid") == pid and "reason" in r]
    test.assertEqual(end["namespace"], "twisted_closewatch.factory")
    test.assertEqual((end["connection_id"], end["reason"], end["exit_signal"]), (1, "client-closed", 9))
    test.assertRegex(end["peer"], r"^127\.0\.0\.1:\d+$")
    test.assertIsInstance(end["kill_latency_ms"], float)
    test.assertIsInstance(end["duration"], float)
    test.assertEqual((end["bytes_in"], end["bytes_out"]), (0, len(f"{pid}\n")))
    test.assertIn(f"ended: client-closed, worker {pid} killed by signal 9", end["text"])


class JSONLogTests(TestCase):
    """
    The JSON lines of real runs, in the foreground and daemonized with
    C{--logfile}, follow the documented schema.
    """

    def test_foreground(self) -> None:
        server = Server([], PID_WORKER)
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        sock.close()
        server.endOf(1)
        self.assertEqual(server.stop(), 0)
        records = assertSchema(self, server.output().splitlines())
        assertEnd(self, records, pid)
        self.assertIn("guardian_pid", {k for r in records for k in r})

    def test_daemonLogFile(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pidfile, logfile = f"{directory}/twistd.pid", f"{directory}/closewatch.log"
        subprocess.run(
            [
                *TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}",
                "--logger=twisted_closewatch.logs.jsonObserver",
                "closewatch", "--listen", LOOPBACK, "--", *PID_WORKER,
            ],
            check=True, timeout=30, env=environment(), cwd=directory,
        )
        def pid() -> str | None:
            if not os.path.exists(pidfile):
                return None
            with open(pidfile) as f:
                return f.read()

        daemon = int(wait(pid))

        def stop() -> None:
            if processesMentioning(directory):
                os.kill(daemon, signal.SIGKILL)

        self.addCleanup(stop)

        def lines() -> list[str]:
            with open(logfile) as f:
                return f.read().splitlines()

        port = int(wait(lambda: re.search(r"starting on (\d+)", "\n".join(lines()))).group(1))
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        pid = int(readLine(sock))
        sock.close()
        wait(lambda: any('"reason": "client-closed"' in line for line in lines()))
        os.kill(daemon, signal.SIGTERM)
        wait(lambda: not processesMentioning(directory), 30)
        self.assertFalse(os.path.exists(pidfile))
        records = assertSchema(self, lines())
        assertEnd(self, records, pid)
        self.assertIn("Server Shut Down.", [r["text"] for r in records])


class VersionTests(TestCase):
    def test_version(self) -> None:
        expected = f"closewatch {twisted_closewatch.__version__} (Twisted "
        for argv in ([*TWISTD, "closewatch", "--version"], [CLOSEWATCH, "--version"]):
            if not os.path.exists(argv[0]):
                continue
            result = subprocess.run(
                argv, capture_output=True, text=True, check=False, timeout=30, env=environment()
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertTrue(result.stdout.startswith(expected), result.stdout)


class CommandTests(TestCase):
    """
    C{closewatch ARGS} and C{python -m twisted_closewatch ARGS} are
    C{twistd -n closewatch ARGS}: start, serve, stop on SIGTERM with status
    0, no pid file left.
    """

    def setUp(self) -> None:
        if not os.path.exists(CLOSEWATCH):
            raise SkipTest(f"{CLOSEWATCH} is not installed (pip install .)")

    def assertServes(self, command: Sequence[str]) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        run = Run(self, [*command, "-l", LOOPBACK, "--", "/bin/cat"], cwd=directory)
        port = int(run.waitFor(r"starting on (\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"hello\n")
            self.assertEqual(readLine(sock), b"hello\n")
        run.waitFor(r"\[1\] 127\.0\.0\.1:\d+ ended: client-closed")
        self.assertEqual(run.stop(), 0, run.output())
        self.assertEqual(os.listdir(directory), [])

    def test_script(self) -> None:
        self.assertServes([CLOSEWATCH])

    def test_module(self) -> None:
        self.assertServes([sys.executable, "-m", "twisted_closewatch"])

    def test_helpAndErrors(self) -> None:
        result = subprocess.run(
            [CLOSEWATCH, "--help"], capture_output=True, text=True, check=False, timeout=30
        )
        self.assertEqual(result.returncode, 0)
        self.assertTrue(result.stdout.startswith("Usage: closewatch [options]"), result.stdout)
        self.assertIn("--user-timeout", result.stdout)
        result = subprocess.run(
            [CLOSEWATCH, "--idle-timeout", "x"],
            capture_output=True, text=True, check=False, timeout=30,
        )
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(
            result.stderr.strip().splitlines()[-1],
            "closewatch: --idle-timeout: 'x' is not a number of seconds",
        )


def netcatHalfCloses() -> bool:
    """
    Whether the C{nc} installed is netcat-openbsd, which has C{-N}.
    """
    if shutil.which("nc") is None:
        return False
    usage = subprocess.run(["nc", "-h"], capture_output=True, text=True, check=False, timeout=10)
    return "-N" in usage.stdout + usage.stderr


def readmeBlock(after: str, language: str) -> str:
    """
    The first C{language} code block of the README after the text C{after}.
    """
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start = readme.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(readme, start)
    assert match is not None
    return match.group(1)


class ReadmeTests(TestCase):
    """
    The README's examples, run as written (on a free port instead of 7000,
    so that parallel runs do not collide).
    """

    def test_halfCloseExample(self) -> None:
        if not os.path.exists(CLOSEWATCH):
            raise SkipTest(f"{CLOSEWATCH} is not installed (pip install .)")
        server, client = readmeBlock("Any other program works", "sh").strip().splitlines()
        self.assertIn("--half-close forward", server)
        self.assertIn("nc -N", client)
        port = str(freePort())
        run = Run(self, ["/bin/sh", "-c", "exec " + server.replace("7000", port)])
        run.waitFor(rf"starting on {port}")
        if netcatHalfCloses():
            result = subprocess.run(
                ["/bin/sh", "-c", client.replace("7000", port)],
                capture_output=True, text=True, check=False, timeout=30, env=environment(),
            )
            self.assertEqual(result.stdout, "apple\npear\n", result.stderr)
        else:
            # What nc -N does: send, half-close, read to the end.
            with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
                sock.sendall(b"pear\napple\n")
                sock.shutdown(socket.SHUT_WR)
                self.assertEqual(readAll(sock), b"apple\npear\n")
        run.waitFor(r"ended: worker-exited")
        self.assertEqual(run.stop(), 0)

    def test_libraryExample(self) -> None:
        """
        The library example serves, stops on SIGTERM, and its guardian kills
        the workers when it is killed.
        """
        port = freePort()
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write(readmeBlock("## Use as a library", "python").replace("7000", str(port)))

        def connect() -> socket.socket | None:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=10)
            except ConnectionRefusedError:
                return None

        for sig in (signal.SIGTERM, signal.SIGKILL):
            run = Run(self, [sys.executable, script])
            sock = wait(connect, 30)
            sock.sendall(b"pear\napple\n")
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(readAll(sock), b"apple\npear\n")
            sock.close()
            waiting = wait(connect)
            worker = wait(lambda run=run: workers(run.process.pid))[0]
            self.assertEqual(run.stop(sig), -signal.SIGKILL if sig == signal.SIGKILL else 0)
            waitGone([worker], 5)
            waiting.close()


class UnixPeerTests(TestCase):
    """
    Unix clients are named in the log, refusals included, and a unix
    endpoint with keepalive left at its defaults warns of nothing.
    """

    def test_unixPeer(self) -> None:
        path = os.path.abspath(self.mktemp())
        server = Server(["--max-workers", "1"], PID_WORKER, listen=f"unix:{path}")
        self.addCleanup(server.cleanup)
        wait(lambda: unixListening(path))
        first = socket.socket(socket.AF_UNIX)
        first.connect(path)
        pid = int(readLine(first))
        second = socket.socket(socket.AF_UNIX)
        second.connect(path)
        self.assertEqual(readAll(second), b"")
        second.close()
        first.close()
        waitGone([pid])
        end = server.endOf(1)
        self.assertEqual(end["peer"], "unix peer")
        [refusal] = [e for e in server.events() if e.get("refused")]
        self.assertEqual(refusal["text"], "refused unix peer: max-workers")
        self.assertEqual([e["text"] for e in server.events() if e["level"] == "warn"], [])
