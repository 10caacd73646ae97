#!/usr/bin/env python3
"""
What a worker's birth costs in a process the size of the spawner, by way:

    sudo python -I -S bench/birth_probe.py [--count 100]

  - C{posix_spawn} of C{/bin/true}, and C{fork} + C{exec} of it: the spawn's
    own cost, as long as the parent is blocked;
  - C{mkdir} and C{rmdir} of a cgroup, and C{posix_spawn} with the parent
    moved into the worker's cgroup for it and back out (what the spawner
    does for a command);
  - the time to the worker's first byte (C{bench/pidworker.sh}: C{echo $$})
    with that C{posix_spawn}, and from a stub forked ahead of time, already
    in its cgroup and session, given the request over a socket: with and
    without waiting for its C{exec} (the spawner must wait, to report a
    command that cannot start as a spawn failure).

Needs root and a cgroup v2 hierarchy (it makes and removes a cgroup of its
own under this process's); prints the medians in microseconds.
"""

from __future__ import annotations

import argparse
import array
import itertools
import json
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = ["/bin/sh", str(HERE / "pidworker.sh")]
# The spawner's own module (standard library only): this process is then
# about the spawner's size, and writes cgroup files as it does.
sys.path.insert(0, str(HERE.parent))

from twisted_closewatch.spawnerprocess import _writeFile as write  # noqa: E402


def cgroupRoot() -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            if rest.split(" ", 1)[0] == "cgroup2":
                mount = fields.split()[4]
                break
        else:
            raise SystemExit("no cgroup v2 hierarchy is mounted")
    with open("/proc/self/cgroup") as f:
        own = next(line[3:].strip() for line in f if line.startswith("0::"))
    return os.path.join(mount, own.lstrip("/"))


class Probe:
    def __init__(self, home: str) -> None:
        self.home = home
        self.parent = os.path.join(home, f"birth-probe-{os.getpid()}")
        os.mkdir(self.parent)
        self.numbers = itertools.count()
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        os.rmdir(self.parent)

    def cgroup(self) -> str:
        path = os.path.join(self.parent, f"w{next(self.numbers)}")
        os.mkdir(path)
        return path

    def end(self, pid: int, cgroup: str | None) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        while cgroup is not None:
            try:
                os.rmdir(cgroup)
                return
            except OSError:
                time.sleep(0.001)

    def spawnTrue(self) -> float:
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn("/bin/true", ["/bin/true"], {}, setsid=True)
        t1 = time.perf_counter_ns()
        os.waitpid(pid, 0)
        return (t1 - t0) / 1000

    def forkTrue(self) -> float:
        t0 = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/true", ["/bin/true"])
        t1 = time.perf_counter_ns()
        os.waitpid(pid, 0)
        return (t1 - t0) / 1000

    def mkdirRmdir(self) -> tuple[float, float]:
        t0 = time.perf_counter_ns()
        path = self.cgroup()
        t1 = time.perf_counter_ns()
        os.rmdir(path)
        t2 = time.perf_counter_ns()
        return (t1 - t0) / 1000, (t2 - t1) / 1000

    def spawnInCgroup(self, argv: list[str], stdout: int) -> tuple[int, str]:
        cgroup = self.cgroup()
        write(os.path.join(cgroup, "cgroup.procs"), "0")
        pid = os.posix_spawn(
            argv[0], argv, dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_DUP2, stdout, 1)], setsid=True,
        )
        write(os.path.join(self.home, "cgroup.procs"), "0")
        return pid, cgroup

    def spawnTrueInCgroup(self) -> float:
        t0 = time.perf_counter_ns()
        pid, cgroup = self.spawnInCgroup(["/bin/true"], self.devnull)
        t1 = time.perf_counter_ns()
        self.end(pid, cgroup)
        return (t1 - t0) / 1000

    def firstByteSpawned(self) -> float:
        r, w = os.pipe()
        t0 = time.perf_counter_ns()
        pid, cgroup = self.spawnInCgroup(WORKER, w)
        os.read(r, 64)
        t1 = time.perf_counter_ns()
        os.close(r)
        os.close(w)
        self.end(pid, cgroup)
        return (t1 - t0) / 1000

    def stub(self) -> tuple[int, socket.socket, str]:
        cgroup = self.cgroup()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            mine.close()
            os.setsid()
            fd = theirs.fileno()
            os.closerange(3, fd)
            os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
            fds = array.array("i")
            data, ancillary, _, _ = theirs.recvmsg(
                1 << 16, socket.CMSG_LEN(fds.itemsize), socket.MSG_CMSG_CLOEXEC
            )
            for _, _, payload in ancillary:
                fds.frombytes(payload)
            request = json.loads(data)
            os.dup2(fds[0], 1)
            os.execve(request["argv"][0], request["argv"], request["env"])
        theirs.close()
        write(os.path.join(cgroup, "cgroup.procs"), str(pid))
        return pid, mine, cgroup

    def firstByteStub(self, waitForExec: bool) -> float:
        pid, sock, cgroup = self.stub()
        # Ready and waiting, as a spare stub would be.
        time.sleep(0.002)
        r, w = os.pipe()
        request = json.dumps({"argv": WORKER, "env": dict(os.environ)}).encode()
        t0 = time.perf_counter_ns()
        socket.send_fds(sock, [request], [w])
        if waitForExec:
            sock.recv(4096)
        os.read(r, 64)
        t1 = time.perf_counter_ns()
        for fd in (r, w):
            os.close(fd)
        sock.close()
        self.end(pid, cgroup)
        return (t1 - t0) / 1000


def median(f: Callable[[], float], count: int) -> int:
    return round(statistics.median(f() for _ in range(count)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100)
    count = ap.parse_args().count
    if os.geteuid() != 0:
        raise SystemExit("needs root (it makes cgroups)")
    probe = Probe(cgroupRoot())
    try:
        mkdirs, rmdirs = zip(*(probe.mkdirRmdir() for _ in range(count)), strict=True)
        result = {
            "posix_spawn_us": median(probe.spawnTrue, count),
            "fork_exec_us": median(probe.forkTrue, count),
            "cgroup_mkdir_us": round(statistics.median(mkdirs)),
            "cgroup_rmdir_us": round(statistics.median(rmdirs)),
            "posix_spawn_in_cgroup_us": median(probe.spawnTrueInCgroup, count),
            "first_byte_posix_spawn_in_cgroup_us": median(probe.firstByteSpawned, count),
            "first_byte_stub_waiting_for_exec_us": median(
                lambda: probe.firstByteStub(True), count
            ),
            "first_byte_stub_us": median(lambda: probe.firstByteStub(False), count),
        }
    finally:
        probe.close()
    with open("/proc/loadavg") as f:
        result["loadavg"] = f.read().split()[:3]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
