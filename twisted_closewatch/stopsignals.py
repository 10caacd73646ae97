"""
Stopping the server on C{SIGTERM}, C{SIGINT} and C{SIGHUP}, with nothing in
the signal handler that could wait for a lock.

Twisted's own handlers (C{ReactorBase.sigTerm} and C{sigInt}, Twisted
26.10.0) log C{"Received SIGTERM, shutting down."} from inside the handler.
A Python signal handler runs in the main thread between two bytecodes of
whatever that thread was doing, and in a busy server that is often logging.
twistd's log file (L{twisted.python.logfile.LogFile}) and the legacy log
publisher are synchronized with L{twisted.python.threadable.XLock}, a
subclass of the pure-Python C{threading._RLock}: if the signal lands inside
that lock's C{acquire} after its inner lock is taken and before its owner
is recorded, or inside C{release} after the owner is cleared and before the
inner lock is released, the handler's own C{acquire} waits for ever on the
inner lock, which only the interrupted code below it would release.  The
server then never stops.

L{StopSignals} replaces those handlers, and handles C{SIGHUP} (what a
closed terminal sends under C{twistd -n}) the same way, where Twisted leaves
it to its default action: death, without the connections' ends.  Its
handler only passes the signal to the reactor with C{callFromThread}, which
appends to a list and writes a byte to the reactor's waker pipe; the
reactor's thread then logs the line and stops.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from twisted_closewatch._compat import handlesSignals, setExitSignal

log = Logger()

#: The signals that stop the server.
STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT) + (
    (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()
)


class StopSignals:
    """
    Stops C{reactor} on C{SIGTERM}, C{SIGINT} or C{SIGHUP}, the way
    Twisted's handlers do (the signal is kept as the reactor's exit signal,
    so that twistd exits with it unless the stop clears it), except that the
    line saying so is logged from the reactor's thread.

    Installed only where the reactor installs signal handlers itself: a
    program that runs it with C{installSignalHandlers=False} has taken
    signals into its own hands, and gets none of these.  Even there, a
    signal is only taken over from the handler the reactor installed for it
    (C{SIGTERM}, and C{SIGINT} unless it found another one there, a
    debugger's say) or, for C{SIGHUP}, from the default action: a handler
    someone else set, or a C{SIGHUP} ignored under C{nohup}, is left alone.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def install(self) -> None:
        """
        Take the signals over; once the reactor runs, after it has
        installed its own handlers (C{reactor.callWhenRunning}).
        """
        if not handlesSignals(self._reactor):
            return
        for number, replaced in self._replaced().items():
            if signal.getsignal(number) == replaced:
                signal.signal(number, self._received)

    def _replaced(self) -> dict[int, object]:
        """
        The handler each signal is taken over from.
        """
        replaced: dict[int, object] = {
            signal.SIGTERM: getattr(self._reactor, "sigTerm", None),
            signal.SIGINT: getattr(self._reactor, "sigInt", None),
        }
        if hasattr(signal, "SIGHUP"):
            replaced[signal.SIGHUP] = signal.SIG_DFL
        return replaced

    def _received(self, number: int, frame: FrameType | None) -> None:
        """
        The signal handler: nothing but a call queued for the reactor's
        thread (see the module's description).
        """
        self._reactor.callFromThread(self._stop, number)

    def _stop(self, number: int) -> None:
        """
        In the reactor's thread: log the signal and stop the reactor.  A
        signal while it is stopping already changes nothing (Twisted's
        handlers would log C{ReactorNotRunning} as an unhandled error).
        """
        name = signal.Signals(number).name
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            log.info("Received {signal_name}, already shutting down.", signal_name=name)
            return
        log.info("Received {signal_name}, shutting down.", signal_name=name)
        setExitSignal(self._reactor, number)
