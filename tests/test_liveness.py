"""
Dead, silent and slow clients: TCP keepalive, TCP_USER_TIMEOUT, the idle
timeout and the heartbeat, against a real server with real workers.

A dead peer is made with loopback only: each dead-peer scenario runs in its
own network namespace (C{unshare -n}) holding the server and the client, and
C{ip link set lo down} cuts every packet both ways (no FIN, no RST, no
keepalive answer).  Those need root, C{unshare} and C{ip}; without them they
are skipped with the reason.  The namespace scenarios run all at once, in
parallel, the first time a test needs them (see L{scenarioResults}); each
test then checks its own.

This module is also the scenario runner: C{python -m tests.test_liveness
SPEC} (from the project root, inside C{unshare -n} for a dead peer) runs one
scenario and prints its result as JSON.  C{bench/deadpeer_bench.py} uses it.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.python import usage
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import (
    PID_WORKER,
    ROOT,
    Server,
    alive,
    pidfdWaitGone,
    reset,
    runTwistd,
    wait,
    waitGone,
)
from twisted_closewatch import tcp
from twisted_closewatch.config import Config
from twisted_closewatch.options import Options

#: A worker that says who it is, then writes as fast as it is let.
YES_WORKER = ["/bin/sh", "-c", "echo $$; exec yes"]

#: A worker that reads its stdin to the end, then computes in silence.
HALF_CLOSE_WORKER = ["/bin/sh", "-c", "echo $$; cat >/dev/null; exec sleep 100000"]

#: Keepalive that gives up on a silent peer after 1 + 2 * 1 = 3 s.
FAST_KEEPALIVE = ["--keepalive-idle", "1", "--keepalive-interval", "1", "--keepalive-count", "2"]


# The scenario runner.


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


class _Client:
    """
    What a scenario's client does once it has read the worker's PID line:

      - C{idle}: nothing;
      - C{reader}: reads everything, as fast as it comes;
      - C{backlog}: sends until the server stops reading (the worker never
        reads its stdin, so the relay pauses the client), then nothing;
      - C{slow}: a backlog, then reads 16 KiB every 0.1 s;
      - C{half-closed}: C{shutdown(SHUT_WR)}, then nothing.
    """

    def __init__(self, sock: socket.socket, kind: str) -> None:
        self.sock = sock
        self.kind = kind
        self.received = 0
        self.sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if kind in ("backlog", "slow"):
            self.sent = _sendUntilBlocked(sock)
        if kind == "half-closed":
            sock.shutdown(socket.SHUT_WR)
        if kind in ("reader", "slow"):
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.2)
        size, pause = (16384, 0.1) if self.kind == "slow" else (65536, 0)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(size)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.received += len(data)
            if pause:
                self._stop.wait(pause)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


def _sendUntilBlocked(sock: socket.socket, stall: float = 0.5, limit: float = 20.0) -> int:
    """
    Send until nothing more goes for C{stall} seconds; return the bytes sent.
    """
    sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if not select.select([], [sock], [], stall)[1]:
                return sent
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                pass
        raise AssertionError(f"the server never stopped reading ({sent} bytes sent)")
    finally:
        sock.setblocking(True)


def runScenario(spec: Mapping[str, Any]) -> dict[str, Any]:
    """
    Run one scenario in this process's network namespace; see
    L{scenarioResults} for C{spec}.

    @return: C{elapsed} (seconds from the cut, or from the setup when there
        is no cut, to the worker's exit; C{None} if it outlived C{watch}),
        C{reason} (the end event's reason), C{alive} (the worker at the
        end), C{received}/C{sent} (client bytes), C{log} (on surprises).
    """
    if "raw" in spec:
        return rawLoss(spec["raw"], spec["mode"])
    if spec.get("netns"):
        _ip("link", "set", "lo", "up")
    server = Server(spec.get("args", ()), spec.get("command", PID_WORKER))
    result: dict[str, Any] = {"elapsed": None, "reason": None}
    pid = client = None
    try:
        sock, pid = server.connectWorker()
        client = _Client(sock, spec.get("client", "idle"))
        time.sleep(spec.get("settle", 0.2))
        if spec.get("poke"):
            # The client's last packet: what the timers count from.
            sock.send(b"\n")
            time.sleep(0.05)
        if spec.get("netns"):
            _ip("link", "set", "lo", "down")
        started = time.monotonic()
        receivedBefore = client.received
        if pidfdWaitGone(pid, spec.get("watch", 15)):
            result["elapsed"] = round(time.monotonic() - started, 3)
            end = wait(lambda: [e for e in server.ends() if e["pid"] == pid], 10)[0]
            result["reason"] = end["reason"]
        result["alive"] = alive(pid)
        result["received"] = client.received - receivedBefore
        result["sent"] = client.sent
        if result["reason"] != spec.get("expect"):
            result["log"] = server.output()[-4000:]
    finally:
        if client is not None:
            client.stop()
        server.cleanup()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    return result


def netnsUnavailable() -> str | None:
    """
    Why dead-peer scenarios cannot run here, or C{None} if they can.
    """
    if not sys.platform.startswith("linux"):
        return "dead-peer scenarios need Linux network namespaces"
    if os.geteuid() != 0:
        return "dead-peer scenarios need root for a private network namespace (unshare -n)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"dead-peer scenarios need the {tool!r} command"
    try:
        probe = subprocess.run(
            ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare -n failed: {e}"
    if probe.returncode:
        return f"unshare -n failed: {probe.stderr.decode(errors='replace').strip()}"
    return None


def runScenarios(specs: Mapping[str, Mapping[str, Any]], timeout: float = 60) -> dict[str, Any]:
    """
    Run every scenario of C{specs} at once, each in a subprocess (in a
    network namespace of its own when it has C{netns}); return each one's
    result, or C{{"error": ...}}.
    """
    processes = {}
    for name, spec in specs.items():
        argv = [sys.executable, "-m", "tests.test_liveness", json.dumps(spec)]
        if spec.get("netns") or "raw" in spec:
            argv = ["unshare", "-n", *argv]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        processes[name] = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    for name, process in processes.items():
        try:
            out, err = process.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            results[name] = {"error": f"timed out: {err[-2000:]}"}
            continue
        try:
            results[name] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            results[name] = {"error": f"exit {process.returncode}: {out[-1000:]} {err[-3000:]}"}
    return results


# Raw sockets: what lossReason makes of each kind of death.


def rawLoss(death: str, mode: str) -> dict[str, Any]:
    """
    Kill a loopback TCP connection one way (in a namespace of one's own),
    and ask L{tcp.lossReason} why, from a duplicate of the server's
    socket, after the original was closed.

    @param death: C{rst} (the peer resets), C{keepalive} (lo down, idle),
        C{user-timeout} (lo down, unacknowledged data), C{zero-window} (lo
        down, the peer's window closed with data queued), C{rst-probe} (the
        peer's RST answers a keepalive probe: a rebooted peer),
        C{rst-retransmit} (its RST answers a retransmission).
    @param mode: C{consumed}: C{recv} on the socket gets the error first,
        as Twisted's does; C{paused}: nothing reads it (a paused relay) and
        an epoll watch sees the error, as the close watch does.
    """
    _ip("link", "set", "lo", "up")
    userTimeout = {"user-timeout": 2, "zero-window": 2, "rst-retransmit": 30}.get(death, 0)
    config = Config(
        argv=("/bin/true",),
        keepaliveIdle=1,
        keepaliveInterval=1,
        keepaliveCount=2,
        userTimeout=userTimeout,
    )
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    if death == "zero-window":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    for level, name, value in tcp.socketOptions(config):
        server.setsockopt(level, name, value)
    server.setblocking(False)
    probe = server.dup()
    if death == "zero-window":
        try:
            while True:
                server.send(b"z" * 65536)
        except BlockingIOError:
            pass
    if mode == "paused":
        client.sendall(b"y" * 1000)  # left unread, as behind a paused relay
    time.sleep(0.2)
    started = time.monotonic()
    if death == "rst":
        reset(client)
    else:
        _ip("link", "set", "lo", "down")
    if death in ("user-timeout", "rst-retransmit"):
        server.send(b"w" * 1000)
    if death in ("rst-probe", "rst-retransmit"):
        time.sleep(1.5)  # a probe or two retransmissions go unanswered
        reset(client)  # the RST is lost: lo is down
        _ip("link", "set", "lo", "up")  # the next probe gets an RST
    watch = select.epoll()
    if mode == "consumed":
        watch.register(server.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    else:
        watch.register(probe.fileno(), select.EPOLLRDHUP)
    events = watch.poll(15)
    elapsed = time.monotonic() - started
    error = None
    if mode == "consumed":
        try:
            while server.recv(65536):
                pass
        except OSError as e:
            error = errno.errorcode.get(e.errno, e.errno)
    server.close()
    return {
        "reason": tcp.lossReason(probe, config) if events else None,
        "elapsed": round(elapsed, 3),
        "recvError": error,
    }


# The dead-peer scenarios, run together once.

_DEAD_PEER: dict[str, dict[str, Any]] = {
    # lo down on an idle connection: keepalive alone (no user timeout).
    "keepalive": {
        "netns": True,
        "args": [*FAST_KEEPALIVE, "--user-timeout", "0"],
        "expect": "keepalive",
    },
    # The three keepalive options alone: the user timeout follows them
    # (1 + 1 * 2 = 3 s) instead of overriding the count.
    "keepalive-only": {
        "netns": True,
        "args": FAST_KEEPALIVE,
        "expect": "keepalive",
    },
    # The same while the relay is paused: the close watch sees the error.
    "keepalive-paused": {
        "netns": True,
        "args": [*FAST_KEEPALIVE, "--user-timeout", "0", "--read-ahead", "64k"],
        "client": "backlog",
        "expect": "keepalive",
    },
    # With a user timeout, Linux ignores the probe count: 1 + 1 * 1 = 2 s
    # by count, 4 s by the user timeout.
    "keepalive-user-timeout": {
        "netns": True,
        "args": [
            "--keepalive-idle", "1", "--keepalive-interval", "1",
            "--keepalive-count", "1", "--user-timeout", "4",
        ],
        "expect": "keepalive",
    },
    # The worker keeps writing to a client that is gone.
    "user-timeout": {
        "netns": True,
        "args": ["--user-timeout", "2"],
        "command": YES_WORKER,
        "client": "reader",
        "expect": "user-timeout",
    },
    # A silent worker's heartbeat goes unacknowledged.
    "heartbeat": {
        "netns": True,
        "args": ["--user-timeout", "2", "--heartbeat", "0.5"],
        "expect": "user-timeout",
    },
    # Under --half-close forward Twisted stops reading at the FIN; the
    # close watch still sees a dead client while the worker is silent.
    "keepalive-half-closed": {
        "netns": True,
        "args": [*FAST_KEEPALIVE, "--user-timeout", "0", "--half-close", "forward"],
        "command": HALF_CLOSE_WORKER,
        "client": "half-closed",
        "expect": "keepalive",
    },
    "half-closed-live": {
        "args": [*FAST_KEEPALIVE, "--user-timeout", "0", "--half-close", "forward"],
        "command": HALF_CLOSE_WORKER,
        "client": "half-closed",
        "watch": 5,
        "expect": None,
    },
    # Control: neither keepalive nor a user timeout, nothing is found.
    "undetected": {
        "netns": True,
        "args": ["--no-keepalive", "--user-timeout", "0"],
        "watch": 4,
        "expect": None,
    },
    # Live but slow clients, lo up: a paused relay and a client reading
    # slowly from a flooding worker, and a paused relay with a silent
    # worker, where keepalive probes the client and must get answers.
    "slow-flood": {
        "args": [*FAST_KEEPALIVE, "--user-timeout", "0", "--read-ahead", "64k"],
        "command": YES_WORKER,
        "client": "slow",
        "watch": 5,
        "expect": None,
    },
    "slow-silent": {
        "args": [*FAST_KEEPALIVE, "--user-timeout", "0", "--read-ahead", "64k"],
        "client": "backlog",
        "watch": 5,
        "expect": None,
    },
}
_RAW = {
    f"raw {death} {mode}": {"raw": death, "mode": mode}
    for death in ("rst", "keepalive", "user-timeout", "zero-window", "rst-probe", "rst-retransmit")
    for mode in ("consumed", "paused")
}

_results: dict[str, Any] | None = None


def scenarioResults() -> dict[str, Any]:
    """
    The results of all dead-peer scenarios, run (in parallel, about 6 s) by
    the first test that asks; skips when namespaces are unavailable.

    A spec: C{args} and C{command} for the server; C{client} (see
    L{_Client}); C{netns} to cut lo after the setup; C{watch}: seconds to
    wait for the worker's exit; C{expect}: the reason expected (for the
    diagnostic log in the result).
    """
    global _results
    reason = netnsUnavailable()
    if reason is not None:
        raise SkipTest(reason)
    if _results is None:
        _results = runScenarios({**_DEAD_PEER, **_RAW})
    return _results


class DeadPeerTests(TestCase):
    """
    A client that vanished without a FIN or an RST is found and its worker
    killed, with the right reason; a live client is left alone.
    """

    def result(self, name: str) -> dict[str, Any]:
        result = scenarioResults()[name]
        self.assertNotIn("error", result, result.get("error"))
        return result

    def assertGone(self, name: str, reason: str, low: float, high: float) -> None:
        result = self.result(name)
        self.assertEqual(result["reason"], reason, result.get("log"))
        self.assertIsNotNone(result["elapsed"], result.get("log"))
        self.assertGreaterEqual(result["elapsed"], low)
        self.assertLessEqual(result["elapsed"], high)

    def test_keepaliveIdle(self) -> None:
        """
        An idle dead client is dropped by keepalive after idle + count *
        interval (3 s) of silence.
        """
        self.assertGone("keepalive", "keepalive", 1.5, 4.5)

    def test_keepaliveOptionsAlone(self) -> None:
        """
        With only the three keepalive options given, they act as set: the
        user timeout derived from them does not hold the dead client longer
        than idle + count * interval (3 s).
        """
        self.assertGone("keepalive-only", "keepalive", 1.5, 3.5)

    def test_keepalivePaused(self) -> None:
        """
        The same while the relay is paused and nothing is read or written:
        the close watch sees the socket error.
        """
        result = self.result("keepalive-paused")
        self.assertGreater(result["sent"], 64 * 1024)
        self.assertGone("keepalive-paused", "keepalive", 1.0, 4.5)

    def test_userTimeoutOverridesCount(self) -> None:
        """
        With TCP_USER_TIMEOUT set, Linux ignores the keepalive count: the
        peer goes at the first probe at or after the user timeout (4 s), not
        after idle + count * interval (2 s), and the reason is keepalive.
        """
        config = Config(keepaliveIdle=1, keepaliveInterval=1, keepaliveCount=1, userTimeout=4)
        self.assertEqual(tcp.keepaliveDeadline(config), 4)
        self.assertGone("keepalive-user-timeout", "keepalive", 3.0, 5.5)

    def test_userTimeout(self) -> None:
        """
        A worker writing to a dead client: its data stays unacknowledged and
        the user timeout (2 s) drops the client.
        """
        self.assertGone("user-timeout", "user-timeout", 1.5, 4.0)

    def test_heartbeatFindsDeadClient(self) -> None:
        """
        A silent worker's client is found dead by the heartbeat the user
        timeout then sees unacknowledged (0.5 s + 2 s), long before the 60 s
        of keepalive.
        """
        self.assertGone("heartbeat", "user-timeout", 1.5, 4.5)

    def test_halfClosedClient(self) -> None:
        """
        Under --half-close forward, a client that sent its FIN and then died
        is found by keepalive while the worker computes in silence; one that
        lives on is left alone.
        """
        self.assertGone("keepalive-half-closed", "keepalive", 1.5, 4.5)
        result = self.result("half-closed-live")
        self.assertIsNone(result["elapsed"], result.get("log"))
        self.assertTrue(result["alive"])

    def test_undetectedWithoutTimers(self) -> None:
        """
        The control: with keepalive and the user timeout off, nothing finds
        the dead client.
        """
        result = self.result("undetected")
        self.assertIsNone(result["elapsed"])
        self.assertTrue(result["alive"])

    def test_slowClientsLive(self) -> None:
        """
        Live clients with paused relays, reading slowly or not at all, are
        never dropped by keepalive (which would take 3 s if it failed them).
        """
        for name in ("slow-flood", "slow-silent"):
            result = self.result(name)
            self.assertIsNone(result["elapsed"], f"{name}: {result.get('log')}")
            self.assertTrue(result["alive"], name)
            self.assertGreater(result["sent"], 64 * 1024, name)
        self.assertGreater(self.result("slow-flood")["received"], 64 * 1024)


class LossReasonTests(TestCase):
    """
    L{tcp.lossReason} on raw loopback sockets, for each death, both
    when C{recv} consumed the error (Twisted reading) and when it did not
    (the close watch of a paused relay).
    """

    expected = {
        "rst": "client-reset",
        "keepalive": "keepalive",
        "user-timeout": "user-timeout",
        "zero-window": "user-timeout",
        "rst-probe": "client-reset",
        "rst-retransmit": "client-reset",
    }

    def test_reasons(self) -> None:
        results = scenarioResults()
        wrong = {}
        for death, reason in self.expected.items():
            for mode in ("consumed", "paused"):
                result = results[f"raw {death} {mode}"]
                if result.get("reason") != reason:
                    wrong[f"{death} {mode}"] = result
                if mode == "consumed" and "error" not in result:
                    # recv did consume the error: SO_ERROR was 0 for lossReason.
                    self.assertIsNotNone(result["recvError"], f"{death}: {result}")
        self.assertEqual(wrong, {})

    def test_noProbe(self) -> None:
        self.assertEqual(tcp.lossReason(None, Config()), "client-reset")

    def test_liveSocket(self) -> None:
        """
        A connection the kernel has not closed is no timeout, whatever its
        counters say.
        """
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)
        self.assertEqual(tcp.lossReason(server, Config()), "client-reset")
        info = tcp.tcpInfo(server)
        if info is not None:
            self.assertEqual(info.state, 1)  # ESTABLISHED


class IdleTimeoutTests(TestCase):
    """
    A client that sends nothing for --idle-timeout is taken for gone.
    """

    def startServer(self, args: Sequence[str], command: Sequence[str] = PID_WORKER) -> Server:
        server = Server(args, command)
        self.addCleanup(server.cleanup)
        return server

    def test_silentClient(self) -> None:
        server = self.startServer(["--idle-timeout", "1"])
        sock, pid = server.connectWorker()
        self.addCleanup(sock.close)
        started = time.monotonic()
        self.assertTrue(pidfdWaitGone(pid, 5))
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual(server.endOf(1)["reason"], "idle-timeout")
        # The connection was aborted.
        sock.settimeout(5)
        self.assertRaises(ConnectionResetError, sock.recv, 10)

    def test_inputKeepsAlive(self) -> None:
        """
        Input resets the clock: a client sending every 0.3 s outlives a 1 s
        idle timeout; once it stops, it goes.
        """
        server = self.startServer(["--idle-timeout", "1"])
        sock, pid = server.connectWorker()
        self.addCleanup(sock.close)
        for _ in range(8):
            sock.send(b".")
            time.sleep(0.3)
        self.assertTrue(alive(pid))
        self.assertTrue(pidfdWaitGone(pid, 5))
        self.assertEqual(server.endOf(1)["reason"], "idle-timeout")

    def test_pausedTimeDoesNotCount(self) -> None:
        """
        While closewatch keeps the client paused (the worker reads nothing),
        its silence is closewatch's doing and does not count.
        """
        server = self.startServer(["--idle-timeout", "1", "--read-ahead", "64k"])
        sock, pid = server.connectWorker()
        self.addCleanup(sock.close)
        self.assertGreater(_sendUntilBlocked(sock), 64 * 1024)
        self.assertFalse(pidfdWaitGone(pid, 2.5))
        # (A close would queue its FIN behind the backlog, never sent.)
        reset(sock)
        waitGone([pid], 5)
        self.assertEqual(server.endOf(1)["reason"], "client-reset")

    def test_halfClosedClientNotIdle(self) -> None:
        """
        Under --half-close forward a client that sent its FIN has nothing
        more to say: its silence while the worker answers is not idleness.
        """
        server = self.startServer(
            ["--idle-timeout", "1", "--half-close", "forward"],
            ["/bin/sh", "-c", "echo $$; cat >/dev/null; sleep 2; echo answer"],
        )
        sock, pid = server.connectWorker()
        self.addCleanup(sock.close)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        data = b""
        while True:
            chunk = sock.recv(100)
            if not chunk:
                break
            data += chunk
        self.assertEqual(data, b"answer\n")
        waitGone([pid], 5)
        self.assertEqual(server.endOf(1)["reason"], "worker-exited")


class HeartbeatTests(TestCase):
    """
    --heartbeat writes --heartbeat-data after that many seconds of nothing
    written to the client, and only then.
    """

    def readFor(self, sock: socket.socket, seconds: float) -> list[tuple[float, bytes]]:
        """
        Lines received in the next C{seconds}, with their arrival times.
        """
        lines = []
        partial = b""
        started = time.monotonic()
        deadline = started + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            now = time.monotonic() - started
            *complete, partial = (partial + chunk).split(b"\n")
            lines.extend((now, line) for line in complete)
        return lines

    def test_rhythm(self) -> None:
        server = Server(["--heartbeat", "0.5", "--heartbeat-data", r"HB\x00"], PID_WORKER)
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        self.addCleanup(sock.close)
        received = b""
        times = []
        sock.settimeout(5)
        started = time.monotonic()
        while time.monotonic() - started < 3:
            chunk = sock.recv(100)
            self.assertTrue(chunk)
            received += chunk
            times.extend([time.monotonic()] * chunk.count(b"\x00"))
        self.assertEqual(received.replace(b"HB\x00", b""), b"")
        beats = received.count(b"HB\x00")
        self.assertGreaterEqual(beats, 3)
        self.assertLessEqual(beats, 7)
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertGreater(min(gaps), 0.3)
        self.assertLess(max(gaps), 1.5)
        self.assertTrue(alive(pid))

    def test_notWhileDataFlows(self) -> None:
        """
        Output every 0.2 s for 2 s keeps a 1 s heartbeat quiet; it starts
        once the worker falls silent.
        """
        server = Server(
            ["--heartbeat", "1", "--heartbeat-data", "HB\\n"],
            [
                "/bin/sh", "-c",
                "echo $$; i=0; while [ $i -lt 10 ]; do echo data; sleep 0.2; i=$((i+1)); done;"
                " exec sleep 100000",
            ],
        )
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        self.addCleanup(sock.close)
        lines = self.readFor(sock, 4.5)
        kinds = [line for _, line in lines]
        self.assertEqual(kinds[:10], [b"data"] * 10)
        self.assertIn(b"HB", kinds[10:])
        self.assertEqual(set(kinds[10:]), {b"HB"})
        lastData = lines[9][0]
        firstBeat = lines[10][0]
        self.assertGreater(firstBeat - lastData, 0.8)
        self.assertLess(firstBeat - lastData, 2.0)


class ResetTests(TestCase):
    """
    An RST is a reset whether the relay was reading (Twisted's recv takes
    the error) or paused (the close watch sees it).
    """

    def test_resetWhilePaused(self) -> None:
        server = Server([*FAST_KEEPALIVE, "--read-ahead", "64k"], PID_WORKER)
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        _sendUntilBlocked(sock)
        reset(sock)
        waitGone([pid], 5)
        self.assertEqual(server.endOf(1)["reason"], "client-reset")

    def test_resetAfterHalfClose(self) -> None:
        """
        Twisted reads no more after a forwarded FIN; the close watch sees
        the RST that follows.
        """
        server = Server(["--half-close", "forward"], HALF_CLOSE_WORKER)
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        sock.shutdown(socket.SHUT_WR)
        self.assertFalse(pidfdWaitGone(pid, 0.5))
        reset(sock)
        waitGone([pid], 5)
        self.assertEqual(server.endOf(1)["reason"], "client-reset")

    def test_resetWhileWriting(self) -> None:
        server = Server(["--user-timeout", "2"], YES_WORKER)
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        sock.recv(65536)
        reset(sock)
        waitGone([pid], 5)
        self.assertEqual(server.endOf(1)["reason"], "client-reset")


class OptionTests(TestCase):
    """
    The liveness options: ranges, usage errors, and their L{Config}.
    """

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions([*args, "--", "/bin/true"])
        return options

    def test_defaults(self) -> None:
        config = self.parse()["config"]
        self.assertEqual(
            (config.keepalive, config.keepaliveIdle, config.keepaliveInterval,
             config.keepaliveCount, config.userTimeout, config.heartbeat,
             config.heartbeatData, config.idleTimeout),
            (True, 60, 10, 6, 120, 0, b"\n", 0),
        )
        # The user timeout agrees with the keepalive settings: a dead idle
        # client goes after 60 + 10 * 6 = 120 s either way.
        self.assertEqual(tcp.keepaliveDeadline(config), 120)
        self.assertEqual(
            tcp.keepaliveDeadline(Config(keepalive=True, userTimeout=0)), 120
        )

    def test_values(self) -> None:
        config = self.parse(
            "--no-keepalive", "--keepalive-idle", "7", "--keepalive-interval", "3",
            "--keepalive-count", "9", "--user-timeout", "2.5", "--heartbeat", "0.25",
            "--heartbeat-data", r"\r\n\x00", "--idle-timeout", "30",
        )["config"]
        self.assertFalse(config.keepalive)
        self.assertEqual(
            (config.keepaliveIdle, config.keepaliveInterval, config.keepaliveCount,
             config.userTimeout, config.heartbeat, config.heartbeatData, config.idleTimeout),
            (7, 3, 9, 2.5, 0.25, b"\r\n\x00", 30),
        )

    def test_bad(self) -> None:
        for args in [
            ("--keepalive-idle", "0"),
            ("--keepalive-idle", "32768"),
            ("--keepalive-idle", "1.5"),
            ("--keepalive-idle", "-1"),
            ("--keepalive-interval", "soon"),
            ("--keepalive-interval", "0"),
            ("--keepalive-count", "0"),
            ("--keepalive-count", "128"),
            ("--user-timeout", "-1"),
            ("--user-timeout", "nan"),
            ("--user-timeout", "inf"),
            ("--user-timeout", "3000000"),
            ("--heartbeat", "-0.5"),
            ("--heartbeat", "often"),
            ("--heartbeat", "1", "--heartbeat-data", ""),
            ("--heartbeat-data", "\\x4"),
            ("--idle-timeout", "-3"),
            ("--idle-timeout", "1e400"),
            ("--keepalive", "--no-keepalive"),
        ]:
            self.assertRaises(usage.UsageError, self.parse, *args)

    def test_badOnCommandLine(self) -> None:
        result = runTwistd(["--keepalive-count", "500", "--", "/bin/true"])
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        self.assertIn("--keepalive-count must be between 1 and 127", output)

    def test_socketOptions(self) -> None:
        options = dict(
            ((level, name), value)
            for level, name, value in tcp.socketOptions(
                Config(keepaliveIdle=7, keepaliveInterval=3, keepaliveCount=9, userTimeout=2.5)
            )
        )
        self.assertEqual(options[socket.SOL_SOCKET, socket.SO_KEEPALIVE], 1)
        if sys.platform.startswith("linux"):
            self.assertEqual(options[socket.IPPROTO_TCP, socket.TCP_KEEPIDLE], 7)
            self.assertEqual(options[socket.IPPROTO_TCP, socket.TCP_KEEPINTVL], 3)
            self.assertEqual(options[socket.IPPROTO_TCP, socket.TCP_KEEPCNT], 9)
            self.assertEqual(options[socket.IPPROTO_TCP, 18], 2500)  # TCP_USER_TIMEOUT
        off = tcp.socketOptions(Config(keepalive=False, userTimeout=0))
        self.assertEqual(off, [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)])


class WarningTests(TestCase):
    """
    Options that cannot apply are one warning each at start-up.
    """

    def test_unixEndpoint(self) -> None:
        path = os.path.abspath(self.mktemp())
        server = Server(["--listen", f"unix:{path}", "--keepalive-idle", "30"], PID_WORKER)
        self.addCleanup(server.cleanup)

        def warnings() -> list[str]:
            return [e["text"] for e in server.events() if e.get("level") == "warn"]

        wait(warnings, 10)
        time.sleep(0.3)
        self.assertEqual(len(warnings()), 1, warnings())
        self.assertIn(f"unix socket endpoint 'unix:{path}'", warnings()[0])
        # And the server works.
        sock, pid = server.connectWorker()
        sock.close()
        waitGone([pid], 5)

    def test_noWarnings(self) -> None:
        from twisted.internet import endpoints, reactor

        tcpEndpoint = endpoints.serverFromString(reactor, "tcp:0")
        self.assertEqual(tcp.platformWarnings(Config(), [("tcp:0", tcpEndpoint)]), [])
        unix = endpoints.serverFromString(reactor, "unix:/nonexistent/x.sock")
        self.assertEqual(tcp.platformWarnings(Config(keepalive=False), [unix]), [])
        self.assertEqual(len(tcp.platformWarnings(Config(), [unix])), 1)


if __name__ == "__main__":
    print(json.dumps(runScenario(json.loads(sys.argv[1]))))
    sys.stdout.flush()
    os._exit(0)
