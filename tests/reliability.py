"""
Helpers for the reliability tests (soak, property-based, durability, bad
input): what the kernel says about a server and its workers, read from
C{/proc}, and an orphan reaper so that killed grandchildren do not linger as
zombies where init does not reap them (some containers).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time
from collections.abc import Iterable
from typing import NamedTuple

from tests.support import children, wait

_PR_SET_CHILD_SUBREAPER = 36
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcStat(NamedTuple):
    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    #: Seconds since boot when the process started.
    started: float
    comm: str


def procStat(pid: int) -> ProcStat | None:
    """
    C{/proc/PID/stat}, or C{None} if there is no such process.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rpartition(")")[2].split()
    return ProcStat(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        started=int(fields[19]) / _CLOCK_TICKS,
        comm=comm,
    )


def allProcesses() -> list[ProcStat]:
    stats = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = procStat(int(name))
            if stat is not None:
                stats.append(stat)
    return stats


def groupMembers(pgids: Iterable[int], notAfter: dict[int, float] | None = None) -> list[ProcStat]:
    """
    Live (not zombie) processes in any of the process groups C{pgids}.

    Worker pids are recycled (C{pid_max} may be as low as 32768), so a group
    id seen again may belong to someone else's new group; with C{notAfter}
    (group id -> seconds since boot when that worker was reaped), a group
    only counts when one of its members started before its worker was
    reaped.  The kernel cannot reuse a group id while the group has a
    member, so a reused id never hides a leftover.
    """
    wanted = set(pgids)
    found: dict[int, list[ProcStat]] = {}
    for stat in allProcesses():
        if stat.pgrp in wanted and stat.state not in ("Z", "X"):
            found.setdefault(stat.pgrp, []).append(stat)
    leftovers = []
    for pgid, members in found.items():
        if notAfter is not None and pgid in notAfter:
            if min(m.started for m in members) > notAfter[pgid] + 1.0:
                continue
        leftovers.extend(members)
    return leftovers


def groupGone(pgid: int) -> bool:
    """
    Whether no live process is left in process group C{pgid}.
    """
    reapOrphans()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    # Zombies still count for kill(2); look closer.
    return not groupMembers([pgid])


def waitGroupsGone(pgids: Iterable[int], timeout: float = 5.0) -> float:
    """
    Wait until every group in C{pgids} is empty; the seconds it took.
    """
    started = time.monotonic()
    pending = set(pgids)

    def check() -> bool:
        for pgid in list(pending):
            if groupGone(pgid):
                pending.discard(pgid)
        return not pending

    try:
        wait(check, timeout, 0.005)
    except AssertionError:
        raise AssertionError(
            f"process groups {sorted(pending)} still have live members after {timeout} s: "
            f"{groupMembers(pending)}"
        )
    return time.monotonic() - started


def state(pid: int) -> str | None:
    stat = procStat(pid)
    return None if stat is None else stat.state


def zombieChildren(pid: int) -> list[int]:
    return [c for c in children(pid) if state(c) == "Z"]


def fdCount(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# Orphans.


def becomeSubreaper(on: bool = True) -> bool:
    """
    Make this process the reaper of its orphaned descendants (Linux
    C{PR_SET_CHILD_SUBREAPER}): a worker's killed grandchildren then become
    our zombies, which L{reapOrphans} reaps, instead of init's, which in
    some containers are never reaped.  Returns whether it worked.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reapOrphans() -> int:
    """
    Reap zombie children of this process that are orphans adopted as
    subreaper: those in another session than ours (workers lead their own
    session; the servers this process started share ours, and their exit
    status belongs to C{subprocess}).  Returns how many were reaped.
    """
    ours = os.getsid(0)
    reaped = 0
    for pid in children(os.getpid()):
        stat = procStat(pid)
        if stat is None or stat.state != "Z" or stat.session == ours:
            continue
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                reaped += 1
        except ChildProcessError:
            pass
    return reaped


class Orphans:
    """
    Adopt orphaned descendants for the life of a test: C{start} in setUp,
    C{stop} as a cleanup.
    """

    def start(self) -> None:
        self.active = becomeSubreaper(True)

    def stop(self) -> None:
        reapOrphans()
        if self.active:
            becomeSubreaper(False)


# Clients.


def connect(port: int, timeout: float = 10.0, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def readUntilClosed(sock: socket.socket, timeout: float = 10.0, limit: int = 1 << 26) -> tuple[bytes, str]:
    """
    Read until the peer closes: the bytes, and C{"eof"} or C{"reset"}.
    """
    sock.settimeout(timeout)
    chunks = []
    total = 0
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise AssertionError("more data than expected")


def killQuietly(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
