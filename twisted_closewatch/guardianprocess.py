"""
The guardian process (see L{twisted_closewatch.guardian}): reads C{+KEY
PGID} and C{-KEY} lines from the server on its stdin and, at end-of-file,
C{SIGKILL}s every process group still registered, then exits.

Standard library only, and run isolated (C{python -I -S}), so that it
starts in milliseconds and costs a few MB.
"""

from __future__ import annotations

import os
import select
import signal
import sys

#: Seconds between two reads of the server's messages.  The guardian is
#: not woken by each message (a wake-up per spawn would cost the server
#: more than the spawn's own write); it sleeps until the pipe hangs up and
#: drains it this often so that it never fills.
DRAIN_INTERVAL_MS = 1000


def _readMessages(fd: int) -> set[int]:
    """
    Follow the server's messages until end-of-file; return the groups still
    registered then.
    """
    groups: dict[int, int] = {}
    partial = b""
    poller = select.poll()
    # No POLLIN: data does not wake us, only the server's end (POLLHUP).
    poller.register(fd, 0)
    os.set_blocking(fd, False)
    while True:
        hungUp = bool(poller.poll(DRAIN_INTERVAL_MS))
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                return set(groups.values())
            lines = (partial + data).split(b"\n")
            partial = lines.pop()
            for line in lines:
                key, _, pgid = line[1:].partition(b" ")
                if line.startswith(b"+"):
                    groups[int(key)] = int(pgid)
                else:
                    groups.pop(int(key), None)
        if hungUp:
            return set(groups.values())


def main() -> None:
    """
    The guardian process.
    """
    try:
        os.setsid()
    except PermissionError:
        # Already a process group leader: then it has a group of its own.
        pass
    os.chdir("/")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    groups = _readMessages(0)
    killed = 0
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    if groups:
        try:
            sys.stderr.write(
                f"closewatch guardian: server gone, killed {killed} worker process group(s)\n"
            )
            sys.stderr.flush()
        except OSError:
            pass


if __name__ == "__main__":
    main()
