"""
A helper process's life as the server sees it (L{Helper}): replaced when
it dies, tried again while it cannot start, let go on stop.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_closewatch.helper import RETRY_DELAY, Helper


class FakeProcess:
    pid = 42

    def __init__(self) -> None:
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Recording(Helper):
    name = "recording"
    stopTimeout = 3.0

    def __init__(self, reactor: Any, failures: int = 0) -> None:
        super().__init__(reactor)
        self.failures = failures
        self.events: list[str] = []

    def start(self) -> None:
        if self.failures:
            self.failures -= 1
            self.events.append("failed")
            raise OSError("no")
        self._process = FakeProcess()
        self.events.append("started")

    def hangUp(self) -> None:
        self.events.append("hung up")

    def helperStopped(self) -> None:
        self.events.append("stopped")

    def helperLost(self, pid: int, reason: Failure) -> None:
        self.events.append(f"lost {pid}")
        self.restart()

    def die(self) -> None:
        self._helperEnded(self.pid or 0, Failure(ProcessTerminated(signal=9)))


class HelperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()

    def test_lostIsReplaced(self) -> None:
        helper = Recording(self.clock)
        helper.start()
        helper.die()
        self.assertEqual(helper.events, ["started", "hung up", "lost 42", "started"])
        self.assertEqual(helper.pid, 42)

    def test_retriedUntilItStarts(self) -> None:
        helper = Recording(self.clock, failures=2)
        helper.restart()
        self.assertEqual(helper.events, ["failed"])
        self.clock.advance(RETRY_DELAY)
        self.assertEqual(helper.events, ["failed", "failed"])
        self.clock.advance(RETRY_DELAY)
        self.assertEqual(helper.events, ["failed", "failed", "started"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopCancelsRetry(self) -> None:
        helper = Recording(self.clock, failures=5)
        helper.restart()
        self.successResultOf(helper.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopWaitsForExit(self) -> None:
        """
        A stop cuts the tie and fires once the helper has exited; it is not
        replaced.
        """
        helper = Recording(self.clock)
        helper.start()
        d = helper.stop()
        self.assertNoResult(d)
        helper.die()
        self.successResultOf(d)
        self.assertEqual(helper.events, ["started", "hung up", "hung up", "stopped"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopKillsLateHelper(self) -> None:
        helper = Recording(self.clock)
        helper.start()
        process = helper._process
        d = helper.stop()
        self.clock.advance(helper.stopTimeout)
        self.assertEqual(process.signals, ["KILL"])
        helper.die()
        self.successResultOf(d)
