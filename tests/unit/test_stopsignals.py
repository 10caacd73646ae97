"""
Tests for L{twisted_closewatch.stopsignals}: the handlers for C{SIGTERM},
C{SIGINT} and C{SIGHUP} log nothing and take no lock; the reactor's thread
logs and stops.

Real signals are raised in this process (C{signal.raise_signal}: Python runs
the handler before the call returns), with every handler put back after
each test; the reactor is a fake that installs Twisted's own handlers when it
runs, as C{ReactorBase} does.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.base import ReactorBase
from twisted.internet.error import ReactorNotRunning
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_closewatch.stopsignals import STOP_SIGNALS, StopSignals


class SignalReactor(MemoryReactorClock):
    """
    A reactor that handles signals as Twisted's does: with
    C{installSignalHandlers}, L{run} installs Twisted's own C{sigTerm}, and
    C{sigInt} where C{SIGINT} has Python's default handler, before the
    C{callWhenRunning} calls; C{callFromThread} queues a call for
    L{runThreadCalls}; a second L{stop} raises.
    """

    sigTerm = ReactorBase.sigTerm
    sigInt = ReactorBase.sigInt
    _exitSignal: int | None = None

    def __init__(self, installSignalHandlers: bool = True) -> None:
        super().__init__()
        self._installSignalHandlers = installSignalHandlers
        self.threadCalls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def run(self) -> None:
        if self._installSignalHandlers:
            if signal.getsignal(signal.SIGINT) == signal.default_int_handler:
                signal.signal(signal.SIGINT, self.sigInt)
            signal.signal(signal.SIGTERM, self.sigTerm)
        self.running = True
        self.hasRun = True
        for f, args, kwargs in self.whenRunningHooks:
            f(*args, **kwargs)

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.threadCalls.append((f, args))

    def runThreadCalls(self) -> None:
        calls, self.threadCalls = self.threadCalls, []
        for f, args in calls:
            f(*args)

    def stop(self) -> None:
        if self.hasStopped:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        super().stop()


class BusyObserver:
    """
    A log observer that is in the middle of writing an event while its
    C{lock} is held, as C{LogFile.write} is inside its lock: a handler that
    logs then would wait for it for ever.  This one records the attempt in
    C{blocked} instead of waiting.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[LogEvent] = []
        self.blocked: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if not self.lock.acquire(blocking=False):
            self.blocked.append(event)
            return
        try:
            self.events.append(event)
        finally:
            self.lock.release()


class StopSignalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        for number in STOP_SIGNALS:
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        self.freshProcess()
        self.observer = BusyObserver()
        globalLogPublisher.addObserver(self.observer)
        self.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def freshProcess(self) -> None:
        """
        The handlers of a fresh twistd: Python's own for C{SIGINT}, the
        default action for C{SIGTERM} and C{SIGHUP}.
        """
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    def startReactor(self, reactor: SignalReactor) -> None:
        """
        Start C{reactor} with L{StopSignals} installed as the service
        installs it.
        """
        self.stopSignals = StopSignals(reactor)
        reactor.callWhenRunning(self.stopSignals.install)
        reactor.run()

    def raiseSignal(self, reactor: SignalReactor, number: int) -> None:
        """
        Deliver C{number} to this process while the log observer is busy,
        once sure the handler is L{StopSignals}' (the default action of
        C{SIGTERM} would end the test run).
        """
        self.assertIs(getattr(signal.getsignal(number), "__self__", None), self.stopSignals)
        with self.observer.lock:
            signal.raise_signal(number)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.observer.events]

    def test_handlerOnlyQueues(self) -> None:
        """
        The handler for each stop signal logs nothing, so takes no log lock
        (the observer's is held when it runs), and does not stop the reactor
        itself: it queues one call for the reactor's thread.
        """
        for number in STOP_SIGNALS:
            self.freshProcess()
            reactor = SignalReactor()
            self.startReactor(reactor)
            self.raiseSignal(reactor, number)
            self.assertEqual(self.observer.blocked, [])
            self.assertEqual(self.observer.events, [])
            self.assertEqual(len(reactor.threadCalls), 1)
            self.assertFalse(reactor.hasStopped)

    def test_stopsFromReactorThread(self) -> None:
        """
        The queued call logs the signal, as Twisted's handler would have,
        stops the reactor, and keeps the signal as the reactor's exit signal
        for twistd.
        """
        for number in STOP_SIGNALS:
            self.freshProcess()
            self.observer.events.clear()
            reactor = SignalReactor()
            self.startReactor(reactor)
            self.raiseSignal(reactor, number)
            reactor.runThreadCalls()
            name = signal.Signals(number).name
            self.assertEqual(self.texts(), [f"Received {name}, shutting down."])
            self.assertEqual(self.observer.events[0]["signal_name"], name)
            self.assertTrue(reactor.hasStopped)
            self.assertEqual(reactor._exitSignal, number)

    def test_signalWhileStopping(self) -> None:
        """
        A signal while the reactor stops already is logged and changes
        nothing: no C{ReactorNotRunning} error, the first signal stays the
        exit signal.
        """
        reactor = SignalReactor()
        self.startReactor(reactor)
        self.raiseSignal(reactor, signal.SIGTERM)
        reactor.runThreadCalls()
        self.raiseSignal(reactor, signal.SIGINT)
        reactor.runThreadCalls()
        self.assertEqual(
            self.texts(),
            ["Received SIGTERM, shutting down.", "Received SIGINT, already shutting down."],
        )
        self.assertEqual(reactor._exitSignal, signal.SIGTERM)

    def test_withoutSignalHandlers(self) -> None:
        """
        A reactor run with C{installSignalHandlers=False} gets no handler
        from closewatch either: signals are its program's to handle.
        """
        before = {number: signal.getsignal(number) for number in STOP_SIGNALS}
        self.startReactor(SignalReactor(installSignalHandlers=False))
        self.assertEqual({number: signal.getsignal(number) for number in STOP_SIGNALS}, before)

    def test_othersHandlersKept(self) -> None:
        """
        A signal is taken over only from the reactor's own handler, or for
        C{SIGHUP} from the default action: a C{SIGINT} handler someone set
        (a debugger's), which the reactor leaves too, and a C{SIGHUP} ignored
        under C{nohup} stay as they are.
        """

        def debugger(number: int, frame: object) -> None:
            """
            A handler of someone else's.
            """

        signal.signal(signal.SIGINT, debugger)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        reactor = SignalReactor()
        self.startReactor(reactor)
        self.assertIs(signal.getsignal(signal.SIGINT), debugger)
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_IGN)
        self.raiseSignal(reactor, signal.SIGTERM)
        self.assertEqual(len(reactor.threadCalls), 1)

    def test_twistedHandlerLogs(self) -> None:
        """
        The fake's C{sigTerm} is Twisted's own: it logs from inside the
        handler, where the busy observer sees it (what the handlers above
        are tested against).
        """
        reactor = SignalReactor()
        reactor.run()
        self.assertEqual(signal.getsignal(signal.SIGTERM), reactor.sigTerm)
        with self.observer.lock:
            signal.raise_signal(signal.SIGTERM)
        self.assertEqual(
            [e["log_format"] for e in self.observer.blocked], ["Received SIGTERM, shutting down."]
        )
