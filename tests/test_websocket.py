"""
C{--websocket} end to end: a real twistd, Twisted's own WebSocket client
(L{twisted.web.websocket.WebSocketClientEndpoint}) where an ordinary client
is wanted, and a raw one (L{tests.wsclient}) where the test must choose
exactly what goes on the wire (a close frame without a FIN, a reset, a
ping never answered).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import tempfile
import time
import urllib.request
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from wsproto.events import BytesMessage

from tests.support import (
    ROOT,
    Server,
    alive,
    outq,
    pidfdWaitGone,
    reset,
    rssKiB,
    runTwistd,
    wait,
    waitGone,
    workers,
)
from tests.test_production import makeCertificate
from tests.wsclient import RawWebSocket, Rejected

try:
    from twisted.web.websocket import WebSocketClientEndpoint
except ImportError:  # Twisted without the websocket extra
    WebSocketClientEndpoint = None  # type: ignore[assignment,misc]

#: Says who it is and who its child is (a grandchild of the server), then
#: echoes its stdin; the child sleeps, so only a group kill ends it.
FAMILY_WORKER = ["/bin/sh", "-c", "sleep 100000 & echo $$ $!; exec cat"]
#: Never reads its stdin.
DEAF_WORKER = ["/bin/sh", "-c", "echo $$; exec sleep 100000"]


def startServer(
    test: TestCase, args: list[str], command: list[str] | None = None, **kwargs: Any
) -> Server:
    server = Server(
        ["--websocket", *args],
        command if command is not None else FAMILY_WORKER,
        **kwargs,
    )
    test.addCleanup(server.cleanup)
    return server


def startTLSServer(test: TestCase, command: list[str] | None = None) -> tuple[Server, str]:
    """
    A server on C{ssl:} with a fresh certificate for localhost, and the
    certificate's path.
    """
    directory = tempfile.mkdtemp(prefix="closewatch-wss-")
    test.addCleanup(shutil.rmtree, directory, True)
    keyPath, certPath = makeCertificate(directory)
    server = startServer(
        test,
        [],
        command,
        listen=f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}",
    )
    server.port = wait(server._listeningPort, 30)
    return server, certPath


def assertClosingHandshake(test: TestCase, client: RawWebSocket, server: Server) -> None:
    """
    After its worker's exit: the server's close frame says 1000, the client
    answers, the server closes, and the end is C{worker-exited}.
    """
    test.assertEqual(client.closeCode, 1000)
    client.sendClose()
    with test.assertRaises(EOFError):
        client.receive()
    test.assertEqual(server.endOf(1)["reason"], "worker-exited")
    client.close()


def family(client: RawWebSocket) -> list[int]:
    line = client.receive()
    assert isinstance(line, str)
    return [int(pid) for pid in line.split()]


def endReasons(server: Server) -> list[str]:
    return [e["reason"] for e in server.ends()]


class _Collector:
    """
    A L{twisted.web.websocket.WebSocketProtocol} that keeps what arrives.
    """

    transport: Any = None

    def __init__(self) -> None:
        self.messages: list[str | bytes] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def negotiationStarted(self, transport: Any) -> None:
        self.transport = transport

    def negotiationFinished(self) -> None:
        pass

    def pongReceived(self, payload: bytes) -> None:
        pass

    def textMessageReceived(self, message: str) -> None:
        self.messages.append(message)

    def bytesMessageReceived(self, data: bytes) -> None:
        self.messages.append(bytes(data))

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.lost.callback(None)


class _Factory:
    def __init__(self) -> None:
        self.protocol = _Collector()

    def buildProtocol(self, url: str) -> _Collector:
        return self.protocol


async def eventually(predicate: Any, timeout: float = 10.0) -> Any:
    """
    Wait for C{predicate} without blocking the reactor.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        await task.deferLater(reactor, 0.01)


async def twistedClient(url: str, **kwargs: Any) -> _Collector:
    factory = _Factory()
    endpoint = WebSocketClientEndpoint.new(reactor, url, **kwargs)
    return await endpoint.connect(factory)


class TwistedClientTests(TestCase):
    """
    What an ordinary client sees, through Twisted's WebSocket client.
    """

    def setUp(self) -> None:
        if WebSocketClientEndpoint is None:
            raise SkipTest("Twisted's websocket extra (wsproto) is not installed")

    def test_sqlRoundTrip(self) -> defer.Deferred[None]:
        """
        The embedded SQL worker answers a query as one message per line;
        the client's close kills the worker.
        """
        directory = tempfile.mkdtemp(prefix="closewatch-ws-")
        self.addCleanup(shutil.rmtree, directory, True)
        server = startServer(self, [], command=[], cwd=directory)

        async def run() -> None:
            client = await twistedClient(f"ws://127.0.0.1:{server.port}/")
            client.transport.sendTextMessage("select 40+2")
            await eventually(lambda: len(client.messages) >= 2)
            self.assertEqual(client.messages[0], "[42]")
            self.assertIn('"ok": true', client.messages[1])
            [pid] = workers(server.pid)
            client.transport.loseConnection()
            await client.lost
            await eventually(lambda: not alive(pid), 5)
            end = server.endOf(1)
            # Twisted's client sends its close frame and its FIN together:
            # whichever the server sees first names the end.
            self.assertIn(end["reason"], ("websocket-closed", "client-closed"))
            self.assertIsNotNone(end["kill_latency_ms"])

        return defer.ensureDeferred(run())

    def test_framingBothWays(self) -> defer.Deferred[None]:
        """
        A text message is a line on the worker's stdin, each output line a
        message without its newline (or CRLF); a message with newlines is
        several lines.
        """
        server = startServer(self, [], command=["/bin/sh", "-c", "exec sed -u 's/$/\\r/'"])

        async def run() -> None:
            client = await twistedClient(f"ws://127.0.0.1:{server.port}/")
            client.transport.sendTextMessage("one")
            client.transport.sendTextMessage("two\nthree")
            client.transport.sendTextMessage("")
            client.transport.sendTextMessage("ünïcødé ✓")
            await eventually(lambda: len(client.messages) >= 5)
            self.assertEqual(client.messages, ["one", "two", "three", "", "ünïcødé ✓"])
            client.transport.loseConnection()
            await client.lost

        return defer.ensureDeferred(run())

    def test_binary(self) -> defer.Deferred[None]:
        """
        C{--binary}: bytes both ways as binary messages, nothing added.
        """
        server = startServer(self, ["--binary"], command=["/bin/cat"])
        payload = bytes(range(256)) * 4

        async def run() -> None:
            client = await twistedClient(f"ws://127.0.0.1:{server.port}/")
            client.transport.sendBytesMessage(payload)
            await eventually(lambda: sum(len(m) for m in client.messages) >= len(payload))
            self.assertTrue(all(isinstance(m, bytes) for m in client.messages))
            self.assertEqual(b"".join(client.messages), payload)  # type: ignore[arg-type]
            client.transport.loseConnection()
            await client.lost

        return defer.ensureDeferred(run())

    def test_wss(self) -> defer.Deferred[None]:
        """
        Over TLS: the worker sees C{HTTPS=on}, and a client that drops the
        connection (no close frame, no close_notify) takes it along.
        """
        from twisted.internet.ssl import Certificate
        from twisted.web.client import BrowserLikePolicyForHTTPS

        server, certPath = startTLSServer(self, ["/bin/sh", "-c", 'echo "$$ $HTTPS"; exec cat'])
        with open(certPath, "rb") as f:
            policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(f.read()))

        async def run() -> None:
            client = await twistedClient(f"wss://localhost:{server.port}/", tlsPolicy=policy)
            await eventually(lambda: client.messages)
            pid, https = str(client.messages[0]).split()
            self.assertEqual(https, "on")
            client.transport.sendTextMessage("secret")
            await eventually(lambda: len(client.messages) >= 2)
            self.assertEqual(client.messages[1], "secret")
            client.transport.transport.abortConnection()
            await client.lost
            await eventually(lambda: not alive(int(pid)), 5)
            self.assertEqual(server.endOf(1)["reason"], "client-reset")

        return defer.ensureDeferred(run())

    def test_wssWorkerExit(self) -> None:
        """
        Over TLS too, a worker's exit is its output, then a close frame 1000.
        """
        server, certPath = startTLSServer(self, ["/bin/sh", "-c", "echo bye"])
        client = RawWebSocket(server.port, tls=ssl.create_default_context(cafile=certPath))
        self.assertEqual(client.messagesUntilClose(), ["bye"])
        assertClosingHandshake(self, client, server)

    def test_tlsTruncation(self) -> None:
        """
        A FIN under TLS without a close_notify (nor a close frame) kills;
        TLS calls it a truncation, logged as a reset as without
        C{--websocket}.
        """
        server, certPath = startTLSServer(self)
        context = ssl.create_default_context(cafile=certPath)
        client = RawWebSocket(server.port, tls=context)
        pids = family(client)
        client.sock.shutdown(socket.SHUT_WR)
        waitGone(pids, 5)
        self.assertEqual(server.endOf(1)["reason"], "client-reset")
        client.close()


class KillTests(TestCase):
    """
    Every way a WebSocket client leaves kills its worker's group at once.
    """

    def test_closeFrame(self) -> None:
        """
        A close frame alone (the TCP connection left open, as browsers do)
        kills the group; the server answers it with its own close frame.
        """
        server = startServer(self, [])
        client = RawWebSocket(server.port)
        pids = family(client)
        client.sendClose(1001)
        self.assertTrue(pidfdWaitGone(pids[0], 5))
        waitGone(pids, 5)
        self.assertEqual(client.messagesUntilClose(), [])
        self.assertEqual(client.closeCode, 1000)
        end = server.endOf(1)
        self.assertEqual(end["reason"], "websocket-closed")
        self.assertEqual(end["exit_signal"], 9)
        client.close()

    def test_fin(self) -> None:
        server = startServer(self, [])
        client = RawWebSocket(server.port)
        pids = family(client)
        client.sock.shutdown(socket.SHUT_WR)
        waitGone(pids, 5)
        self.assertEqual(server.endOf(1)["reason"], "client-closed")
        client.close()

    def test_reset(self) -> None:
        server = startServer(self, [])
        client = RawWebSocket(server.port)
        pids = family(client)
        reset(client.sock)
        waitGone(pids, 5)
        self.assertEqual(server.endOf(1)["reason"], "client-reset")

    def test_missedPong(self) -> None:
        """
        Under C{--heartbeat}, a client that does not answer a ping within
        the interval is dead (its kernel still acknowledges everything: only
        a pong proves the client itself alive); one that answers stays.
        """
        # An interval the answering client's pong makes in time even on a
        # loaded machine (it is blocked in recv, waiting for the ping).
        server = startServer(self, ["--heartbeat", "0.5"])
        deaf = RawWebSocket(server.port)
        pids = family(deaf)
        started = time.monotonic()
        # From now on this client reads nothing, so it answers no ping.
        waitGone(pids, 5)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(server.endOf(1)["reason"], "ping-timeout")
        deaf.close()

        live = RawWebSocket(server.port)
        livePIDs = family(live)
        # Reading (RawWebSocket answers the pings it reads) for four intervals.
        with self.assertRaises(TimeoutError):
            live.receive(timeout=2.0)
        self.assertTrue(all(alive(p) for p in livePIDs))
        live.close()
        waitGone(livePIDs, 5)

    def test_workerExit(self) -> None:
        """
        A worker that exits: its output, the last line without a newline
        too, then a close frame with 1000.
        """
        server = startServer(self, [], command=["/bin/sh", "-c", "echo one; printf two"])
        client = RawWebSocket(server.port)
        self.assertEqual(client.messagesUntilClose(), ["one", "two"])
        assertClosingHandshake(self, client, server)

    def test_closeWhilePaused(self) -> None:
        """
        A worker that does not read pauses the client; the close watch still
        sees its FIN.
        """
        server = startServer(self, ["--read-ahead", "64k"], command=DEAF_WORKER)
        client = RawWebSocket(server.port)
        pid = int(client.receive())
        # The worker's pipe, the read-ahead and more, in frames, each step
        # acknowledged by the server's kernel: the relay is paused, and
        # nothing is left in the client's queue to hold its FIN back.
        stream = b"".join(client.ws.send(BytesMessage(b"x" * 65536)) for _ in range(20))
        step = 16 * 1024
        for offset in range(0, len(stream), step):
            client.sock.sendall(stream[offset : offset + step])
            wait(lambda: outq(client.sock) == 0, 10, 0.002)
        client.sock.close()
        waitGone([pid], 5)
        self.assertEqual(server.endOf(1)["reason"], "client-closed")

    def test_clientNotReading(self) -> None:
        """
        A client that does not read pauses the worker: the server's memory
        stays bounded while a worker writes without end.
        """
        server = startServer(self, [], command=["/usr/bin/yes", "closewatch " * 50])
        client = RawWebSocket(server.port)
        client.receive()
        before = rssKiB(server.pid)
        time.sleep(1.5)
        self.assertLess(rssKiB(server.pid) - before, 32 * 1024)
        [pid] = workers(server.pid)
        with open(f"/proc/{pid}/stat") as f:
            self.assertEqual(f.read().rpartition(")")[2].split()[0], "S")
        reset(client.sock)
        waitGone([pid], 5)


class MessageTests(TestCase):
    def test_oversized(self) -> None:
        """
        A message over C{--max-message}: close code 1009, worker killed.
        """
        server = startServer(self, ["--max-message", "1000"])
        client = RawWebSocket(server.port)
        pids = family(client)
        client.send("x" * 1000)
        self.assertEqual(client.receive(), "x" * 1000)
        client.send("y" * 1001)
        self.assertEqual(client.messagesUntilClose(), [])
        self.assertEqual(client.closeCode, 1009)
        waitGone(pids, 5)
        self.assertEqual(server.endOf(1)["reason"], "websocket-error")
        client.close()

    def test_longLineAndBadUTF8(self) -> None:
        """
        A worker line longer than C{--max-message} is split into messages of
        at most that many bytes, at character boundaries; output that is not
        UTF-8 arrives with U+FFFD in place and is logged once.
        """
        worker = (
            "printf '%0999d\\303\\251%0500d\\n' 0 0; "
            "printf 'bad \\377 one\\nbad \\376 two\\n'; exec sleep 100000"
        )
        server = startServer(self, ["--max-message", "1000"], command=["/bin/sh", "-c", worker])
        client = RawWebSocket(server.port)
        first, second = client.receive(), client.receive()
        self.assertEqual((len(str(first).encode()), first), (999, "0" * 999))
        self.assertEqual(second, "é" + "0" * 500)
        self.assertEqual([client.receive(), client.receive()], ["bad \ufffd one", "bad \ufffd two"])
        errors = [e for e in server.events() if "not UTF-8" in e.get("text", "")]
        self.assertEqual(len(errors), 1)
        splits = [e for e in server.events() if "longer than" in e.get("text", "")]
        self.assertEqual(len(splits), 1)
        client.close()


class AdmissionTests(TestCase):
    def test_origin(self) -> None:
        """
        A page from another origin is refused (403, no worker); the
        server's own pages, C{--allow-origin} ones and clients that send
        no Origin are let through.
        """
        server = startServer(self, ["--allow-origin", "https://app.example"])
        with self.assertRaises(Rejected) as refused:
            RawWebSocket(server.port, headers=[("Origin", "http://evil.example")])
        self.assertEqual(refused.exception.status, 403)
        self.assertEqual(workers(server.pid), [])
        for origin in (
            f"http://127.0.0.1:{server.port}",
            "https://app.example:443",
            None,
        ):
            client = RawWebSocket(server.port, headers=[("Origin", origin)] if origin else [])
            pids = family(client)
            client.close()
            waitGone(pids, 5)
        self.assertEqual([e["reason"] for e in server.events() if e.get("refused")], ["origin"])

    def test_busy(self) -> None:
        """
        At C{--max-workers}, an upgrade is answered 503 without a worker;
        the slot is taken at the upgrade, not by the HTTP connection.
        """
        server = startServer(self, ["--max-workers", "1"])
        page = socket.create_connection(("127.0.0.1", server.port))
        first = RawWebSocket(server.port)
        pids = family(first)
        with self.assertRaises(Rejected) as refused:
            RawWebSocket(server.port)
        self.assertEqual(refused.exception.status, 503)
        first.close()
        waitGone(pids, 5)
        wait(lambda: len(server.ends()) == 1)
        again = RawWebSocket(server.port)
        family(again)
        again.close()
        page.close()

    def test_httpTimeout(self) -> None:
        """
        An HTTP connection that sends no request is closed after
        C{--handshake-timeout}; a WebSocket is not, however quiet.
        """
        server = startServer(self, ["--handshake-timeout", "0.3"])
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        client = RawWebSocket(server.port)
        pids = family(client)
        self.assertEqual(silent.recv(1), b"")
        time.sleep(1)
        client.send("still here")
        self.assertEqual(client.receive(), "still here")
        self.assertTrue(all(alive(p) for p in pids))
        client.close()
        silent.close()

    def test_environment(self) -> None:
        """
        The CGI-style variables, with header values cleaned and no
        C{HTTP_PROXY}.
        """
        names = [
            "REMOTE_ADDR",
            "REMOTE_PORT",
            "REQUEST_URI",
            "PATH_INFO",
            "QUERY_STRING",
            "HTTP_X_TEST",
            "HTTP_USER_AGENT",
            "HTTP_PROXY",
            "HTTPS",
            "TCPREMOTEIP",
            "PROTO",
        ]
        script = "for n in " + " ".join(names) + '; do eval "echo $n=\\${$n-unset}"; done; exec cat'
        server = startServer(self, [], command=["/bin/sh", "-c", script])
        client = RawWebSocket(
            server.port,
            target="/some%20where/x?a=1&b=%20",
            headers=[
                ("X-Test", "one"),
                ("X-Test", "two"),
                ("User-Agent", "t\tua"),
                ("Proxy", "http://evil:1"),
            ],
        )
        env = dict(str(client.receive()).split("=", 1) for _ in names)
        port = client.sock.getsockname()[1]
        self.assertEqual(
            env,
            {
                "REMOTE_ADDR": "127.0.0.1",
                "REMOTE_PORT": str(port),
                "REQUEST_URI": "/some%20where/x?a=1&b=%20",
                "PATH_INFO": "/some where/x",
                "QUERY_STRING": "a=1&b=%20",
                "HTTP_X_TEST": "one, two",
                "HTTP_USER_AGENT": "tua",
                "HTTP_PROXY": "unset",
                "HTTPS": "unset",
                "TCPREMOTEIP": "127.0.0.1",
                "PROTO": "TCP",
            },
        )
        client.close()

    def test_proxyAndMetrics(self) -> None:
        """
        Behind the PROXY protocol the worker sees the original client; the
        end reasons and refusals are counted in the metrics.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            metricsPort = probe.getsockname()[1]
        server = startServer(
            self,
            ["--metrics", f"tcp:{metricsPort}:interface=127.0.0.1"],
            command=["/bin/sh", "-c", 'echo "$$ $REMOTE_ADDR $REMOTE_PORT"; exec cat'],
            listen="haproxy:tcp:0:interface=127.0.0.1",
        )
        server.port = wait(lambda: _ports(server) - {metricsPort}, 30).pop()
        client = RawWebSocket(server.port, prelude=b"PROXY TCP4 192.0.2.7 127.0.0.1 4242 80\r\n")
        pid, addr, port = str(client.receive()).split()
        self.assertEqual((addr, port), ("192.0.2.7", "4242"))
        client.sendClose()
        waitGone([int(pid)], 5)
        with self.assertRaises(Rejected):
            RawWebSocket(
                server.port,
                prelude=b"PROXY TCP4 192.0.2.8 127.0.0.1 4243 80\r\n",
                headers=[("Origin", "http://evil.example")],
            )
        wait(server.ends)
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=10)
            .read()
            .decode()
        )
        self.assertIn('closewatch_worker_ends_total{reason="websocket-closed"} 1.0', body)
        self.assertIn('closewatch_connections_refused_total{reason="origin"} 1.0', body)


def _ports(server: Server) -> set[int]:
    found = set()
    for event in server.events():
        match = re.search(r"starting on (\d+)$", event.get("text", ""))
        if match:
            found.add(int(match.group(1)))
    return found


class PageTests(TestCase):
    def test_console(self) -> None:
        """
        GET / without an upgrade is the console page; other paths are 404.
        """
        server = startServer(self, [])
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10) as page:
            self.assertEqual(page.headers["content-type"], "text/html; charset=utf-8")
            self.assertIn(b"new WebSocket(", page.read())
        with self.assertRaises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nothing", timeout=10)
        self.assertEqual(missing.exception.code, 404)
        self.assertEqual(workers(server.pid), [])

    def test_static(self) -> None:
        """
        C{--static DIR} serves its files instead, without directory listings.
        """
        directory = tempfile.mkdtemp(prefix="closewatch-static-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.mkdir(os.path.join(directory, "sub"))
        with open(os.path.join(directory, "index.html"), "w") as f:
            f.write("<p>mine</p>")
        server = startServer(self, ["--static", directory])
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10) as page:
            self.assertEqual(page.read(), b"<p>mine</p>")
        with self.assertRaises(urllib.error.HTTPError) as listing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/sub/", timeout=10)
        self.assertEqual(listing.exception.code, 403)
        client = RawWebSocket(server.port, target="/sub/")
        family(client)
        client.close()

    def test_optionErrors(self) -> None:
        """
        Options that contradict C{--websocket}, or need it, are one-line
        errors at start-up.
        """
        for args, message in (
            (["--binary"], "--binary needs --websocket"),
            (
                ["--websocket", "--half-close", "forward"],
                "--half-close forward does not apply",
            ),
            (["--websocket", "--allow-origin", "evil"], "--allow-origin 'evil'"),
            (["--websocket", "--static", ROOT + "/nothing"], "not a directory"),
        ):
            result = runTwistd([*args, "--", "/bin/cat"])
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(message, result.stderr + result.stdout)
            self.assertNotIn("Traceback", result.stderr + result.stdout)
