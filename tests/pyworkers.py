"""
Warm Python workers for the spawner's tests (C{--python-worker
tests.pyworkers:NAME}).
"""

from __future__ import annotations

import json
import os
import random
import sys

#: Set in the spawner at import, so a worker can tell it was imported once.
IMPORTED_IN = os.getpid()


def describe() -> int:
    """
    One JSON line: its environment, descriptors, a random number, the pid
    its module was imported in; then an echo of its input until EOF.
    """
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    report = {
        "env": dict(os.environ),
        "fds": fds,
        "random": random.random(),
        "importedIn": IMPORTED_IN,
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "stdinIsFd0": sys.stdin.fileno() == 0,
    }
    print(json.dumps(report), flush=True)
    for line in sys.stdin:
        sys.stdout.write(line)
        sys.stdout.flush()
    return 0


def status() -> int:
    """
    Exit with status 7 at once.
    """
    return 7


def raises() -> None:
    """
    Fail as a buggy worker does.
    """
    raise RuntimeError("a worker bug")
