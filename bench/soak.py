#!/usr/bin/env python3
"""
closewatch soak: many connections ended every way there is, then a count of
everything that could have leaked.

    python bench/soak.py [--connections 10000] [--burst 1000] [--bursts 3]
                         [--concurrency 16] [--warmup-rounds 2] [--seed N]
                         [--json FILE]

Starts three servers of this checkout on loopback (twistd -n closewatch,
JSON logs to a temporary directory), each with --max-per-peer BURST,
--busy-message 'BUSY\\n' and --metrics:

  kill       --half-close kill     -- worker.sh
  forward    --half-close forward  -- worker.sh
  spawnfail  --half-close kill     -- broken.sh   (its interpreter line names
             a file that does not exist: posix_spawn fails with ENOENT, as
             for a deleted or half-deployed worker)

worker.sh forks a grandchild into its process group (sleep, stdio on
/dev/null), prints its pid, reads one line and then: "exit" -> prints "bye",
exits 3; "forward" -> prints "got N" for the N bytes it reads up to EOF,
exits 0; anything else (or EOF) -> sleeps forever.

Drives CONNECTIONS connections in a random mix (CONCURRENCY at a time):
FIN, RST, half-close under --half-close kill, half-close under forward (the
whole answer must arrive), RST under forward, worker exits first, FIN and
RST while the relay is paused by a worker that does not read, spawn
failure, and connect-then-reset at once; between them BURSTS bursts of
BURST concurrent connections (all open, every pid line read, then all
dropped or half-closed at once).  Before the baseline each server gets
WARMUP_ROUNDS warm-up rounds (a tenth of the mix, as many paused relays at
once as the mix can have, a burst per server), so that one-off allocations
(the close watch's epoll, the allocator's high-water marks) are not counted
as growth; the RSS after every phase is printed, to show it levels off.

Afterwards, for each server: open descriptors back to the baseline
(/proc/PID/fd), no zombie child, no live process left in any worker's
process group (a /proc scan by process group id, robust to pid reuse), all
limit slots free (BURST fresh connections from the same address all get a
worker, and one more is refused: the limit is on, and nothing holds a slot),
metrics agree (no active worker, ends counted), RSS growth <= 5 MiB, every
connection ended with the reason its kind implies, and SIGTERM stops it
with status 0.  Prints a table of figures; exits 1 on any failure.

Linux only (/proc, pidfds through the server).  The soak makes itself the
subreaper of its servers' orphans (PR_SET_CHILD_SUBREAPER) and reaps them:
some container inits never reap, and killed grandchildren would otherwise
linger as zombies.  tests/test_soak.py runs a reduced soak in CI.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import ctypes
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.reliability import readUntilClosed  # noqa: E402
from tests.support import children, readLine, rssKiB, workers  # noqa: E402

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
MiB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_CHILD_SUBREAPER = 36
#: Timeout for every single client operation.
IO_TIMEOUT = 60.0

WORKER = """\
sleep 100000 </dev/null >/dev/null 2>&1 &
echo $$ $CLOSEWATCH_CONNECTION_ID
IFS= read -r mode || exec sleep 100000
case "$mode" in
  exit) echo bye; exit 3 ;;
  forward) n=$(wc -c); echo "got $n"; exit 0 ;;
esac
exec sleep 100000
"""

#: kind -> (server, weight in the mix, end reasons allowed, exit check)
KINDS: dict[str, tuple[str, int, frozenset[str], Callable[[dict], bool]]] = {}


def _killed(end: dict) -> bool:
    return end.get("exit_signal") == signal.SIGKILL


def _exited(code: int) -> Callable[[dict], bool]:
    return lambda end: end.get("exit_code") == code and end.get("exit_signal") is None


def _never(end: dict) -> bool:
    return end.get("pid") is None


def kind(name: str, server: str, weight: int, reasons: set[str], check: Callable[[dict], bool]):
    def register(f):
        KINDS[name] = (server, weight, frozenset(reasons), check)
        f.kindName = name
        return f

    return register


# /proc


def procStat(pid: int) -> tuple[str, int, int, float] | None:
    """
    (state, ppid, pgrp, start time in seconds since boot) of C{pid}.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19]) / CLOCK_TICKS


def fdTargets(pid: int) -> dict[int, str]:
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return targets


def _epoch(isoTime: str) -> float:
    """
    Seconds since the epoch of a JSON log line's C{time}.
    """
    return datetime.fromisoformat(isoTime).timestamp()


def uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def groupLeftovers(reapedAt: dict[int, float]) -> list[tuple[int, int, str]]:
    """
    Live processes in any worker's process group: (pid, pgid, state).

    pgid -> seconds since boot when that worker was reaped.  A group counts
    only if a member started before then: pids (and so group ids) are reused
    (pid_max may be 32768), but never while the group still has a member, so
    a reused id cannot hide a leftover.
    """
    found: dict[int, list[tuple[int, str, float]]] = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = procStat(int(name))
        if stat is None:
            continue
        state, _, pgrp, started = stat
        if pgrp in reapedAt and state not in ("Z", "X"):
            found[pgrp].append((int(name), state, started))
    leftovers = []
    for pgid, members in found.items():
        if min(m[2] for m in members) <= reapedAt[pgid] + 1.0:
            leftovers.extend((pid, pgid, state) for pid, state, _ in members)
    return leftovers


class Orphans:
    """
    Adopt the servers' orphaned descendants and reap them, in a thread.
    """

    def __init__(self) -> None:
        self.reaped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.active = False

    def start(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.active = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            self.active = False
        self._thread.start()

    def reap(self) -> None:
        ours = os.getsid(0)
        for pid in children(os.getpid()):
            stat = procStat(pid)
            if stat is None or stat[0] != "Z":
                continue
            try:
                if os.getsid(pid) == ours:
                    continue  # a server: subprocess reaps it
            except OSError:
                pass
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    self.reaped += 1
            except ChildProcessError:
                pass

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.reap()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.reap()
        if self.active:
            ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# Servers.


class Server:
    """
    C{twistd -n closewatch}, its JSON log read incrementally.
    """

    def __init__(self, name: str, args: list[str], command: list[str], workdir: str,
                 python: str = sys.executable) -> None:
        self.name = name
        self.logPath = os.path.join(workdir, f"{name}.jsonl")
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        argv = [python, "-c", TWISTD, "-n", "--pidfile=",
                "--logger=twisted_closewatch.logs.jsonObserver", "closewatch",
                "--listen", "tcp:0:interface=127.0.0.1", *args, "--", *command]
        self._log = open(self.logPath, "wb")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, cwd=workdir)
        self.pid = self.process.pid
        self._reader = open(self.logPath, "rb")
        self._partial = b""
        self._lock = threading.Lock()
        self.ends: list[dict] = []
        self.failures: list[dict] = []
        self.ports: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while "CloseWatchFactory" not in self.ports or (
            "--metrics" in args and "metrics" not in self.ports
        ):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not start: {self.output()[-2000:]}")
            self.poll()
            time.sleep(0.05)
        self.port = self.ports["CloseWatchFactory"]

    def output(self) -> str:
        with open(self.logPath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def poll(self) -> None:
        """
        Read the log events written since the last call.
        """
        with self._lock:
            data = self._partial + self._reader.read()
            lines = data.split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                text = event.get("text", "")
                match = re.match(r"(\w+) starting on (\d+)$", text)
                if match:
                    # The metrics endpoint is an HTTP site, whatever its name.
                    key = "metrics" if "Site" in match.group(1) else match.group(1)
                    self.ports.setdefault(key, int(match.group(2)))
                if "kill_latency_ms" in event and "reason" in event:
                    self.ends.append(event)
                if "traceback" in event or event.get("level") == "critical" or "Traceback" in text:
                    self.failures.append(event)

    def endCount(self) -> int:
        self.poll()
        return len(self.ends)

    def workers(self) -> list[int]:
        return workers(self.pid)

    def zombies(self) -> list[int]:
        return [p for p in children(self.pid) if (procStat(p) or ("?",))[0] == "Z"]

    def metrics(self) -> dict[str, float]:
        port = self.ports.get("metrics")
        if port is None:
            return {}
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while (chunk := sock.recv(65536)) and len(data) < 16 * MiB:
                data += chunk
        values = {}
        for line in data.partition(b"\r\n\r\n")[2].decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def settle(self, expected: int, timeout: float = 120.0) -> None:
        """
        Wait until at least C{expected} connections have ended, no worker is
        left, and the end count has been still for a moment.
        """
        deadline = time.monotonic() + timeout
        last, stillSince = -1, time.monotonic()
        while True:
            count = self.endCount()
            if count != last:
                last, stillSince = count, time.monotonic()
            if count >= expected and not self.workers() and time.monotonic() - stillSince > 0.3:
                return
            if time.monotonic() > deadline:
                stuck = {}
                for pid in self.workers()[:5]:
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        cmd = "?"
                    stuck[pid] = (procStat(pid), cmd[:80], sorted(fdTargets(pid).items())[:6]
                                  if os.path.exists(f"/proc/{pid}/fd") else None)
                raise RuntimeError(
                    f"{self.name}: not settled after {timeout} s: {count} ends of "
                    f"{expected}, workers left: {stuck}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return None
        finally:
            self._log.close()
            self._reader.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
        self._reader.close()


# Clients.


_opened = threading.local()


def connect(port: int) -> socket.socket:
    """
    A connection to C{port}, remembered so that a client that fails midway
    can be reset (a socket left to the garbage collector, with data queued
    behind a closed window, would never tell the server it is gone).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    opened = getattr(_opened, "sockets", None)
    if opened is not None:
        opened.append(sock)
    return sock


class Worker(NamedTuple):
    """
    Who a client's worker is: its pid, and the connection id the server
    gave it (pids are reused during a soak; connection ids are not).
    """

    pid: int
    cid: int


def readPid(sock: socket.socket) -> Worker:
    line = readLine(sock, IO_TIMEOUT)
    words = line.split()
    if len(words) != 2 or not all(w.isdigit() for w in words):
        raise AssertionError(f"expected a pid and connection id line, got {line!r}")
    return Worker(int(words[0]), int(words[1]))


def rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def outq(sock: socket.socket) -> int:
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def sendAcked(sock: socket.socket, total: int, step: int = 16 * 1024) -> bool:
    """
    Send C{total} bytes, each step acknowledged by the server's kernel before
    the next: nothing stays queued on our side, so a FIN sent next reaches
    the server at once even though its relay has stopped reading.  False if
    the server's window closed first (a FIN would then wait behind the
    queued data, and no server could see it).
    """
    chunk = b"q" * step
    for offset in range(0, total, step):
        sock.sendall(chunk[: min(step, total - offset)])
        deadline = time.monotonic() + 3.0
        while outq(sock):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
    return True


#: The servers' read-ahead: past the worker's stdin pipe (1 MiB) and this,
#: a relay whose worker does not read has stopped reading its client.
READ_AHEAD = 256 * 1024
#: Enough for that, and small enough for the rest to fit the server's
#: receive window.
PAUSED_BACKLOG = MiB + READ_AHEAD + 32 * 1024


@kind("fin", "kill", 20, {"client-closed"}, _killed)
def fin(s: Server, rng: random.Random) -> int:
    sock = connect(s.port)
    pid = readPid(sock)
    sock.close()
    return pid


@kind("rst", "kill", 20, {"client-reset"}, _killed)
def reset(s: Server, rng: random.Random) -> int:
    sock = connect(s.port)
    pid = readPid(sock)
    rst(sock)
    return pid


@kind("half-close-kill", "kill", 12, {"client-closed", "half-close"}, _killed)
def halfCloseKill(s: Server, rng: random.Random) -> int:
    sock = connect(s.port)
    pid = readPid(sock)
    sock.shutdown(socket.SHUT_WR)
    data, how = readUntilClosed(sock, IO_TIMEOUT, 16 * MiB)
    sock.close()
    if (data, how) != (b"", "eof"):
        raise AssertionError(f"after a half-close under kill: {data[:80]!r}, {how}")
    return pid


@kind("half-close-forward", "forward", 14, {"worker-exited"}, _exited(0))
def halfCloseForward(s: Server, rng: random.Random) -> int:
    sock = connect(s.port)
    pid = readPid(sock)
    size = rng.choice((0, 1, rng.randrange(1, 256 * 1024)))
    sock.sendall(b"forward\n" + b"f" * size)
    sock.shutdown(socket.SHUT_WR)
    data, how = readUntilClosed(sock, IO_TIMEOUT, 16 * MiB)
    sock.close()
    if how != "eof" or data.split() != [b"got", str(size).encode()]:
        raise AssertionError(f"forward answer lost: {data[:80]!r} ({how}), sent {size}")
    return pid


@kind("rst-forward", "forward", 5, {"client-reset"}, _killed)
def resetForward(s: Server, rng: random.Random) -> int:
    sock = connect(s.port)
    pid = readPid(sock)
    if rng.random() < 0.5:
        sock.sendall(b"some input\n")
    rst(sock)
    return pid


@kind("worker-exits", "kill", 10, {"worker-exited"}, _exited(3))
def workerExits(s: Server, rng: random.Random) -> int:
    sock = connect(s.port)
    pid = readPid(sock)
    sock.sendall(b"exit\n")
    data, how = readUntilClosed(sock, IO_TIMEOUT, 16 * MiB)
    sock.close()
    if (data, how) != (b"bye\n", "eof"):
        raise AssertionError(f"worker's last words lost: {data[:80]!r} ({how})")
    return pid


@kind("paused-fin", "kill", 2, {"client-closed"}, _killed)
def pausedFin(s: Server, rng: random.Random) -> int | tuple[int, str]:
    sock = connect(s.port)
    pid = readPid(sock)
    sock.sendall(b"hold\n")
    if not sendAcked(sock, PAUSED_BACKLOG):
        rst(sock)
        return pid, "paused-window-closed-rst"
    sock.close()
    return pid


@kind("paused-rst", "kill", 3, {"client-reset"}, _killed)
def pausedRst(s: Server, rng: random.Random) -> int:
    sock = connect(s.port)
    pid = readPid(sock)
    sock.sendall(b"hold\n")
    sock.settimeout(0.5)
    try:
        sock.sendall(b"p" * (4 * MiB))
    except TimeoutError:
        pass  # paused: the server stopped taking it
    rst(sock)
    return pid


@kind("spawn-failure", "spawnfail", 10, {"spawn-failed"}, _never)
def spawnFailure(s: Server, rng: random.Random) -> None:
    sock = connect(s.port)
    data, how = readUntilClosed(sock, IO_TIMEOUT, 16 * MiB)
    sock.close()
    if data:
        raise AssertionError(f"a worker that cannot start said {data[:80]!r}")
    return None


@kind("connect-rst", "kill", 4, {"client-reset", "client-closed"}, _killed)
def connectReset(s: Server, rng: random.Random) -> None:
    rst(connect(s.port))
    return None


# The soak.


@dataclass
class Params:
    connections: int = 10000
    burst: int = 1000
    bursts: int = 3
    concurrency: int = 16
    seed: int | None = None
    #: Warm-up rounds (mix and bursts) before the baseline.
    warmupRounds: int = 2
    rssLimitKiB: int = 5 * 1024
    python: str = sys.executable
    progress: Callable[[str], None] = lambda message: None


@dataclass
class Report:
    params: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    connections: int = 0
    orphansReaped: int = 0

    def fail(self, message: str) -> None:
        if len(self.failures) < 200:
            self.failures.append(message)

    def table(self) -> str:
        out = []
        out.append(
            f"soak: {self.connections} connections in {self.seconds:.1f} s "
            f"({self.connections / max(self.seconds, 1e-9):.0f}/s), "
            f"mix {self.params['connections']}, {self.params['bursts']} bursts of "
            f"{self.params['burst']}, concurrency {self.params['concurrency']}, "
            f"{self.params['warmupRounds']} warm-up rounds, "
            f"seed {self.params['seed']}, load average {os.getloadavg()[0]:.1f}"
        )
        out.append("")
        out.append("| kind | server | connections | client errors | ends as expected | kill latency p50 / p99 / max (ms) |")
        out.append("|---|---|---:|---:|---:|---|")
        for name, k in sorted(self.kinds.items()):
            lat = k["latencies"]
            latText = "-"
            if lat:
                lat = sorted(lat)
                latText = f"{_pct(lat, 50):.2f} / {_pct(lat, 99):.2f} / {lat[-1]:.2f}"
            out.append(
                f"| {name} | {k['server']} | {k['count']} | {k['errors']} | "
                f"{k['asExpected']} | {latText} |"
            )
        out.append("")
        out.append(
            "| server | ends | fds baseline -> after (-> after slot check) | zombies | "
            "live processes in worker groups | RSS KiB start / baseline / after (growth) | "
            "slots: fresh connections served | refused at limit + 1 | metrics: active, ends | stop |"
        )
        out.append("|---|---:|---|---:|---:|---|---|---|---|---|")
        for name, s in self.servers.items():
            out.append(
                f"| {name} | {s.get('ends')} | {s.get('fdsBaseline')} -> {s.get('fdsAfter')} "
                f"(-> {s.get('fdsAfterSlots')}) | {s.get('zombies')} | {s.get('groupLeftovers')} | "
                f"{s.get('rssStart')} / {s.get('rssBaseline')} / {s.get('rssAfter')} "
                f"({s.get('rssGrowth'):+d}) | {s.get('slotsServed')}/{s.get('slots')} | "
                f"{s.get('refusedAtLimit')} | {s.get('metricsActive')}, {s.get('metricsEnds')} | "
                f"exit {s.get('exitStatus')} |"
            )
        out.append("")
        out.append("RSS KiB after each phase:")
        for name, s in self.servers.items():
            out.append(f"  {name}: " + ", ".join(f"{label} {kib}" for label, kib in s.get("rssTrail", [])))
        out.append("")
        out.append(f"orphans reaped by the soak (as subreaper): {self.orphansReaped}")
        out.append("result: " + ("PASS" if not self.failures else f"FAIL ({len(self.failures)})"))
        for failure in self.failures[:50]:
            out.append(f"  - {failure}")
        return "\n".join(out)


def _pct(sortedValues: list[float], q: float) -> float:
    if not sortedValues:
        return float("nan")
    index = min(len(sortedValues) - 1, max(0, round(q / 100 * (len(sortedValues) - 1))))
    return sortedValues[index]


@dataclass
class Outcome:
    kind: str
    server: str
    pid: int | None
    error: str | None


class Soak:
    def __init__(self, params: Params) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else random.randrange(1 << 30)
        self.seed = seed
        self.rng = random.Random(seed)
        self.report = Report(params={
            "connections": params.connections, "burst": params.burst,
            "bursts": params.bursts, "concurrency": params.concurrency, "seed": seed,
            "warmupRounds": params.warmupRounds,
        })
        self.outcomes: list[Outcome] = []
        self.made: collections.Counter[str] = collections.Counter()
        self.servers: dict[str, Server] = {}
        self.workdir = tempfile.mkdtemp(prefix="closewatch-soak-")
        self.interpreter = os.path.join(self.workdir, "missing", "sh")

    # Set-up.

    def writeWorkers(self) -> tuple[str, str]:
        worker = os.path.join(self.workdir, "worker.sh")
        broken = os.path.join(self.workdir, "broken.sh")
        for path, interpreter in ((worker, "/bin/sh"), (broken, self.interpreter)):
            with open(path, "w") as f:
                f.write(f"#!{interpreter}\n{WORKER}")
            os.chmod(path, 0o755)
        return worker, broken

    def startServers(self) -> None:
        worker, broken = self.writeWorkers()
        burst = self.params.burst
        common = ["--read-ahead", str(READ_AHEAD),
                  "--max-workers", str(4 * burst + 100), "--max-per-peer", str(burst),
                  "--busy-message", "BUSY\\n", "--metrics", "tcp:0:interface=127.0.0.1"]
        for name, policy, command in (("kill", "kill", worker), ("forward", "forward", worker),
                                      ("spawnfail", "kill", broken)):
            self.servers[name] = Server(name, ["--half-close", policy, *common], [command],
                                        self.workdir, self.params.python)
            self.report.servers[name] = {"rssStart": rssKiB(self.servers[name].pid)}

    # Driving.

    def run1(self, name: str, rng: random.Random) -> Outcome:
        server = KINDS[name][0]
        f = DRIVERS[name]
        _opened.sockets = []
        try:
            pid = f(self.servers[server], rng)
            if isinstance(pid, tuple) and isinstance(pid[1], str):
                pid, name = pid
            return Outcome(name, server, pid, None)
        except Exception as e:
            return Outcome(name, server, None, f"{type(e).__name__}: {e}")
        finally:
            for sock in _opened.sockets:
                if sock.fileno() != -1:
                    try:
                        rst(sock)
                    except OSError:
                        sock.close()
            _opened.sockets = None

    def mix(self, count: int, label: str = "") -> None:
        names = list(KINDS)
        weights = [KINDS[n][1] for n in names]
        picks = self.rng.choices(names, weights, k=count)
        seeds = [self.rng.randrange(1 << 30) for _ in picks]
        with concurrent.futures.ThreadPoolExecutor(self.params.concurrency) as pool:
            futures = [pool.submit(self.run1, n, random.Random(s)) for n, s in zip(picks, seeds)]
            for i, future in enumerate(futures):
                outcome = future.result()
                self.record(label + outcome.kind, outcome)
                if (i + 1) % 1000 == 0:
                    self.params.progress(f"  {label or 'mix'}: {i + 1}/{count}")

    def only(self, name: str, count: int, label: str) -> None:
        """
        C{count} connections of one kind, all at once.
        """
        seeds = [self.rng.randrange(1 << 30) for _ in range(count)]
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            for outcome in pool.map(lambda s: self.run1(name, random.Random(s)), seeds):
                self.record(label + outcome.kind, outcome)

    def trail(self, label: str) -> None:
        """
        The servers' RSS now: a leak grows phase after phase, a high-water
        mark does not.
        """
        for name, server in self.servers.items():
            self.report.servers[name].setdefault("rssTrail", []).append((label, rssKiB(server.pid)))

    def record(self, name: str, outcome: Outcome) -> None:
        outcome.kind = name
        self.outcomes.append(outcome)
        self.made[outcome.server] += 1

    def burstOn(self, serverName: str, label: str) -> None:
        """
        BURST connections open at once: all opened, every pid line read,
        then all ended in one sweep (FIN, RST, half-close; under forward a
        half-close whose answer must arrive).
        """
        server = self.servers[serverName]
        n = self.params.burst
        socks: list[socket.socket] = []
        pids: list[int | None] = []
        errors: list[str | None] = []
        try:
            for _ in range(n):
                socks.append(connect(server.port))
            for sock in socks:
                try:
                    pids.append(readPid(sock))
                    errors.append(None)
                except Exception as e:
                    pids.append(None)
                    errors.append(f"{type(e).__name__}: {e}")
        finally:
            actions = []
            for i, sock in enumerate(socks):
                if pids[i:i + 1] == [None] or i >= len(pids):
                    rst(sock)
                    actions.append(None)
                    continue
                if serverName == "forward":
                    action = ("burst-forward-rst" if i % 4 == 0 else "burst-half-close-forward")
                else:
                    action = ("burst-fin", "burst-rst", "burst-half-close-kill")[i % 3]
                actions.append(action)
                if action.endswith("rst"):
                    rst(sock)
                elif action == "burst-fin":
                    sock.close()
                elif action == "burst-half-close-kill":
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.sendall(b"forward\nxyz")
                    sock.shutdown(socket.SHUT_WR)
            for i, sock in enumerate(socks):
                action = actions[i]
                if action in ("burst-half-close-kill", "burst-half-close-forward"):
                    try:
                        data, how = readUntilClosed(sock, IO_TIMEOUT, 16 * MiB)
                        expected = b"" if action == "burst-half-close-kill" else b"got 3\n"
                        if (data.replace(b" ", b""), how) != (expected.replace(b" ", b""), "eof"):
                            errors[i] = f"{action}: {data[:40]!r} ({how})"
                    except Exception as e:
                        errors[i] = f"{action}: {type(e).__name__}: {e}"
                    sock.close()
        for i in range(len(socks)):
            name = label + (actions[i] or "burst-failed")
            self.record(name, Outcome(name, serverName, pids[i] if i < len(pids) else None,
                                      errors[i] if i < len(errors) else "not read"))

    def settle(self) -> None:
        for name, server in self.servers.items():
            connectResets = sum(
                1 for o in self.outcomes if o.server == name and o.kind.endswith("connect-rst")
            )
            try:
                server.settle(self.made[name] - connectResets)
            except RuntimeError as e:
                pids = {int(x) for x in re.findall(r"(\d+): \(", str(e))}
                known = [(o.kind, o.pid, o.error) for o in self.outcomes
                         if o.pid is not None and o.pid.pid in pids]
                errors = collections.Counter(
                    (o.kind, (o.error or "")[:100]) for o in self.outcomes if o.error is not None)
                raise RuntimeError(f"{e}; their connections: {known or 'none a client saw'}; "
                                   f"client errors: {dict(errors)}")

    # Measuring.

    def measure(self, key: str) -> None:
        for name, server in self.servers.items():
            s = self.report.servers[name]
            s[f"fds{key}"] = len(fdTargets(server.pid))
            s[f"fdTargets{key}"] = fdTargets(server.pid)
            s[f"rss{key}"] = rssKiB(server.pid)

    def slotCheck(self, name: str) -> None:
        """
        With --max-per-peer BURST: BURST fresh connections from the same
        address all get a worker (no slot is held by anything that ended),
        and one more is refused (the limit is really on).
        """
        server = self.servers[name]
        n = self.params.burst
        s = self.report.servers[name]
        s["slots"] = n
        socks = []
        served = 0
        try:
            for _ in range(n):
                socks.append(connect(server.port))
            for sock in socks:
                try:
                    line = readLine(sock, IO_TIMEOUT)
                except OSError:
                    line = b""
                words = line.split()
                if len(words) == 2 and all(w.isdigit() for w in words):
                    served += 1
            extra = connect(server.port)
            try:
                data, how = readUntilClosed(extra, IO_TIMEOUT, 16 * MiB)
            except OSError as e:
                data, how = b"", str(e)
            extra.close()
            s["refusedAtLimit"] = data == b"BUSY\n"
            if data != b"BUSY\n":
                self.report.fail(f"{name}: connection {n + 1} from one address got {data[:40]!r} ({how}), not the busy message")
        finally:
            for sock in socks:
                rst(sock)
        s["slotsServed"] = served
        if served != n:
            self.report.fail(f"{name}: only {served} of {n} fresh connections got a worker: slots leaked")
        self.made[name] += n
        self.report.connections += n + 1

    def verify(self) -> None:
        report = self.report
        p = self.params
        # Client side.
        kinds: dict[str, dict[str, Any]] = {}
        for o in self.outcomes:
            k = kinds.setdefault(o.kind, {"server": o.server, "count": 0, "errors": 0,
                                          "asExpected": 0, "latencies": []})
            k["count"] += 1
            if o.error is not None:
                k["errors"] += 1
                report.fail(f"{o.kind}: {o.error}")
        # Server side: every end matches its kind.
        reapedAt: dict[int, float] = {}
        bootOffset = time.time() - uptime()
        for name, server in self.servers.items():
            server.poll()
            byConnection = {e["connection_id"]: e for e in server.ends}
            for e in server.ends:
                if e.get("pid") is not None:
                    reapedAt[e["pid"]] = max(reapedAt.get(e["pid"], 0.0), _epoch(e["time"]) - bootOffset)
            matched = set()
            for o in self.outcomes:
                if o.server != name or o.pid is None:
                    continue
                end = byConnection.get(o.pid.cid)
                base = _baseKind(o.kind)
                _, _, reasons, check = KINDS.get(base, (None, None, None, None))
                if end is None or end.get("pid") != o.pid.pid:
                    report.fail(f"{o.kind}: no end event for worker {o.pid}: {end}")
                    continue
                matched.add(o.pid.cid)
                if reasons is not None and (end["reason"] not in reasons or not check(end)):
                    report.fail(f"{o.kind}: worker {o.pid} ended {end['reason']}, signal "
                                f"{end.get('exit_signal')}, code {end.get('exit_code')}")
                    continue
                kinds[o.kind]["asExpected"] += 1
                if end.get("kill_latency_ms") is not None:
                    kinds[o.kind]["latencies"].append(end["kill_latency_ms"])
            # Ends no client saw a pid for: connect-then-reset (some are
            # reset before they are accepted, and never end), spawn failures
            # (every one must end, as spawn-failed).
            unmatched = [e for e in server.ends if e["connection_id"] not in matched]
            pidless = [o for o in self.outcomes
                       if o.server == name and o.pid is None and o.error is None]
            allowed = {"spawn-failed"} if name == "spawnfail" else {"client-reset", "client-closed"}
            bad = [e for e in unmatched if e["reason"] not in allowed]
            for e in bad[:10]:
                report.fail(f"{name}: an end no client accounts for: {e['reason']} (pid {e.get('pid')})")
            if name == "spawnfail" and len(unmatched) != len(pidless):
                report.fail(f"{name}: {len(pidless)} spawn failures, {len(unmatched)} ends")
            elif len(unmatched) > len(pidless):
                report.fail(f"{name}: {len(unmatched)} ends no client accounts for (at most {len(pidless)})")
            report.servers[name]["unseenEnds"] = f"{len(unmatched)} of {len(pidless)}"
            for kindName, k in kinds.items():
                if k["server"] == name and _baseKind(kindName) in ("connect-rst", "spawn-failure"):
                    k["asExpected"] = f"{len(unmatched)} of {len(pidless)} (server-wide)" if not bad else 0
                    k["latencies"] = [e["kill_latency_ms"] for e in unmatched
                                      if e.get("kill_latency_ms") is not None]
            s = report.servers[name]
            s["ends"] = len(server.ends)
            s["zombies"] = len(server.zombies())
            if s["zombies"]:
                report.fail(f"{name}: zombie children {server.zombies()[:10]}")
            if server.failures:
                report.fail(f"{name}: {len(server.failures)} error events in the log, e.g. "
                            f"{json.dumps(server.failures[0])[:300]}")
        report.kinds = kinds
        leftovers = groupLeftovers(reapedAt)
        for s in report.servers.values():
            s["groupLeftovers"] = 0
        for name, server in self.servers.items():
            pids = {e["pid"] for e in server.ends if e.get("pid") is not None}
            mine = [l for l in leftovers if l[1] in pids]
            report.servers[name]["groupLeftovers"] = len(mine)
            if mine:
                report.fail(f"{name}: live processes in worker groups: {mine[:10]}")
        for name in self.servers:
            s = report.servers[name]
            s["rssGrowth"] = s["rssAfter"] - s["rssBaseline"]
            if s["rssGrowth"] > p.rssLimitKiB:
                report.fail(f"{name}: RSS grew by {s['rssGrowth']} KiB (limit {p.rssLimitKiB})")
            if s["fdsAfter"] != s["fdsBaseline"]:
                before, after = s["fdTargetsBaseline"], s["fdTargetsAfter"]
                diff = {fd: t for fd, t in after.items() if before.get(fd) != t}
                report.fail(f"{name}: {s['fdsBaseline']} fds at baseline, {s['fdsAfter']} after: {list(diff.items())[:10]}")

    def checkMetrics(self) -> None:
        for name, server in self.servers.items():
            s = self.report.servers[name]
            try:
                values = server.metrics()
            except OSError as e:
                self.report.fail(f"{name}: metrics: {e}")
                continue
            active = values.get("closewatch_workers_active")
            ends = sum(v for k, v in values.items() if k.startswith("closewatch_worker_ends_total"))
            s["metricsActive"], s["metricsEnds"] = active, int(ends)
            if active != 0:
                self.report.fail(f"{name}: metrics say {active} workers active")
            if int(ends) != server.endCount():
                self.report.fail(f"{name}: metrics count {ends} ends, the log {server.endCount()}")

    def run(self) -> Report:
        p = self.params
        started = time.monotonic()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        orphans = Orphans()
        orphans.start()
        try:
            p.progress(f"soak: starting servers in {self.workdir} (seed {self.seed})")
            self.startServers()
            # The warm-up takes every path to its high-water mark before
            # the baseline: all kinds, as many paused relays at once as the
            # mix can have (each holds up to the read-ahead), bursts on a
            # heap the mix has fragmented.  Growth after it is what the soak
            # measures (and the RSS after each phase shows whether it
            # levels off).
            for round in range(p.warmupRounds):
                p.progress(f"soak: warm-up {round + 1}")
                self.mix(max(200, p.connections // 10), "warmup-")
                self.settle()
                self.only("paused-rst", p.concurrency, "warmup-")
                self.only("paused-fin", p.concurrency, "warmup-")
                self.settle()
                self.burstOn("kill", "warmup-")
                self.burstOn("forward", "warmup-")
                self.settle()
            self.measure("Baseline")
            self.trail("baseline")
            warmup = len(self.outcomes)
            chunks = [p.connections // (p.bursts + 1)] * (p.bursts + 1)
            chunks[-1] += p.connections - sum(chunks)
            for i, chunk in enumerate(chunks):
                p.progress(f"soak: mix {chunk}")
                self.mix(chunk)
                self.settle()
                self.trail(f"mix {i + 1}")
                if i < p.bursts:
                    server = ("kill", "forward")[i % 2]
                    p.progress(f"soak: burst of {p.burst} on {server}")
                    self.burstOn(server, "")
                    self.settle()
                    self.trail(f"burst {i + 1}")
            self.report.connections = len(self.outcomes) - warmup
            p.progress("soak: measuring")
            self.measure("After")
            self.verify()
            # Drop the warm-up rows from the figures (they were verified).
            self.report.kinds = {k: v for k, v in self.report.kinds.items()
                                 if not k.startswith("warmup-")}
            p.progress("soak: slot checks")
            os.makedirs(os.path.dirname(self.interpreter), exist_ok=True)
            os.symlink("/bin/sh", self.interpreter)
            for name in self.servers:
                self.slotCheck(name)
            self.settle()
            for name, server in self.servers.items():
                self.report.servers[name]["fdsAfterSlots"] = len(fdTargets(server.pid))
                if self.report.servers[name]["fdsAfterSlots"] != self.report.servers[name]["fdsBaseline"]:
                    self.report.fail(f"{name}: fds after the slot check: {self.report.servers[name]['fdsAfterSlots']}")
            self.checkMetrics()
            p.progress("soak: stopping servers")
            for name, server in self.servers.items():
                status = server.stop()
                self.report.servers[name]["exitStatus"] = status
                if status != 0:
                    self.report.fail(f"{name}: SIGTERM stop exited with {status}")
                if server.workers():
                    self.report.fail(f"{name}: workers left after stop")
        finally:
            for server in self.servers.values():
                server.kill()
            orphans.stop()
            self.report.orphansReaped = orphans.reaped
            self.report.seconds = time.monotonic() - started
            for s in self.report.servers.values():
                for key in [k for k in s if k.startswith("fdTargets")]:
                    del s[key]
            if not self.report.failures:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                self.report.fail(f"logs kept in {self.workdir}")
        return self.report


def _baseKind(name: str) -> str:
    name = name.removeprefix("warmup-")
    if name.startswith("burst-"):
        return {
            "burst-fin": "fin",
            "burst-rst": "rst",
            "burst-half-close-kill": "half-close-kill",
            "burst-half-close-forward": "half-close-forward",
            "burst-forward-rst": "rst-forward",
        }.get(name, name)
    if name == "paused-window-closed-rst":
        return "paused-rst"
    return name


DRIVERS = {f.kindName: f for f in (fin, reset, halfCloseKill, halfCloseForward, resetForward,
                                     workerExits, pausedFin, pausedRst, spawnFailure, connectReset)}


def soak(params: Params) -> Report:
    return Soak(params).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--server-python", default=sys.executable)
    parser.add_argument("--json", help="write the report as JSON to this file")
    args = parser.parse_args(argv)
    report = soak(Params(
        connections=args.connections, burst=args.burst, bursts=args.bursts,
        concurrency=args.concurrency, seed=args.seed, python=args.server_python,
        warmupRounds=args.warmup_rounds,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    ))
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.__dict__, f, indent=1, default=str)
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
