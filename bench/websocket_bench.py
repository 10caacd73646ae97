#!/usr/bin/env python3
"""
WebSocket kill latency and message rate: closewatch --websocket against
websocketd (Debian's package), interleaved in the same run.

Kill latency: a client connects, reads the worker's PID (the worker prints
it, then blocks in sleep, so it never notices its client by itself), sends
a close frame and keeps its TCP connection open, as a browser does; the
time from the frame's send to the worker's exit is taken with a pidfd.
The same with a worker that starts a child (a grandchild of the server),
whose exit is waited for.

Message rate: one connection to a `cat` worker; round trips (send a line,
wait for it to come back, N times) and a pipelined stream (N messages sent
in windows of 100, all read back).

    python bench/websocket_bench.py [-n 200] [--messages 5000] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support import Server, wait  # noqa: E402
from tests.wsclient import RawWebSocket  # noqa: E402

PID_WORKER = ["/bin/sh", "-c", "echo $$; exec sleep 100000"]
FAMILY_WORKER = ["/bin/sh", "-c", "sleep 100000 & echo $!; wait"]
CAT = ["/bin/cat"]
NEVER = 5.0
#: Workers that never exit after which a scenario is not tried further.
GIVE_UP = 5


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def closewatch(command: list[str]) -> Iterator[int]:
    directory = tempfile.mkdtemp(prefix="closewatch-wsbench-")
    server = Server(["--websocket", "--max-workers", "100000"], command, cwd=directory)
    try:
        yield server.port
    finally:
        server.cleanup()
        shutil.rmtree(directory, True)


@contextmanager
def websocketd(command: list[str]) -> Iterator[int]:
    port = freePort()
    process = subprocess.Popen(
        [
            "websocketd",
            f"--port={port}",
            "--address=127.0.0.1",
            "--loglevel=fatal",
            *command,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait(listening, 10)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def killLatencies(port: int, n: int) -> tuple[list[float], int]:
    """
    Close-frame-to-exit times of C{n} workers (seconds), and how many never
    exited within L{NEVER} seconds (those are killed by the benchmark; after
    L{GIVE_UP} of them, the rest are not tried).
    """
    latencies, survivors = [], 0
    for _ in range(n):
        if survivors >= GIVE_UP:
            break
        client = RawWebSocket(port)
        pid = int(client.receive())
        pidfd = os.pidfd_open(pid)
        started = time.perf_counter()
        client.sendClose(1001)
        exited = select.select([pidfd], [], [], NEVER)[0]
        elapsed = time.perf_counter() - started
        os.close(pidfd)
        if exited:
            latencies.append(elapsed)
        else:
            survivors += 1
            os.kill(pid, 9)
        client.close()
    return latencies, survivors


def roundTrips(port: int, n: int) -> float:
    client = RawWebSocket(port)
    started = time.perf_counter()
    for i in range(n):
        client.send(f"message {i}")
        if client.receive() != f"message {i}":
            raise AssertionError("echo mismatch")
    elapsed = time.perf_counter() - started
    client.close()
    return n / elapsed


def pipelined(port: int, n: int, window: int = 100) -> float:
    client = RawWebSocket(port)
    started = time.perf_counter()
    for first in range(0, n, window):
        batch = range(first, min(first + window, n))
        client.sock.sendall(b"".join(client.ws.send(_text(f"message {i}")) for i in batch))
        for i in batch:
            if client.receive() != f"message {i}":
                raise AssertionError("echo mismatch")
    elapsed = time.perf_counter() - started
    client.close()
    return n / elapsed


def _text(data: str):  # type: ignore[no-untyped-def]
    from wsproto.events import TextMessage

    return TextMessage(data)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("-n", type=int, default=200, help="kills per server per repetition")
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    servers: dict[str, Callable[[list[str]], contextmanager]] = {"closewatch": closewatch}  # type: ignore[type-arg]
    if shutil.which("websocketd"):
        servers["websocketd"] = websocketd
    else:
        print("websocketd not found (apt-get install websocketd): closewatch alone")
    results: dict[tuple[str, str], list] = {}  # type: ignore[type-arg]
    for rep in range(args.reps):
        for name, serve in servers.items():
            for scenario, command in (
                ("worker", PID_WORKER),
                ("grandchild", FAMILY_WORKER),
            ):
                with serve(command) as port:
                    latencies, survivors = killLatencies(port, args.n)
                results.setdefault((name, scenario), []).append((latencies, survivors))
            with serve(CAT) as port:
                results.setdefault((name, "round trips/s"), []).append(
                    roundTrips(port, args.messages)
                )
                results.setdefault((name, "pipelined/s"), []).append(pipelined(port, args.messages))
        print(f"repetition {rep + 1} of {args.reps} done", file=sys.stderr)

    print(
        f"{args.reps} repetitions, {args.n} kills each, {args.messages} messages; "
        "medians of the repetitions"
    )
    print("| measure | " + " | ".join(servers) + " |")
    print("|---|" + "---|" * len(servers))
    for scenario in ("worker", "grandchild"):
        cells = []
        for name in servers:
            runs = results[(name, scenario)]
            killed = [r for r in runs if r[0]]
            survivors = sum(r[1] for r in runs)
            total = sum(len(r[0]) + r[1] for r in runs)
            if not killed:
                cells.append(f"never ({survivors} of {total} still running after {NEVER:g} s)")
                continue
            p50 = statistics.median(percentile(r[0], 50) for r in killed) * 1000
            p99 = statistics.median(percentile(r[0], 99) for r in killed) * 1000
            cell = f"{p50:.2f} / {p99:.2f} ms"
            if survivors:
                cell += f" ({survivors} of {total} never exited)"
            cells.append(cell)
        print(f"| kill after close frame, {scenario}, p50 / p99 | " + " | ".join(cells) + " |")
    for measure in ("round trips/s", "pipelined/s"):
        values = [statistics.median(results[(name, measure)]) for name in servers]
        cells = [f"{v:,.0f}" for v in values]
        if len(values) == 2:
            cells[0] += f" ({values[0] / values[1]:.2f}x)"
        print(f"| messages, {measure} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
