#!/usr/bin/env python3
"""
The timeline of one burst of closes, from the kernel's timestamps: when each
FIN reaches the server, when each kill is sent, when each worker exits, when
the client sees it, and who had the two CPUs meanwhile.

    python bench/kill_burst.py [-n 100] [--scenario fin|rst|half] [--bursts 3]
        [--servers closewatch,naive,ideal] [--variant 'NAME=--cgroup off' ...]
        [--old NAME=DIR ...]

Root (perf).  Starts each server (closewatch, every C{--variant}: closewatch
with more options, the naive relay, C{ideal_server.py}), then, the servers
alternating, opens C{n} connections, waits for every PID line and closes
them all in one loop, exactly as C{closewatch_bench.py} does, while
C{perf record -a -k CLOCK_MONOTONIC} records the server socket's state
changes, every system call of the servers, their helpers (the spawner)
and the client, every context switch and every process exit.  The kernel's
floor (C{kill_floor.oneRun}) runs in the same alternation.

For each server it prints, medians over the bursts: the span of the
client's close loop; the p50/p99 of each leg (close -> FIN processed on the
server's socket -> kill -> worker's exit -> client woken); when the first
and last kill and exit came; the server's system calls between its first
and last kill (the work it did before every worker was killed); and the CPU
time each party had from the first close to the last exit.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import closewatch_bench as b
import kill_floor
from kill_path import parse, stopPerf

SYSCALLS = {
    0: "read", 1: "write", 3: "close", 7: "poll", 13: "rt_sigaction", 14: "rt_sigprocmask",
    16: "ioctl", 20: "writev", 44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg",
    48: "shutdown", 54: "setsockopt", 55: "getsockopt", 61: "wait4", 62: "kill", 72: "fcntl",
    83: "mkdir", 84: "rmdir", 202: "futex", 228: "clock_gettime", 232: "epoll_wait",
    233: "epoll_ctl", 247: "waitid", 257: "openat", 281: "epoll_pwait", 424: "pidfd_send_signal",
    434: "pidfd_open", 435: "clone3",
}


def syscall(e: dict) -> tuple[str, int]:
    """The name and signed first argument of a sys_enter event."""
    rest = e["rest"].split("NR ", 1)[1]
    nr, _, args = rest.partition(" ")
    # The first argument as a C int (a pid, a descriptor).
    arg = int(args.strip("( ").split(",")[0] or "0", 16) & 0xFFFFFFFF
    if arg >= 1 << 31:
        arg -= 1 << 32
    return SYSCALLS.get(int(nr), f"nr{nr}"), arg


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            out.append(c)
            todo.append(c)
    return out


def helpers(server: b.Server) -> dict[int, str]:
    """The server's long-lived helper processes (spawner, guardian), by pid."""
    out = {}
    for pid in descendants(server.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "spawnerprocess" in cmd:
            out[pid] = "spawner"
        elif "guardian" in cmd:
            out[pid] = "guardian"
    return out


def burst(server: b.Server, n: int, scenario: str) -> list[dict]:
    conns, _ = b.openConns(server.port, n, timeout=60.0)
    tracker = b.ExitTracker()
    try:
        for c in conns:
            tracker.add(c)
        time.sleep(0.3)
        for c in conns:
            b._act(c, scenario)
            tracker.poll(0)
        tracker.drain(b.SURVIVE_S)
    finally:
        tracker.close()
        for c in conns:
            c.closeSock()
        b.WORKERS.killall()
    return [{"tAct": c.tAct, "tExit": c.tExit, "pid": c.pid, "lport": c.lport} for c in conns
            if c.tExit is not None]


def pct(xs: list[float], p: float) -> float:
    return b.percentile(xs, p) or 0.0


def analyse(events: list[dict], closes: list[dict], server: b.Server, helperPids: dict[int, str],
            scenario: str) -> dict:
    state = "TCP_CLOSE" if scenario == "rst" else "TCP_CLOSE_WAIT"
    t0 = min(c["tAct"] for c in closes)
    tEnd = max(c["tExit"] for c in closes)
    window = [e for e in events if t0 - 0.0005 <= e["ts"] <= tEnd + 0.001]
    workers = {c["pid"] for c in closes}
    fins, kills, exits = {}, {}, {}
    serverCalls = []
    for e in window:
        if e["event"] == "sock:inet_sock_set_state" and f"newstate={state}" in e["rest"] \
                and f"sport={server.port} " in e["rest"]:
            lport = int(e["rest"].split("dport=")[1].split()[0])
            fins.setdefault(lport, e["ts"])
        elif e["event"] == "raw_syscalls:sys_enter" and e["pid"] == server.pid:
            name, arg = syscall(e)
            serverCalls.append((e["ts"], name))
            if name == "kill" and abs(arg) in workers:
                kills.setdefault(abs(arg), e["ts"])
        elif e["event"] == "sched:sched_process_exit":
            pid = int(e["rest"].split("pid=")[1].split()[0])
            if pid in workers:
                exits.setdefault(pid, e["ts"])
    rows = []
    for c in closes:
        fin, kill, ex = fins.get(c["lport"]), kills.get(c["pid"]), exits.get(c["pid"])
        if None in (fin, kill, ex):
            continue
        rows.append({"act": c["tAct"] - t0, "fin": fin - t0, "kill": kill - t0, "exit": ex - t0,
                     "seen": c["tExit"] - t0, "total": c["tExit"] - c["tAct"],
                     "act->fin": fin - c["tAct"], "fin->kill": kill - fin,
                     "kill->exit": ex - kill, "exit->seen": c["tExit"] - ex})
    cpu = cpuShares(window, t0, tEnd, lambda pid, comm: who(pid, comm, server.pid, helperPids,
                                                            workers))
    firstKill = min((r["kill"] for r in rows), default=0.0) + t0
    lastKill = max((r["kill"] for r in rows), default=0.0) + t0
    between = collections.Counter(name for ts, name in serverCalls
                                  if firstKill <= ts <= lastKill and name != "kill")
    return {"rows": rows, "cpu": cpu, "between": between, "span": tEnd - t0}


def cpuShares(window: list[dict], t0: float, tEnd: float, who) -> collections.Counter:
    """
    The CPU time each party (C{who(pid, comm)}) had from C{t0} to C{tEnd}.
    """
    cpu: collections.Counter = collections.Counter()
    running: dict[int, tuple[float, int, str]] = {}
    for e in window:
        if e["event"] != "sched:sched_switch":
            continue
        rest = e["rest"]
        prevPid = int(rest.split("prev_pid=")[1].split()[0])
        nextPid = int(rest.split("next_pid=")[1].split()[0])
        nextComm = rest.split("next_comm=")[1].split(" next_pid=")[0]
        start = running.get(e["cpu"])
        begin = max(start[0], t0) if start else t0
        end = min(e["ts"], tEnd)
        if end > begin:
            cpu[who(prevPid, e["comm"] if start is None else start[2])] += end - begin
        running[e["cpu"]] = (e["ts"], nextPid, nextComm)
    for ts, pid, comm in running.values():
        if tEnd > max(ts, t0):
            cpu[who(pid, comm)] += tEnd - max(ts, t0)
    return cpu


def analyseFloor(events: list[dict], kills: list[tuple[int, float, float]]) -> dict:
    """
    The kernel floor's burst: the kill is the action, no FIN, no server.
    """
    t0 = min(k for _, k, _ in kills)
    tEnd = max(x for _, _, x in kills)
    window = [e for e in events if t0 - 0.0005 <= e["ts"] <= tEnd + 0.001]
    workers = {pid for pid, _, _ in kills}
    exits = {}
    for e in window:
        if e["event"] == "sched:sched_process_exit":
            pid = int(e["rest"].split("pid=")[1].split()[0])
            if pid in workers:
                exits.setdefault(pid, e["ts"])
    rows = [{"act": k - t0, "fin": k - t0, "kill": k - t0, "exit": exits[pid] - t0,
             "seen": x - t0, "total": x - k, "act->fin": 0.0, "fin->kill": 0.0,
             "kill->exit": exits[pid] - k, "exit->seen": x - exits[pid]}
            for pid, k, x in kills if pid in exits]
    cpu = cpuShares(window, t0, tEnd, lambda pid, comm: who(pid, comm, -1, {}, workers))
    return {"rows": rows, "cpu": cpu, "between": collections.Counter(), "span": tEnd - t0}


def who(pid: int, comm: str, server: int, helperPids: dict[int, str], workers: set[int]) -> str:
    if pid == 0:
        return "idle"
    if pid == os.getpid():
        return "client"
    if pid == server:
        return "server"
    if pid in helperPids:
        return helperPids[pid]
    if pid in workers or comm in ("sleep", "pidworker.sh"):
        return "workers"
    if comm.startswith(("kworker", "ksoftirqd", "rcu")):
        return "kernel threads"
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--scenario", default="fin", choices=("fin", "rst", "half"))
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--servers", default="closewatch,naive,ideal")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=OPTIONS: closewatch with these options too")
    ap.add_argument("--old", action="append", default=[],
                    help="NAME=DIR: the closewatch of another tree too (e.g. a worktree of main)")
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="closewatch-burst-"))
    b.raiseFdLimit(65536)
    b.EXTRA_CLOSEWATCH_OPTIONS[:] = ["--max-workers", str(2 * args.n + 100)]
    servers: list[tuple[str, b.Server]] = []
    perf = None
    try:
        base = list(b.EXTRA_CLOSEWATCH_OPTIONS)
        servers += [(name, b.startServer(name, [str(b.PIDWORKER)], logdir, sys.executable))
                    for name in args.servers.split(",")]
        for old in args.old:
            name, _, root = old.partition("=")
            b.ROOT = Path(root).resolve()
            servers.append((name, b.startServer("closewatch", [str(b.PIDWORKER)], logdir,
                                                sys.executable)))
        b.ROOT = b.HERE.parent
        for variant in args.variant:
            name, _, options = variant.partition("=")
            b.EXTRA_CLOSEWATCH_OPTIONS[:] = base + options.split()
            servers.append((name, b.startServer("closewatch", [str(b.PIDWORKER)], logdir,
                                                sys.executable)))
        time.sleep(1.0)
        helperPids = {label: helpers(srv) for label, srv in servers}
        traced = [os.getpid()] + [s.pid for _, s in servers] + [
            p for h in helperPids.values() for p in h]
        data = logdir / "perf.data"
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-m", "4M", "-o", str(data),
             "-e", "sock:inet_sock_set_state",
             "--filter", " || ".join(f"sport == {s.port}" for _, s in servers),
             "-e", "raw_syscalls:sys_enter",
             "--filter", " || ".join(f"common_pid == {p}" for p in traced),
             "-e", "sched:sched_switch", "-e", "sched:sched_process_exit"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)
        results: dict[str, list[list[dict]]] = collections.defaultdict(list)
        floors = []
        for _ in range(args.bursts):
            floors.append(kill_floor.timeline(args.n))
            for label, srv in servers:
                results[label].append(burst(srv, args.n, args.scenario))
                time.sleep(0.3)
        time.sleep(0.3)
        perf.send_signal(2)
        perf.wait(60)
        events = parse(data)
        # Everything needed to look at a burst again (bench/README.md).
        (logdir / "closes.json").write_text(json.dumps({
            "results": results, "floors": floors,
            "servers": {label: [srv.pid, srv.port] for label, srv in servers},
            "helpers": {label: {str(k): v for k, v in h.items()}
                        for label, h in helperPids.items()},
        }))
        print(f"raw data (perf.data, closes.json): {logdir}")
        print(f"{args.scenario}, {args.n} closes at once, {args.bursts} bursts per server, "
              f"alternating; load average {os.getloadavg()[0]:.2f}; medians over the bursts, ms")
        report("kernel floor (kill_floor.py: the client is the killer)",
               [analyseFloor(events, kills) for kills in floors], args.n)
        for label, srv in servers:
            analyses = [analyse(events, closes, srv, helperPids[label], args.scenario)
                        for closes in results[label] if closes]
            report(label, analyses, args.n)
    finally:
        stopPerf(perf)
        b.cleanup()
    return 0


def report(label: str, analyses: list[dict], n: int) -> None:
    def med(f) -> float:
        return statistics.median(f(a) for a in analyses) * 1e3

    def leg(key: str, p: float) -> float:
        return med(lambda a: pct([r[key] for r in a["rows"]], p))

    print(f"\n{label}: {statistics.median(len(a['rows']) for a in analyses)} of {n} "
          "closes fully traced per burst")
    print(f"  client's close loop: {med(lambda a: max(r['act'] for r in a['rows'])):.2f}; "
          f"last FIN processed {med(lambda a: max(r['fin'] for r in a['rows'])):.2f}")
    print(f"  kills: first {med(lambda a: min(r['kill'] for r in a['rows'])):.2f}, "
          f"last {med(lambda a: max(r['kill'] for r in a['rows'])):.2f}; exits: first "
          f"{med(lambda a: min(r['exit'] for r in a['rows'])):.2f}, last "
          f"{med(lambda a: max(r['exit'] for r in a['rows'])):.2f}; last seen "
          f"{med(lambda a: max(r['seen'] for r in a['rows'])):.2f} (from the first close)")
    for key in ("act->fin", "fin->kill", "kill->exit", "exit->seen", "total"):
        print(f"  {key:11s} p50 {leg(key, 50):6.2f}  p99 {leg(key, 99):6.2f}")
    cpu = collections.Counter()
    for a in analyses:
        for k, v in a["cpu"].items():
            cpu[k] += v / len(analyses)
    span = med(lambda a: a["span"])
    print(f"  CPU time from the first close to the last exit seen ({span:.2f} ms x 2 CPUs): "
          + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in cpu.most_common()))
    between = collections.Counter()
    for a in analyses:
        between.update(a["between"])
    print("  server system calls between its first and last kill, per burst: "
          + (", ".join(f"{k} {v / len(analyses):.0f}" for k, v in between.most_common(12))
             or "none"))


if __name__ == "__main__":
    sys.exit(main())
