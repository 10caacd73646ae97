"""
The queue the SQL workers' writers wait in, in the kernel rather than in
SQLite's busy handler.

SQLite's busy handler does not queue: a connection that finds the write lock
taken sleeps (1, 2, 5, ... then 100 ms at a time) and tries again, and it
gets the lock only if it happens to try in the gap between one holder's
release and the next taker.  Under steady contention a writer that has
backed off to 100 ms polls loses to every newcomer polling at 1 ms, and can
wait past the busy timeout while hundreds of other transactions commit (seen
in tests/test_durability.py: a writer refused "database is locked" after
10 s while 200 others committed).  A blocking C{flock} is queued by the
kernel instead: since Linux 5.0 a new waiter is chained behind the waiters
already there, and a release wakes the first of them, so writers get the lock
about in their order of arrival, and the busy timeout bounds a wait behind
the holders in front rather than a lottery.

The lock is a C{flock} on the database file itself: SQLite's unix VFS locks
with C{fcntl} (POSIX) locks, which on Linux are independent of C{flock}, so
no file is added.  The descriptor stays open for the worker's life: closing
any descriptor of a file drops the process's POSIX locks on it, SQLite's
among them.  A killed worker's place in the queue goes with its descriptors.

Like the worker, this imports only the standard library.
"""

from __future__ import annotations

import fcntl
import os
import signal
from types import FrameType


class _Expired(Exception):
    """
    The wait for the lock ran out of time.
    """


class WriterQueue:
    """
    One worker's place in the queue of the database's writers.

    @ivar held: whether this worker holds the lock.
    """

    def __init__(self, path: str, timeout: float) -> None:
        """
        @param path: the database file, already opened by SQLite.
        @param timeout: seconds L{enter} waits at most (SQLite's busy
            timeout, so that a client waits as long as it would have).
        """
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._timeout = timeout
        self._waiting = False
        self.held = False
        # Installed for good: an alarm that lands just after the wait is
        # then ignored rather than taken for SIGALRM's default, an exit.
        signal.signal(signal.SIGALRM, self._expire)

    def _expire(self, signum: int, frame: FrameType | None) -> None:
        if self._waiting:
            raise _Expired()

    def enter(self) -> bool:
        """
        Wait for this worker's turn to write, at most the timeout.

        @return: whether the lock is held now.
        """
        if self.held:
            return True
        self._waiting = True
        try:
            signal.setitimer(signal.ITIMER_REAL, self._timeout)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            self.held = True
        except _Expired:
            # Possibly raised just after the lock was granted: give it back.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.held = False
        finally:
            self._waiting = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        return self.held

    def leave(self) -> None:
        """
        Let the next writer in; nothing if this worker is not in front.
        """
        if self.held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        """
        Leave the queue for good: only once SQLite's connection is closed,
        whose POSIX locks the close of this descriptor would drop.
        """
        self.held = False
        os.close(self._fd)
