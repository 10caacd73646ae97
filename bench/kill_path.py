#!/usr/bin/env python3
"""
Where the time goes between a client's FIN (or RST) and its worker's exit,
from the kernel's own timestamps.

    python bench/kill_path.py [-n 40] [--scenario fin|rst|half] [--old DIR ...]

Starts closewatch (this checkout, and every C{--old} tree, e.g. a
C{git worktree} of an older commit) and the naive Twisted relay
(C{naive_relay.py}), then closes C{n} single connections against each, the
servers alternating, while C{perf record -k CLOCK_MONOTONIC} (root) records
system-wide: the server socket's state change (C{sock:inet_sock_set_state}:
the FIN or RST has arrived), the server's scheduling and every system call
it makes, the C{kill} and the worker's C{sched_process_exit}.  For each
server it prints the medians of each leg (client action -> FIN processed ->
server on a CPU -> kill syscall -> worker exit -> client sees the pidfd) and
the most common system-call sequence from the FIN to the kill.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import closewatch_bench as b

#: x86_64 numbers of the system calls that show up around a kill.
SYSCALLS = {
    0: "read", 1: "write", 3: "close", 7: "poll", 16: "ioctl", 32: "dup", 44: "sendto",
    45: "recvfrom", 48: "shutdown", 54: "setsockopt", 55: "getsockopt", 61: "wait4",
    62: "kill", 72: "fcntl", 202: "futex", 228: "clock_gettime", 232: "epoll_wait",
    233: "epoll_ctl", 247: "waitid", 257: "openat", 281: "epoll_pwait", 424: "pidfd_send_signal",
    434: "pidfd_open",
}
TCP_CLOSE, TCP_CLOSE_WAIT = "TCP_CLOSE", "TCP_CLOSE_WAIT"
_LINE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<ts>[\d.]+):\s+"
                   r"(?P<event>[\w:]+):\s*(?P<rest>.*)$")


def parse(path: Path) -> list[dict]:
    out = subprocess.run(["perf", "script", "-i", str(path)], capture_output=True, text=True, check=True)
    events = []
    for line in out.stdout.splitlines():
        m = _LINE.match(line)
        if m:
            d = m.groupdict()
            d["pid"], d["cpu"], d["ts"] = int(d["pid"]), int(d["cpu"]), float(d["ts"])
            events.append(d)
    return events


def stopPerf(perf: subprocess.Popen | None) -> None:
    """
    End a C{perf record} still running (an error or an interrupt cut the
    run short).
    """
    if perf is not None and perf.poll() is None:
        perf.kill()
        perf.wait()


def legs(events: list[dict], close: dict, server: int, scenario: str) -> dict | None:
    """The kernel timestamps of one close, from the trace."""
    state = TCP_CLOSE if scenario == "rst" else TCP_CLOSE_WAIT
    t0, worker = close["tAct"], close["pid"]
    window = [e for e in events if t0 - 0.001 <= e["ts"] <= close["tExit"] + 0.002]
    fin = next((e["ts"] for e in window if e["event"] == "sock:inet_sock_set_state"
                and f"sport={close['port']} dport={close['lport']}" in e["rest"]
                and f"newstate={state}" in e["rest"]), None)
    kill = next((e for e in window if e["pid"] == server and e["event"] == "raw_syscalls:sys_enter"
                 and SYSCALLS.get(int(e["rest"].split("NR ")[1].split()[0])) == "kill"
                 and e["ts"] >= (fin or t0)), None)
    exited = next((e["ts"] for e in window if e["event"] == "sched:sched_process_exit"
                   and f"pid={worker} " in e["rest"] + " "), None)
    if fin is None or kill is None or exited is None:
        return None
    oncpu = next((e["ts"] for e in window if e["event"] == "sched:sched_switch"
                  and f"next_pid={server} " in e["rest"] + " " and fin <= e["ts"] <= kill["ts"]), fin)
    calls = [SYSCALLS.get(int(e["rest"].split("NR ")[1].split()[0]), e["rest"].split()[1])
             for e in window if e["pid"] == server and e["event"] == "raw_syscalls:sys_enter"
             and fin <= e["ts"] < kill["ts"]]
    wake = next((e["ts"] for e in window if e["event"] == "sched:sched_wakeup"
                 and f"pid={os.getpid()} " in e["rest"] + " " and e["ts"] >= exited), close["tExit"])
    # Who had the dying worker's CPU between its exit and the client's wake-up.
    exitCpu = next(e["cpu"] for e in window if e["event"] == "sched:sched_process_exit"
                   and f"pid={worker} " in e["rest"] + " ")
    onExitCpu = [e["rest"].split("next_comm=")[1].split()[0] for e in window
                 if e["event"] == "sched:sched_switch" and e["cpu"] == exitCpu
                 and exited <= e["ts"] <= wake]
    after = [SYSCALLS.get(int(e["rest"].split("NR ")[1].split()[0]), e["rest"].split()[1])
             for e in window if e["pid"] == server and e["event"] == "raw_syscalls:sys_enter"
             and kill["ts"] < e["ts"] < exited]
    return {
        "act->fin": fin - t0, "fin->oncpu": oncpu - fin, "oncpu->kill": kill["ts"] - oncpu,
        "kill->exit": exited - kill["ts"], "exit->notify": wake - exited,
        "notify->seen": close["tExit"] - wake, "onExitCpu": " ".join(onExitCpu),
        "total": close["tExit"] - t0, "calls": " ".join(calls), "after": " ".join(after),
        "sameCpu": kill["cpu"] == next((e["cpu"] for e in window if e["event"] == "sched:sched_process_exit"
                                        and f"pid={worker} " in e["rest"] + " "), -1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--scenario", default="fin", choices=("fin", "rst", "half"))
    ap.add_argument("--old", action="append", default=[], help="another closewatch tree")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--settle", type=float, default=0.01,
                    help="seconds between reading the PID line and the close (0: at once, "
                         "as closewatch_bench.py does)")
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="closewatch-killpath-"))
    servers: list[tuple[str, b.Server]] = []
    perf = None
    try:
        for label, root in [("closewatch", b.ROOT)] + [(f"closewatch@{Path(r).name}", Path(r)) for r in args.old]:
            b.ROOT = Path(root).resolve()
            servers.append((label, b.startServer("closewatch", [str(b.PIDWORKER)], logdir, sys.executable)))
        if not args.no_naive:
            servers.append(("naive", b.startServer("naive", [str(b.PIDWORKER)], logdir, sys.executable)))
        pids = " || ".join(f"common_pid == {s.pid}" for _, s in servers)
        ports = " || ".join(f"sport == {s.port}" for _, s in servers)
        data = logdir / "perf.data"
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-o", str(data),
             "-e", "sock:inet_sock_set_state", "--filter", ports,
             "-e", "raw_syscalls:sys_enter", "--filter", pids,
             "-e", "sched:sched_switch",
             "-e", "sched:sched_wakeup", "--filter", f"pid == {os.getpid()} || comm == \"sleep\"",
             "-e", "sched:sched_process_exit"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)
        closes: dict[str, list[dict]] = collections.defaultdict(list)
        for _ in range(args.n):
            for label, srv in servers:
                conns, _ = b.openConns(srv.port, 1, 10.0)
                if not conns:
                    continue
                c = conns[0]
                tracker = b.ExitTracker()
                tracker.add(c)
                time.sleep(args.settle)
                b._act(c, args.scenario)
                tracker.waitFor(c, 1.0)
                tracker.close()
                c.closeSock()
                if c.tExit is not None:
                    closes[label].append({"tAct": c.tAct, "tExit": c.tExit, "pid": c.pid,
                                          "lport": c.lport, "port": srv.port})
                b.WORKERS.killall()
                time.sleep(0.02)
        time.sleep(0.5)
        perf.send_signal(2)
        perf.wait(60)
        events = parse(data)
        if os.environ.get("KILL_PATH_DUMP"):
            Path(os.environ["KILL_PATH_DUMP"]).write_text(
                "\n".join(f"{e['ts']:.6f} [{e['cpu']}] {e['comm']}/{e['pid']} {e['event']} {e['rest']}"
                          for e in events) + "\n" + repr(dict(closes)) + "\n"
                + repr({label: (srv.pid, srv.port) for label, srv in servers}))
        print(f"{args.scenario}, {args.n} closes per server, alternating; load average "
              f"{os.getloadavg()[0]:.2f}; medians in microseconds")
        keys = ("act->fin", "fin->oncpu", "oncpu->kill", "kill->exit", "exit->notify",
                "notify->seen", "total")
        print(f"{'server':24s} {'traced':>6s} " + " ".join(f"{k:>11s}" for k in keys) + "  kill and exit on one CPU")
        for label, srv in servers:
            rows = [r for r in (legs(events, c, srv.pid, args.scenario) for c in closes[label]) if r]
            if not rows:
                print(f"{label:24s} no complete trace")
                continue
            med = [statistics.median(r[k] for r in rows) * 1e6 for k in keys]
            if os.environ.get("KILL_PATH_ROWS"):
                for r in sorted(rows, key=lambda r: r["total"]):
                    print("   ", " ".join(f"{r[k] * 1e6:6.0f}" for k in keys))
            same = sum(r["sameCpu"] for r in rows)
            print(f"{label:24s} {len(rows):6d} " + " ".join(f"{m:11.0f}" for m in med) + f"  {same}/{len(rows)}")
            for title, key in (("FIN -> kill", "calls"), ("kill -> worker exit", "after"),
                               ("switches on the exit's CPU until the client is woken", "onExitCpu")):
                common = collections.Counter(r[key] for r in rows).most_common(2)
                for seq, count in common:
                    print(f"    {title} ({count}/{len(rows)}): {seq or '(none)'}")
    finally:
        stopPerf(perf)
        b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
