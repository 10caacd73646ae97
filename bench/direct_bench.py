#!/usr/bin/env python3
"""
closewatch --direct against tcpserver and closewatch's relayed mode, on
loopback, every measure alternated in the same run:

    flock /work/bench.lock python bench/direct_bench.py [--runs 3] [--trials 40]

  1. relay throughput with `cat` as worker, 256 MiB each way at once (the
     throughput test of closewatch_bench.py): --direct, tcpserver (whose
     worker owns the socket too) and the relayed mode, one repetition each
     per run, in turn;
  2. kill latency after a FIN, one connection at a time, --direct and the
     relayed mode trial by trial, each first in half of the pairs (the
     worker prints its PID and sleeps; the exit is taken with a pidfd);
  3. grandchildren killed: a worker that starts a child in its group and
     prints the child's PID; the child's exit after the client's FIN.

Medians over the runs, with same-run ratios; the load average at the start
and the end.  Every process started is ended on exit.  Linux 5.3+.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import closewatch_bench as cb

#: A worker whose child (the server's grandchild) is what the client's PID
#: line names: it must die with the worker's group.
FAMILY_WORKER = ["/bin/sh", "-c", "sleep 1000000 & echo $!; wait"]


def startCloseWatch(name: str, args: list[str], worker: list[str], logdir: Path) -> cb.Server:
    port = cb.freePort()
    argv = [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile=", f"--logfile={logdir / f'{name}-{port}.twistd.log'}",
        "closewatch", "-l", f"tcp:{port}:interface=127.0.0.1", "--half-close", "kill",
        "--max-workers", "2000", *args, "--", *worker,
    ]
    server = cb.Server(name, argv, port, logdir, cb.closewatchEnv())
    cb.SERVERS.append(server)
    server.start()
    return server


def startTCPServer(worker: list[str], logdir: Path) -> cb.Server:
    port = cb.freePort()
    argv = ["tcpserver", "-c", "2000", "-b", "1024", "-HRl0", "127.0.0.1", str(port), *worker]
    server = cb.Server("tcpserver", argv, port, logdir)
    cb.SERVERS.append(server)
    server.start()
    return server


def mergeCells(cells: list[dict]) -> dict:
    """
    One kill cell from several of the same server: counts added, the
    percentiles over all the samples.
    """
    samples = [x for cell in cells for x in cell["samples_ms"]]
    merged = {key: sum(cell[key] for cell in cells)
              for key in ("connections", "killed", "survived")}
    merged.update(p50_ms=cb.percentile(samples, 50), p99_ms=cb.percentile(samples, 99))
    return merged


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=40, help="FINs per server per run")
    ap.add_argument("--mib", type=int, default=256, help="MiB each way per throughput test")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if shutil.which("tcpserver") is None:
        sys.exit("needs tcpserver (apt-get install ucspi-tcp)")
    cb.raiseFdLimit(65536)
    logdir = Path(tempfile.mkdtemp(prefix="direct-bench-"))
    cat = shutil.which("cat") or "/bin/cat"
    pidWorker = [str(cb.PIDWORKER)]
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "loadavg_start": os.getloadavg(),
        "commit": cb.versionOf(["git", "-C", str(cb.ROOT), "describe", "--always", "--dirty"]),
        "runs": [],
    }
    try:
        for run in range(args.runs):
            one: dict = {"throughput": {}, "server_cpu_ms_per_mib": {}, "kill": {}}
            # Each run starts with another server: no order is favoured.
            order = ["direct", "tcpserver", "relayed"]
            for name in order[run % 3 :] + order[: run % 3]:
                if name == "tcpserver":
                    server = startTCPServer([cat], logdir)
                else:
                    server = startCloseWatch(
                        name, ["--direct"] if name == "direct" else [], [cat], logdir
                    )
                try:
                    r = cb.throughputOnce(server, args.mib * cb.MiB)
                finally:
                    cb.stopServer(server)
                one["throughput"][name] = r["mb_per_s"]
                one["server_cpu_ms_per_mib"][name] = r["server_cpu_ms_per_mib"]
                cb.log(f"run {run} throughput {name:9s}: {cb.fmt(r['mb_per_s'], 0)} MB/s, "
                       f"server CPU {cb.fmt(r['server_cpu_ms_per_mib'], 3)} ms/MiB"
                       + ("" if r["ok"] else f" FAILED {r['error']}"))
            direct = startCloseWatch("direct", ["--direct"], pidWorker, logdir)
            relayed = startCloseWatch("relayed", [], pidWorker, logdir)
            family = startCloseWatch("family", ["--direct"], FAMILY_WORKER, logdir)
            try:
                # Trial by trial, each server first in half of the pairs.
                halves = [
                    cb.killCellsAlternating(pair, "fin", args.trials // 2)
                    for pair in ({"direct": direct, "relayed": relayed},
                                 {"relayed": relayed, "direct": direct})
                ]
                cells = {name: mergeCells([half[name] for half in halves])
                         for name in ("direct", "relayed")}
                grand = cb.killCell(family, "fin", 1, args.trials)
            finally:
                for server in (direct, relayed, family):
                    cb.stopServer(server)
            for name, cell in cells.items():
                one["kill"][name] = {k: cell[k] for k in ("killed", "survived", "p50_ms", "p99_ms")}
                cb.log(f"run {run} FIN kill {name:8s}: {cell['killed']}/{cell['connections']} "
                       f"p50 {cb.fmt(cell['p50_ms'], 3)} p99 {cb.fmt(cell['p99_ms'], 3)} ms")
            one["grandchildren"] = {k: grand[k] for k in ("connections", "killed", "survived",
                                                         "p50_ms", "p99_ms")}
            cb.log(f"run {run} grandchildren (direct): {grand['killed']} of "
                   f"{grand['connections']} killed, p50 {cb.fmt(grand['p50_ms'], 3)} ms")
            res["runs"].append(one)
    except KeyboardInterrupt:
        cb.log("interrupted: cleaning up")
        return 130
    finally:
        cb.cleanup()
        shutil.rmtree(logdir, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    runs = res["runs"]
    tp = {name: median([r["throughput"][name] for r in runs])
          for name in ("direct", "tcpserver", "relayed")}
    cpu = {name: median([r["server_cpu_ms_per_mib"][name] for r in runs])
           for name in ("direct", "tcpserver", "relayed")}
    tpRatio = median([ratio(r["throughput"]["direct"], r["throughput"]["tcpserver"])
                      for r in runs])
    killP50 = {name: median([r["kill"][name]["p50_ms"] for r in runs])
               for name in ("direct", "relayed")}
    killP99 = {name: median([r["kill"][name]["p99_ms"] for r in runs])
               for name in ("direct", "relayed")}
    killRatio = median([ratio(r["kill"]["direct"]["p50_ms"], r["kill"]["relayed"]["p50_ms"])
                        for r in runs])
    grandKilled = sum(r["grandchildren"]["killed"] for r in runs)
    grandAll = sum(r["grandchildren"]["connections"] for r in runs)
    res["summary"] = {
        "throughput_mb_per_s": tp, "throughput_ratio_direct_tcpserver": tpRatio,
        "server_cpu_ms_per_mib": cpu,
        "kill_p50_ms": killP50, "kill_p99_ms": killP99, "kill_p50_ratio_direct_relayed": killRatio,
        "grandchildren_killed": [grandKilled, grandAll],
    }
    print(f"{len(runs)} runs, load average {res['loadavg_start'][0]:.2f} -> "
          f"{res['loadavg_end'][0]:.2f}, commit {res['commit']}")
    print(f"throughput MB/s (median): direct {cb.fmt(tp['direct'], 0)}, tcpserver "
          f"{cb.fmt(tp['tcpserver'], 0)}, relayed {cb.fmt(tp['relayed'], 0)}; "
          f"direct/tcpserver {cb.fmt(tpRatio, 2)} (median of same-run ratios; target >= 0.8)")
    print(f"server CPU ms/MiB (median): direct {cb.fmt(cpu['direct'], 3)}, tcpserver "
          f"{cb.fmt(cpu['tcpserver'], 3)}, relayed {cb.fmt(cpu['relayed'], 3)}")
    print(f"FIN -> worker gone p50 / p99 ms (median): direct {cb.fmt(killP50['direct'], 3)} / "
          f"{cb.fmt(killP99['direct'], 3)}, relayed {cb.fmt(killP50['relayed'], 3)} / "
          f"{cb.fmt(killP99['relayed'], 3)}; p50 direct/relayed {cb.fmt(killRatio, 2)} "
          f"(target <= 1.5)")
    print(f"grandchildren killed: {grandKilled} of {grandAll}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
