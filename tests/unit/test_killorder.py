"""
The kill comes first: whichever way the relay learns that its client is
gone, signalling the worker is the first thing it does, and the rest (the
reason's socket probing, unwatching, producers, the transport's close)
follows.  See the "Kill path" section of C{bench/README.md} for why.
"""

from __future__ import annotations

import os

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.unit.fakes import Harness
from twisted_closewatch.aftermath import TEARDOWN_DELAY
from twisted_closewatch.record import EndReason
from twisted_closewatch.relay import DROP_DELAY, State
from twisted_closewatch.spawn import _WorkerOutput


class RelayKillFirstTests(SynchronousTestCase):
    """
    The relay signals the worker before anything else.
    """

    def test_finOnTheReadPath(self) -> None:
        """
        A FIN read by Twisted: the kill precedes the C{SO_ERROR} read that
        tells a FIN from a reset, and the reason is still C{client-closed}.
        """
        h = Harness()
        h.client.readConnectionLost()
        self.assertEqual(h.actions, ["kill", "probe"])
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)

    def test_resetSeenAsEndOfInput(self) -> None:
        """
        An RST that Twisted takes for the end of input is still named a
        reset, from the error pending on the socket, read after the kill.
        """
        h = Harness()
        h.probe.fin = EndReason.CLIENT_RESET
        h.client.readConnectionLost()
        self.assertEqual(h.actions, ["kill", "probe"])
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)

    def test_closeWatchFin(self) -> None:
        h = Harness()
        h.watch.sawClose(h.probe.fd)
        self.assertEqual(h.actions, ["kill"])
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)

    def test_closeWatchReset(self) -> None:
        """
        A reset seen by the close watch: kill, then the probing that names
        it.
        """
        h = Harness()
        h.watch.sawReset(h.probe.fd)
        self.assertEqual(h.actions, ["kill", "probe"])
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)

    def test_connectionLost(self) -> None:
        """
        A connection lost with the worker running: the kill before the
        reason's probing and before unwatching.
        """
        h = Harness()
        h.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(h.actions, ["kill", "probe", "unwatch"])
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)

    def test_connectionDone(self) -> None:
        h = Harness()
        h.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.actions[0], "kill")
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)

    def test_onlyOneKill(self) -> None:
        """
        Both the close watch and the read path see the same FIN: one kill,
        one reason, no probing the second time.
        """
        h = Harness()
        h.watch.sawClose(h.probe.fd)
        h.client.readConnectionLost()
        self.assertEqual(h.actions, ["kill"])
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)


class RelayDropAfterReapTests(SynchronousTestCase):
    """
    After a C{SIGKILL}, the dying worker gets the CPU first: its client's
    connection is not read, and is dropped once the worker is reaped, or
    after L{DROP_DELAY} at the latest; with a grace period, at once.
    """

    def test_dropOnReap(self) -> None:
        h = Harness()
        h.watch.sawClose(h.probe.fd)
        h.turn()
        self.assertEqual(h.transport.producerState, "paused")
        self.assertFalse(h.transport.disconnecting)
        self.assertIn(h.probe.fd, h.watch.watched)
        h.reap()
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.watch.watched, {})
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_dropWithoutReap(self) -> None:
        """
        A worker not reaped in time (stuck in the kernel) does not keep its
        client's connection open.
        """
        h = Harness()
        h.client.readConnectionLost()
        h.turn()
        h.clock.advance(DROP_DELAY)
        self.assertTrue(h.transport.disconnecting)

    def test_graceDropsAtOnce(self) -> None:
        """
        Under C{--grace} the worker may take seconds to go: the client is not
        kept waiting for it.
        """
        h = Harness(dying=False)
        h.client.readConnectionLost()
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_lostBeforeReap(self) -> None:
        """
        The connection ends before the reap: the drop is cancelled, and the
        end is reported once the worker has ended.
        """
        h = Harness()
        h.relay.clientGone(EndReason.CLIENT_RESET)
        h.connectionLost(Failure(ConnectionLost()))
        h.turn()
        # No drop: only the bound of the stragglers' kill, which waits for
        # the reap.
        self.assertEqual([c.getTime() for c in h.clock.getDelayedCalls()], [TEARDOWN_DELAY])
        h.workerKilled()
        self.assertEqual(h.ended, [h.record])
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.actions[-1], "stragglers")

    def test_noLingerForAGoneClient(self) -> None:
        h = Harness()
        h.watch.sawClose(h.probe.fd)
        h.workerKilled()
        self.assertIs(h.relay.state, State.CLOSING)
        self.assertFalse(h.transport.writeClosed)

    def test_resetIsAborted(self) -> None:
        h = Harness()
        h.relay.clientGone(EndReason.CLIENT_RESET)
        h.reap()
        self.assertTrue(h.transport.disconnected)


class StderrDrainTests(TestCase):
    """
    A killed worker's pipes are not watched until its reap; then what it
    wrote to stderr and was not read yet is still delivered.
    """

    def test_drain(self) -> None:
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        os.write(writeEnd, b"last words\n")
        received: list[tuple[int, bytes]] = []

        class Proc:
            def childDataReceived(self, name: int, data: bytes) -> None:
                received.append((name, data))

        reader = _WorkerOutput(MemoryReactorClock(), Proc(), 2, readEnd)
        reader.drain()
        self.assertEqual(received, [(2, b"last words\n")])
        # Nothing more: no blocking, no second delivery; EOF ends it too.
        reader.drain()
        os.close(writeEnd)
        reader.drain()
        self.assertEqual(received, [(2, b"last words\n")])
