"""
The kernel's floor for killing many workers at once, with no server at all.

Spawns N session leaders running C{sleep} (what C{pidworker.sh} ends as),
then C{killpg(SIGKILL)}s them one after another in a tight loop and times
each one's exit against its own kill call with a pidfd, exactly as
C{closewatch_bench.py} times a worker's exit against its client's close.
On a small machine the dying processes compete for the CPU with the loop
that kills them, so the last of a thousand exits well after the first: no
server can kill a thousand workers faster than this.

Timed so, it is not what a server facing N clients that leave at once can
reach: the loop is slowed by the very exits it causes (a killed process
preempts its killer on the CPU it is woken on), so each exit comes soon
after its own kill and the later kills wait instead, unclocked.  A client
that closes N connections within a millisecond starts every clock at
once.  So the exits are also timed from the first kill, as if all N had
been asked for at that moment: that is the floor for a burst of closes.

    python bench/kill_floor.py [-n 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import time


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def oneRun(n: int) -> tuple[float, float, float, float, float]:
    """
    Kill C{n} sleeping groups; return the (p50, p99, last) exit latency in
    ms, each exit timed from its own kill, then the (p50, p99) timed from
    the first kill: as if all C{n} had been asked for at once.
    """
    kills = timeline(n)
    start = min(killed for _, killed, _ in kills)
    latencies = [(exited - killed) * 1000 for _, killed, exited in kills]
    fromStart = [(exited - start) * 1000 for _, _, exited in kills]
    return (percentile(latencies, 50), percentile(latencies, 99), max(latencies),
            percentile(fromStart, 50), percentile(fromStart, 99))


def timeline(n: int) -> list[tuple[int, float, float]]:
    """
    Kill C{n} sleeping groups; return each one's pid, kill time and exit
    time (C{time.perf_counter}, which is C{CLOCK_MONOTONIC} on Linux).
    """
    pids = [os.posix_spawn("/bin/sleep", ["sleep", "1000000"], {}, setsid=True) for _ in range(n)]
    try:
        time.sleep(0.5)
        pidfds = {os.pidfd_open(pid): pid for pid in pids}
        poller = select.epoll()
        for fd in pidfds:
            poller.register(fd, select.EPOLLIN)
        killedAt: dict[int, float] = {}
        exitedAt: dict[int, float] = {}

        def collect(timeout: float) -> None:
            for fd, _ in poller.poll(timeout):
                poller.unregister(fd)
                exitedAt[pidfds[fd]] = time.perf_counter()

        for pid in pids:
            killedAt[pid] = time.perf_counter()
            os.killpg(pid, signal.SIGKILL)
            collect(0)
        deadline = time.monotonic() + 10
        while len(exitedAt) < n and time.monotonic() < deadline:
            collect(0.1)
        poller.close()
        for fd in pidfds:
            os.close(fd)
        return [(pid, killedAt[pid], exitedAt[pid]) for pid in pids if pid in exitedAt]
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [oneRun(args.n) for _ in range(args.runs)]
    p50, p99, last, burst50, burst99 = (statistics.median(r[i] for r in runs) for i in range(5))
    print(
        f"kernel floor, {args.n} groups killed in a tight loop, median of {args.runs} runs: "
        f"exit latency p50 {p50:.2f} ms, p99 {p99:.2f} ms, last {last:.2f} ms; "
        f"from the first kill p50 {burst50:.2f} ms, p99 {burst99:.2f} ms "
        f"(load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
