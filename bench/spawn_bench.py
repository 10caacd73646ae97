#!/usr/bin/env python3
"""
Worker birth through the spawner, against peers measured in the same run:

    python bench/spawn_bench.py [--runs 3] [--main /work/main] [--load 3000]
        [--only sql,python,sh,load,kill] [--closewatch-args '--cgroup off']

Each run measures, alternating the servers:

 1. SQL: fresh-connection queries (connect, C{select 1;}, read the ok
    line, close; one client, one after another) against the default
    service (the embedded SQL worker, warm) and against tcpserver running
    the cold C{python -m twisted_closewatch.sqlworker}: rate and
    time-to-answer p50;
 2. C{--python-worker} first byte p50 against the same server running a
    cold C{python3 script.py} that does the same;
 3. connection rate (connect, first byte, close) with a C{sh} worker,
    closewatch against tcpserver;
 4. spawn p50 (connect -> first byte) idle and with C{--load} other live
    connections;
 5. kill latency (FIN -> worker gone, pidfd-timed, one connection at a
    time) of this tree against the tree given by C{--main}.

Prints one JSON object per run and a summary of medians (and the load
average at the start and end).  Uses bench/closewatch_bench.py's servers
and helpers; every process it starts is ended on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import closewatch_bench as cb  # noqa: E402

#: A Python worker: one line at once (what --python-worker runs warm).
HELLO_MODULE = "spawn_bench_worker"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def closewatch(root: Path, args: list[str], logdir: Path) -> cb.Server:
    """
    C{twistd closewatch} from the tree at C{root}, with C{args}.
    """
    port = cb.freePort()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(HERE)])
    argv = [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile=", f"--logfile={logdir / f'closewatch-{port}.log'}",
        "closewatch", "-l", f"tcp:{port}:interface=127.0.0.1", "--max-workers", "5000",
        *args,
    ]
    server = cb.Server(f"closewatch-{root.name}", argv, port, logdir, env)
    cb.SERVERS.append(server)
    server.start(60)
    return server


def tcpserver(worker: list[str], logdir: Path, cwd: Path | None = None) -> cb.Server:
    port = cb.freePort()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(cb.ROOT), str(HERE)])
    argv = ["tcpserver", "-c", "20000", "-b", "1024", "-HRl0", "127.0.0.1", str(port), *worker]
    server = cb.Server("tcpserver", argv, port, logdir, env)
    cb.SERVERS.append(server)
    server.start()
    return server


def sqlRate(server: cb.Server, seconds: float, most: int) -> dict:
    """
    Fresh connections, one query each, for C{seconds} (or C{most} queries).
    """
    answers = []
    started = time.perf_counter()
    while len(answers) < most and time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"select 1;\n")
            data = b""
            while b'"ok"' not in data:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError(f"{server.name}: closed before the answer: {data!r}")
                data += chunk
            answers.append((time.perf_counter() - t0) * 1000)
    elapsed = time.perf_counter() - started
    return {"queries": len(answers), "per_s": len(answers) / elapsed,
            "answer_p50_ms": cb.percentile(answers, 50)}


def firstByte(server: cb.Server, count: int) -> dict:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            if not s.recv(64):
                raise RuntimeError(f"{server.name}: no first byte")
            times.append((time.perf_counter() - t0) * 1000)
    return {"count": count, "p50_ms": cb.percentile(times, 50)}


def killLatency(server: cb.Server, trials: int) -> float | None:
    return cb.killCell(server, "close", 1, trials)["p50_ms"]


PARTS = ("sql", "python", "sh", "load", "kill")


def _spawnerPid(server: cb.Server, timeout: float = 5.0) -> int | None:
    """
    The server's spawner (started once the server has bound its port).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in cb._children(server.pid):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    if b"spawnerprocess" in f.read():
                        return child
            except OSError:
                continue
        time.sleep(0.05)
    return None


def shRate(server: cb.Server, peer: cb.Server, conns: int) -> dict:
    """
    The C{sh} worker's connection rate, closewatch and its peer alternated
    twice; with closewatch's and its spawner's CPU per connection.
    """
    spawner = _spawnerPid(server)
    rates: dict[str, list[float]] = {"closewatch": [], "peer": [], "cpu": [], "spawnerCpu": []}
    for _ in range(2):
        before = cb._cpuSeconds(spawner) if spawner else 0.0
        a = cb.connRate(server, conns)
        if spawner:
            rates["spawnerCpu"].append((cb._cpuSeconds(spawner) - before) * 1e6 / conns)
        rates["closewatch"].append(a["conn_per_s"])
        rates["cpu"].append(a["server_cpu_us_per_conn"])
        rates["peer"].append(cb.connRate(peer, conns)["conn_per_s"])
    result = {
        "closewatch_per_s": statistics.median(rates["closewatch"]),
        "tcpserver_per_s": statistics.median(rates["peer"]),
        "server_cpu_us_per_conn": statistics.median(rates["cpu"]),
    }
    if rates["spawnerCpu"]:
        result["spawner_cpu_us_per_conn"] = statistics.median(rates["spawnerCpu"])
    result["ratio"] = result["closewatch_per_s"] / result["tcpserver_per_s"]
    return result


def oneRun(args: argparse.Namespace, logdir: Path) -> dict:
    here = cb.ROOT
    parts = set(args.only)
    result: dict = {"loadavg_start": loadavg()}
    sqlCold = [sys.executable, "-m", "twisted_closewatch.sqlworker"]
    db = logdir / "bench.sqlite3"
    os.environ["CLOSEWATCH_DATABASE"] = str(db)

    if "sql" in parts:
        warm = closewatch(here, [], logdir)
        cold = tcpserver(sqlCold, logdir)
        try:
            # Each creates the database on first use: not part of the figure.
            sqlRate(warm, 1, 3)
            result["sql_closewatch"] = sqlRate(warm, args.seconds, 2000)
            result["sql_tcpserver_cold"] = sqlRate(cold, args.seconds, 2000)
        finally:
            cb.stopServer(warm)
            cb.stopServer(cold)
        result["sql_ratio"] = (
            result["sql_closewatch"]["per_s"] / result["sql_tcpserver_cold"]["per_s"]
        )

    if "python" in parts:
        script = HERE / f"{HELLO_MODULE}.py"
        pyWarm = closewatch(here, ["--python-worker", f"{HELLO_MODULE}:main"], logdir)
        pyCold = closewatch(here, ["--", sys.executable, str(script)], logdir)
        try:
            result["python_warm"] = firstByte(pyWarm, 200)
            result["python_cold"] = firstByte(pyCold, 50)
        finally:
            cb.stopServer(pyWarm)
            cb.stopServer(pyCold)

    shWorker = ["--", "/bin/sh", str(cb.PIDWORKER)]
    if parts & {"sh", "load"}:
        sh = closewatch(here, [*args.closewatch_args, *shWorker], logdir)
        try:
            if "sh" in parts:
                peer = tcpserver(["/bin/sh", str(cb.PIDWORKER)], logdir)
                try:
                    rate = shRate(sh, peer, args.conns)
                finally:
                    cb.stopServer(peer)
                result["sh"] = rate
                result["sh_closewatch_per_s"] = rate["closewatch_per_s"]
                result["sh_tcpserver_per_s"] = rate["tcpserver_per_s"]
                result["sh_ratio"] = rate["ratio"]
            if "load" in parts and args.load:
                load = cb.spawnUnderLoad(sh, args.load, 3, 50)
                result["load"] = {k: load.get(k) for k in (
                    "background_opened", "idle_p50_ms", "loaded_p50_ms", "ratio",
                    "server_fds_per_connection", "background_alive_after")}
        finally:
            cb.stopServer(sh)

    if "kill" in parts and args.main:
        mine = closewatch(here, shWorker, logdir)
        theirs = closewatch(Path(args.main), shWorker, logdir)
        try:
            mineP50, theirP50 = [], []
            for _ in range(3):
                mineP50.append(killLatency(mine, args.kills))
                theirP50.append(killLatency(theirs, args.kills))
        finally:
            cb.stopServer(mine)
            cb.stopServer(theirs)
        result["kill_p50_ms"] = statistics.median(mineP50)
        result["kill_p50_main_ms"] = statistics.median(theirP50)
        result["kill_ratio"] = result["kill_p50_ms"] / result["kill_p50_main_ms"]
    result["loadavg_end"] = loadavg()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="per SQL rate measurement")
    ap.add_argument("--conns", type=int, default=300, help="per sh connection-rate measurement")
    ap.add_argument("--load", type=int, default=3000, help="live connections for spawn p50")
    ap.add_argument("--kills", type=int, default=40, help="FINs per kill-latency cell")
    ap.add_argument("--main", default=None, help="a closewatch tree to compare kill latency with")
    ap.add_argument("--only", type=lambda text: text.split(","), default=list(PARTS),
                    help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    ap.add_argument("--closewatch-args", type=str.split, default=[],
                    help="extra closewatch options for the sh and load parts, e.g. '--cgroup off'")
    args = ap.parse_args()
    unknown = set(args.only) - set(PARTS)
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    cb.raiseFdLimit(args.load * 2 + 1000)
    logdir = Path(tempfile.mkdtemp(prefix="spawn-bench-"))
    runs = []
    try:
        for _ in range(args.runs):
            run = oneRun(args, logdir)
            print(json.dumps(run), flush=True)
            runs.append(run)
    finally:
        cb.cleanup()

    def med(path: str) -> float | None:
        values = []
        for run in runs:
            value: object = run
            for key in path.split("."):
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)):
                values.append(float(value))
        return round(statistics.median(values), 3) if values else None

    summary = {p: med(p) for p in (
        "sql_closewatch.per_s", "sql_closewatch.answer_p50_ms", "sql_tcpserver_cold.per_s",
        "sql_tcpserver_cold.answer_p50_ms", "sql_ratio", "python_warm.p50_ms",
        "python_cold.p50_ms", "sh_closewatch_per_s", "sh_tcpserver_per_s", "sh_ratio",
        "sh.server_cpu_us_per_conn", "sh.spawner_cpu_us_per_conn",
        "load.idle_p50_ms", "load.loaded_p50_ms", "load.ratio", "kill_p50_ms",
        "kill_p50_main_ms", "kill_ratio")}
    summary["loadavg"] = [(r["loadavg_start"], r["loadavg_end"]) for r in runs]
    print(json.dumps({"summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
