"""
The front doors end to end, as an attacker would try them: silent and
half-done TLS handshakes and PROXY headers, malformed headers, address rules
and the per-client rate from 127.0.0.x sources, unix socket modes, and
SIGHUP.  Real twistd, real sockets, real openssl certificates.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import time

from twisted.trial.unittest import TestCase

from tests.support import (
    DEFAULT_SIGNALS,
    Server,
    readAll,
    readLine,
    unixListening,
    unixSocketPath,
    wait,
    waitGone,
    workers,
)
from tests.test_production import makeCertificate, refusals, startServer

#: Says who it is and who the client is, then echoes its stdin.
ECHO_WORKER = ["/bin/sh", "-c", 'echo "$$ $TCPREMOTEIP $TCPREMOTEPORT"; exec cat']
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2Header(source: str, sourcePort: int, command: int = 0x21, family: int = 0x11) -> bytes:
    block = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", sourcePort, 8787)
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block


def connectFrom(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closedWithin(sock: socket.socket, seconds: float) -> float:
    """
    Read until the server closes C{sock} (a FIN or a reset); return how long
    that took, failing if it takes longer than C{seconds}.
    """
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {seconds} s")
    return time.monotonic() - started


def tcpState(sock: socket.socket) -> str | None:
    """
    The kernel's state of C{sock}'s connection, seen from /proc/net/tcp (hex,
    "01" is established), or C{None} once the connection is gone.
    """
    host, port = sock.getsockname()
    local = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local:
                return fields[3]
    return None


def clientTLSContext() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def assertCleanLog(test: TestCase, server: Server) -> None:
    output = server.output()
    test.assertNotIn("Traceback", output)
    test.assertNotIn("Unhandled", output)


class TLSGateTests(TestCase):
    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        keyPath, certPath = makeCertificate(directory)
        self.listen = f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        self.context = clientTLSContext()

    def connectTLS(self, server: Server) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        return self.context.wrap_socket(raw, server_hostname="localhost")

    def test_silentConnectionsHoldNoSlot(self) -> None:
        """
        Five silent TCP connections do not keep a TLS client from one of
        five workers.
        """
        server = startServer(self, ["--max-workers", "5"], listen=self.listen)
        silent = [server.connect() for _ in range(5)]
        time.sleep(0.3)
        self.assertEqual(workers(server.pid), [])
        sock = self.connectTLS(server)
        pid = int(readLine(sock))
        self.assertIn(pid, workers(server.pid))
        self.assertEqual(refusals(server), [])
        sock.close()
        waitGone([pid], 5)
        for s in silent:
            s.close()

    def test_handshakeTimeout(self) -> None:
        """
        A client that never completes its handshake is closed after
        --handshake-timeout, without a worker.
        """
        server = startServer(self, ["--handshake-timeout", "1"], listen=self.listen)
        silent = server.connect()
        half = server.connect()
        half.sendall(b"\x16\x03\x01\x00\xff")  # the start of a ClientHello
        for sock in (silent, half):
            self.assertLess(closedWithin(sock, 3), 2.5)
            sock.close()
        self.assertEqual(refusals(server), ["handshake-timeout"] * 2)
        self.assertEqual(server.ends(), [])
        assertCleanLog(self, server)

    def test_refusedClosedSoon(self) -> None:
        """
        A TLS client refused a worker (busy) is told so and closed within
        2 s, even though it never answers the server's close_notify.
        """
        server = startServer(
            self, ["--max-workers", "1", "--busy-message", r"busy\n"], listen=self.listen
        )
        held = self.connectTLS(server)
        pid = int(readLine(held))
        refused = self.connectTLS(server)
        started = time.monotonic()
        self.assertEqual(readAll(refused, 5), b"busy\n")
        wait(lambda: tcpState(refused) != "01", 2)
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(refusals(server), ["max-workers"])
        refused.close()
        held.close()
        waitGone([pid], 5)


class ProxyHeaderTests(TestCase):
    """
    A closewatch node behind the PROXY protocol, spoken by hand.
    """

    def setUp(self) -> None:
        self.server = startServer(self, command=ECHO_WORKER, listen="haproxy:tcp:0:interface=127.0.0.1")

    def test_partialHeaderTimeout(self) -> None:
        server = startServer(
            self, ["--handshake-timeout", "1"], listen="haproxy:tcp:0:interface=127.0.0.1"
        )
        partial = connectFrom(server.port)
        partial.sendall(V2_SIGNATURE + b"\x21\x11\x00")
        silent = connectFrom(server.port)
        for sock in (partial, silent):
            self.assertLess(closedWithin(sock, 3), 2.5)
            sock.close()
        self.assertEqual(refusals(server), ["handshake-timeout"] * 2)
        self.assertEqual(workers(server.pid), [])

    def test_keepaliveBeforeHeader(self) -> None:
        """
        Keepalive is on from accept, before any header has arrived.
        """
        if shutil.which("ss") is None:
            raise self.skipTest("ss (iproute2) is not installed")
        sock = connectFrom(self.server.port)
        query = ["ss", "-tno", "state", "established", f"( sport = :{self.server.port} )"]
        wait(
            lambda: "timer:(keepalive" in subprocess.run(
                query, capture_output=True, text=True, timeout=10, check=False
            ).stdout,
            5,
        )
        self.assertEqual(workers(self.server.pid), [])
        sock.close()

    def test_malformed(self) -> None:
        """
        Every malformed header is closed at once (not at the timeout), one
        warning each, without a worker or a traceback.
        """
        headers = [
            b"PROXY TCP4 999.1.2.3 127.0.0.1 1000 8787\r\n",
            b"PROXY TCP4 127.0.0.9 127.0.0.1 99999 8787\r\n",
            b"PROXY TCP4 127.0.0.9 127.0.0.1 -5 8787\r\n",
            b"PROXY TCP4 127.0.0.9 127.0.0.1 abc 8787\r\n",
            b"PROXY TCP4 127.0.0.9\n127.0.0.1 1000 8787\r\n",
            b"PROXY TCP4 127.0.0.9 127.0.0.1 1000 8787\x00\r\n",
            b"PROXY UNKNOWN " + b"x" * 120,
            b"GET / HTTP/1.0\r\n\r\n",
            v2Header("127.0.0.9", 1000, command=0x31),  # version 3
            v2Header("127.0.0.9", 1000, command=0x25),  # command 5
            v2Header("127.0.0.9", 1000, family=0x12),  # datagram
            V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x7f\x00\x00\x09",  # short block
            v2Header("127.0.0.9", 1000)[:14] + b"\x00\x10" + v2Header("127.0.0.9", 1000)[16:]
            + b"\x01\x00\x09",  # a TLV that overruns
        ]
        for header in headers:
            sock = connectFrom(self.server.port)
            sock.sendall(header + b"hello\n")
            self.assertLess(closedWithin(sock, 5), 2, header)
            sock.close()
        wait(lambda: len(refusals(self.server)) == len(headers), 5)
        self.assertEqual(refusals(self.server), ["bad-header"] * len(headers))
        self.assertEqual(workers(self.server.pid), [])
        self.assertEqual(self.server.ends(), [])
        warnings = [e for e in self.server.events() if e.get("reason") == "bad-header"]
        for event in warnings:
            self.assertNotIn("\n", event["detail"])
        assertCleanLog(self, self.server)
        self.assertIsNone(self.server.process.poll())

    def test_unknownServed(self) -> None:
        """
        PROXY UNKNOWN is served, with the connection's own address.
        """
        sock = connectFrom(self.server.port)
        sock.sendall(b"PROXY UNKNOWN\r\n")
        pid, ip, port = readLine(sock).split()
        self.assertEqual((ip.decode(), int(port)), sock.getsockname())
        sock.close()
        waitGone([int(pid)], 5)

    def test_byteByByte(self) -> None:
        """
        A v2 header sent one byte per segment is reassembled; the client's
        bytes sent with the header's last byte come first, in order.
        """
        sock = connectFrom(self.server.port)
        header = v2Header("192.0.2.7", 4242)
        for byte in header[:-1]:
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        sock.sendall(header[-1:] + b"first\n")
        sock.sendall(b"second\n")
        pid, ip, port = readLine(sock).split()
        self.assertEqual((ip, port), (b"192.0.2.7", b"4242"))
        self.assertEqual(readLine(sock) + readLine(sock), b"first\nsecond\n")
        sock.close()
        waitGone([int(pid)], 5)

    def test_v1WithData(self) -> None:
        sock = connectFrom(self.server.port)
        sock.sendall(b"PROXY TCP6 2001:db8::7 ::1 4242 8787\r\nhello\n")
        _, ip, port = readLine(sock).split()
        self.assertEqual((ip, port), (b"2001:db8::7", b"4242"))
        self.assertEqual(readLine(sock), b"hello\n")
        sock.close()


class AccessTests(TestCase):
    def test_allowDeny(self) -> None:
        """
        With --allow 127.0.0.0/30 --deny 127.0.0.2: 127.0.0.1 and .3 are
        served, .2 (denied) and .5 (not allowed) closed without a worker.
        """
        server = startServer(
            self, ["--allow", "127.0.0.0/30", "--deny", "127.0.0.2"], command=ECHO_WORKER
        )
        for source, served in (
            ("127.0.0.1", True),
            ("127.0.0.2", False),
            ("127.0.0.3", True),
            ("127.0.0.5", False),
        ):
            sock = connectFrom(server.port, source)
            if served:
                self.assertEqual(readLine(sock).split()[1].decode(), source)
            else:
                self.assertLess(closedWithin(sock, 5), 1)
            sock.close()
        self.assertEqual(refusals(server), ["denied", "denied"])
        self.assertEqual(len(wait(lambda: len(server.ends()) == 2 and server.ends())), 2)

    def test_behindProxy(self) -> None:
        """
        Behind the PROXY protocol the rules apply to the original client.
        """
        server = startServer(
            self,
            ["--deny", "192.0.2.0/24"],
            command=ECHO_WORKER,
            listen="haproxy:tcp:0:interface=127.0.0.1",
        )
        denied = connectFrom(server.port)
        denied.sendall(v2Header("192.0.2.7", 1000))
        self.assertLess(closedWithin(denied, 5), 1)
        allowed = connectFrom(server.port)
        allowed.sendall(v2Header("198.51.100.7", 1000))
        self.assertEqual(readLine(allowed).split()[1], b"198.51.100.7")
        self.assertEqual(refusals(server), ["denied"])
        denied.close()
        allowed.close()

    def test_ratePerPeer(self) -> None:
        """
        --max-rate-per-peer 2: a third connection within the second is
        refused; another client is not affected; a second later the first
        is served again.
        """
        server = startServer(self, ["--max-rate-per-peer", "2"], command=ECHO_WORKER)
        served = [connectFrom(server.port, "127.0.0.2") for _ in range(2)]
        for sock in served:
            self.assertTrue(readLine(sock))
        over = connectFrom(server.port, "127.0.0.2")
        self.assertLess(closedWithin(over, 5), 1)
        other = connectFrom(server.port, "127.0.0.3")
        self.assertTrue(readLine(other))
        time.sleep(1.1)
        again = connectFrom(server.port, "127.0.0.2")
        self.assertTrue(readLine(again))
        self.assertEqual(refusals(server), ["rate"])
        for sock in (*served, over, other, again):
            sock.close()

    def test_badNetwork(self) -> None:
        from tests.support import runTwistd

        for option, value in (("--allow", "10.0.0.1/8"), ("--deny", "not-an-ip")):
            result = runTwistd([option, value])
            output = result.stdout + result.stderr
            self.assertNotEqual(result.returncode, 0)
            self.assertNotIn("Traceback", output)
            self.assertIn(f"{option} {value!r}", output.strip().splitlines()[-1])


class UnixSocketModeTests(TestCase):
    def startUnix(self, description: str, path: str) -> Server:
        """
        A server on a unix socket, once it has served a client.
        """
        server = Server(listen=description)
        self.addCleanup(server.cleanup)
        wait(lambda: unixListening(path) or server.process.poll() is not None, 30)
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(path)
        pid = int(readLine(sock))
        sock.close()
        waitGone([pid], 5)
        return server

    def test_default0600(self) -> None:
        path = unixSocketPath(self)
        server = self.startUnix(f"unix:{path}", path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(server.stop(), 0)

    def test_modeHonoured(self) -> None:
        path = unixSocketPath(self)
        server = self.startUnix(f"unix:{path}:mode=660", path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        self.assertEqual(server.stop(), 0)

    def test_worldWritableAsRootWarns(self) -> None:
        if os.geteuid() != 0:
            raise self.skipTest("the warning is for a server running as root")
        path = unixSocketPath(self)
        server = self.startUnix(f"unix:{path}:mode=666", path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o666)
        wait(lambda: "world-writable" in server.output(), 10)
        self.assertEqual(server.stop(), 0)


class HangUpTests(TestCase):
    def test_sighup(self) -> None:
        """
        SIGHUP stops the server as SIGTERM does: every worker killed and
        reaped, a server-stopping end logged for each, exit status 0.
        """
        server = startServer(self, wrapper=DEFAULT_SIGNALS)
        held = [server.connectWorker() for _ in range(3)]
        pids = [pid for _, pid in held]
        server.process.send_signal(signal.SIGHUP)
        self.assertEqual(server.process.wait(30), 0)
        waitGone(pids, 5)
        ends = server.ends()
        self.assertEqual(sorted(e["pid"] for e in ends), sorted(pids))
        self.assertEqual({e["reason"] for e in ends}, {"server-stopping"})
        for sock, _ in held:
            sock.close()
