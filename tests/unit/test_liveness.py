"""
The idle timeout and the heartbeat, on a fake clock.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import Harness
from twisted_closewatch.record import EndReason


class IdleTimeoutTests(SynchronousTestCase):
    """
    C{--idle-timeout}: a client that sends nothing for that long is gone;
    time closewatch keeps it paused does not count.
    """

    def test_offByDefault(self) -> None:
        h = Harness()
        h.clock.advance(10**6)
        self.assertEqual(h.worker.kills, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_countsFromLastData(self) -> None:
        h = Harness(idleTimeout=5)
        h.clock.advance(3)
        h.client.dataReceived(b"x")
        h.clock.advance(4.9)
        self.assertEqual(h.worker.kills, 0)
        h.clock.advance(0.1)
        self.assertEqual(h.record.reason, EndReason.IDLE_TIMEOUT)

    def test_outputDoesNotCount(self) -> None:
        """
        Output to the client is no sign of life from it.
        """
        h = Harness(idleTimeout=5)
        h.clock.advance(3)
        h.relay.workerOutput(b"x")
        h.clock.advance(2)
        self.assertEqual(h.record.reason, EndReason.IDLE_TIMEOUT)

    def test_pausedTimeDoesNotCount(self) -> None:
        h = Harness(idleTimeout=5)
        h.clock.advance(3)
        h.workerStops()
        h.clock.advance(100)
        self.assertEqual(h.worker.kills, 0)
        h.worker.stdinDrained()
        h.clock.advance(4.9)
        self.assertEqual(h.worker.kills, 0)
        h.clock.advance(0.1)
        self.assertEqual(h.record.reason, EndReason.IDLE_TIMEOUT)

    def test_noTimeoutAfterHalfClose(self) -> None:
        """
        Under C{--half-close forward}, a client that has sent its FIN has
        nothing more to send: its silence is no sign of death.
        """
        h = Harness(idleTimeout=5, halfClose="forward")
        h.client.readConnectionLost()
        h.clock.advance(100)
        self.assertEqual(h.worker.kills, 0)

    def test_stopsWhenWorkerExits(self) -> None:
        h = Harness(idleTimeout=5)
        h.workerExits()
        h.clock.advance(100)
        self.assertEqual(h.record.reason, EndReason.WORKER_EXITED)


class HeartbeatTests(SynchronousTestCase):
    """
    C{--heartbeat}: after that long with nothing written to the client,
    C{--heartbeat-data} is written.
    """

    def test_offByDefault(self) -> None:
        h = Harness()
        h.clock.advance(10**6)
        self.assertEqual(h.transport.value(), b"")

    def test_afterSilence(self) -> None:
        h = Harness(heartbeat=2)
        h.clock.advance(1.9)
        self.assertEqual(h.transport.value(), b"")
        h.clock.advance(0.1)
        self.assertEqual(h.transport.value(), b"\n")

    def test_rhythm(self) -> None:
        h = Harness(heartbeat=2)
        h.clock.pump([1] * 6)
        self.assertEqual(h.transport.value(), b"\n\n\n")

    def test_data(self) -> None:
        h = Harness(heartbeat=1, heartbeatData=b"\x00")
        h.clock.advance(1)
        self.assertEqual(h.transport.value(), b"\x00")

    def test_notWhileOutputFlows(self) -> None:
        """
        Heartbeats never interleave with a worker's answer: they wait for
        C{--heartbeat} seconds after the last output.
        """
        h = Harness(heartbeat=2)
        h.clock.advance(1.5)
        h.relay.workerOutput(b"answer")
        h.clock.advance(0.5)
        self.assertEqual(h.transport.value(), b"answer")
        h.clock.advance(1.5)
        self.assertEqual(h.transport.value(), b"answer\n")

    def test_heldWhileClientNotReading(self) -> None:
        """
        A client not taking its output is not silent: no heartbeat grows
        the buffer.
        """
        h = Harness(heartbeat=1)
        h.transport.producerPaused = True
        h.clock.advance(5)
        self.assertEqual(h.transport.value(), b"")
        h.transport.producerPaused = False
        h.clock.advance(1)
        self.assertEqual(h.transport.value(), b"\n")

    def test_noneAfterWorkerExited(self) -> None:
        h = Harness(heartbeat=1)
        h.relay.workerOutput(b"last")
        h.workerExits()
        h.clock.advance(5)
        self.assertEqual(h.transport.value(), b"last")

    def test_noneAfterClientGone(self) -> None:
        h = Harness(heartbeat=1)
        h.client.readConnectionLost()
        h.clock.advance(5)
        self.assertEqual(h.transport.value(), b"")
