"""
A twistd log observer (C{--logger tests.busylogger.observer}) that sends a
signal to its own process while it is in the middle of writing an event,
where a signal lands in a busy server, for the tests of
L{twisted_closewatch.stopsignals}.

It writes what L{twisted_closewatch.logs.jsonObserver} writes, inside a lock
of its own, as C{LogFile.write} runs inside its C{XLock}.  Once the file
named by C{$BUSYLOGGER_TRIGGER} exists, the next event makes it remove the
file and, still inside the lock, send itself the signal whose number the
file holds; Python runs the signal's handler before C{os.kill} returns.  A
handler that logs calls the observer again in the same thread, where a real
log file's lock, caught half taken, would make it wait for ever: this one
writes that event with C{"reentered": true} instead, for the test to find.
"""

from __future__ import annotations

import os
import threading

from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

from twisted_closewatch.logs import jsonObserver


@implementer(ILogObserver)
class BusyObserver:
    def __init__(self, observer: ILogObserver, trigger: str) -> None:
        self._observer = observer
        self._trigger = trigger
        self._lock = threading.Lock()
        self._writing: int | None = None

    def __call__(self, event: LogEvent) -> None:
        if self._writing == threading.get_ident():
            self._observer({**event, "reentered": True})
            return
        with self._lock:
            self._writing = threading.get_ident()
            try:
                self._observer(event)
                self._signalIfAsked()
            finally:
                self._writing = None

    def _signalIfAsked(self) -> None:
        try:
            with open(self._trigger) as f:
                number = int(f.read())
        except FileNotFoundError:
            return
        os.unlink(self._trigger)
        os.kill(os.getpid(), number)


def observer() -> ILogObserver:
    """
    The observer twistd's C{--logger} calls for.
    """
    return BusyObserver(jsonObserver(), os.environ["BUSYLOGGER_TRIGGER"])
