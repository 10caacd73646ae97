"""
What follows the kills, held back so that it delays none.

When a hundred clients leave at once, the server's CPU is what every one
of their kills, and every dying worker, waits for.  A kill is a few system
calls (the signal, the client and the worker's pipes no longer watched);
what follows it (timers, C{cgroup.kill} for what left the worker's group)
is more, and the end of the connection (the drop of the client's
transport, the log line, the metrics) is a few hundred microseconds of
Python.  L{Aftermath} is the server's one place for that work, in two
stages:

  - L{Aftermath.afterKills}: once every kill of this reactor turn has been
    sent (the next turn, one timer for the whole batch);
  - L{Aftermath.teardown}: once no worker sent C{SIGKILL} is still
    waiting for its reap (L{Aftermath.killed}, L{Aftermath.reaped}), so
    that the dying workers have the CPUs to themselves, and at the latest
    L{TEARDOWN_DELAY} after it was asked for.

Both are bounded: a stage holds at most one call per connection's step,
and the teardown waits L{TEARDOWN_DELAY} at most, however busy the server.
Before a teardown runs, and between every L{CHUNK} of its calls, the close
watch is polled (C{beforeTeardown}): a client that left meanwhile is killed
first.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

#: The longest a teardown waits for the dying workers to be reaped.
TEARDOWN_DELAY = 0.05
#: Teardown calls run between two polls of the close watch: an end costs a
#: few hundred microseconds, and a client that leaves meanwhile waits for
#: at most this many.
CHUNK = 4

Work = Callable[[], None]


class Aftermath:
    """
    The work that follows kills: run after them, and after the dying.

    @param beforeTeardown: what runs before a teardown and between its
        chunks (the close watch's poll: kills first).
    """

    def __init__(self, clock: IReactorTime, beforeTeardown: Callable[[], None]) -> None:
        self._clock = clock
        self._beforeTeardown = beforeTeardown
        self._afterKills: list[Work] = []
        self._afterKillsCall: IDelayedCall | None = None
        self._teardowns: list[Work] = []
        self._teardownCall: IDelayedCall | None = None
        self._dying: set[object] = set()

    def __len__(self) -> int:
        """
        The calls waiting, in both stages.
        """
        return len(self._afterKills) + len(self._teardowns)

    def killed(self, worker: object) -> None:
        """
        C{worker} was sent C{SIGKILL}: teardowns wait for its reap.
        """
        self._dying.add(worker)

    def reaped(self, worker: object) -> None:
        """
        C{worker} has been reaped (or will never be: it is forgotten).
        """
        self._dying.discard(worker)
        if not self._dying and self._teardowns:
            self._schedule(0)

    def afterKills(self, work: Work) -> None:
        """
        Run C{work} on the next reactor turn, after every kill of this one.
        """
        self._afterKills.append(work)
        if self._afterKillsCall is None:
            self._afterKillsCall = self._clock.callLater(0, self._runAfterKills)

    def teardown(self, work: Work) -> None:
        """
        Run C{work} once no killed worker is dying, or after
        L{TEARDOWN_DELAY}.
        """
        self._teardowns.append(work)
        if self._teardownCall is None:
            self._schedule(0 if not self._dying else TEARDOWN_DELAY)

    def _schedule(self, delay: float) -> None:
        if self._teardownCall is not None:
            if self._teardownCall.getTime() <= self._clock.seconds() + delay:
                return
            self._teardownCall.cancel()
        self._teardownCall = self._clock.callLater(delay, self._runTeardowns)

    def _runAfterKills(self) -> None:
        if self._afterKillsCall is not None:
            if self._afterKillsCall.active():
                self._afterKillsCall.cancel()
            self._afterKillsCall = None
        work, self._afterKills = self._afterKills, []
        for call in work:
            _run(call)

    def _runTeardowns(self) -> None:
        self._teardownCall = None
        if self._afterKills:
            # Their kills came first; their follow-up too.
            self._runAfterKills()
        work, self._teardowns = self._teardowns, []
        for start in range(0, len(work), CHUNK):
            self._beforeTeardown()
            if self._afterKills:
                self._runAfterKills()
            for call in work[start : start + CHUNK]:
                _run(call)


def _run(work: Work) -> None:
    """
    One connection's step: its failure is logged, and stops no other's.
    """
    try:
        work()
    except Exception:
        log.failure("after a kill")
