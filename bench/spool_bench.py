#!/usr/bin/env python3
"""
Closes behind a backlog, with and without the spool, and what the spool's
synchronous file I/O costs the reactor.

    python bench/spool_bench.py [--runs 3] [--trials 50] [--conns 1,50] [--mib 8,100]
                                [--baseline-root DIR]

Servers (the worker `pidworker.sh` never reads its stdin): closewatch with
the default settings (spooling on, `--spool-dir` a fresh directory), the
same with `--spool-max 0` (no spool: today's paused relay), and the naive
Twisted relay (`naive_relay.py`, which reads everything into memory).
For every backlog size and concurrency: at 1, `--trials` connections one
after another (`--peer-trials` for the cells whose workers survive: each
costs the 3 s survival wait), at more, one batch of that many.  Each client
sends the backlog without blocking (what its kernel takes, until the server
has taken nothing for 0.5 s), then closes (a batch: all in one loop), and
each worker's exit is timed from its own client's close (pidfd): the time
includes reading what was still queued before the FIN.  A worker alive 3 s after
its client's close survived (with the server's TCP state of its socket:
ESTABLISHED means the FIN never reached the server).  The server's peak RSS
is its VmHWM, reset before the connections open.  Servers alternate within
each run; the medians of the runs are printed at the end.

Then, in this process, the spool's file I/O as the reactor would do it:
`--io-mib` MiB appended to a spool file in 1 MiB `pwrite`s (a client's read
while it is spooled) and read back in 64 KiB `pread`s (what the worker is
fed at a time), each call timed (p50, p99, max), and the `ftruncate` that
gives the space back.  `--io-only` measures only that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import closewatch_bench as b

from twisted_closewatch.spool import FEED_SIZE, SPOOL_READ_SIZE, SpoolBudget

MiB = b.MiB


def pushBacklog(conns: list[b.Conn], size: int, stall: float = 0.5, cap: float = 60.0) -> None:
    """
    Send C{size} bytes on every connection without blocking, until all is
    sent or the server has taken nothing for C{stall} seconds.
    """
    block = memoryview(b"\xa5" * MiB)
    for c in conns:
        c.sock.setblocking(False)
        c.sent = 0
    lastProgress = time.monotonic()
    deadline = lastProgress + cap
    while any(c.sent < size for c in conns) and time.monotonic() < deadline:
        progress = False
        for c in conns:
            while c.sent < size:
                try:
                    c.sent += c.sock.send(block[: min(MiB, size - c.sent)])
                except BlockingIOError:
                    break
                progress = True
        now = time.monotonic()
        if progress:
            lastProgress = now
        elif now - lastProgress > stall:
            break
        else:
            time.sleep(0.005)


def backlogCell(server: b.Server, n: int, size: int, trials: int) -> dict:
    """
    C{trials} single connections one after another (C{n} == 1), or one
    batch of C{n} at once: each sends C{size} bytes its worker never reads,
    then closes.
    """
    with open(f"/proc/{server.pid}/clear_refs", "w") as f:
        f.write("5")
    tracker = b.ExitTracker()
    conns: list[b.Conn] = []
    sent: list[int] = []
    failed = 0
    try:
        for _ in range(trials if n == 1 else 1):
            batch, lost = b.openConns(server.port, n, timeout=60.0)
            failed += lost
            pushBacklog(batch, size)
            sent += [c.sent for c in batch]
            for c in batch:
                tracker.add(c)
            for c in batch:
                b._act(c, "fin")
                tracker.poll(0)
            tracker.drain(b.SURVIVE_S)
            conns += batch
        survivors = {c.lport for c in conns if c.survived}
        states = b.serverStates(server.port, survivors) if survivors else {}
        hwm = b._rssKiB(server.pid, "VmHWM") / 1024
    finally:
        tracker.close()
        for c in conns:
            c.closeSock()
        b.WORKERS.killall()
    lat = [(c.tExit - c.tAct) * 1000 for c in conns if c.tExit is not None and not c.survived]
    return {
        "killed": len(lat),
        "connections": len(conns),
        "failed": failed,
        "p50": b.percentile(lat, 50),
        "p99": b.percentile(lat, 99),
        "sent_min_mib": min(sent) / MiB if sent else None,
        "rss_mb": hwm,
        "survivor_states": sorted(set(states.values())),
    }


def ioCosts(directory: str, mib: int) -> dict:
    """
    The spool's calls, timed one by one, as the reactor makes them.
    """
    budget = SpoolBudget(directory, mib * MiB, mib * MiB)
    spool = budget.open()
    chunk = os.urandom(SPOOL_READ_SIZE)
    writes, reads = [], []
    try:
        for _ in range(mib * MiB // SPOOL_READ_SIZE):
            t = time.perf_counter()
            spool.append(chunk)
            writes.append((time.perf_counter() - t) * 1e6)
        for _ in range(mib * MiB // FEED_SIZE):
            t = time.perf_counter()
            spool.read(FEED_SIZE)
            reads.append((time.perf_counter() - t) * 1e6)
        t = time.perf_counter()
        spool.empty()
        truncate = (time.perf_counter() - t) * 1e6
    finally:
        spool.close()

    def dist(xs: list[float]) -> str:
        p50, p99 = b.percentile(xs, 50), b.percentile(xs, 99)
        return f"p50 {p50:.0f} µs, p99 {p99:.0f} µs, max {max(xs):.0f} µs"

    return {"pwrite": dist(writes), "pread": dist(reads), "ftruncate_us": truncate}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--peer-trials", type=int, default=5,
                    help="trials of the cells that end in survivors (no spool, over the spool)")
    ap.add_argument("--conns", default="1,50", help="concurrency levels, comma-separated")
    ap.add_argument("--mib", default="8,100", help="backlog sizes in MiB, comma-separated")
    ap.add_argument("--io-mib", type=int, default=64)
    ap.add_argument("--servers", default="spool,nospool,naive")
    ap.add_argument("--io-only", action="store_true")
    ap.add_argument("--server-args", default="",
                    help="more closewatch options, space-separated (e.g. '--read-ahead 128k')")
    ap.add_argument("--baseline-root", type=Path,
                    help="another closewatch checkout (e.g. main's), run with the default "
                         "settings as the server 'baseline', alternating with the others")
    args = ap.parse_args()
    servers = args.servers.split(",") + (["baseline"] if args.baseline_root else [])
    logdir = Path(tempfile.mkdtemp(prefix="closewatch-spool-bench-"))
    spoolDir = tempfile.mkdtemp(prefix="closewatch-spool-bench-dir-")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for run in range(0 if args.io_only else args.runs):
            for n, mib in [(int(n), int(m)) for n in args.conns.split(",")
                           for m in args.mib.split(",")]:
                for name in servers:
                    if n > 1 and mib * n > 1024:
                        continue  # over --spool-total: the single connection shows the limit
                    trials = args.trials
                    if name == "nospool" or mib > 64:
                        trials = args.peer_trials
                    if name == "naive":
                        server = b.startServer("naive", [str(b.PIDWORKER)], logdir, sys.executable)
                    else:
                        b.EXTRA_CLOSEWATCH_OPTIONS[:] = [
                            "--max-workers", str(n + 10), "--spool-dir", spoolDir,
                            *(["--spool-max", "0"] if name == "nospool" else []),
                            *args.server_args.split(),
                        ]
                        root = b.ROOT
                        if name == "baseline":
                            b.ROOT = args.baseline_root.resolve()
                        try:
                            server = b.startServer(
                                "closewatch", [str(b.PIDWORKER)], logdir, sys.executable
                            )
                        finally:
                            b.ROOT = root
                    try:
                        r = backlogCell(server, n, mib * MiB, trials)
                    finally:
                        b.stopServer(server)
                    results.setdefault((name, n, mib), []).append(r)
                    print(f"run {run} {n:3d} x {mib:4d} MiB {name:8s}: killed "
                          f"{r['killed']}/{r['connections']} p50 {b.fmt(r['p50'])} "
                          f"p99 {b.fmt(r['p99'])} ms, server peak RSS "
                          f"{r['rss_mb']:.1f} MB, least sent {b.fmt(r['sent_min_mib'], 1)} MiB, "
                          f"survivors' server state {r['survivor_states']}", flush=True)
                    leftover = os.listdir(spoolDir)
                    if leftover:
                        print(f"  files left in the spool directory: {leftover}", flush=True)
        print(f"load average after the closes: {os.getloadavg()}", flush=True)
        print("\nmedians of the runs:", flush=True)
        for (name, n, mib), rs in results.items():
            print(f"{n:3d} x {mib:4d} MiB {name:8s}: killed "
                  f"{b.median([r['killed'] for r in rs]):.0f}/{rs[0]['connections']}, "
                  f"p50 {b.fmt(b.median([r['p50'] for r in rs]))} ms, "
                  f"p99 {b.fmt(b.median([r['p99'] for r in rs]))} ms, "
                  f"peak RSS {b.fmt(b.median([r['rss_mb'] for r in rs]), 1)} MB", flush=True)
        for _ in range(args.runs):
            print(f"spool I/O, {args.io_mib} MiB in {spoolDir}:", ioCosts(spoolDir, args.io_mib),
                  flush=True)
    finally:
        b.cleanup()
        shutil.rmtree(spoolDir, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
