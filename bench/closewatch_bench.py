#!/usr/bin/env python3
"""
closewatch against socat and tcpserver, on loopback, in one command:

    python bench/closewatch_bench.py [--quick] [--out bench/results]

Starts every server itself (on free loopback ports), measures, and writes
results.json, results.md (the table printed to stdout) and kill_latency.png
(matplotlib) into the out directory.  Every process it starts, servers and
workers alike, is ended on exit, Ctrl-C or error.

What is measured (see bench/README.md):

 1. kill latency: time from the client's action (close, reset, half-close,
    close behind a backlog that pauses the relay) to the worker's exit, taken
    exactly with a pidfd, at 1, 100 and 1,000 concurrent connections; a
    worker still alive 3 s after its client's action counts as survived;
 2. connection rate (sequential connect, read the PID line, close) and
    spawn latency (connect -> first byte) with 0 and with 5,000 other live
    connections open;
 3. relay throughput with `cat` as worker, 256 MiB each way at once, and
    the server's peak RSS meanwhile.

Linux 5.3+ only (pidfd_open).  Needs socat and tcpserver (ucspi-tcp) for
the peers; a missing peer is skipped.  Python 3.9+; the servers run under
--server-python (default: this interpreter), which must import Twisted.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import math
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import kill_floor

HERE = Path(__file__).resolve().parent
#: The closewatch source tree benchmarked (--root); by default this checkout.
ROOT = HERE.parent
PIDWORKER = HERE / "pidworker.sh"

MiB = 1024 * 1024
KiB = 1024
#: closewatch's defaults, which the paused backlog is sized against.
PIPE_SIZE = 1 * MiB
READ_AHEAD = 256 * KiB
SIOCOUTQ = 0x5411
SURVIVE_S = 3.0

SCENARIOS = ("fin", "rst", "half", "paused")
#: closewatch's options for the kill, rate and spawn measures (see main).
KILL_OPTIONS = ("--spool-max", "0")
#: The naive Twisted relay (naive_relay.py) reads everything it is sent (no
#: flow control), so it never pauses: no paused cell.  It takes part in the
#: kill and rate measures only (its spawn cost grows with its open fds, and
#: its relay buffers without bound).
PEER_SCENARIOS = {"naive": ("fin", "rst", "half"), "ideal": ("fin", "rst", "half")}
PEER_MEASURES = {"naive": {"kill", "rate"}, "ideal": {"kill"}}
#: Servers that are Python scripts of this directory, not programs to find.
SCRIPTED = ("closewatch", "naive", "ideal")
SCENARIO_TITLES = {
    "fin": "FIN (close)",
    "rst": "RST (linger 0)",
    "half": "half-close (SHUT_WR)",
    "paused": "paused (backlog, close)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Statistics


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


# --------------------------------------------------------------------------
# Workers: every worker PID the bench learns is held as a pidfd, so that it
# can be timed exactly and killed safely (no PID reuse) at cleanup.


class Workers:
    def __init__(self) -> None:
        self.pidfds: dict[int, int] = {}

    def open(self, pid: int) -> int:
        fd = os.pidfd_open(pid)
        self.pidfds[fd] = pid
        return fd

    def close(self, fd: int) -> None:
        if self.pidfds.pop(fd, None) is not None:
            os.close(fd)

    def killall(self, grace: float = 0.0) -> int:
        """
        Wait up to C{grace} s for registered workers to exit by themselves,
        then SIGKILL the rest, wait for them, and forget them all.

        @return: how many had to be killed.
        """
        fds = list(self.pidfds)
        if not fds:
            return 0
        alive = set(fds)
        if grace > 0:
            alive = _waitExits(alive, grace)
        killed = 0
        for fd in alive:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        _waitExits(alive, 5.0)
        for fd in fds:
            self.close(fd)
        return killed


def _waitExits(fds: set[int], timeout: float) -> set[int]:
    """Wait until the pidfds in C{fds} are readable; return those still alive."""
    alive = set(fds)
    if not alive:
        return alive
    ep = select.epoll()
    try:
        for fd in alive:
            ep.register(fd, select.EPOLLIN)
        deadline = time.monotonic() + timeout
        while alive:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in ep.poll(left, 1024):
                alive.discard(fd)
                ep.unregister(fd)
    finally:
        ep.close()
    return alive


def _isAlive(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)


WORKERS = Workers()


# --------------------------------------------------------------------------
# Servers


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port (without connecting to it)?"""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def tcpQueues(port: int) -> dict[int, tuple[int, int]]:
    """Established server-side sockets on C{port}: peer port -> (tx, rx) queue."""
    out: dict[int, tuple[int, int]] = {}
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] != local or parts[3] != "01":
                continue
            tx, rx = parts[4].split(":")
            out[int(parts[2].split(":")[1], 16)] = (int(tx, 16), int(rx, 16))
    return out


class Server:
    def __init__(self, name: str, argv: list[str], port: int, logdir: Path, env=None) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.logpath = logdir / f"{name}-{port}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        logf = open(self.logpath, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                # Not the caller's directory: with `python -c`, the current
                # directory comes first on sys.path and could shadow --root.
                cwd=str(self.logpath.parent),
            )
        finally:
            logf.close()
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} at start-up; "
                    f"see {self.logpath}:\n{self.logpath.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} is not listening on {self.port} after {timeout} s")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # The server leads its own process group (start_new_session): the
        # group holds it and, for socat and tcpserver, its workers.
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Stragglers of the group (socat children) once the leader is gone.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


SERVERS: list[Server] = []


#: Options of `twistd closewatch` added when this version knows them.
EXTRA_CLOSEWATCH_OPTIONS: list[str] = []


def closewatchEnv() -> dict:
    env = dict(os.environ)
    # Works from a fresh clone without installing: the package and its
    # twistd plugin (twisted/plugins/closewatch.py) are found on the path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def closewatchOptions(serverPython: str, maxWorkers: int) -> list[str]:
    """Options this closewatch version needs to be benchmarked at all."""
    out = subprocess.run(
        [serverPython, "-c", "from twisted.scripts.twistd import run; run()", "closewatch", "--help"],
        capture_output=True, text=True, env=closewatchEnv(), timeout=60,
        cwd=tempfile.gettempdir(),  # as for the server: no shadowing from "."
    )
    if out.returncode:
        raise RuntimeError(f"twistd closewatch --help failed:\n{out.stdout}{out.stderr}")
    extra = []
    if "--max-workers" in out.stdout:
        # The default cap would refuse the 1,000 and 5,000 connections.
        extra += ["--max-workers", str(maxWorkers)]
    return extra


def startServer(
    kind: str, worker: list[str], logdir: Path, serverPython: str, options: Sequence[str] = ()
) -> Server:
    """
    @param options: more closewatch options for this server alone.
    """
    port = freePort()
    if kind == "closewatch":
        env = closewatchEnv()
        argv = [
            serverPython, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", f"--logfile={logdir / f'closewatch-{port}.twistd.log'}",
            "closewatch", "-l", f"tcp:{port}:interface=127.0.0.1",
            "--read-ahead", str(READ_AHEAD), "--half-close", "kill",
            *EXTRA_CLOSEWATCH_OPTIONS, *options, "--", *worker,
        ]
        server = Server(kind, argv, port, logdir, env)
    elif kind == "socat":
        argv = [
            "socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024",
            "EXEC:" + " ".join(worker),
        ]
        server = Server(kind, argv, port, logdir)
    elif kind == "tcpserver":
        argv = ["tcpserver", "-c", "20000", "-b", "1024", "-HRl0", "127.0.0.1", str(port), *worker]
        server = Server(kind, argv, port, logdir)
    elif kind == "naive":
        argv = [serverPython, str(HERE / "naive_relay.py"), str(port), *worker]
        server = Server(kind, argv, port, logdir)
    elif kind == "ideal":
        argv = [serverPython, str(HERE / "ideal_server.py"), str(port), *worker]
        server = Server(kind, argv, port, logdir)
    else:
        raise ValueError(kind)
    SERVERS.append(server)
    server.start()
    return server


def stopServer(server: Server) -> None:
    server.stop()
    if server in SERVERS:
        SERVERS.remove(server)


def cleanup() -> None:
    # A second Ctrl-C (or timeout(1) passing its signal on) must not cut
    # the clean-up short.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass
    WORKERS.killall()
    for server in list(SERVERS):
        try:
            stopServer(server)
        except Exception as e:  # keep cleaning up the others
            log(f"stopping {server.name}: {e}")


# --------------------------------------------------------------------------
# Connections


class Conn:
    __slots__ = ("sock", "buf", "pid", "pidfd", "tConnect", "tFirst", "tAct", "tExit",
                 "survived", "sent", "lport")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pid = self.pidfd = None
        self.tConnect = self.tFirst = self.tAct = self.tExit = None
        self.survived = False
        self.sent = 0
        self.lport = 0

    def closeSock(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def openConns(port: int, n: int, timeout: float, window: int = 32) -> tuple[list[Conn], int]:
    """
    Open C{n} connections, at most C{window} not yet answered at a time (so
    that no listen backlog overflows), and wait for every worker's PID line.

    @return: the connections whose worker answered, and how many failed.
    """
    addr = ("127.0.0.1", port)
    ep = select.epoll()
    pending: dict[int, Conn] = {}
    done: list[Conn] = []
    failed = started = 0
    deadline = time.monotonic() + timeout
    try:
        while started < n or pending:
            while started < n and len(pending) < window:
                started += 1
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                c = Conn(s)
                c.tConnect = time.perf_counter()
                err = s.connect_ex(addr)
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    failed += 1
                    continue
                ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
                pending[s.fileno()] = c
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in ep.poll(min(left, 0.5), 256):
                t = time.perf_counter()
                c = pending[fd]
                try:
                    data = c.sock.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    c.buf += data
                    if b"\n" not in c.buf:
                        continue
                ep.unregister(fd)
                del pending[fd]
                try:
                    c.pid = int(c.buf.split(b"\n", 1)[0])
                    c.pidfd = WORKERS.open(c.pid)
                except (ValueError, OSError):
                    c.closeSock()
                    failed += 1
                    continue
                c.tFirst = t
                c.lport = c.sock.getsockname()[1]
                done.append(c)
    finally:
        for c in pending.values():
            c.closeSock()
            failed += 1
        ep.close()
    return done, failed


def connectOnce(port: int, timeout: float = 5.0) -> tuple[float, socket.socket, int]:
    """Blocking connect, read the PID line: (seconds to first byte, socket, pid)."""
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    buf = s.recv(64)
    t1 = time.perf_counter()
    while b"\n" not in buf:
        more = s.recv(64)
        if not more:
            s.close()
            raise ConnectionError("server closed before the PID line")
        buf += more
    return t1 - t0, s, int(buf.split(b"\n", 1)[0])


# --------------------------------------------------------------------------
# 1. Kill latency


class ExitTracker:
    """Timestamps worker exits (pidfd readable) for connections in flight."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.pending: dict[int, Conn] = {}

    def add(self, c: Conn) -> None:
        self.ep.register(c.pidfd, select.EPOLLIN)
        self.pending[c.pidfd] = c

    def poll(self, timeout: float) -> None:
        events = self.ep.poll(timeout, 1024)
        t = time.perf_counter()
        for fd, _ in events:
            c = self.pending.pop(fd, None)
            if c is not None:
                c.tExit = t
                self.ep.unregister(fd)

    def waitFor(self, c: Conn, cap: float) -> None:
        end = time.perf_counter() + cap
        while c.tExit is None and c.pidfd in self.pending:
            left = end - time.perf_counter()
            if left <= 0:
                return
            self.poll(left)

    def drain(self, survive: float) -> None:
        """Wait until every pending worker exited or outlived its client by C{survive} s."""
        while self.pending:
            now = time.perf_counter()
            nextDeadline = None
            for fd, c in list(self.pending.items()):
                if c.tAct is None:
                    continue
                dl = c.tAct + survive
                if dl <= now:
                    c.survived = True
                    del self.pending[fd]
                    self.ep.unregister(fd)
                elif nextDeadline is None or dl < nextDeadline:
                    nextDeadline = dl
            if not self.pending:
                break
            if nextDeadline is None:
                nextDeadline = now + survive
            self.poll(max(0.0, min(nextDeadline - now, 0.25)))

    def close(self) -> None:
        self.ep.close()


_PAYLOAD = memoryview(b"\xa5" * (4 * MiB))


def sendUpTo(conns: list[Conn], target: int, timeout: float = 15.0) -> None:
    """
    Send on every connection until C{c.sent == target} (non-blocking, all at
    once).  A peer that never reads fills its buffers: give up once nothing
    moved for half a second.
    """
    ep = select.epoll()
    todo: dict[int, Conn] = {}
    for c in conns:
        if c.sent < target:
            todo[c.sock.fileno()] = c
            ep.register(c.sock.fileno(), select.EPOLLOUT)
    deadline = time.monotonic() + timeout
    lastProgress = time.monotonic()
    try:
        while todo and time.monotonic() < deadline:
            if time.monotonic() - lastProgress > 0.25:
                break
            for fd, _ in ep.poll(0.1, 1024):
                c = todo.get(fd)
                if c is None:
                    continue
                try:
                    while c.sent < target:
                        c.sent += c.sock.send(_PAYLOAD[: min(target - c.sent, len(_PAYLOAD))])
                        lastProgress = time.monotonic()
                except BlockingIOError:
                    pass
                except OSError:
                    c.sent = target + 1  # dead: stop sending
                if c.sent >= target:
                    del todo[fd]
                    ep.unregister(fd)
    finally:
        ep.close()


def _outq(c: Conn) -> int:
    buf = bytearray(4)
    fcntl.ioctl(c.sock.fileno(), SIOCOUTQ, buf)
    return struct.unpack("i", buf)[0]


def _sndWnd(c: Conn) -> int | None:
    """The peer's advertised window (tcp_info.tcpi_snd_wnd, Linux 6.2+)."""
    raw = c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", raw, 228)[0] if len(raw) >= 232 else None


def waitAcked(conns: list[Conn], timeout: float) -> int:
    """Wait until the client send queues are empty; return how many are not."""
    deadline = time.monotonic() + timeout
    left = list(conns)
    last, stableSince = None, time.monotonic()
    while left and time.monotonic() < deadline:
        qs = [(c, _outq(c)) for c in left]
        left = [c for c, q in qs if q > 0]
        total = sum(q for _, q in qs)
        if total != last:
            last, stableSince = total, time.monotonic()
        elif time.monotonic() - stableSince > 0.15:
            break  # stuck behind a zero window: the server does not read
        if left:
            time.sleep(0.02)
    return len(left)


def pauseWithBacklog(port: int, conns: list[Conn], step: int = 16 * KiB) -> dict:
    """
    Send each connection a backlog that its worker never reads, just large
    enough that the server stops reading the client: first what fits in
    the worker's pipe and the read-ahead, then C{step} at a time until the
    server's receive queue for the connection is non-empty and stays so.
    The backlog left in the kernel is then at most about C{step}, so the
    server's receive window stays open and the client's FIN is delivered
    (with a full receive buffer it would not be, and no server could see
    the close without reading).  The step is small because a paused
    socket's receive buffer may still be at the kernel's initial size
    (tcp_rmem[1], 128 KiB: the window closes with ~64 KiB queued) when many
    connections fill at once and autotuning never grew it.
    """
    base = PIPE_SIZE + READ_AHEAD - 64 * KiB
    sendUpTo(conns, base)
    byPort = {c.lport: c for c in conns}
    last: dict[int, int] = {}
    paused: set[int] = set()
    target = base
    for _ in range(40):
        todo = [c for c in conns if c.lport not in paused and c.sent >= target]
        if not todo:
            break
        target += step
        sendUpTo(todo, target, timeout=5.0)
        waitAcked(todo, 1.0)
        # A connection is paused once its queue stopped draining: look twice.
        for _ in range(2):
            time.sleep(0.03)
            queues = tcpQueues(port)
            for c in todo:
                rx = queues.get(c.lport, (0, 0))[1]
                if rx > 0 and last.get(c.lport) == rx:
                    paused.add(c.lport)
                last[c.lport] = rx
    notAcked = waitAcked(conns, 2.0)
    wnd = [_sndWnd(c) for c in conns]
    sent = sorted(c.sent for c in conns)
    return {
        "paused": sum(1 for p in byPort if p in paused),
        "not_acked": notAcked,
        "zero_window": sum(1 for w in wnd if w == 0),
        "backlog_p50": sent[len(sent) // 2] if sent else None,
        "backlog_max": sent[-1] if sent else None,
    }


def serverStates(port: int, lports: set[int]) -> dict[int, str]:
    """TCP state of the server's side of each client port (/proc/net/tcp)."""
    names = {"01": "ESTABLISHED", "08": "CLOSE_WAIT", "09": "LAST_ACK", "07": "CLOSE",
             "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT", "0B": "CLOSING"}
    local = f"0100007F:{port:04X}"
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] != local:
                continue
            rport = int(parts[2].split(":")[1], 16)
            if rport in lports:
                out[rport] = names.get(parts[3], parts[3])
    return out


def _act(c: Conn, scenario: str) -> None:
    s = c.sock
    if scenario == "rst":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.tAct = time.perf_counter()
        s.close()
        c.sock = None
    elif scenario == "half":
        c.tAct = time.perf_counter()
        s.shutdown(socket.SHUT_WR)
    else:  # fin, paused
        c.tAct = time.perf_counter()
        s.close()
        c.sock = None


def killCell(server: Server, scenario: str, n: int, trials: int) -> dict:
    """
    One repetition of a (server, scenario, concurrency) cell.  With n == 1,
    C{trials} sequential single connections; else one batch of n.
    """
    tracker = ExitTracker()
    conns: list[Conn] = []
    failed = 0
    pstats: list[dict] = []
    survivorStates: dict[str, int] = {}
    closeCpuUs = None
    setupS = 0.0
    try:
        if n == 1:
            for _ in range(trials):
                t0 = time.perf_counter()
                got, f = openConns(server.port, 1, 10.0)
                failed += f
                if not got:
                    continue
                c = got[0]
                if scenario == "paused":
                    st = pauseWithBacklog(server.port, got)
                    pstats.append(st)
                setupS += time.perf_counter() - t0
                tracker.add(c)
                conns.append(c)
                _act(c, scenario)
                # closewatch answers in well under a millisecond; peers that
                # never kill are left pending (and drained below).
                tracker.waitFor(c, 0.02)
                tracker.poll(0)
        else:
            t0 = time.perf_counter()
            conns, failed = openConns(server.port, n, timeout=120.0)
            if scenario == "paused":
                pstats.append(pauseWithBacklog(server.port, conns))
            setupS = time.perf_counter() - t0
            for c in conns:
                tracker.add(c)
            cpu0 = _settledCpu(server.pid)
            for c in conns:
                _act(c, scenario)
                tracker.poll(0)
        tracker.drain(SURVIVE_S)
        if n > 1 and conns:
            # The server's own CPU for the whole teardown of these
            # connections: the n-th close waits for about n times this.
            closeCpuUs = (_settledCpu(server.pid) - cpu0) * 1e6 / len(conns)
        # Did the survivors' FIN reach the server at all?  CLOSE_WAIT: it
        # did, and the server did not act on it; ESTABLISHED: it did not.
        survivors = {c.lport for c in conns if c.survived}
        states = serverStates(server.port, survivors) if survivors else {}
        for c in conns:
            if c.survived:
                st = states.get(c.lport, "gone")
                survivorStates[st] = survivorStates.get(st, 0) + 1
    finally:
        tracker.close()
        for c in conns:
            c.closeSock()
        WORKERS.killall()
    lat = [(c.tExit - c.tAct) * 1000 for c in conns if c.tExit is not None and not c.survived]
    killed = len(lat)
    survived = sum(1 for c in conns if c.survived)
    def psum(key):
        return sum(p[key] for p in pstats) if pstats else None

    return {
        "n": n,
        "connections": len(conns),
        "failed": failed,
        "killed": killed,
        "survived": survived,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
        "paused_verified": psum("paused"),
        "zero_window": psum("zero_window"),
        "not_acked": psum("not_acked"),
        "backlog_bytes_p50": median([p["backlog_p50"] for p in pstats]) if pstats else None,
        "backlog_bytes_max": max((p["backlog_max"] for p in pstats), default=None),
        "survivor_server_states": survivorStates,
        "server_cpu_us_per_close": closeCpuUs,
        "setup_s": round(setupS, 3),
        "samples_ms": [round(x, 4) for x in lat],
    }


def killCellsAlternating(servers: dict[str, Server], scenario: str, trials: int) -> dict[str, dict]:
    """
    One repetition of the single-connection cell for several servers, their
    trials interleaved one by one, so that a burst of load on this shared
    machine hits them all alike.
    """
    reps: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(trials):
        for name, server in servers.items():
            reps[name].append(killCell(server, scenario, 1, 1))
    out = {}
    for name, cells in reps.items():
        lat = [x for c in cells for x in c["samples_ms"]]
        merged = dict(cells[0])
        for key in ("connections", "failed", "killed", "survived"):
            merged[key] = sum(c[key] for c in cells)
        merged.update(
            p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
            max_ms=max(lat) if lat else None, samples_ms=lat,
            setup_s=round(sum(c["setup_s"] for c in cells), 3),
            survivor_server_states=_mergeCounts([c["survivor_server_states"] for c in cells]),
        )
        out[name] = merged
    return out


# --------------------------------------------------------------------------
# 2. Connection rate and spawn latency


def connRate(server: Server, count: int) -> dict:
    lat = []
    failed = 0
    cpu0 = _settledCpu(server.pid)
    t0 = time.perf_counter()
    deadline = time.monotonic() + max(60.0, count * 0.05)
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            dt, s, pid = connectOnce(server.port)
        except OSError:
            failed += 1
            continue
        try:
            WORKERS.open(pid)  # for cleanup only: peers leave it running
        except OSError:
            pass
        s.close()
        lat.append(dt * 1000)
    elapsed = time.perf_counter() - t0
    cpu = _settledCpu(server.pid) - cpu0
    WORKERS.killall(grace=1.0)
    return {
        # main process only: socat's and tcpserver's per-connection work is
        # mostly in their forked children, closewatch's all in this process
        "server_cpu_us_per_conn": cpu * 1e6 / len(lat) if lat else None,
        "connections": len(lat),
        "failed": failed,
        "conn_per_s": len(lat) / elapsed if elapsed else None,
        "spawn_p50_ms": percentile(lat, 50),
        "spawn_p99_ms": percentile(lat, 99),
    }


def spawnRounds(server: Server, rounds: int, per: int) -> list[dict]:
    out = []
    for _ in range(rounds):
        lat = []
        socks = []
        failed = 0
        for _ in range(per):
            try:
                dt, s, pid = connectOnce(server.port)
            except OSError:
                failed += 1
                continue
            try:
                WORKERS.open(pid)
            except OSError:
                pass
            socks.append(s)
            lat.append(dt * 1000)
        for s in socks:
            s.close()
        out.append({"n": len(lat), "failed": failed, "p50_ms": percentile(lat, 50),
                    "p99_ms": percentile(lat, 99)})
        time.sleep(0.1)
    return out


def _fdCount(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _fdLimit(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError):
        pass
    return None


def spawnUnderLoad(server: Server, background: int, rounds: int, per: int) -> dict:
    """Spawn latency with C{background} other live connections open."""
    result: dict = {"background": background}
    # Idle figure first, measured the same way.
    idle = spawnRounds(server, rounds, per)
    WORKERS.killall(grace=1.0)
    result["idle_rounds"] = idle
    result["idle_p50_ms"] = median([r["p50_ms"] for r in idle])
    # A server holding every connection in one process needs descriptors
    # per connection (closewatch: socket, its watch duplicate, 3 pipes, a
    # pidfd): measure that on a first slice, and open no more than the
    # server's own RLIMIT_NOFILE allows, rather than drive it into EMFILE.
    t0 = time.perf_counter()
    fds0 = _fdCount(server.pid)
    first = min(200, background)
    conns, failed = openConns(server.port, first, timeout=60.0, window=64)
    perConn = (_fdCount(server.pid) - fds0) / max(1, len(conns))
    limit = _fdLimit(server.pid)
    result["server_fds_per_connection"] = round(perConn, 2)
    result["server_fd_limit"] = limit
    want = background
    if perConn >= 0.5 and limit:
        fits = len(conns) + int((limit - _fdCount(server.pid) - 100) / perConn)
        if fits < background:
            want = fits
            log(f"{server.name}: {perConn:.1f} fds per connection, RLIMIT_NOFILE {limit}: "
                f"background capped at {fits} (not {background})")
    result["background_capped_at"] = want if want < background else None
    more, f2 = openConns(server.port, want - len(conns), timeout=300.0, window=64)
    conns += more
    failed += f2
    openS = time.perf_counter() - t0
    bgPidfds = {c.pidfd for c in conns}
    firsts = [(c.tFirst - c.tConnect) * 1000 for c in conns]
    result["background_opened"] = len(conns)
    result["background_failed"] = failed
    result["background_open_s"] = round(openS, 2)
    # spawn latency of the background connections themselves, by thousand
    result["background_spawn_p50_by_1000"] = [
        percentile(firsts[i : i + 1000], 50) for i in range(0, len(firsts), 1000)
    ]
    try:
        loaded = spawnRounds(server, rounds, per)
        result["loaded_rounds"] = loaded
        result["loaded_p50_ms"] = median([r["p50_ms"] for r in loaded])
        # the background is still alive (nobody killed it by mistake)?
        result["background_alive_after"] = sum(1 for fd in bgPidfds if _isAlive(fd))
    finally:
        for c in conns:
            c.closeSock()
        WORKERS.killall(grace=2.0)
    if result.get("idle_p50_ms") and result.get("loaded_p50_ms"):
        result["ratio"] = result["loaded_p50_ms"] / result["idle_p50_ms"]
    return result


# --------------------------------------------------------------------------
# 3. Throughput and memory


def _rssKiB(pid: int, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_CLK = os.sysconf("SC_CLK_TCK")


def _cpuSeconds(pid: int) -> float:
    """utime + stime of a process (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return 0.0


def _settledCpu(pid: int, timeout: float = 3.0) -> float:
    """The server's CPU time once it stopped growing (the server is idle)."""
    end = time.monotonic() + timeout
    last = _cpuSeconds(pid)
    while time.monotonic() < end:
        time.sleep(0.1)
        now = _cpuSeconds(pid)
        if now == last:
            break
        last = now
    return last


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _serverPids(root: int, workerComm: str) -> list[int]:
    """The server's own processes: its tree without the workers (and theirs)."""
    pids, todo = [], [root]
    while todo:
        p = todo.pop()
        if p != root and _comm(p) == workerComm:
            continue
        pids.append(p)
        todo += _children(p)
    return pids


def throughputOnce(server: Server, total: int, chunk: int = 4 * MiB) -> dict:
    block = random.randbytes(chunk) if hasattr(random, "randbytes") else os.urandom(chunk)
    nblocks = total // chunk
    expected = 0
    for _ in range(nblocks):
        expected = zlib.crc32(block, expected)
    total = nblocks * chunk

    # Reset the peak-RSS counter of the server process (Linux 4.0+).
    try:
        with open(f"/proc/{server.pid}/clear_refs", "w") as f:
            f.write("5")
        hwmReset = True
    except OSError:
        hwmReset = False

    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    state = {"received": 0, "crc": 0, "error": None, "tLast": None}
    started = threading.Event()

    def reader() -> None:
        buf = bytearray(1 * MiB)
        view = memoryview(buf)
        crc = 0
        got = 0
        try:
            while got < total:
                n = s.recv_into(view)
                if not n:
                    break
                crc = zlib.crc32(view[:n], crc)
                got += n
                if not started.is_set():
                    started.set()
        except OSError as e:
            state["error"] = repr(e)
        state["tLast"] = time.perf_counter()
        state["received"], state["crc"] = got, crc
        started.set()

    peak = {"kib": 0, "main": 0, "pids": []}
    stop = threading.Event()

    def sampler() -> None:
        started.wait(30)
        # The server's own processes: for socat the listener and the forked
        # relay; for closewatch twistd and any helper process it runs.
        pids = _serverPids(server.pid, "cat")
        peak["pids"] = pids
        peak["cpu0"] = sum(_cpuSeconds(p) for p in pids)
        while not stop.is_set():
            rss = [_rssKiB(p) for p in pids]
            peak["kib"] = max(peak["kib"], sum(rss))
            peak["main"] = max(peak["main"], rss[0])
            stop.wait(0.01)

    rt = threading.Thread(target=reader, daemon=True)
    st = threading.Thread(target=sampler, daemon=True)
    rt.start()
    st.start()
    t0 = time.perf_counter()
    sendError = None
    try:
        for _ in range(nblocks):
            s.sendall(block)
    except OSError as e:
        sendError = repr(e)
    rt.join(120)
    stop.set()
    st.join(5)
    # Before the close: socat's relaying child is still alive to be read.
    cpu = sum(_cpuSeconds(p) for p in peak["pids"]) - peak.get("cpu0", 0.0)
    hwm = _rssKiB(server.pid, "VmHWM") if hwmReset else None
    s.close()
    WORKERS.killall()
    t1 = state["tLast"] or time.perf_counter()
    ok = state["received"] == total and state["crc"] == expected and not sendError
    return {
        "bytes": total,
        "ok": ok,
        "received": state["received"],
        "error": state["error"] or sendError,
        "seconds": t1 - t0,
        "mb_per_s": total / (t1 - t0) / 1e6 if ok else None,
        # Load-independent: the server's CPU per MiB relayed (both directions
        # count, so 2 x total bytes cross the relay).
        "server_cpu_s": cpu,
        "server_cpu_ms_per_mib": cpu * 1000 / (2 * total / MiB) if ok else None,
        "peak_rss_mb_sampled": peak["main"] / 1024,
        "peak_tree_rss_mb_sampled": peak["kib"] / 1024,
        "server_pids_sampled": len(peak["pids"]),
        "server_comms": [_comm(p) for p in peak["pids"]],
        "vmhwm_mb": hwm / 1024 if hwm else None,
    }


# --------------------------------------------------------------------------
# Report


def fmt(x, nd=2, unit=""):
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:.0f}{unit}"
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def summarizeKill(reps: list[dict]) -> dict:
    return {
        "reps": len(reps),
        "connections": sum(r["connections"] for r in reps),
        "killed": sum(r["killed"] for r in reps),
        "survived": sum(r["survived"] for r in reps),
        "failed": sum(r["failed"] for r in reps),
        "p50_ms": median([r["p50_ms"] for r in reps]),
        "p99_ms": median([r["p99_ms"] for r in reps]),
        "server_cpu_us_per_close": median([r.get("server_cpu_us_per_close") for r in reps]),
        "worst_p99_ms": max((r["p99_ms"] for r in reps if r["p99_ms"] is not None), default=None),
        "paused_verified": (
            sum(r["paused_verified"] for r in reps)
            if any(r["paused_verified"] is not None for r in reps)
            else None
        ),
        "zero_window": sum(r["zero_window"] or 0 for r in reps),
        "backlog_bytes_p50": median([r["backlog_bytes_p50"] for r in reps]),
        "survivor_server_states": _mergeCounts([r["survivor_server_states"] for r in reps]),
        # survivors whose server-side socket had left ESTABLISHED: the close
        # did reach the server, which did not act on it
        "survived_fin_delivered": sum(
            v for r in reps for k, v in r["survivor_server_states"].items() if k != "ESTABLISHED"
        ),
    }


def _mergeCounts(ds: list[dict]) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def killCellText(s: dict) -> str:
    total = s["killed"] + s["survived"]
    text = f"{s['killed']}/{s['survived']}"
    if s["killed"]:
        text += f" {fmt(s['p50_ms'])}/{fmt(s['p99_ms'])}"
    if s["failed"]:
        text += f" ({s['failed']} failed)"
    if s["paused_verified"] is not None and s["paused_verified"] < total:
        text += f" (paused {s['paused_verified']}/{total})"
    if s["survived"] and s["survived_fin_delivered"] is not None:
        undelivered = s["survived"] - s["survived_fin_delivered"]
        if undelivered:
            text += f" ({undelivered} FIN never reached the server)"
    return text


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def buildReport(res: dict) -> tuple[str, list[dict]]:
    servers = res["servers"]
    peers = [s for s in servers if s != "closewatch"]
    lines = []
    lines.append(f"# closewatch benchmark ({res['meta']['mode']})\n")
    m = res["meta"]
    lines.append(
        f"{m['date']} · {m['host']['cpus']} CPUs · Linux {m['host']['kernel']} · "
        f"Python {m['host']['python']} · Twisted {m['twisted']} · closewatch {m['closewatch_commit']} · "
        f"{m['socat'] or 'no socat'} · {'tcpserver' if 'tcpserver' in servers else 'no tcpserver'} · "
        f"load average {m['host']['loadavg_start'][0]:.1f} at start, "
        f"{m['host'].get('loadavg_end', [0])[0]:.1f} at end\n"
    )
    lines.append(
        "Kill latency cells: killed/survived (survived = alive 3 s after the client's action), "
        "then p50/p99 ms from the client's action to the worker's exit (pidfd), median over "
        "repetitions. Ratios are closewatch/peer.\n"
    )
    hdr = ["measure", *servers] + [f"cw/{p}" for p in peers]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    kill = res["kill"]
    scenarios = res["config"].get("scenarios", SCENARIOS)
    for n in res["config"]["concurrency"]:
        for sc in scenarios:
            key = f"{sc}@{n}"
            row = [f"kill {SCENARIO_TITLES[sc]}, {n} conn"]
            for srv in servers:
                s = kill.get(srv, {}).get(key)
                row.append(killCellText(s["summary"]) if s else "–")
            cw = kill.get("closewatch", {}).get(key)
            for p in peers:
                ps = kill.get(p, {}).get(key)
                if cw and ps and ps["summary"]["killed"] and cw["summary"]["killed"]:
                    row.append(
                        f"p50 {fmt(ratio(cw['summary']['p50_ms'], ps['summary']['p50_ms']), 4)}"
                        + (f", p99 {fmt(ratio(cw['summary']['p99_ms'], ps['summary']['p99_ms']), 4)}"
                           if p in PEER_SCENARIOS else "")
                    )
                elif cw and ps:
                    row.append(f"{ps['summary']['survived']} survived")
                else:
                    row.append("–")
            lines.append("| " + " | ".join(row) + " |")

    nmaxK = max(res["config"]["concurrency"])
    row = [f"server main-process CPU us per close, {nmaxK} conns (FIN/RST/half/paused)"]
    for srv in servers:
        vals = [kill.get(srv, {}).get(f"{sc}@{nmaxK}", {}).get("summary", {}).get("server_cpu_us_per_close")
                for sc in scenarios]
        row.append("/".join(fmt(v, 0) for v in vals) if any(v is not None for v in vals) else "–")
    row += ["–"] * len(peers)
    lines.append("| " + " | ".join(row) + " |")
    for n, runs in res.get("floor", {}).items():
        for title, i in (("each exit from its own kill", 0), ("each exit from the first kill", 3)):
            row = [f"kernel floor: {n} groups killpg'd in a tight loop, no server "
                   f"(kill_floor.py), {title}"]
            row += [f"{fmt(median([r[i] for r in runs]))}/{fmt(median([r[i + 1] for r in runs]))}"
                    if srv == "closewatch" else "–" for srv in servers]
            row += ["–"] * len(peers)
            lines.append("| " + " | ".join(row) + " |")

    def simpleRow(title, getter, nd=2, higher=True):
        row = [title]
        vals = {srv: getter(srv) for srv in servers}
        row += [fmt(vals[srv], nd) for srv in servers]
        row += [fmt(ratio(vals.get("closewatch"), vals[p]), 2) for p in peers]
        lines.append("| " + " | ".join(row) + " |")

    rate = res["rate"]
    simpleRow("conn/s (sequential connect, PID line, close)", lambda s: rate.get(s, {}).get("conn_per_s"), 0)
    simpleRow("server main-process CPU us per connection, rate test",
              lambda s: rate.get(s, {}).get("server_cpu_us_per_conn"), 0)
    simpleRow("spawn p50 ms (connect -> first byte), rate test", lambda s: rate.get(s, {}).get("spawn_p50_ms"))
    sp = res["spawn"]
    bg = res["config"]["background"]
    simpleRow("spawn p50 ms, 0 other connections", lambda s: sp.get(s, {}).get("idle_p50_ms"))
    simpleRow(f"spawn p50 ms, {bg} other live connections (or fewer: next row)",
              lambda s: sp.get(s, {}).get("loaded_p50_ms"))
    simpleRow("live connections actually held open for that", lambda s: sp.get(s, {}).get("background_opened"), 0)
    simpleRow(f"time to open the {bg} connections, s", lambda s: sp.get(s, {}).get("background_open_s"))
    tp = res["throughput"]
    simpleRow(
        f"relay MB/s ({res['config']['throughput_mib']} MiB each way at once, cat)",
        lambda s: tp.get(s, {}).get("mb_per_s"), 0,
    )
    simpleRow("server CPU ms per MiB relayed (load-independent)",
              lambda s: tp.get(s, {}).get("server_cpu_ms_per_mib"), 2)
    simpleRow("peak server RSS MB during relay (main process)", lambda s: tp.get(s, {}).get("peak_rss_mb"), 1)
    simpleRow("peak RSS MB of all server processes (helpers, socat children)",
              lambda s: tp.get(s, {}).get("peak_tree_rss_mb"), 1)
    lines.append("")

    # Targets
    targets = []

    def target(name, ok, detail):
        targets.append({"target": name, "pass": ok, "detail": detail})

    def cwKill(key):
        return kill.get("closewatch", {}).get(key, {}).get("summary")

    k1 = [cwKill(f"{sc}@1") for sc in ("fin", "rst", "half")]
    if all(k1):
        p50 = max(k["p50_ms"] or math.inf for k in k1)
        p99 = max(k["p99_ms"] or math.inf for k in k1)
        allKilled = all(k["survived"] == 0 and k["failed"] == 0 for k in k1)
        target("kill p50 <= 0.5 ms, 1 conn (FIN/RST/half)", p50 <= 0.5 and allKilled,
               f"worst p50 {fmt(p50, 3)} ms")
        target("kill p99 <= 2 ms, 1 conn (FIN/RST/half)", p99 <= 2 and allKilled,
               f"worst p99 {fmt(p99, 3)} ms")
    nmax = max(res["config"]["concurrency"])
    kn = [cwKill(f"{sc}@{nmax}") for sc in ("fin", "rst", "half")]
    if all(kn):
        p99 = max(k["p99_ms"] or math.inf for k in kn)
        target(f"kill p99 <= 5 ms at {nmax} conns (FIN/RST/half)",
               p99 <= 5 and all(k["survived"] == 0 for k in kn), f"worst p99 {fmt(p99, 3)} ms")
    kp = [cwKill(f"paused@{n}") for n in res["config"]["concurrency"]]
    if all(kp):
        det = all(k["survived"] == 0 and k["failed"] == 0 and k["killed"] == k["connections"] for k in kp)
        p99 = max(k["p99_ms"] or math.inf for k in kp)
        verified = all(k["paused_verified"] == k["connections"] for k in kp)
        undelivered = sum(k["survived"] - k["survived_fin_delivered"] for k in kp)
        target("paused closes detected 100%, p99 <= 5 ms", det and p99 <= 5,
               f"{sum(k['killed'] for k in kp)}/{sum(k['connections'] for k in kp)} killed, "
               f"worst p99 {fmt(p99, 3)} ms"
               + ("" if verified else "; NOTE not every connection was verified paused")
               + (f"; {undelivered} survivors' FIN never reached the server" if undelivered else ""))
    if "tcpserver" in rate and "closewatch" in rate:
        a, b = rate["closewatch"].get("conn_per_s"), rate["tcpserver"].get("conn_per_s")
        target("conn/s >= tcpserver's", a is not None and b is not None and a >= b,
               f"{fmt(a, 0)} vs {fmt(b, 0)} ({fmt(ratio(a, b), 2)}x)")
    if "socat" in tp and "closewatch" in tp:
        a, b = tp["closewatch"].get("mb_per_s"), tp["socat"].get("mb_per_s")
        target("relay MB/s >= 1.5x socat's", a is not None and b is not None and a >= 1.5 * b,
               f"{fmt(a, 0)} vs {fmt(b, 0)} ({fmt(ratio(a, b), 2)}x)")
    if "closewatch" in tp:
        r = tp["closewatch"].get("peak_rss_mb")
        target("peak RSS during relay <= 64 MB", r is not None and r <= 64, f"{fmt(r, 1)} MB")
    if "closewatch" in sp:
        s = sp["closewatch"]
        r = s.get("ratio")
        ok = r is not None and r <= 2 and s.get("background_opened") == bg
        capped = ""
        if s.get("background_capped_at"):
            capped = (f"; capped: {s['server_fds_per_connection']} fds per connection, "
                      f"server RLIMIT_NOFILE {s['server_fd_limit']}")
        target(f"spawn p50 at {bg} open conns <= 2x idle", ok,
               f"{fmt(s.get('loaded_p50_ms'), 3)} vs {fmt(s.get('idle_p50_ms'), 3)} ms "
               f"({fmt(r, 2)}x; {s.get('background_opened')}/{bg} opened{capped})")
    if "naive" in servers:
        for sc in ("fin", "rst", "half"):
            cw, nv = cwKill(f"{sc}@1"), kill.get("naive", {}).get(f"{sc}@1", {}).get("summary")
            if not (cw and nv and cw["killed"] and nv["killed"]):
                continue
            r50 = ratio(cw["p50_ms"], nv["p50_ms"])
            r99 = ratio(cw["p99_ms"], nv["p99_ms"])
            target(f"kill {sc} 1 conn: p50 <= 1.25x, p99 <= 2x the naive relay's (same run)",
                   r50 is not None and r50 <= 1.25 and r99 is not None and r99 <= 2
                   and cw["survived"] == 0,
                   f"p50 {fmt(cw['p50_ms'], 3)} vs {fmt(nv['p50_ms'], 3)} ms ({fmt(r50, 2)}x), "
                   f"p99 {fmt(cw['p99_ms'], 3)} vs {fmt(nv['p99_ms'], 3)} ms ({fmt(r99, 2)}x), "
                   f"median over {cw['reps']} alternating runs")
    for n, runs in res.get("floor", {}).items():
        cw = cwKill(f"fin@{n}")
        if not cw or not cw["killed"]:
            continue
        floor99 = median([r[1] for r in runs])
        r99 = ratio(cw["p99_ms"], floor99)
        target(f"kill FIN {n} at once: p99 <= 1.5x the kernel floor at {n} (same run)",
               r99 is not None and r99 <= 1.5 and cw["survived"] == 0,
               f"p99 {fmt(cw['p99_ms'], 3)} vs {fmt(floor99, 3)} ms ({fmt(r99, 2)}x)")
        burst99 = median([r[4] for r in runs])
        b99 = ratio(cw["p99_ms"], burst99)
        target(f"kill FIN {n} at once: p99 <= 1.5x the kernel floor at {n} timed from its "
               "first kill (same run)",
               b99 is not None and b99 <= 1.5 and cw["survived"] == 0,
               f"p99 {fmt(cw['p99_ms'], 3)} vs {fmt(burst99, 3)} ms ({fmt(b99, 2)}x)")
        ideal = kill.get("ideal", {}).get(f"fin@{n}", {}).get("summary")
        if ideal and ideal["killed"]:
            i99 = ratio(cw["p99_ms"], ideal["p99_ms"])
            target(f"kill FIN {n} at once: p99 against the ideal server's (ideal_server.py: "
                   "epoll + killpg, nothing else; same run)",
                   i99 is not None and i99 <= 1.5 and cw["survived"] == 0,
                   f"p99 {fmt(cw['p99_ms'], 3)} vs {fmt(ideal['p99_ms'], 3)} ms ({fmt(i99, 2)}x); "
                   f"ideal / floor {fmt(ratio(ideal['p99_ms'], floor99), 2)}x, / floor from "
                   f"the first kill {fmt(ratio(ideal['p99_ms'], burst99), 2)}x")
    lines.append("## Targets (closewatch)\n")
    lines.append("| target | result | measured |")
    lines.append("|---|---|---|")
    for t in targets:
        lines.append(f"| {t['target']} | {'PASS' if t['pass'] else 'FAIL'} | {t['detail']} |")
    lines.append("")
    return "\n".join(lines), targets


# --------------------------------------------------------------------------
# Main


def versionOf(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return None


def raiseFdLimit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new in ((max(want, hard), max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(new[0], new[1]), new[1]))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> int:
    global ROOT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (< 2 min)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory")
    ap.add_argument("--server-python", default=sys.executable,
                    help="interpreter that runs closewatch (must import Twisted)")
    ap.add_argument("--servers", default="closewatch,naive,socat,tcpserver",
                    help="naive is bench/naive_relay.py (a bare Twisted relay)")
    ap.add_argument("--only", default="kill,rate,spawn,throughput",
                    help="comma-separated subset of kill,rate,spawn,throughput")
    ap.add_argument("--runs", type=int, default=0,
                    help="repetitions of every kill cell (servers alternate within each)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--alternate", action="store_true",
                    help="single-connection kill trials of closewatch and the naive relay "
                         "interleaved one by one (fairest on a busy machine)")
    ap.add_argument("--trials", type=int, default=0,
                    help="single-connection trials per repetition (default 50, 20 with --quick)")
    ap.add_argument("--concurrency", default="",
                    help="kill concurrency levels, e.g. 1,100 (default 1,100,1000)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs in OUT/logs")
    ap.add_argument("--closewatch-args", default="",
                    help="more closewatch options, e.g. '--cgroup off'")
    ap.add_argument("--root", default=str(ROOT),
                    help="closewatch source tree to benchmark (default: this checkout)")
    args = ap.parse_args()
    ROOT = Path(args.root).resolve()

    if not hasattr(os, "pidfd_open"):
        sys.exit("needs Linux 5.3+ and Python 3.9+ (os.pidfd_open)")
    if not os.access(PIDWORKER, os.X_OK):
        os.chmod(PIDWORKER, 0o755)

    q = args.quick
    cfg = {
        "concurrency": [1, 100, 1000],
        # Peers never kill (tcpserver) or kill after socat's 0.5 s timeout: each
        # of their cells costs the 3 s survival wait, so --quick runs them at
        # one connection only.
        "peer_concurrency": [1] if q else [1, 100, 1000],
        "kill_reps": {1: 1, 100: 1, 1000: 1} if q else {1: 3, 100: 3, 1000: 3},
        "single_trials": 20 if q else 50,
        # peers' single-connection cells: their outcome does not vary
        "peer_single_trials": 5 if q else 10,
        "rate_count": 300 if q else 2000,
        "rate_reps": 1 if q else 3,
        "background": 1000 if q else 5000,
        "spawn_rounds": 2 if q else 3,
        "spawn_per_round": 50 if q else 100,
        "throughput_mib": 256,
        "throughput_reps": 1 if q else 3,
        "survive_s": SURVIVE_S,
    }
    if args.concurrency:
        cfg["concurrency"] = [int(n) for n in args.concurrency.split(",")]
    if args.runs:
        cfg["kill_reps"] = {n: args.runs for n in cfg["concurrency"]}
    if args.trials:
        cfg["single_trials"] = args.trials
    cfg["alternate"] = args.alternate
    cfg["scenarios"] = [sc for sc in SCENARIOS if sc in args.scenarios.split(",")]
    only = set(args.only.split(","))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logdir = out / "logs" if args.keep_logs else Path(tempfile.mkdtemp(prefix="closewatch-bench-"))
    logdir.mkdir(parents=True, exist_ok=True)

    fdLimit = raiseFdLimit(65536)
    if fdLimit < cfg["background"] * 2 + 2000:
        newbg = max(100, (fdLimit - 2000) // 2)
        log(f"RLIMIT_NOFILE is {fdLimit}: background connections cut to {newbg} "
            f"(run as root or raise the hard limit for {cfg['background']})")
        cfg["background"] = newbg

    servers = []
    for name in args.servers.split(","):
        if name not in SCRIPTED and shutil.which(name) is None:
            log(f"{name} not found, skipped (apt-get install -y socat ucspi-tcp)")
            continue
        servers.append(name)
    check = subprocess.run(
        [args.server_python, "-c", "import twisted, attr, twisted_closewatch; print(twisted_closewatch.__file__)"],
        capture_output=True, env=closewatchEnv(), text=True, cwd=tempfile.gettempdir(),
    )
    if check.returncode:
        sys.exit(f"{args.server_python} cannot import Twisted/attrs: pass --server-python "
                 "(e.g. the venv's python) or pip install -e .")
    if not check.stdout.strip().startswith(str(ROOT)):
        log(f"warning: the server imports {check.stdout.strip()}, not from {ROOT}")
    if "closewatch" in servers:
        EXTRA_CLOSEWATCH_OPTIONS[:] = (closewatchOptions(args.server_python, cfg["background"] + 2000)
                                       + args.closewatch_args.split())

    twistedVersion = versionOf([args.server_python, "-c", "import twisted; print(twisted.__version__)"])
    commit = versionOf(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    if not commit or "fatal" in commit:
        commit = (ROOT / "COMMIT").read_text().strip() if (ROOT / "COMMIT").exists() else "unknown"
    socatV = versionOf(["socat", "-V"]) if "socat" in servers else None
    if socatV:
        socatV = next((l for l in socatV.splitlines() if "socat version" in l), socatV)
        socatV = " ".join(socatV.split()[:3])
    res: dict = {
        "meta": {
            "mode": "quick" if q else "full",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": {
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "fd_limit": fdLimit,
                "loadavg_start": os.getloadavg(),
            },
            "root": str(ROOT),
            "closewatch_options": EXTRA_CLOSEWATCH_OPTIONS,
            "twisted": twistedVersion,
            "closewatch_commit": commit,
            "socat": socatV,
        },
        "config": cfg,
        "servers": servers,
        "kill": {},
        "floor": {},
        "rate": {},
        "spawn": {},
        "throughput": {},
    }
    started = time.monotonic()

    def onSignal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, onSignal)
    signal.signal(signal.SIGHUP, onSignal)
    worker = [str(PIDWORKER)]
    try:
        running = {}
        if only & {"kill", "rate", "spawn"}:
            for name in servers:
                if not only & PEER_MEASURES.get(name, only):
                    continue
                # The paused scenario closes behind a backlog sized to fill
                # the pipe and the read-ahead, so that the relay pauses: a
                # spool would read it on (up to 64 MiB, each connection's
                # set-up then minutes long) and nothing would pause.  The
                # close behind a backlog with the spool: spool_bench.py.
                running[name] = startServer(name, worker, logdir, args.server_python,
                                            KILL_OPTIONS if name == "closewatch" else ())
                log(f"{name} listening on {running[name].port} (pid {running[name].pid})")

        if "kill" in only:
            for n in cfg["concurrency"]:
                for sc in cfg["scenarios"]:
                    for rep in range(cfg["kill_reps"][n]):
                        if n > 1 and sc == cfg["scenarios"][0]:
                            # The kernel's floor at this concurrency, in the
                            # same alternation as the servers.
                            floor = kill_floor.oneRun(n)
                            res["floor"].setdefault(str(n), []).append(floor)
                            log(f"kill floor n={n:<4d} rep {rep}: p50 {floor[0]:.3f} "
                                f"p99 {floor[1]:.3f} ms; from the first kill p50 "
                                f"{floor[3]:.3f} p99 {floor[4]:.3f} ms")
                        # Servers that kill: trial by trial (--alternate) or
                        # cell by cell.  The naive relay is the yardstick: as
                        # many trials as closewatch.
                        killers = {name: running[name] for name in servers
                                   if name == "closewatch" or sc in PEER_SCENARIOS.get(name, ())}
                        together = (killCellsAlternating(killers, sc, cfg["single_trials"])
                                    if args.alternate and n == 1 and len(killers) > 1 else {})
                        for name in servers:  # interleaved: noise hits all alike
                            if name in PEER_SCENARIOS and sc not in PEER_SCENARIOS[name]:
                                continue
                            if name not in SCRIPTED and n not in cfg["peer_concurrency"]:
                                continue
                            r = together.get(name) or killCell(
                                running[name], sc, n,
                                cfg["single_trials"] if name in killers else cfg["peer_single_trials"])
                            cell = res["kill"].setdefault(name, {}).setdefault(f"{sc}@{n}", {"reps": []})
                            cell["reps"].append(r)
                            log(f"kill {sc:6s} n={n:<4d} rep {rep} {name:10s}: "
                                f"{r['killed']}/{r['survived']} p50 {fmt(r['p50_ms'], 3)} "
                                f"p99 {fmt(r['p99_ms'], 3)} ms"
                                + (f" paused {r['paused_verified']}/{r['connections']}"
                                   if r["paused_verified"] is not None else "")
                                + (f" failed {r['failed']}" if r["failed"] else "")
                                + (f" server CPU {r['server_cpu_us_per_close']:.0f} us/close"
                                   if r.get("server_cpu_us_per_close") is not None else "")
                                + f" (setup {r['setup_s']} s)")
                            time.sleep(0.2)
            for name, cells in res["kill"].items():
                for cell in cells.values():
                    cell["summary"] = summarizeKill(cell["reps"])
            log(f"kill latency done at {time.monotonic() - started:.0f} s")

        if "rate" in only:
            for rep in range(cfg["rate_reps"]):
                for name in servers:
                    if "rate" not in PEER_MEASURES.get(name, {"rate"}):
                        continue
                    r = connRate(running[name], cfg["rate_count"])
                    res["rate"].setdefault(name, {"reps": []})["reps"].append(r)
                    log(f"rate rep {rep} {name:10s}: {fmt(r['conn_per_s'], 0)} conn/s, "
                        f"server CPU {fmt(r['server_cpu_us_per_conn'], 0)} us/conn, "
                        f"spawn p50 {fmt(r['spawn_p50_ms'], 3)} ms")
                    time.sleep(0.3)
            for name, d in res["rate"].items():
                d["conn_per_s"] = median([r["conn_per_s"] for r in d["reps"]])
                d["spawn_p50_ms"] = median([r["spawn_p50_ms"] for r in d["reps"]])
                d["server_cpu_us_per_conn"] = median([r["server_cpu_us_per_conn"] for r in d["reps"]])
            log(f"rate done at {time.monotonic() - started:.0f} s")

        if "spawn" in only:
            for name in servers:
                if "spawn" not in PEER_MEASURES.get(name, {"spawn"}):
                    continue
                r = spawnUnderLoad(running[name], cfg["background"], cfg["spawn_rounds"],
                                   cfg["spawn_per_round"])
                res["spawn"][name] = r
                log(f"spawn {name:10s}: idle {fmt(r.get('idle_p50_ms'), 3)} ms, with "
                    f"{r['background_opened']} open {fmt(r.get('loaded_p50_ms'), 3)} ms "
                    f"(opened in {r['background_open_s']} s)")
                time.sleep(0.5)
            log(f"spawn done at {time.monotonic() - started:.0f} s")

        for name in list(running):
            stopServer(running.pop(name))

        if "throughput" in only:
            for name in servers:
                if "throughput" not in PEER_MEASURES.get(name, {"throughput"}):
                    continue
                srv = startServer(name, [shutil.which("cat") or "/bin/cat"], logdir, args.server_python)
                try:
                    reps = []
                    for rep in range(cfg["throughput_reps"]):
                        r = throughputOnce(srv, cfg["throughput_mib"] * MiB)
                        reps.append(r)
                        log(f"throughput rep {rep} {name:10s}: {fmt(r['mb_per_s'], 0)} MB/s, "
                            f"server CPU {fmt(r['server_cpu_ms_per_mib'], 2)} ms/MiB, "
                            f"peak RSS {r['peak_rss_mb_sampled']:.1f} MB (VmHWM {fmt(r['vmhwm_mb'], 1)})"
                            + ("" if r["ok"] else f" FAILED {r['error']} {r['received']}"))
                        time.sleep(0.3)
                finally:
                    stopServer(srv)
                res["throughput"][name] = {
                    "reps": reps,
                    "mb_per_s": median([r["mb_per_s"] for r in reps]),
                    "peak_rss_mb": max(
                        max(r["peak_rss_mb_sampled"], r["vmhwm_mb"] or 0) for r in reps
                    ),
                    "peak_tree_rss_mb": max(r["peak_tree_rss_mb_sampled"] for r in reps),
                    "server_cpu_ms_per_mib": median([r["server_cpu_ms_per_mib"] for r in reps]),
                    "server_comms": reps[-1]["server_comms"],
                    "all_ok": all(r["ok"] for r in reps),
                }
            log(f"throughput done at {time.monotonic() - started:.0f} s")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        cleanup()
        return 130
    finally:
        cleanup()
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)

    res["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    res["meta"]["host"]["loadavg_end"] = os.getloadavg()
    report, targets = buildReport(res)
    res["targets"] = targets
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(report)
    print(report)
    try:
        sys.path.insert(0, str(HERE))
        from plot_kill_latency import plot

        png = plot(res, out / "kill_latency.png")
        log(f"plot: {png}")
    except ImportError as e:
        log(f"no plot ({e}): pip install matplotlib, then "
            f"python bench/plot_kill_latency.py {out / 'results.json'}")
    log(f"results: {out / 'results.json'}, {out / 'results.md'} ({res['meta']['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
