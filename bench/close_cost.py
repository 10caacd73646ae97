#!/usr/bin/env python3
"""
Where closewatch's time goes when many clients come or go at once.

    python bench/close_cost.py [-n 1000] [--reps 3] [--scenario fin] [--py-spy]

Starts closewatch with the PID worker, opens N connections (waiting for
every PID line), then closes them all as fast as one Python loop can, and
reports, per phase, the server's CPU time per connection (utime + stime from
/proc/PID/stat) and the spread of the workers' exit times.  With --py-spy,
the close phase is also sampled with py-spy (pip install py-spy) and the
functions it spends its time in are listed (self and cumulative share).

The kill latency of the n-th close is roughly n times the server's CPU per
close (once the server falls behind the client's close loop), so this is the
figure to bring down for a low p99 at 1,000 concurrent closes.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import closewatch_bench as b  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def waitIdle(pid: int, quiet: float = 0.3, timeout: float = 30.0) -> float:
    """Wait until the server's CPU time stops growing; return it."""
    end = time.monotonic() + timeout
    last = cpuSeconds(pid)
    while time.monotonic() < end:
        time.sleep(quiet)
        now = cpuSeconds(pid)
        if now == last:
            return now
        last = now
    return last


def summarizeRaw(path: Path, top: int = 25) -> str:
    """Self and total sample share per function from py-spy's raw output."""
    selfc: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        n += c
        selfc[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    out = [f"{n} samples"]
    out.append("self%   function")
    for f, c in selfc.most_common(top):
        out.append(f"{100 * c / n:5.1f}   {f}")
    out.append("total%  function")
    for f, c in total.most_common(top + 15):
        out.append(f"{100 * c / n:5.1f}   {f}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scenario", default="fin", choices=b.SCENARIOS)
    ap.add_argument("--py-spy", action="store_true")
    ap.add_argument("--server-python", default=sys.executable)
    ap.add_argument("--rate", type=int, default=0,
                    help="instead: N sequential connect/PID/close, server CPU per connection")
    ap.add_argument("--background", type=int, default=0,
                    help="with --rate: live connections held open meanwhile")
    ap.add_argument("--root", default=str(b.ROOT), help="closewatch tree (as closewatch_bench.py)")
    args = ap.parse_args()
    b.ROOT = Path(args.root).resolve()
    b.raiseFdLimit(65536)
    logdir = Path(tempfile.mkdtemp(prefix="closewatch-cost-"))
    b.EXTRA_CLOSEWATCH_OPTIONS[:] = b.closewatchOptions(args.server_python, args.n + args.background + 1000)
    srv = b.startServer("closewatch", [str(b.PIDWORKER)], logdir, args.server_python)
    spy = None
    try:
        if args.rate:
            raw = logdir / "rate.raw"
            bg, _ = b.openConns(srv.port, args.background, 300.0, window=64) if args.background else ([], 0)
            if bg:
                print(f"{len(bg)} background connections open, server holds "
                      f"{b._fdCount(srv.pid)} fds", flush=True)
            waitIdle(srv.pid)
            if args.py_spy:
                spy = subprocess.Popen(
                    [shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                     "record", "-p", str(srv.pid), "-r", "1000", "--nonblocking", "-f", "raw",
                     "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(1.5)
            for rep in range(args.reps):
                c0 = waitIdle(srv.pid)
                t0 = time.perf_counter()
                r = b.connRate(srv, args.rate)
                wall = time.perf_counter() - t0
                c1 = waitIdle(srv.pid)
                print(f"rate rep {rep}: {r['conn_per_s']:.0f} conn/s, spawn p50 {r['spawn_p50_ms']:.2f} ms, "
                      f"server CPU {(c1 - c0) * 1e6 / r['connections']:.0f} us/conn "
                      f"({100 * (c1 - c0) / wall:.0f}% of one core)", flush=True)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
                print(summarizeRaw(raw))
            return 0
        for rep in range(args.reps):
            c0 = waitIdle(srv.pid)
            t0 = time.perf_counter()
            conns, failed = b.openConns(srv.port, args.n, 120.0)
            openS = time.perf_counter() - t0
            c1 = waitIdle(srv.pid)
            if args.scenario == "paused":
                b.pauseWithBacklog(srv.port, conns)
            if args.py_spy and rep == args.reps - 1:
                raw = logdir / "close.raw"
                spy = subprocess.Popen(
                    [shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(srv.pid), "-r", "2000", "-f", "raw",
                     "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(1.5)
            c2 = waitIdle(srv.pid)
            tracker = b.ExitTracker()
            for c in conns:
                tracker.add(c)
            tc0 = time.perf_counter()
            for c in conns:
                b._act(c, args.scenario)
                tracker.poll(0)
            tc1 = time.perf_counter()
            tracker.drain(b.SURVIVE_S)
            c3 = waitIdle(srv.pid)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            lat = sorted((c.tExit - c.tAct) * 1000 for c in conns if c.tExit)
            lastExit = max(c.tExit for c in conns if c.tExit) - tc0
            tracker.close()
            for c in conns:
                c.closeSock()
            b.WORKERS.killall()
            print(
                f"rep {rep}: n={len(conns)} failed={failed} | open: {openS:.2f} s wall, server CPU "
                f"{(c1 - c0) * 1e6 / max(1, len(conns)):.0f} us/conn | close loop {1000 * (tc1 - tc0):.1f} ms, "
                f"last exit at {1000 * lastExit:.1f} ms, server CPU {(c3 - c2) * 1e6 / max(1, len(conns)):.0f} "
                f"us/conn | kill p50 {b.percentile(lat, 50):.1f} p99 {b.percentile(lat, 99):.1f} ms",
                flush=True,
            )
            time.sleep(0.5)
        if spy is not None:
            print(summarizeRaw(logdir / "close.raw"))
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
