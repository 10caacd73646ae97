#!/usr/bin/env python3
"""
How much CPU a relay like closewatch's would save with splice(2).

    python bench/splice_probe.py [--mib 256] [--reps 3]

Runs two minimal one-connection relays, each spawning `cat` with 1 MiB
pipes, and pushes the throughput test of closewatch_bench.py (256 MiB each
way at once) through them:

  - copy:   os.read/os.recv into Python bytes, then os.write/send (what
            closewatch's Twisted relay does per chunk, minus Twisted);
  - splice: os.splice socket -> worker stdin pipe and worker stdout pipe ->
            socket, in the kernel, no user-space copy.

It prints MB/s and the relay's CPU time per MiB relayed.  The relays are
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import closewatch_bench as b  # noqa: E402

CHUNK = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def relay(mode: str, port: int) -> None:
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
    worker = subprocess.Popen(["cat"], stdin=inR, stdout=outW, start_new_session=True)
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
    pending = b""  # copy mode: bytes read from the worker not yet sent

    pendingUp = b""  # copy mode: bytes read from the client not yet written

    def up() -> bool:  # client -> worker
        nonlocal upOpen, pendingUp
        while upOpen:
            try:
                if mode == "splice":
                    n = os.splice(sock, inW, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                else:
                    if pendingUp:
                        pendingUp = pendingUp[os.write(inW, pendingUp):]
                        continue
                    pendingUp = conn.recv(256 * 1024)
                    n = len(pendingUp)
            except BlockingIOError:
                return True
            if n == 0:
                upOpen = False
                os.close(inW)
                ep_unregister(inW)
        return False

    def down() -> bool:  # worker -> client
        nonlocal downOpen, pending
        while downOpen:
            try:
                if mode == "splice":
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
    worker.wait()
    conn.close()


class _Probe:
    name = "probe"

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        relay(args.serve[0], int(args.serve[1]))
        return 0
    for rep in range(args.reps):
        for mode in ("copy", "splice"):
            port = b.freePort()
            proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(port)],
                                    cwd=tempfile.gettempdir())
            try:
                while not b.listening(port):
                    if proc.poll() is not None:
                        raise RuntimeError("probe relay died")
                    import time

                    time.sleep(0.02)
                r = b.throughputOnce(_Probe(proc, port), args.mib * b.MiB)
                print(f"rep {rep} {mode:6s}: {b.fmt(r['mb_per_s'], 0)} MB/s, relay CPU "
                      f"{b.fmt(r['server_cpu_ms_per_mib'], 2)} ms/MiB, peak RSS "
                      f"{r['peak_rss_mb_sampled']:.1f} MB{'' if r['ok'] else ' FAILED ' + str(r['error'])}",
                      flush=True)
            finally:
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
