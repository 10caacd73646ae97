"""
C{--direct} end to end: the worker's stdin and stdout are the client's
socket, and the server still kills it the moment the client leaves.  Real
servers, real workers, real sockets (and a real HAProxy, and network
namespaces as root, where available).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import (
    PID_WORKER,
    Server,
    alive,
    checkUsageError,
    children,
    openFDs,
    pidfdWaitGone,
    readAll,
    readLine,
    reset,
    scrapeMetrics,
    unixListening,
    unixSocketPath,
    wait,
    waitGone,
    workers,
)
from tests.test_liveness import FAST_KEEPALIVE, YES_WORKER, netnsUnavailable, runScenarios
from tests.test_production import freePort, haproxyConfig, listening
from tests.test_spawner import _needCgroups

#: Says who it is, then echoes its input.
ECHO_WORKER = ["/bin/sh", "-c", "echo $$; exec cat"]
#: Says who it is and who its client is, then echoes.
PROXIED_WORKER = ["/bin/sh", "-c", 'echo "$$ $TCPREMOTEIP $TCPREMOTEPORT"; exec cat']
#: Has a child in its process group, says both pids, then blocks.
FAMILY_WORKER = ["/bin/sh", "-c", "sleep 100000 & echo $$ $!; wait"]

_O_CLOEXEC = 0o2000000


def socketInode(pid: int, fd: int) -> str | None:
    """
    The socket C{pid}'s C{fd} is (C{socket:[INODE]}), or C{None} if it is no
    socket.
    """
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return target if target.startswith("socket:") else None


def fdFlags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd} of {pid}")


class DirectTestCase(TestCase):
    def startServer(
        self, args: list[str] | tuple[str, ...] = (), command: list[str] = PID_WORKER, **kwargs: Any
    ) -> Server:
        server = Server(["--direct", *args], command, **kwargs)
        self.addCleanup(server.cleanup)
        return server


class HandoverTests(DirectTestCase):
    """
    The worker gets the socket itself, exactly as fds 0 and 1.
    """

    def test_echo(self) -> None:
        """
        What the client sends, the worker reads from the socket and writes
        back to it, 1 MiB of it too.
        """
        server = self.startServer(command=ECHO_WORKER)
        sock, pid = server.connectWorker()
        payload = os.urandom(1 << 20)
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            self.assertTrue(chunk, "the echo ended early")
            received += chunk
        self.assertEqual(received, payload)
        sock.close()
        waitGone([pid], 5)

    def test_descriptors(self) -> None:
        """
        The worker has exactly fds 0, 1 and 2: 0 and 1 the client's socket,
        2 a pipe (to the log); the server's copies of the socket are
        close-on-exec.
        """
        server = self.startServer()
        sock, pid = server.connectWorker()
        self.assertEqual(openFDs(pid), [0, 1, 2])
        inode = socketInode(pid, 0)
        self.assertIsNotNone(inode)
        self.assertEqual(socketInode(pid, 1), inode)
        self.assertTrue(os.readlink(f"/proc/{pid}/fd/2").startswith("pipe:"))
        copies = [fd for fd in openFDs(server.pid) if socketInode(server.pid, fd) == inode]
        self.assertEqual(len(copies), 2, "the transport's and the close watch's")
        for fd in copies:
            self.assertTrue(fdFlags(server.pid, fd) & _O_CLOEXEC)
        sock.close()
        waitGone([pid], 5)

    def test_stderrLogged(self) -> None:
        """
        The worker's stderr still goes to the log.
        """
        server = self.startServer(
            command=["/bin/sh", "-c", "echo $$; echo 'to the log' >&2; exec sleep 100000"]
        )
        sock, pid = server.connectWorker()
        wait(lambda: any(e.get("line") == "to the log" for e in server.events()), 5)
        sock.close()
        waitGone([pid], 5)

    def test_pythonWorker(self) -> None:
        """
        A warm Python worker gets the socket as fds 0 and 1 (and
        C{sys.stdin}/C{sys.stdout} on them).
        """
        server = self.startServer(["--python-worker", "tests.pyworkers:describe"], command=[])
        sock = server.connect()
        report = json.loads(readLine(sock))
        self.assertEqual(report["fds"][:3], [0, 1, 2])
        self.assertTrue(report["stdinIsFd0"])
        self.assertIsNotNone(socketInode(report["pid"], 0))
        sock.sendall(b"a line\n")
        self.assertEqual(readLine(sock), b"a line\n")
        sock.close()
        waitGone([report["pid"]], 5)
        self.assertEqual(server.endOf(1)["reason"], "client-closed")


class KillTests(DirectTestCase):
    """
    Whichever way the client leaves, its worker is killed at once.
    """

    def assertKilled(self, server: Server, pid: int, reason: str) -> None:
        self.assertTrue(pidfdWaitGone(pid, 5), "the worker outlived its client")
        end = server.endOf(1)
        self.assertEqual(end["reason"], reason)
        self.assertEqual(end["exit_signal"], 9)
        self.assertLess(end["kill_latency_ms"], 1000)

    def test_fin(self) -> None:
        server = self.startServer()
        sock, pid = server.connectWorker()
        sock.close()
        self.assertKilled(server, pid, "client-closed")

    def test_reset(self) -> None:
        server = self.startServer()
        sock, pid = server.connectWorker()
        reset(sock)
        self.assertKilled(server, pid, "client-reset")

    def test_halfCloseKill(self) -> None:
        """
        Under C{--half-close kill} a half-close is a departure.
        """
        server = self.startServer()
        sock, pid = server.connectWorker()
        sock.shutdown(socket.SHUT_WR)
        self.assertKilled(server, pid, "client-closed")
        self.assertEqual(readAll(sock, 5), b"")
        sock.close()

    def test_finBehindUnreadData(self) -> None:
        """
        A FIN behind data the worker never read is seen at once.
        """
        server = self.startServer()
        sock, pid = server.connectWorker()
        sock.sendall(b"x" * 30000)
        sock.close()
        self.assertKilled(server, pid, "client-closed")

    def test_grandchild(self) -> None:
        """
        The worker's whole process group goes, its child too.
        """
        server = self.startServer(command=FAMILY_WORKER)
        sock = server.connect()
        pid, child = (int(p) for p in readLine(sock).split())
        self.assertTrue(alive(child))
        sock.close()
        waitGone([pid, child], 5)

    def test_setsidDaemonWithTheSocket(self) -> None:
        """
        With the cgroup on, a daemon that left the worker's group holding
        the socket (fds 0 and 1 inherited) dies with the worker too.
        """
        _needCgroups()
        server = self.startServer(
            ["--cgroup", "on"],
            ["/bin/sh", "-c", 'setsid sh -c "exec sleep 100000" & echo $$ $!; exec sleep 100000'],
        )
        sock = server.connect()
        pid, daemon = (int(p) for p in readLine(sock).split())
        wait(lambda: socketInode(daemon, 1) is not None, 5)
        sock.close()
        waitGone([pid, daemon], 5)
        self.assertEqual(server.endOf(1)["reason"], "client-closed")

    def test_serverStops(self) -> None:
        """
        SIGTERM: every worker is killed, each client gets a reset once its
        worker is reaped, and the server exits 0.
        """
        server = self.startServer()
        held = [server.connectWorker() for _ in range(2)]
        self.assertEqual(server.stop(), 0)
        waitGone([pid for _, pid in held], 5)
        for sock, _ in held:
            self.assertRaises(ConnectionResetError, readAll, sock, 5)
        self.assertEqual({e["reason"] for e in server.ends()}, {"server-stopping"})

    def test_maxLifetime(self) -> None:
        """
        C{--max-lifetime} kills the worker, then the client gets a FIN.
        """
        server = self.startServer(["--max-lifetime", "0.5"])
        sock, pid = server.connectWorker()
        self.assertEqual(readAll(sock, 5), b"")
        self.assertFalse(alive(pid))
        self.assertEqual(server.endOf(1)["reason"], "max-lifetime")


class HalfCloseForwardTests(DirectTestCase):
    """
    Under C{--half-close forward} the worker reads the EOF itself; only a
    reset or a dead peer kills it.
    """

    def test_eofAndAnswer(self) -> None:
        server = self.startServer(["--half-close", "forward"], ["/bin/sh", "-c", "wc -c"])
        sock = server.connect()
        sock.sendall(b"y" * 1000)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(readAll(sock, 5).strip(), b"1000")
        end = server.endOf(1)
        self.assertEqual(end["reason"], "worker-exited")
        self.assertEqual((end["bytes_in"], end["bytes_out"]), (1000, 5))

    def test_idleTimeoutAfterTheEOF(self) -> None:
        """
        A client that half-closed waits for its answer: its silence after
        the FIN is no idle time (as in relayed mode).
        """
        server = self.startServer(
            ["--half-close", "forward", "--idle-timeout", "1"],
            ["/bin/sh", "-c", "cat >/dev/null; sleep 2; echo done"],
        )
        sock = server.connect()
        sock.sendall(b"request\n")
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(readAll(sock, 6), b"done\n")
        self.assertEqual(server.endOf(1)["reason"], "worker-exited")

    def test_finIsNoKill(self) -> None:
        server = self.startServer(["--half-close", "forward"])
        sock, pid = server.connectWorker()
        sock.shutdown(socket.SHUT_WR)
        self.assertFalse(pidfdWaitGone(pid, 0.5), "a half-close killed the worker")
        reset(sock)
        self.assertTrue(pidfdWaitGone(pid, 5))
        self.assertEqual(server.endOf(1)["reason"], "client-reset")


class EndTests(DirectTestCase):
    """
    A worker's own end, what is counted, and what is left behind.
    """

    def test_workerExitsFIN(self) -> None:
        """
        A worker that exits gets its client a FIN at once, though the client
        keeps its side open: nothing else holds the socket.
        """
        server = self.startServer(command=["/bin/sh", "-c", "echo bye"])
        sock = server.connect()
        self.assertEqual(readAll(sock, 5), b"bye\n")
        self.assertEqual(server.endOf(1)["reason"], "worker-exited")
        sock.close()

    def test_bytesCounted(self) -> None:
        """
        Bytes in and out, from C{TCP_INFO}, in the end's log event and in
        the metrics, FINs not counted.
        """
        server = self.startServer(["--metrics", "tcp:0:interface=127.0.0.1"], ECHO_WORKER)
        sock, pid = server.connectWorker()
        pidLine = len(f"{pid}\n")
        sock.sendall(b"z" * 5000)
        got = 0
        while got < 5000:
            got += len(sock.recv(65536))
        sock.close()
        end = server.endOf(1)
        self.assertEqual((end["bytes_in"], end["bytes_out"]), (5000, 5000 + pidLine))
        metrics = scrapeMetrics(server)
        self.assertEqual(metrics[("closewatch_received_bytes_total", ())], 5000)
        self.assertEqual(metrics[("closewatch_sent_bytes_total", ())], 5000 + pidLine)

    def test_closedStdout(self) -> None:
        """
        A worker that closes its stdout but runs on keeps its connection
        open (its stdin is the same socket, and the server holds it); the
        client's close still kills it.
        """
        server = self.startServer(
            command=["/bin/sh", "-c", "echo $$; exec 1>&-; exec sleep 100000"]
        )
        sock, pid = server.connectWorker()
        sock.settimeout(0.5)
        self.assertRaises(TimeoutError, sock.recv, 1)
        sock.close()
        self.assertTrue(pidfdWaitGone(pid, 5))

    def test_nothingLeft(self) -> None:
        """
        After connections ended every way, the server holds the descriptors
        it started with, has no child but its helpers, and every slot is
        free again.
        """
        server = self.startServer(["--max-workers", "2"], ECHO_WORKER)
        sock, pid = server.connectWorker()
        sock.close()
        waitGone([pid], 5)
        wait(lambda: len(server.ends()) == 1)
        baseline = len(openFDs(server.pid))
        helpers = set(children(server.pid))
        for n, how in enumerate(("close", "reset", "half", "exit") * 3, start=2):
            sock, pid = server.connectWorker()
            if how == "close":
                sock.close()
            elif how == "reset":
                reset(sock)
            elif how == "half":
                sock.shutdown(socket.SHUT_WR)
                readAll(sock, 5)
                sock.close()
            else:
                os.kill(pid, 9)
                readAll(sock, 5)
                sock.close()
            waitGone([pid], 5)
            server.endOf(n)
        wait(lambda: len(openFDs(server.pid)) == baseline, 5)
        self.assertEqual(set(children(server.pid)), helpers)
        self.assertEqual(workers(server.pid), [])
        held = [server.connectWorker() for _ in range(2)]
        for sock, _ in held:
            sock.close()

    def test_idleTimeout(self) -> None:
        """
        The idle timeout, from the kernel's time since the client's last
        data: a silent client is dropped, one that keeps sending is not.
        """
        server = self.startServer(["--idle-timeout", "1"], ECHO_WORKER)
        silent, silentPID = server.connectWorker()
        talking, talkingPID = server.connectWorker()
        started = time.monotonic()
        for _ in range(8):
            talking.sendall(b".")
            self.assertEqual(talking.recv(1), b".")
            time.sleep(0.25)
        self.assertFalse(alive(silentPID))
        self.assertTrue(alive(talkingPID))
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(server.endOf(1)["reason"], "idle-timeout")
        talking.close()
        silent.close()

    def test_idleTimeoutWhileUnread(self) -> None:
        """
        Data the worker leaves unread: the silence is the worker's, and the
        idle timeout does not take the client for gone.
        """
        server = self.startServer(["--idle-timeout", "1"])
        sock, pid = server.connectWorker()
        sock.sendall(b"never read\n")
        self.assertFalse(pidfdWaitGone(pid, 2.5), "killed while its data waited unread")
        sock.close()
        self.assertTrue(pidfdWaitGone(pid, 5))
        self.assertEqual(server.endOf(1)["reason"], "client-closed")

    def test_graceLastWords(self) -> None:
        """
        Under C{--grace} the socket stays the worker's until it is reaped:
        a worker ended for its lifetime says goodbye to its client itself.
        """
        server = self.startServer(
            ["--max-lifetime", "0.5", "--grace", "2"],
            [
                "/bin/sh",
                "-c",
                'trap "echo bye; exit 0" TERM; echo $$; while :; do sleep 0.05; done',
            ],
        )
        sock, pid = server.connectWorker()
        self.assertEqual(readAll(sock, 5), b"bye\n")
        self.assertTrue(pidfdWaitGone(pid, 5))
        end = server.endOf(1)
        self.assertEqual((end["reason"], end["exit_code"]), ("max-lifetime", 0))

    def test_unixSocket(self) -> None:
        """
        A unix socket listener: the worker gets the unix socket; a close is
        seen and kills it.
        """
        path = unixSocketPath(self)
        server = self.startServer(listen=f"unix:{path}", command=ECHO_WORKER)
        wait(lambda: unixListening(path))
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        pid = int(readLine(sock))
        sock.sendall(b"over unix\n")
        self.assertEqual(readLine(sock), b"over unix\n")
        sock.close()
        self.assertTrue(pidfdWaitGone(pid, 5))
        self.assertEqual(server.endOf(1)["reason"], "client-closed")


class ProxyHeaderTests(DirectTestCase):
    """
    Behind the PROXY protocol the header is read exactly: the worker gets
    every byte after it, however they arrived.
    """

    def test_headerAndDataTogether(self) -> None:
        server = self.startServer(
            listen="haproxy:tcp:0:interface=127.0.0.1", command=PROXIED_WORKER
        )
        server.port = wait(server._listeningPort, 30)
        sock = server.connect()
        sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 4711 80\r\nfirst bytes\n")
        pid, ip, port = readLine(sock).split()
        self.assertEqual((ip, port), (b"192.0.2.7", b"4711"))
        self.assertEqual(readLine(sock), b"first bytes\n")
        sock.close()
        waitGone([int(pid)], 5)

    def test_headerByteByByte(self) -> None:
        server = self.startServer(
            listen="haproxy:tcp:0:interface=127.0.0.1", command=PROXIED_WORKER
        )
        server.port = wait(server._listeningPort, 30)
        sock = server.connect()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in b"PROXY TCP4 192.0.2.8 127.0.0.1 4712 80\r\n":
            sock.send(bytes([byte]))
            time.sleep(0.002)
        sock.sendall(b"after\n")
        self.assertEqual(readLine(sock).split()[1:], [b"192.0.2.8", b"4712"])
        self.assertEqual(readLine(sock), b"after\n")
        sock.close()

    def test_badHeaderRefused(self) -> None:
        server = self.startServer(listen="haproxy:tcp:0:interface=127.0.0.1")
        server.port = wait(server._listeningPort, 30)
        sock = server.connect()
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        self.assertRaises(ConnectionResetError, readAll, sock, 5)
        wait(lambda: any(e.get("reason") == "bad-header" for e in server.events()), 5)
        self.assertEqual(workers(server.pid), [])

    def test_behindHAProxy(self) -> None:
        """
        Through a real HAProxy (PROXY v1 and v2): the worker sees the
        original client, echoes, and dies when the client closes.
        """
        haproxy = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
        )
        if haproxy is None:
            raise SkipTest("haproxy is not installed (apt-get install haproxy)")
        listen = "haproxy:tcp:0:interface=127.0.0.1"
        nodes = [self.startServer(listen=listen, command=PROXIED_WORKER) for _ in range(2)]
        for node in nodes:
            node.port = wait(node._listeningPort, 30)
        front = freePort()
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write(
                haproxyConfig(
                    {
                        front: [
                            ("a", nodes[0].port, "send-proxy"),
                            ("b", nodes[1].port, "send-proxy-v2"),
                        ]
                    }
                )
            )
        process = subprocess.Popen(
            [haproxy, "-db", "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def stop() -> None:
            process.kill()
            process.wait(10)

        self.addCleanup(stop)
        wait(lambda: listening(front), 10)
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", front), timeout=10)
            sock.sendall(b"hello through haproxy\n")
            pid, ip, port = readLine(sock).split()
            self.assertEqual((ip.decode(), int(port)), sock.getsockname())
            self.assertEqual(readLine(sock), b"hello through haproxy\n")
            sock.close()
            self.assertTrue(pidfdWaitGone(int(pid), 5))
        for node in nodes:
            end = node.endOf(1)
            self.assertEqual(end["reason"], "client-closed")
            self.assertEqual(end["bytes_in"], len(b"hello through haproxy\n"))


#: Sets C{SO_LINGER} (30 s) on the socket it was given, fills the socket's
#: send buffer, says on stderr how much it sent, and exits.
LINGERING_WORKER = r"""
import os, socket, struct, sys
sock = socket.socket(fileno=os.dup(1))
sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 30))
sock.setblocking(False)
sent = 0
try:
    while True:
        sent += sock.send(b"x" * 65536)
except BlockingIOError:
    pass
print("sent", sent, file=sys.stderr)
"""


#: Turns the user timeout and keepalive off on the socket it was given,
#: fills the socket's send buffer, and exits.
OPTIONS_OFF_WORKER = r"""
import os, socket
sock = socket.socket(fileno=os.dup(1))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
sock.setblocking(False)
try:
    while True:
        sock.send(b"x" * 65536)
except BlockingIOError:
    pass
"""

#: Left the worker's group with its socket (fd 1), makes the socket
#: blocking whenever the server has made it non-blocking, and takes what
#: the client sends when it is readable, a moment later: at times between
#: the server's epoll and its read.
RACING_SURVIVOR = r"""
import fcntl, os, random, select, socket, time
sock = socket.socket(fileno=os.dup(1))
poller = select.poll()
poller.register(sock.fileno(), select.POLLIN)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    flags = fcntl.fcntl(1, fcntl.F_GETFL)
    fcntl.fcntl(1, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    if not poller.poll(100):
        continue
    until = time.perf_counter() + random.uniform(0, 300e-6)
    while time.perf_counter() < until:
        pass
    try:
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
        break
    except BlockingIOError:
        pass
"""


def _killIfAlive(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


class HostileWorkerTests(DirectTestCase):
    """
    What a worker leaves on the socket it owned does not stop the server
    once it is the server's again.
    """

    def serveScript(self, script: str, args: list[str] | tuple[str, ...] = ()) -> Server:
        """
        A server whose worker says its pid, then runs C{script} in Python.
        """
        return self.startServer(
            args,
            ["/bin/sh", "-c", 'echo $$; exec "$PYTHON" -c "$WORKER"'],
            env={"PYTHON": sys.executable, "WORKER": script},
        )

    def connectSlowReader(self, server: Server) -> tuple[socket.socket, int]:
        """
        A client with a small receive buffer, and its worker's pid.
        """
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        return sock, int(readLine(sock))

    def test_lingerOption(self) -> None:
        """
        A worker's C{SO_LINGER} would make the server's last close of the
        socket wait for a client that stopped reading (30 s here), in the
        reactor: the connection ends at once instead, and the server serves
        on.
        """
        server = self.serveScript(LINGERING_WORKER)
        sock, _ = self.connectSlowReader(server)

        def sent() -> int | None:
            for event in server.events():
                words = event.get("text", "").split()
                if words[-2:-1] == ["sent"]:
                    return int(words[-1])
            return None

        total = wait(sent, 10)
        # Enough for the server's FIN to be queued, not all of it: the rest
        # waits in the server's socket, which the client no longer reads.
        got = 0
        while got < total * 0.6:
            got += len(sock.recv(65536))
        self.assertEqual(server.endOf(1, timeout=5)["reason"], "worker-exited")
        other, pid = server.connectWorker()
        other.close()
        self.assertTrue(pidfdWaitGone(pid, 5))

    def test_socketOptionsRestored(self) -> None:
        """
        A worker that turned the user timeout and keepalive off, filled the
        socket and exited, with a client that never reads: the server's
        user timeout (2 s) applies again once the socket is the server's,
        and the connection ends, where it would stay open as long as the
        client answers the kernel's window probes.
        """
        server = self.serveScript(OPTIONS_OFF_WORKER, ["--user-timeout", "2"])
        _, pid = self.connectSlowReader(server)
        self.assertTrue(pidfdWaitGone(pid, 5))
        self.assertEqual(server.endOf(1, timeout=6)["reason"], "worker-exited")

    def test_blockingSurvivor(self) -> None:
        """
        A process that survived the worker with its socket (C{--cgroup
        off}: it left the group) and makes the socket blocking again does
        not make the server's lingering close wait in a read of it, where
        the server would serve nobody until the client sent more: the
        server drops the client's input with reads that never wait.
        """
        if not os.access(f"/proc/{os.getpid()}/stack", os.R_OK):
            raise SkipTest("reading a process's kernel stack needs root")
        server = self.startServer(
            ["--cgroup", "off"],
            ["/bin/sh", "-c", 'setsid "$PYTHON" -c "$SURVIVOR" & echo $$ $!; sleep 0.2'],
            env={"PYTHON": sys.executable, "SURVIVOR": RACING_SURVIVOR},
        )
        sock = server.connect()
        self.addCleanup(sock.close)
        pid, survivor = (int(p) for p in readLine(sock).split())
        self.addCleanup(_killIfAlive, survivor)
        self.assertTrue(pidfdWaitGone(pid, 5))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        blocked = sent = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and alive(survivor):
            try:
                sock.send(b".")
            except OSError:
                break
            sent += 1
            time.sleep(0.004)
            with open(f"/proc/{server.pid}/stack") as f:
                blocked += "sk_wait_data" in f.read()
        self.assertEqual(blocked, 0, f"the server waited in a read {blocked} times")
        self.assertGreater(sent, 50)


class StartupConflictTests(TestCase):
    """
    What cannot work when the worker owns the socket is refused at start-up,
    in one line naming the conflict.
    """

    def assertRefused(self, args: list[str], message: str) -> None:
        checkUsageError(self, ["--direct", *args], message)

    def test_tls(self) -> None:
        self.assertRefused(
            ["-l", "ssl:0:privateKey=k.pem:certKey=c.pem"], "--direct cannot serve --listen 'ssl:"
        )

    def test_websocket(self) -> None:
        self.assertRefused(["--websocket"], "--direct and --websocket exclude each other")

    def test_heartbeat(self) -> None:
        self.assertRefused(["--heartbeat", "5"], "--heartbeat does not apply to --direct")

    def test_heartbeatData(self) -> None:
        self.assertRefused(["--heartbeat-data", "x"], "--heartbeat-data does not apply to --direct")

    def test_readAhead(self) -> None:
        self.assertRefused(["--read-ahead", "1m"], "--read-ahead does not apply to --direct")

    def test_idleTimeoutOnUnix(self) -> None:
        self.assertRefused(
            ["-l", "unix:/tmp/closewatch-direct-test", "--idle-timeout", "5"],
            "--idle-timeout needs TCP_INFO under --direct",
        )


# Dead peers, in network namespaces of their own (see tests.test_liveness).

_SCENARIOS: dict[str, dict[str, Any]] = {
    "keepalive": {
        "netns": True,
        "args": ["--direct", *FAST_KEEPALIVE, "--user-timeout", "0"],
        "expect": "keepalive",
    },
    "user-timeout": {
        "netns": True,
        "args": ["--direct", "--user-timeout", "2"],
        "command": YES_WORKER,
        "client": "reader",
        "expect": "user-timeout",
    },
    "keepalive-half-closed": {
        "netns": True,
        "args": ["--direct", *FAST_KEEPALIVE, "--user-timeout", "0", "--half-close", "forward"],
        "command": ["/bin/sh", "-c", "echo $$; cat >/dev/null; exec sleep 100000"],
        "client": "half-closed",
        "expect": "keepalive",
    },
}
#: The scenarios' results, once run.
_results: dict[str, Any] = {}


class DeadPeerTests(TestCase):
    """
    A client gone without a FIN or an RST (lo down in its namespace) is
    found by keepalive or the user timeout, and its worker killed.
    """

    def assertGone(self, name: str, reason: str, low: float, high: float) -> None:
        unavailable = netnsUnavailable()
        if unavailable is not None:
            raise SkipTest(unavailable)
        if not _results:
            _results.update(runScenarios(_SCENARIOS))
        result = _results[name]
        self.assertNotIn("error", result, result.get("error"))
        self.assertEqual(result["reason"], reason, result.get("log"))
        self.assertIsNotNone(result["elapsed"], result.get("log"))
        self.assertGreaterEqual(result["elapsed"], low)
        self.assertLessEqual(result["elapsed"], high)

    def test_keepalive(self) -> None:
        self.assertGone("keepalive", "keepalive", 1.5, 4.5)

    def test_userTimeout(self) -> None:
        self.assertGone("user-timeout", "user-timeout", 1.5, 4.5)

    def test_keepaliveHalfClosed(self) -> None:
        """
        Under C{--half-close forward}, after the client's FIN: a dead peer
        is still found.
        """
        self.assertGone("keepalive-half-closed", "keepalive", 1.5, 4.5)
