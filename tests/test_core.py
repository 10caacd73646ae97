"""
End-to-end behaviour of C{twistd closewatch}: real sockets, real workers.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from twisted.trial.unittest import TestCase

from tests.support import (
    PID_WORKER,
    Server,
    alive,
    checkUsageError,
    children,
    readAll,
    readLine,
    reset,
    runTwistd,
    unixListening,
    wait,
    waitGone,
    workers,
)


class ServerTestCase(TestCase):
    """
    Starts a server per test from C{args}/C{command}; stops it afterwards.
    """

    args: tuple[str, ...] = ()
    command: tuple[str, ...] = tuple(PID_WORKER)

    def startServer(self, args=None, command=None, **kwargs) -> Server:
        server = Server(
            self.args if args is None else args,
            self.command if command is None else command,
            **kwargs,
        )
        self.addCleanup(server.cleanup)
        return server

    def setUp(self) -> None:
        self.server = self.startServer()


class KillTests(ServerTestCase):
    """
    A client that goes away takes its worker, and the worker's children,
    with it.
    """

    def test_close(self) -> None:
        sock, pid = self.server.connectWorker()
        sock.close()
        waitGone([pid], 5)
        end = self.server.endOf(1)
        self.assertEqual(end["reason"], "client-closed")
        self.assertEqual(end["pid"], pid)
        self.assertEqual(end["exit_signal"], 9)
        self.assertIsInstance(end["kill_latency_ms"], float)
        self.assertLess(end["kill_latency_ms"], 1000)

    def test_reset(self) -> None:
        sock, pid = self.server.connectWorker()
        reset(sock)
        waitGone([pid], 5)
        self.assertEqual(self.server.endOf(1)["reason"], "client-reset")

    def test_halfCloseKills(self) -> None:
        """
        Under the default C{--half-close kill}, shutdown(SHUT_WR) is a close.
        """
        sock, pid = self.server.connectWorker()
        sock.shutdown(socket.SHUT_WR)
        waitGone([pid], 5)
        self.assertEqual(readAll(sock), b"")
        sock.close()
        self.assertEqual(self.server.endOf(1)["reason"], "client-closed")

    def test_grandchildren(self) -> None:
        """
        The whole process group goes, not only the worker.
        """
        server = self.startServer(
            command=["/bin/sh", "-c", "sleep 1000 & sleep 1000 & echo $$; wait"]
        )
        sock, pid = server.connectWorker()
        grandchildren = wait(lambda: len(children(pid)) == 2 and children(pid))
        sock.close()
        waitGone([pid, *grandchildren], 5)

    def test_othersUntouched(self) -> None:
        """
        One client leaving kills its own worker only.
        """
        first, firstPID = self.server.connectWorker()
        second, secondPID = self.server.connectWorker()
        first.close()
        waitGone([firstPID], 5)
        self.assertTrue(alive(secondPID))
        second.close()
        waitGone([secondPID], 5)


class WorkerExitTests(ServerTestCase):
    command = ("/bin/sh", "-c", "head -c 300000 /dev/zero; echo bye >&2; exit 3")

    def test_outputDeliveredThenFIN(self) -> None:
        """
        A worker that exits by itself has all its output delivered, then the
        connection is closed with a FIN (a reset would raise here).
        """
        sock = self.server.connect()
        data = readAll(sock)
        self.assertEqual(data, b"\0" * 300000)
        end = self.server.endOf(1)
        self.assertEqual(end["reason"], "worker-exited")
        self.assertEqual(end["exit_code"], 3)
        self.assertIsNone(end["kill_latency_ms"])
        self.assertEqual(end["bytes_out"], 300000)

    def test_unreadInputDoesNotResetOutput(self) -> None:
        """
        A worker that exits without reading all its input still has all its
        output delivered: the server does not close a socket with unread
        input (which would reset the connection and drop queued output).
        """
        server = self.startServer(command=["/bin/sh", "-c", "head -c 4194304 /dev/zero"])
        sock = server.connect()
        sock.setblocking(False)
        sent = 0
        try:
            while sent < 4 * 1024 * 1024:
                sent += sock.send(b"u" * 65536)
        except BlockingIOError:
            pass
        self.assertGreater(sent, 1024 * 1024 + 256 * 1024, "the server's buffers did not fill")
        time.sleep(0.5)
        sock.setblocking(True)
        self.assertEqual(len(readAll(sock)), 4194304)
        self.assertEqual(server.endOf(1)["reason"], "worker-exited")

    def test_stderrLogged(self) -> None:
        """
        stderr goes to the log, tagged with the connection, never to the
        client.
        """
        sock = self.server.connect()
        self.assertNotIn(b"bye", readAll(sock))
        self.server.endOf(1)
        lines = [e for e in self.server.events() if e.get("line") == "bye"]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["connection_id"], 1)


class HalfCloseForwardTests(ServerTestCase):
    args = ("--half-close", "forward")
    command = ("/bin/sh", "-c", "wc -c; sleep 0.3; echo late")

    def test_answerAfterHalfClose(self) -> None:
        """
        The worker reads EOF, and what it writes afterwards still reaches the
        half-closed client; then the connection closes normally.
        """
        sock = self.server.connect()
        sock.sendall(b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(readAll(sock).split(), [b"1000", b"late"])
        self.assertEqual(self.server.endOf(1)["reason"], "worker-exited")

    def test_netcat(self) -> None:
        """
        C{printf 'query' | nc -N host port} gets its whole answer.
        """
        import shutil
        import subprocess

        if shutil.which("nc") is None:
            raise self.skipTest("nc (netcat-openbsd) is not installed")
        result = subprocess.run(
            ["nc", "-N", "127.0.0.1", str(self.server.port)],
            input=b"hello\n",
            capture_output=True,
            timeout=10,
        )
        self.assertEqual(result.stdout.split(), [b"6", b"late"])


class HygieneTests(ServerTestCase):
    command = (
        sys.executable,
        "-c",
        "import os, json\n"
        "fds = []\n"
        "for fd in range(256):\n"
        "    try: os.fstat(fd)\n"
        "    except OSError: continue\n"
        "    fds.append(fd)\n"
        "print(json.dumps({'fds': fds, 'env': dict(os.environ), 'pgid': os.getpgid(0),"
        " 'sid': os.getsid(0), 'pid': os.getpid()}), flush=True)\n"
        "import sys; sys.stdin.read()\n",
    )
    args = ("--env", "FOO=bar=baz", "--env", "EMPTY=")

    def report(self) -> tuple[socket.socket, dict]:
        import json

        sock = self.server.connect()
        return sock, json.loads(readLine(sock))

    def test_onlyStandardFDs(self) -> None:
        """
        Workers inherit exactly fds 0-2, even with other clients connected.
        """
        others = [self.server.connect() for _ in range(3)]
        sock, report = self.report()
        self.assertEqual(report["fds"], [0, 1, 2])
        for s in others + [sock]:
            s.close()

    def test_sessionLeader(self) -> None:
        sock, report = self.report()
        self.assertEqual(report["pgid"], report["pid"])
        self.assertEqual(report["sid"], report["pid"])
        sock.close()

    def test_environment(self) -> None:
        sock, report = self.report()
        env = report["env"]
        self.assertEqual(env["PROTO"], "TCP")
        self.assertEqual(env["TCPREMOTEIP"], "127.0.0.1")
        self.assertEqual(env["TCPREMOTEPORT"], str(sock.getsockname()[1]))
        self.assertEqual(env["TCPLOCALIP"], "127.0.0.1")
        self.assertEqual(env["TCPLOCALPORT"], str(self.server.port))
        self.assertEqual(env["CLOSEWATCH_CONNECTION_ID"], "1")
        self.assertEqual(env["FOO"], "bar=baz")
        self.assertEqual(env["EMPTY"], "")
        self.assertIn("PATH", env)
        sock.close()

    def test_unixSocket(self) -> None:
        """
        On a unix socket PROTO names the transport and no TCP variable is set.
        """
        import json

        path = os.path.abspath(self.mktemp())
        server = self.startServer(listen=f"unix:{path}", command=self.command)
        wait(lambda: unixListening(path))
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        env = json.loads(readLine(sock))["env"]
        self.assertEqual(env["PROTO"], "UNIX")
        self.assertNotIn("TCPREMOTEIP", env)
        sock.close()
        server.endOf(1)


class StopTests(ServerTestCase):
    def test_stopKillsAll(self) -> None:
        """
        SIGTERM: stop listening, kill every worker group, exit 0.
        """
        pids = []
        socks = []
        for _ in range(5):
            sock, pid = self.server.connectWorker()
            socks.append(sock)
            pids.append(pid)
        self.assertEqual(self.server.stop(), 0)
        for pid in pids:
            self.assertFalse(alive(pid))
        reasons = {e["reason"] for e in self.server.ends()}
        self.assertEqual(reasons, {"server-stopping"})
        self.assertEqual(len(self.server.ends()), 5)


class SpawnFailureTests(TestCase):
    def test_deletedCommand(self) -> None:
        """
        A worker that cannot start closes its connection and is logged; the
        server goes on serving everyone else.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        script = os.path.join(directory, "worker")
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho $$\nexec sleep 100000\n")
        os.chmod(script, 0o755)
        server = Server(command=[script])
        self.addCleanup(server.cleanup)
        os.rename(script, script + ".away")
        sock = server.connect()
        self.assertEqual(readAll(sock), b"")
        end = server.endOf(1)
        self.assertEqual(end["reason"], "spawn-failed")
        self.assertIsNone(end["pid"])
        os.rename(script + ".away", script)
        sock, pid = server.connectWorker()
        sock.close()
        waitGone([pid], 5)


class BadOptionsTests(TestCase):
    """
    Bad options: non-zero exit, usage text, a one-line error, no traceback.
    """

    def assertUsageError(self, args, message) -> None:
        checkUsageError(self, args, message)

    def test_unknownPolicy(self) -> None:
        self.assertUsageError(["--half-close", "maybe"], "--half-close 'maybe'")

    def test_envWithoutEquals(self) -> None:
        self.assertUsageError(["--env", "FOO"], "expected NAME=VALUE")

    def test_missingCommand(self) -> None:
        self.assertUsageError(["--", "no-such-command-xyz"], "command not found")

    def test_notExecutable(self) -> None:
        path = self.mktemp()
        open(path, "w").close()
        self.assertUsageError(["--", path], "not an executable file")

    def test_malformedEndpoint(self) -> None:
        self.assertUsageError(["--listen", "tcp:notaport"], "--listen 'tcp:notaport'")

    def test_unknownEndpointType(self) -> None:
        self.assertUsageError(["--listen", "carrier-pigeon:9"], "--listen")

    def test_badSize(self) -> None:
        self.assertUsageError(["--read-ahead", "lots"], "not a size")

    def test_unknownOption(self) -> None:
        self.assertUsageError(["--frobnicate"], "frobnicate")

    def test_portInUse(self) -> None:
        """
        A port that cannot be bound stops start-up with a non-zero exit.
        """
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        self.addCleanup(holder.close)
        result = runTwistd(["--listen", f"tcp:{holder.getsockname()[1]}:interface=127.0.0.1"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Address already in use", result.stdout + result.stderr)


class SQLWorkerServiceTests(ServerTestCase):
    """
    The embedded default worker behind the real server.
    """

    command = ()

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.server = self.startServer(
            env={"CLOSEWATCH_DATABASE": os.path.join(self.directory, "db.sqlite3")}
        )

    def test_query(self) -> None:
        import json

        sock = self.server.connect()
        sock.sendall(b"select 1 + 1, 'two';\n")
        self.assertEqual(json.loads(readLine(sock)), [2, "two"])
        self.assertEqual(json.loads(readLine(sock))["ok"], True)
        sock.close()

    def test_endlessQueryKilled(self) -> None:
        """
        The README's demo: an endless query dies with its client.
        """
        sock = self.server.connect()
        sock.sendall(
            b"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) "
            b"SELECT count(*) FROM c;\n"
        )
        pid = wait(lambda: workers(self.server.pid))[0]
        time.sleep(0.2)
        self.assertTrue(alive(pid))
        sock.close()
        waitGone([pid], 5)
        self.assertEqual(self.server.endOf(1)["reason"], "client-closed")
