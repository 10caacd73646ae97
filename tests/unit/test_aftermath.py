"""
L{Aftermath}: the work that follows kills runs after them, and the
teardowns after the dying, within bounds.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import Harness
from twisted_closewatch.aftermath import CHUNK, TEARDOWN_DELAY, Aftermath
from twisted_closewatch.relay import DROP_DELAY, State


class AftermathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.log: list[str] = []
        self.aftermath = Aftermath(self.clock, lambda: self.log.append("poll"))

    def test_afterKillsNextTurn(self) -> None:
        """
        What follows the kills runs on the next turn, in order, with one
        timer for the whole turn's batch.
        """
        for i in range(3):
            self.aftermath.afterKills(lambda i=i: self.log.append(f"after {i}"))
        self.assertEqual(self.log, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.aftermath), 3)
        self.clock.advance(0)
        self.assertEqual(self.log, ["after 0", "after 1", "after 2"])
        self.assertEqual(len(self.aftermath), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_teardownWaitsForTheDying(self) -> None:
        """
        A teardown waits while a worker sent C{SIGKILL} is not reaped, and
        runs on the turn after the last one is, after a poll of the close
        watch.
        """
        first, second = object(), object()
        self.aftermath.killed(first)
        self.aftermath.killed(second)
        self.aftermath.teardown(lambda: self.log.append("teardown"))
        self.clock.advance(0)
        self.aftermath.reaped(first)
        self.clock.advance(0)
        self.assertEqual(self.log, [])
        self.aftermath.reaped(second)
        self.assertEqual(self.log, [])
        self.clock.advance(0)
        self.assertEqual(self.log, ["poll", "teardown"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_teardownBounded(self) -> None:
        """
        A worker whose reap never comes delays teardowns by
        L{TEARDOWN_DELAY} at most, counted from the first one waiting.
        """
        self.aftermath.killed(object())
        self.aftermath.teardown(lambda: self.log.append("first"))
        self.clock.advance(TEARDOWN_DELAY / 2)
        self.aftermath.teardown(lambda: self.log.append("second"))
        self.clock.advance(TEARDOWN_DELAY / 2)
        self.assertEqual(self.log, ["poll", "first", "second"])
        self.assertEqual(len(self.aftermath), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_teardownAtOnceWithoutDying(self) -> None:
        self.aftermath.teardown(lambda: self.log.append("teardown"))
        self.clock.advance(0)
        self.assertEqual(self.log, ["poll", "teardown"])

    def test_afterKillsBeforeTeardowns(self) -> None:
        """
        A teardown never runs before the follow-up of a kill sent before
        it, even when its timer comes first.
        """
        self.aftermath.teardown(lambda: self.log.append("teardown"))
        self.aftermath.afterKills(lambda: self.log.append("after"))
        self.clock.advance(0)
        self.assertEqual(self.log, ["after", "poll", "teardown"])

    def test_killsFirstBetweenChunks(self) -> None:
        """
        A long teardown polls the close watch before every chunk, and runs
        what that poll's kills queued before going on.
        """
        polls: list[int] = []
        done: list[int] = []

        def poll() -> None:
            polls.append(len(done))
            aftermath.afterKills(lambda: done.append(-1))

        aftermath = Aftermath(self.clock, poll)
        for i in range(CHUNK * 2 + 1):
            aftermath.teardown(lambda i=i: done.append(i))
        self.clock.advance(0)
        self.assertEqual(polls, [0, CHUNK + 1, 2 * CHUNK + 2])
        self.assertEqual([i for i in done if i >= 0], list(range(CHUNK * 2 + 1)))
        self.assertEqual(done.count(-1), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failureContained(self) -> None:
        """
        A step that fails is logged, and the others still run.
        """

        def fail() -> None:
            raise RuntimeError("broken")

        self.aftermath.afterKills(fail)
        self.aftermath.afterKills(lambda: self.log.append("after"))
        self.clock.advance(0)
        self.assertEqual(self.log, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class BurstTests(SynchronousTestCase):
    """
    A hundred relays of one server, whose clients all leave at once.
    """

    def setUp(self) -> None:
        first = Harness()
        self.harnesses = [first] + [
            Harness(clock=first.clock, aftermath=first.aftermath) for _ in range(99)
        ]
        self.clock = first.clock
        self.actions = [h.actions for h in self.harnesses]

    def closeAll(self) -> None:
        for h in self.harnesses:
            h.watch.sawClose(h.probe.fd)

    def test_everyKillFirst(self) -> None:
        """
        The turn that sees the FINs kills every worker and stops reading
        its client, and does nothing else; the next one arms the drops'
        timers, and what left the workers' groups waits for their reaps.
        """
        self.closeAll()
        self.assertEqual(self.actions, [["kill"]] * 100)
        self.assertTrue(all(h.relay.state is State.KILLED for h in self.harnesses))
        self.assertTrue(all(h.transport.producerState == "paused" for h in self.harnesses))
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.clock.advance(0)
        self.assertEqual(self.actions, [["kill"]] * 100)
        self.assertEqual(len(self.clock.getDelayedCalls()), 100 + 1)

    def test_dropsAfterTheLastReap(self) -> None:
        """
        No connection is dropped while another killed worker is dying;
        once the last is reaped, all are, and the stragglers' kills run.
        """
        self.closeAll()
        self.clock.advance(0)
        for h in self.harnesses[:-1]:
            h.relay.workerReaped()
            h.relay.workerEnded(None, 9)
        self.clock.advance(0)
        self.assertFalse(any(h.transport.disconnecting for h in self.harnesses))
        self.assertEqual(self.harnesses[0].relay.state, State.REAPED)
        last = self.harnesses[-1]
        last.relay.workerReaped()
        last.relay.workerEnded(None, 9)
        self.clock.advance(0)
        self.assertTrue(all(h.transport.disconnecting for h in self.harnesses))
        self.assertTrue(all("stragglers" in h.actions for h in self.harnesses))
        self.assertTrue(all(h.relay.state is State.CLOSING for h in self.harnesses))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stuckWorkerDelaysDropsBoundedly(self) -> None:
        """
        One worker never reaped: the others' connections are dropped after
        L{TEARDOWN_DELAY}, its own after L{DROP_DELAY}; every end is
        reported once its connection closes.
        """
        self.closeAll()
        self.clock.advance(0)
        stuck, others = self.harnesses[0], self.harnesses[1:]
        for h in others:
            h.relay.workerReaped()
            h.relay.workerEnded(None, 9)
        self.clock.advance(TEARDOWN_DELAY)
        self.assertTrue(all(h.transport.disconnecting for h in others))
        self.assertFalse(stuck.transport.disconnecting)
        self.clock.advance(DROP_DELAY - TEARDOWN_DELAY)
        self.assertTrue(stuck.transport.disconnecting)
        for h in self.harnesses:
            h.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(all(h.ended == [h.record] for h in others))
        self.assertEqual(stuck.ended, [])
        stuck.workerKilled()
        self.assertEqual(stuck.ended, [stuck.record])


class ReapedStateTests(SynchronousTestCase):
    """
    L{State.REAPED}: the killed worker has ended, its connection's drop
    waits for the burst.
    """

    def test_connectionLostWhileReaped(self) -> None:
        """
        The client's connection closes before its drop: the end is reported
        once, and no drop follows.
        """
        h = Harness()
        h.aftermath.killed(object())
        h.watch.sawClose(h.probe.fd)
        h.turn()
        h.relay.workerReaped()
        h.relay.workerEnded(None, 9)
        self.assertIs(h.relay.state, State.REAPED)
        h.connectionLost(Failure(ConnectionDone()))
        self.assertIs(h.relay.state, State.ENDED)
        self.assertEqual(h.ended, [h.record])
        h.clock.advance(DROP_DELAY)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.ended, [h.record])
        self.assertEqual(h.clock.getDelayedCalls(), [])
