#!/usr/bin/env python3
"""
How much CPU a relay like closewatch's would save with splice(2).

    python bench/splice_probe.py [--mib 256] [--reps 3] [--direction both|up|down]

Runs minimal one-connection relays, each spawning a worker with 1 MiB
pipes, and pushes data through them:

  - copy:   os.read/os.recv into Python bytes, then os.write/send (what
            closewatch's Twisted relay does per chunk, minus Twisted);
  - splice: os.splice socket -> worker stdin pipe and worker stdout pipe ->
            socket, in the kernel, no user-space copy;
  - splice-up, splice-down: splice in one direction only, copy in the other.

With `--direction both` (the default) the worker is `cat` and the load is the
throughput test of closewatch_bench.py (256 MiB each way at once).  With
`--direction up` the worker is `cat >/dev/null` (client -> worker only: the
client sends, half-closes, and waits for the close); with `--direction down`
it is `head -c N /dev/zero` (worker -> client only).  One direction at a time
tells which one splice helps.

It prints MB/s and the relay's CPU time per MiB relayed (per MiB crossing
the relay: both directions count with `both`).  The relays are
bench-only probes (no flow-control subtleties, no close watch): they bound
what the relay loop could cost, not what closewatch costs.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import closewatch_bench as b

CHUNK = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def relay(mode: str, port: int, worker: list[str]) -> None:
    """The probe server: one connection, one `cat`, until both sides end."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(1)
    conn, _ = ls.accept()
    ls.close()
    inR, inW = os.pipe()
    outR, outW = os.pipe()
    for fd in (inW, outR):
        fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
    proc = subprocess.Popen(worker, stdin=inR, stdout=outW, start_new_session=True)
    os.close(inR)
    os.close(outW)
    sock = conn.fileno()
    for fd in (sock, inW, outR):
        os.set_blocking(fd, False)
    ep = select.epoll()
    ET = select.EPOLLET
    ep.register(sock, select.EPOLLIN | select.EPOLLOUT | ET)
    ep.register(inW, select.EPOLLOUT | ET)
    ep.register(outR, select.EPOLLIN | ET)
    upOpen = downOpen = True
    spliceUp = mode in ("splice", "splice-up")
    spliceDown = mode in ("splice", "splice-down")
    pending = b""  # copy mode: bytes read from the worker not yet sent

    pendingUp = b""  # copy mode: bytes read from the client not yet written

    def up() -> bool:  # client -> worker
        nonlocal upOpen, pendingUp
        while upOpen:
            try:
                if spliceUp:
                    n = os.splice(sock, inW, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                else:
                    if pendingUp:
                        pendingUp = pendingUp[os.write(inW, pendingUp):]
                        continue
                    pendingUp = conn.recv(256 * 1024)
                    n = len(pendingUp)
            except BlockingIOError:
                return True
            except BrokenPipeError:  # the worker exited (`head`, direction down)
                n = 0
            if n == 0:
                upOpen = False
                os.close(inW)
                ep_unregister(inW)
        return False

    def down() -> bool:  # worker -> client
        nonlocal downOpen, pending
        while downOpen:
            try:
                if spliceDown:
                    n = os.splice(outR, sock, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                else:
                    if not pending:
                        pending = os.read(outR, 128 * 1024)
                        if not pending:
                            n = 0
                        else:
                            n = -1
                    if pending:
                        pending = pending[conn.send(pending):]
                        n = -1
            except BlockingIOError:
                return True
            if n == 0:
                downOpen = False
                conn.shutdown(socket.SHUT_WR)
        return False

    def ep_unregister(fd: int) -> None:
        try:
            ep.unregister(fd)
        except (OSError, ValueError):
            pass

    while upOpen or downOpen:
        ep.poll(1.0)
        up()
        down()
    proc.wait()
    conn.close()


class _Probe:
    name = "probe"

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid


def oneWay(proc: subprocess.Popen, port: int, direction: str, total: int) -> dict:
    """
    Push C{total} bytes one way through the probe relay: C{up}, the client
    sends and half-closes, then waits for the close; C{down}, the client
    reads until EOF.  The relay's CPU time is read before it exits.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    cpu0 = b._cpuSeconds(proc.pid)
    block = b"\xa5" * (4 * b.MiB)
    got = 0
    t0 = time.perf_counter()
    if direction == "up":
        for _ in range(total // len(block)):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        got = total
    else:
        buf = bytearray(b.MiB)
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
    if direction == "up":
        s.recv(1)  # the relay's FIN once the worker has read everything
    seconds = time.perf_counter() - t0
    cpu = b._cpuSeconds(proc.pid) - cpu0
    s.close()
    ok = got == total
    return {
        "ok": ok,
        "error": None if ok else f"{got} of {total} bytes",
        "mb_per_s": total / seconds / 1e6 if ok else None,
        "server_cpu_ms_per_mib": cpu * 1000 / (total / b.MiB) if ok else None,
        "peak_rss_mb_sampled": b._rssKiB(proc.pid) / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--direction", choices=("both", "up", "down"), default="both")
    ap.add_argument("--modes", default="copy,splice",
                    help="comma-separated: copy, splice, splice-up, splice-down")
    ap.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        relay(args.serve[0], int(args.serve[1]), args.serve[2:])
        return 0
    total = args.mib * b.MiB
    worker = {
        "both": ["cat"],
        "up": ["sh", "-c", "exec cat >/dev/null"],
        "down": ["head", "-c", str(total), "/dev/zero"],
    }[args.direction]
    results: dict[str, list[float]] = {}
    print(f"load average {os.getloadavg()}, {args.mib} MiB, direction {args.direction}", flush=True)
    for rep in range(args.reps):
        for mode in args.modes.split(","):
            port = b.freePort()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(port), *worker],
                                    cwd=tempfile.gettempdir())
            try:
                while not b.listening(port):
                    if proc.poll() is not None:
                        raise RuntimeError("probe relay died")
                    time.sleep(0.02)
                if args.direction == "both":
                    r = b.throughputOnce(_Probe(proc, port), total)
                else:
                    r = oneWay(proc, port, args.direction, total)
                if r["ok"]:
                    results.setdefault(mode, []).append(r["mb_per_s"])
                    results.setdefault(mode + " cpu", []).append(r["server_cpu_ms_per_mib"])
                failed = "" if r["ok"] else " FAILED " + str(r["error"])
                print(f"rep {rep} {mode:11s}: {b.fmt(r['mb_per_s'], 0)} MB/s, relay CPU "
                      f"{b.fmt(r['server_cpu_ms_per_mib'], 2)} ms/MiB, peak RSS "
                      f"{r['peak_rss_mb_sampled']:.1f} MB{failed}", flush=True)
            finally:
                proc.kill()
                proc.wait()
    for mode in args.modes.split(","):
        if mode in results:
            print(f"median {mode:11s}: {b.fmt(b.median(results[mode]), 0)} MB/s, "
                  f"{b.fmt(b.median(results[mode + ' cpu']), 2)} ms/MiB", flush=True)
    print(f"load average {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
