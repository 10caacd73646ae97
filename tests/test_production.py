"""
Production features end to end: limits, graceful kills, dying with the
server, Prometheus metrics, the PROXY protocol behind a real HAProxy, TLS,
and systemd socket activation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, endpoints, protocol
from twisted.trial.unittest import TestCase

from tests.support import (
    PID_WORKER,
    ROOT,
    TWISTD,
    Server,
    alive,
    children,
    readAll,
    readLine,
    reset,
    runTwistd,
    scrapeMetrics,
    wait,
    waitGone,
)

#: Says who it is and who the client is, then blocks without reading stdin.
ENV_WORKER = [
    "/bin/sh",
    "-c",
    'echo "$$ $TCPREMOTEIP $TCPREMOTEPORT $TCPLOCALPORT $NODE"; exec sleep 100000',
]
#: Has a child in its process group, then blocks.
FAMILY_WORKER = ["/bin/sh", "-c", "sleep 100000 & echo $$; wait"]


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """
    Whether something listens on IPv4 TCP C{port} (without connecting).
    """
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return True
    return False


def startServer(test: TestCase, args=(), command=PID_WORKER, **kwargs: Any) -> Server:
    server = Server(args, command, **kwargs)
    test.addCleanup(server.cleanup)
    if not server.port:
        server.port = wait(server._listeningPort, 30)
    return server


def guardianPID(server: Server, after: int = 0) -> int:
    """
    The pid of the guardian the server started, other than C{after}.
    """

    def find() -> int | None:
        for event in server.events():
            pid = event.get("guardian_pid")
            if pid and pid != after and "started" in event.get("text", ""):
                return pid
        return None

    return wait(find, 10)


def refusals(server: Server) -> list[str]:
    return [e["reason"] for e in server.events() if e.get("refused")]


class LimitTests(TestCase):
    def test_maxWorkersBusyMessage(self) -> None:
        """
        At --max-workers, a client gets the busy message and a clean close,
        even one that sent its request first; a slot freed is usable again.
        """
        server = startServer(self, ["--max-workers", "2", "--busy-message", r"busy\r\n"])
        first, firstPID = server.connectWorker()
        second, _ = server.connectWorker()
        refused = server.connect()
        self.assertEqual(readAll(refused), b"busy\r\n")
        # Unread data at close() would make the kernel send a reset, which
        # can destroy the busy message: the refusal reads what is sent.
        eager = server.connect()
        eager.sendall(b"x" * (4 << 20))
        eager.shutdown(socket.SHUT_WR)
        self.assertEqual(readAll(eager), b"busy\r\n")
        self.assertEqual(refusals(server), ["max-workers", "max-workers"])
        first.close()
        waitGone([firstPID], 5)
        server.endOf(1)
        third, thirdPID = server.connectWorker()
        self.assertTrue(alive(thirdPID))
        for s in (second, third, refused, eager):
            s.close()


class PerPeerTests(TestCase):
    """
    Under --max-per-peer 1, the slot comes back after every way a
    connection can end.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.script = os.path.join(directory, "worker")
        with open(self.script, "w") as f:
            f.write("#!/bin/sh\necho $$\nread line\necho bye\n")
        os.chmod(self.script, 0o755)
        self.server = startServer(
            self, ["--max-per-peer", "1", "--busy-message", "busy"], [self.script]
        )

    def assertSlotHeldThenReleased(self, end, connectionID: int, reason: str) -> None:
        """
        Hold the peer's one slot, check a second client is refused, end the
        first with C{end}, then check a new client gets a worker.
        """
        sock, pid = self.server.connectWorker()
        other = self.server.connect()
        self.assertEqual(readAll(other), b"busy")
        other.close()
        end(sock)
        waitGone([pid], 5)
        self.assertEqual(self.server.endOf(connectionID)["reason"], reason)
        again, againPID = self.server.connectWorker()
        self.assertTrue(alive(againPID))
        again.close()
        waitGone([againPID], 5)
        self.assertEqual(refusals(self.server), ["max-per-peer"])

    def test_close(self) -> None:
        self.assertSlotHeldThenReleased(lambda s: s.close(), 1, "client-closed")

    def test_reset(self) -> None:
        self.assertSlotHeldThenReleased(reset, 1, "client-reset")

    def test_halfClose(self) -> None:
        self.assertSlotHeldThenReleased(
            lambda s: s.shutdown(socket.SHUT_WR), 1, "client-closed"
        )

    def test_workerExit(self) -> None:
        def finish(sock: socket.socket) -> None:
            sock.sendall(b"done\n")
            self.assertEqual(readAll(sock), b"bye\n")
            sock.close()

        self.assertSlotHeldThenReleased(finish, 1, "worker-exited")

    def test_spawnFailure(self) -> None:
        os.rename(self.script, self.script + ".away")
        sock = self.server.connect()
        self.assertEqual(readAll(sock), b"")
        self.assertEqual(self.server.endOf(1)["reason"], "spawn-failed")
        os.rename(self.script + ".away", self.script)
        again, pid = self.server.connectWorker()
        self.assertTrue(alive(pid))
        again.close()
        self.assertEqual(refusals(self.server), [])


class _FirstLine(protocol.Protocol):
    def __init__(self) -> None:
        self.line: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._data = b""

    def dataReceived(self, data: bytes) -> None:
        self._data += data
        if b"\n" in self._data and not self.line.called:
            self.line.callback(self._data.split(b"\n")[0])

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


class ServerStopTests(TestCase):
    """
    In process: stopping the server gives every slot back and leaves the
    metrics consistent.
    """

    @defer.inlineCallbacks
    def test_stopReleasesSlots(self):
        from twisted.internet import reactor

        from twisted_closewatch.config import Config
        from twisted_closewatch.factory import CloseWatchFactory
        from twisted_closewatch.metrics import ServerMetrics

        metrics = ServerMetrics()
        factory = CloseWatchFactory(Config(argv=PID_WORKER, maxPerPeer=1), reactor, metrics)
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            factory
        )
        self.addCleanup(port.stopListening)
        client = yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), _FirstLine()
        )
        pid = int((yield client.line))
        self.assertEqual(factory.limits.perPeer("127.0.0.1"), 1)
        self.assertEqual(metrics.registry.get_sample_value("closewatch_workers_active"), 1)
        yield factory.stopWorkers()
        yield client.lost
        self.assertFalse(alive(pid))
        self.assertEqual(factory.limits.active, 0)
        self.assertEqual(len(factory.limits), 0)
        self.assertEqual(metrics.registry.get_sample_value("closewatch_workers_active"), 0)
        self.assertEqual(
            metrics.registry.get_sample_value(
                "closewatch_worker_ends_total", {"reason": "server-stopping"}
            ),
            1,
        )


class LifetimeAndGraceTests(TestCase):
    def test_maxLifetime(self) -> None:
        server = startServer(self, ["--max-lifetime", "0.5"])
        sock, pid = server.connectWorker()
        time.sleep(0.2)
        self.assertTrue(alive(pid))
        waitGone([pid], 5)
        end = server.endOf(1)
        self.assertEqual(end["reason"], "max-lifetime")
        self.assertGreaterEqual(end["duration"], 0.5)
        self.assertEqual(end["exit_signal"], signal.SIGKILL)
        # The client is told with a FIN, not a reset (which would raise).
        self.assertEqual(readAll(sock), b"")
        sock.close()

    def test_graceEndsInSIGKILL(self) -> None:
        """
        A worker that ignores SIGTERM is killed once the grace is over, and
        the kill latency runs to the reap.
        """
        server = startServer(
            self,
            ["--grace", "1"],
            ["/bin/sh", "-c", "trap '' TERM; echo $$; exec sleep 100000"],
        )
        sock, pid = server.connectWorker()
        sock.close()
        time.sleep(0.5)
        self.assertTrue(alive(pid))
        waitGone([pid], 5)
        end = server.endOf(1)
        self.assertEqual(end["exit_signal"], signal.SIGKILL)
        self.assertGreaterEqual(end["kill_latency_ms"], 1000)
        self.assertLess(end["kill_latency_ms"], 3000)

    def test_graceSIGTERMFirst(self) -> None:
        """
        A worker that heeds SIGTERM ends with it, at once.
        """
        server = startServer(self, ["--grace", "10"])
        sock, pid = server.connectWorker()
        sock.close()
        waitGone([pid], 5)
        end = server.endOf(1)
        self.assertEqual(end["exit_signal"], signal.SIGTERM)
        self.assertLess(end["kill_latency_ms"], 1000)


class DieWithServerTests(TestCase):
    def test_serverSIGKILL(self) -> None:
        """
        Workers, and their children, die within a second of the server
        being killed with SIGKILL; the guardian exits too.
        """
        server = startServer(self, command=FAMILY_WORKER)
        guardian = guardianPID(server)
        socks, pids = [], []
        for _ in range(3):
            sock, pid = server.connectWorker()
            socks.append(sock)
            pids.append(pid)
            pids += wait(lambda: children(pid))
        server.process.kill()
        server.process.wait(5)
        self.assertLess(waitGone(pids + [guardian], 3), 1.0)
        for sock in socks:
            sock.close()

    def test_guardianIsolated(self) -> None:
        """
        The guardian leads its own session, ignores SIGTERM (systemd sends
        it to the whole unit) and exits when the server stops cleanly.
        """
        server = startServer(self)
        guardian = guardianPID(server)
        # Once it has started up: it calls setsid() itself.
        wait(lambda: os.getsid(guardian) == guardian, 5)
        time.sleep(0.1)
        self.assertNotEqual(os.getpgid(guardian), os.getpgid(server.pid))
        os.kill(guardian, signal.SIGTERM)
        time.sleep(0.2)
        self.assertTrue(alive(guardian))
        self.assertEqual(server.stop(), 0)
        waitGone([guardian], 5)

    def test_guardianReplaced(self) -> None:
        """
        A guardian that dies is replaced, and the replacement knows the
        workers started before it.
        """
        server = startServer(self)
        first = guardianPID(server)
        sock, pid = server.connectWorker()
        os.kill(first, signal.SIGKILL)
        second = guardianPID(server, after=first)
        self.assertTrue(alive(second))
        server.process.kill()
        server.process.wait(5)
        waitGone([pid, second], 3)
        sock.close()


class MetricsTests(TestCase):
    def scrape(self, server: Server) -> dict[tuple[str, tuple], float]:
        return scrapeMetrics(server)

    def test_counts(self) -> None:
        server = startServer(
            self,
            ["--metrics", "tcp:0:interface=127.0.0.1", "--max-workers", "3"],
            ["/bin/sh", "-c", "echo $$; read line; echo bye"],
        )
        closed, closedPID = server.connectWorker()
        closed.sendall(b"12345")
        closed.close()
        resetSock, resetPID = server.connectWorker()
        reset(resetSock)
        exiting, _ = server.connectWorker()
        exiting.sendall(b"done\n")
        self.assertEqual(readAll(exiting), b"bye\n")
        waitGone([closedPID, resetPID])
        wait(lambda: len(server.ends()) == 3)
        held = [server.connectWorker() for _ in range(3)]
        refused = server.connect()
        self.assertEqual(readAll(refused), b"")

        metrics = self.scrape(server)

        def value(name: str, **labels: str) -> float:
            return metrics[(name, tuple(sorted(labels.items())))]

        self.assertEqual(value("closewatch_connections_accepted_total"), 7)
        self.assertEqual(value("closewatch_connections_refused_total", reason="max-workers"), 1)
        self.assertEqual(value("closewatch_connections_refused_total", reason="max-per-peer"), 0)
        self.assertEqual(value("closewatch_workers_active"), 3)
        self.assertEqual(value("closewatch_worker_ends_total", reason="client-closed"), 1)
        self.assertEqual(value("closewatch_worker_ends_total", reason="client-reset"), 1)
        self.assertEqual(value("closewatch_worker_ends_total", reason="worker-exited"), 1)
        self.assertEqual(value("closewatch_worker_ends_total", reason="max-lifetime"), 0)
        self.assertEqual(value("closewatch_kill_latency_seconds_count"), 2)
        self.assertLess(value("closewatch_kill_latency_seconds_sum"), 2)
        self.assertEqual(value("closewatch_kill_latency_seconds_bucket", le="+Inf"), 2)
        self.assertEqual(value("closewatch_spawn_latency_seconds_count"), 6)
        self.assertEqual(value("closewatch_received_bytes_total"), 5 + 5)
        pidLines = sum(len(str(e["pid"])) + 1 for e in server.ends())
        self.assertEqual(value("closewatch_sent_bytes_total"), pidLines + 4)
        for sock, _ in held:
            sock.close()

    def test_withoutPrometheusClient(self) -> None:
        """
        --metrics without prometheus_client is a one-line usage error.
        """
        hidden = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(hidden, "prometheus_client"))
        with open(os.path.join(hidden, "prometheus_client", "__init__.py"), "w") as f:
            f.write("raise ImportError('hidden by the test')\n")
        environ = dict(os.environ)
        environ["PYTHONPATH"] = os.pathsep.join([hidden, ROOT])
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "closewatch", "--metrics", "tcp:0"],
            capture_output=True,
            text=True,
            timeout=30,
            env=environ,
            cwd=tempfile.gettempdir(),
        )
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", output)
        self.assertIn("--metrics needs prometheus_client", output.strip().splitlines()[-1])


class BadProductionOptionsTests(TestCase):
    def assertUsageError(self, args: list[str], message: str) -> None:
        result = runTwistd(args)
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", output)
        self.assertIn(message, output.strip().splitlines()[-1])

    def test_values(self) -> None:
        self.assertUsageError(["--max-workers", "0"], "--max-workers must be between")
        self.assertUsageError(["--max-per-peer", "-1"], "--max-per-peer must be between")
        self.assertUsageError(["--grace", "soon"], "is not a number of seconds")
        self.assertUsageError(["--max-lifetime", "-3"], "seconds must be a finite number")
        self.assertUsageError(["--metrics", "nonsense:1"], "--metrics 'nonsense:1'")
        self.assertUsageError(["--listen", "haproxy:tcp:notaport"], "--listen 'haproxy:")


def haproxyConfig(frontends: dict[int, list[tuple[str, int, str]]]) -> str:
    lines = [
        "global",
        "    maxconn 200",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
    ]
    for n, (port, servers) in enumerate(frontends.items()):
        lines += [
            f"frontend fe{n}",
            f"    bind 127.0.0.1:{port}",
            f"    default_backend be{n}",
            f"backend be{n}",
            "    balance roundrobin",
        ]
        lines += [
            f"    server {name} 127.0.0.1:{serverPort} {proxy}"
            for name, serverPort, proxy in servers
        ]
    return "\n".join(lines) + "\n"


class HAProxyTests(TestCase):
    """
    Two closewatch nodes behind a real HAProxy sending the PROXY protocol
    (v1 to one, v2 to the other), and a third with --half-close forward.
    """

    def setUp(self) -> None:
        haproxy = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
        )
        if haproxy is None:
            raise self.skipTest("haproxy is not installed (apt-get install haproxy)")
        listen = "haproxy:tcp:0:interface=127.0.0.1"
        self.nodes = [
            startServer(self, ["--env", f"NODE={name}"], ENV_WORKER, listen=listen)
            for name in ("a", "b")
        ]
        self.forward = startServer(
            self,
            ["--half-close", "forward", "--max-per-peer", "1", "--busy-message", "busy"],
            ["/bin/sh", "-c", 'echo "$TCPREMOTEIP"; wc -c; sleep 0.2; echo late'],
            listen=listen,
        )
        self.front, self.frontForward = freePort(), freePort()
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write(
                haproxyConfig(
                    {
                        self.front: [
                            ("a", self.nodes[0].port, "send-proxy"),
                            ("b", self.nodes[1].port, "send-proxy-v2"),
                        ],
                        self.frontForward: [("c", self.forward.port, "send-proxy")],
                    }
                )
            )
        self.haproxy = subprocess.Popen(
            [haproxy, "-db", "-f", config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(self._stopHAProxy)
        wait(lambda: listening(self.front) and listening(self.frontForward), 10)

    def _stopHAProxy(self) -> None:
        self.haproxy.kill()
        self.haproxy.wait(10)
        self.haproxy.stderr.close()

    def connect(self, port: int, source: str = "127.0.0.1") -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))

    def test_clientAddressAndClose(self) -> None:
        """
        Each worker sees the original client's address and port, and the
        frontend's port; nodes take turns; a client's close through HAProxy
        kills its worker at once.
        """
        seen = set()
        for _ in range(2):
            sock = self.connect(self.front)
            pid, ip, port, localPort, node = readLine(sock).decode().split()
            self.assertEqual((ip, int(port)), sock.getsockname())
            self.assertEqual(int(localPort), self.front)
            seen.add(node)
            started = time.monotonic()
            sock.close()
            waitGone([int(pid)], 5)
            self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(seen, {"a", "b"})
        for node in self.nodes:
            end = node.endOf(1)
            self.assertEqual(end["reason"], "client-closed")
            self.assertLess(end["kill_latency_ms"], 1000)

    def test_reset(self) -> None:
        sock = self.connect(self.front)
        pid = int(readLine(sock).split()[0])
        reset(sock)
        waitGone([pid], 5)

    def test_halfCloseForward(self) -> None:
        """
        A half-close through HAProxy reaches the worker as EOF, and its
        answer reaches the client.
        """
        sock = self.connect(self.frontForward)
        self.assertEqual(readLine(sock), b"127.0.0.1\n")
        sock.sendall(b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(readAll(sock).split(), [b"1000", b"late"])
        self.assertEqual(self.forward.endOf(1)["reason"], "worker-exited")

    def test_perPeerUsesOriginalAddress(self) -> None:
        """
        HAProxy connects from one address; the per-peer limit counts the
        clients' own.
        """
        first = self.connect(self.frontForward, "127.0.0.2")
        self.assertEqual(readLine(first), b"127.0.0.2\n")
        second = self.connect(self.frontForward, "127.0.0.3")
        self.assertEqual(readLine(second), b"127.0.0.3\n")
        third = self.connect(self.frontForward, "127.0.0.2")
        self.assertEqual(readAll(third), b"busy")
        for sock in (first, second, third):
            sock.close()

    def test_healthCheckSpawnsNothing(self) -> None:
        """
        A connection that closes without a PROXY header (a TCP health check)
        starts no worker.
        """
        node = self.nodes[0]
        socket.create_connection(("127.0.0.1", node.port), timeout=10).close()
        sock = self.connect(self.front)
        readLine(sock)
        sock.close()
        self.assertEqual(len(wait(lambda: node.ends() or self.nodes[1].ends())), 1)
        self.assertEqual([e["connection_id"] for e in node.ends() + self.nodes[1].ends()], [1])


def makeCertificate(directory: str) -> tuple[str, str]:
    """
    A self-signed certificate for localhost, and its key.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    keyPath = os.path.join(directory, "key.pem")
    certPath = os.path.join(directory, "cert.pem")
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


class TLSTests(TestCase):
    """
    A TLS client that goes, however it goes, takes its worker along.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        keyPath, certPath = makeCertificate(directory)
        self.listen = f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        self.server = startServer(self, listen=self.listen)
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    def connectWorker(self) -> tuple[ssl.SSLSocket, int]:
        raw = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        sock = self.context.wrap_socket(raw, server_hostname="localhost")
        return sock, int(readLine(sock))

    def test_closeNotify(self) -> None:
        sock, pid = self.connectWorker()
        sock.unwrap().close()
        waitGone([pid], 5)
        self.assertEqual(self.server.endOf(1)["reason"], "client-closed")

    def test_bareFIN(self) -> None:
        """
        A close without close_notify: TLS calls it a truncation.
        """
        sock, pid = self.connectWorker()
        sock.close()
        waitGone([pid], 5)
        end = self.server.endOf(1)
        self.assertEqual(end["reason"], "client-reset")
        self.assertLess(end["kill_latency_ms"], 1000)

    def test_reset(self) -> None:
        sock, pid = self.connectWorker()
        reset(sock)
        waitGone([pid], 5)
        self.assertEqual(self.server.endOf(1)["reason"], "client-reset")

    def test_noHalfCloseUnderTLS(self) -> None:
        """
        Under TLS, close_notify ends the connection even with --half-close
        forward: the worker is killed, nothing more is delivered.
        """
        self.server = startServer(
            self,
            ["--half-close", "forward"],
            ["/bin/sh", "-c", "echo $$; wc -c; echo late"],
            listen=self.listen,
        )
        sock, pid = self.connectWorker()
        sock.sendall(b"x" * 10)
        raw = sock.unwrap()
        waitGone([pid], 5)
        self.assertEqual(readAll(raw), b"")
        raw.close()
        self.assertEqual(self.server.endOf(1)["reason"], "client-closed")

    def test_keepaliveUnderTLS(self) -> None:
        """
        Keepalive is set on the TCP socket under the TLS layer too.
        """
        if shutil.which("ss") is None:
            raise self.skipTest("ss (iproute2) is not installed")
        sock, pid = self.connectWorker()

        def timers() -> str:
            # The keepalive timer shows once nothing is left to retransmit.
            return subprocess.run(
                ["ss", "-tno", "state", "established", f"( sport = :{self.server.port} )"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout

        wait(lambda: "timer:(keepalive" in timers(), 5)
        sock.close()
        waitGone([pid], 5)


class SocketActivationTests(TestCase):
    def test_systemdSocket(self) -> None:
        """
        systemd-socket-activate hands twistd its listening socket; workers
        do not inherit it; a close kills the worker; SIGTERM stops cleanly.
        """
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise self.skipTest("systemd-socket-activate is not installed (apt-get install systemd)")
        port = freePort()
        logPath = os.path.abspath(self.mktemp())
        worker = [
            sys.executable,
            "-c",
            "import os\n"
            "fds = [fd for fd in range(64) if os.path.exists(f'/proc/self/fd/{fd}')]\n"
            "print(os.getpid(), *fds, flush=True)\n"
            "os.execv('/bin/sleep', ['sleep', '100000'])\n",
        ]
        argv = [
            activate,
            "--fdname=closewatch",
            "-l",
            f"127.0.0.1:{port}",
            "-E",
            f"PYTHONPATH={ROOT}",
            "-E",
            f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
            *TWISTD,
            "-n",
            "--pidfile=",
            "--logger=twisted_closewatch.logs.jsonObserver",
            "closewatch",
            "--listen",
            "systemd:domain=INET:index=0",
            "--",
            *worker,
        ]
        with open(logPath, "w") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir()
            )
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait(10)))
        wait(lambda: listening(port), 10)
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        pid, *fds = (int(x) for x in readLine(sock, 30).split())
        self.assertEqual(fds, [0, 1, 2])
        sock.close()
        waitGone([pid], 5)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(30), 0)
        with open(logPath) as f:
            events = [json.loads(line) for line in f if line.startswith("{")]
        self.assertEqual([e["reason"] for e in events if "kill_latency_ms" in e], ["client-closed"])
