"""
The C{sh} connection rate of closewatch trees against each other and
tcpserver, interleaved finely: on a shared machine a burst of load then
hits every server alike.

    flock /work/bench.lock python bench/rate_ab.py main=/work/main,rate=. \
        [--rounds 16] [--per 150] [--echo]

Every tree's server (C{twistd closewatch}, default options, the worker
C{pidworker.sh}) and tcpserver run at once; each round, every server gets
C{--per} sequential connections (connect, read the pid line, close), the
order rotated from round to round.  With C{--echo} the worker is
C{/bin/echo hi}, which exits at once, and the client reads until the
server's FIN: the time a one-shot worker's client waits for its end.
Per server: the median rate of its blocks, the median of its per-round
ratios to tcpserver, a connection's time (one C{connect} to the next) at
p10/p50/p90/p99 and its mean, and the server's CPU per connection.  Every
worker is killed after its block (by pidfd: tcpserver leaves them
running), every server at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIDWORKER = HERE / "pidworker.sh"
_CLK = os.sysconf("SC_CLK_TCK")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def loadAverage() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def waitListening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def block(port: int, count: int, echo: bool) -> tuple[float, list[float]]:
    """
    C{count} sequential connections: the rate, and each connection's time
    from its C{connect} to the next one's.
    """
    pidfds: list[int] = []
    starts: list[float] = []
    began = time.perf_counter()
    for _ in range(count):
        starts.append(time.perf_counter())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            line = s.recv(64)
            while echo and line:
                line = s.recv(64)
            if echo:
                continue
            try:
                pidfds.append(os.pidfd_open(int(line.split(b"\n", 1)[0])))
            except (OSError, ValueError):
                pass
    elapsed = time.perf_counter() - began
    for fd in pidfds:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
        os.close(fd)
    return count / elapsed, [b - a for a, b in itertools.pairwise(starts)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", help="NAME=DIR,... closewatch trees (DIR holds twisted_closewatch)")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--per", type=int, default=150, help="connections per server per round")
    ap.add_argument("--echo", action="store_true", help="worker /bin/echo hi, read to EOF")
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="rate-ab-"))
    worker = ["/bin/echo", "hi"] if args.echo else ["/bin/sh", str(PIDWORKER)]
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for spec in args.trees.split(","):
            name, root = spec.split("=", 1)
            port = freePort()
            env = dict(os.environ, PYTHONPATH=str(Path(root).resolve()))
            argv = [
                sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", f"--logfile={logdir / name}.log", "closewatch",
                "-l", f"tcp:{port}:interface=127.0.0.1", "--max-workers", "5000",
                "--", *worker,
            ]
            servers[name] = (
                subprocess.Popen(argv, env=env, cwd=logdir, stdout=subprocess.DEVNULL), port
            )
        port = freePort()
        servers["tcpserver"] = (
            subprocess.Popen(
                ["tcpserver", "-c", "20000", "-b", "1024", "-HRl0", "127.0.0.1", str(port),
                 *worker]
            ),
            port,
        )
        for _, port in servers.values():
            waitListening(port)
        time.sleep(1.0)
        names = list(servers)
        rates: dict[str, list[float]] = {n: [] for n in names}
        cycles: dict[str, list[float]] = {n: [] for n in names}
        cpu = dict.fromkeys(names, 0.0)
        print("load at start", loadAverage(), flush=True)
        for r in range(args.rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                process, port = servers[name]
                before = cpuSeconds(process.pid)
                rate, times = block(port, args.per, args.echo)
                time.sleep(0.15)
                cpu[name] += cpuSeconds(process.pid) - before
                rates[name].append(rate)
                cycles[name].extend(times)
        print("load at end", loadAverage())
        for name in names:
            ratios = [a / b for a, b in zip(rates[name], rates["tcpserver"], strict=True)]
            c = sorted(cycles[name])

            def at(q: float, c: list[float] = c) -> str:
                return f"{c[int(len(c) * q)] * 1e3:.2f}"

            print(
                f"{name:10} {statistics.median(rates[name]):5.0f} /s, "
                f"ratio to tcpserver {statistics.median(ratios):.3f} "
                f"(rounds {' '.join(f'{x:.2f}' for x in ratios)}); a connection "
                f"p10/p50/p90/p99 {at(0.1)}/{at(0.5)}/{at(0.9)}/{at(0.99)} ms, "
                f"mean {statistics.mean(c) * 1e3:.2f} ms; server CPU "
                f"{cpu[name] * 1e6 / (args.rounds * args.per):.0f} µs/connection"
            )
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in servers.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
