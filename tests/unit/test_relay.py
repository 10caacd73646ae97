"""
The relay's state machine, in memory: how a connection ends for each end
reason, flow control both ways, and the lingering close.
"""

from __future__ import annotations

import errno

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides

from tests.unit.fakes import Harness, spawnFailure
from twisted_closewatch.record import EndReason
from twisted_closewatch.relay import LINGER_SECONDS, SpawnFailed, State

LOST = Failure(ConnectionLost())
DONE = Failure(ConnectionDone())


class StartTests(SynchronousTestCase):
    """
    A connection starts its worker at once and relays both ways.
    """

    def test_running(self) -> None:
        h = Harness()
        self.assertIs(h.relay.state, State.RUNNING)
        self.assertEqual(h.record.pid, h.worker.pid)

    def test_clientBytesGoToTheWorker(self) -> None:
        h = Harness()
        h.client.dataReceived(b"select 1;\n")
        self.assertEqual(h.worker.stdin, b"select 1;\n")
        self.assertEqual(h.record.bytesIn, 10)

    def test_workerOutputGoesToTheClient(self) -> None:
        h = Harness()
        h.relay.workerOutput(b"[1]\n")
        self.assertEqual(h.transport.value(), b"[1]\n")
        self.assertEqual(h.record.bytesOut, 4)

    def test_socketConfiguredAndWatched(self) -> None:
        """
        The client's socket gets the keepalive options and is watched for
        the client's departure from the start.
        """
        h = Harness()
        self.assertIs(h.probe.configuredWith, h.config)
        self.assertIn(h.probe.fd, h.watch.watched)

    def test_reapedWhileSpawning(self) -> None:
        """
        A worker that exits at once may be reaped before its start returns:
        the relay is running already, and its end comes as usual.
        """
        h = Harness(reapedWhileSpawning=True)
        self.assertIs(h.relay.state, State.RUNNING)
        h.relay.workerEnded(0, None)
        self.assertIs(h.relay.state, State.LINGERING)

    def test_spawnFailed(self) -> None:
        """
        A worker that cannot start: the client is closed, the connection
        ends C{spawn-failed} once closed, without a pid.
        """
        h = Harness(spawnError=spawnFailure())
        self.assertIsInstance(h.connection, SpawnFailed)
        self.assertTrue(h.transport.disconnecting)
        self.assertTrue(h.probe.closed)
        self.assertEqual(h.ended, [])
        h.connectionLost(DONE)
        self.assertEqual([r.reason for r in h.ended], [EndReason.SPAWN_FAILED])
        self.assertIsNone(h.record.pid)

    def test_unwatchableClientKillsItsWorker(self) -> None:
        """
        A worker started for a client whose socket the close watch cannot
        watch (epoll out of memory or watches): nobody would ever kill that
        worker, so it is killed at once; its later events change nothing,
        and the connection ends C{spawn-failed} once closed, once.
        """
        h = Harness(
            heartbeat=5.0, idleTimeout=10.0, watchError=OSError(errno.ENOSPC, "No space left")
        )
        self.assertIsInstance(h.connection, SpawnFailed)
        self.assertEqual(h.worker.kills, 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        sink = h.worker.sink
        sink.workerOutput(b"late\n")
        sink.workerLifetimeOver()
        sink.workerReaped()
        sink.workerEnded(None, 9)
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(h.worker.kills, 1)
        h.connectionLost(DONE)
        self.assertEqual([r.reason for r in h.ended], [EndReason.SPAWN_FAILED])


class ClientGoneTests(SynchronousTestCase):
    """
    Every way a client leaves kills the worker first, records why, and
    closes the connection.
    """

    def test_finKills(self) -> None:
        """
        Under C{--half-close kill}, a FIN is C{client-closed}: the worker is
        killed, the connection closed after what was written.
        """
        h = Harness()
        h.client.readConnectionLost()
        self.assertEqual(h.worker.kills, 1)
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)
        self.assertIs(h.relay.state, State.KILLED)
        h.reap()
        self.assertIs(h.relay.state, State.CLIENT_GONE)
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.transport.disconnected)

    def test_finWithPendingResetIsReset(self) -> None:
        """
        A FIN reported while an RST's error is pending is C{client-reset},
        and the connection is aborted.
        """
        h = Harness()
        h.probe.fin = EndReason.CLIENT_RESET
        h.client.readConnectionLost()
        h.reap()
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)
        self.assertTrue(h.transport.disconnected)

    def test_resetKills(self) -> None:
        """
        A connection lost with an error is read from the socket
        (C{client-reset} here), after the kill.
        """
        h = Harness()
        h.connectionLost(LOST)
        self.assertEqual(h.actions[:2], ["kill", "probe"])
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)
        self.assertIs(h.relay.state, State.WORKER_EXITING)

    def test_cleanLossIsClientClosed(self) -> None:
        h = Harness()
        h.connectionLost(DONE)
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)
        self.assertEqual(h.actions, ["kill", "unwatch"])

    def test_keepalive(self) -> None:
        """
        The close watch sees a dead peer while the client is paused: the
        socket says C{keepalive}, and the connection is aborted.
        """
        h = Harness()
        h.probe.loss = EndReason.KEEPALIVE
        h.workerStops()
        h.watch.sawReset(h.probe.fd)
        self.assertEqual(h.actions, ["kill", "probe"])
        self.assertEqual(h.record.reason, EndReason.KEEPALIVE)
        h.reap()
        self.assertTrue(h.transport.disconnected)

    def test_userTimeout(self) -> None:
        h = Harness()
        h.probe.loss = EndReason.USER_TIMEOUT
        h.connectionLost(LOST)
        self.assertEqual(h.record.reason, EndReason.USER_TIMEOUT)

    def test_closeWatchFin(self) -> None:
        """
        A FIN the close watch sees (behind data the paused client has not
        had read) kills under C{--half-close kill}.
        """
        h = Harness()
        h.workerStops()
        h.watch.sawClose(h.probe.fd)
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)
        self.assertEqual(h.worker.kills, 1)

    def test_closeWatchFinLeftToTLSWhileReading(self) -> None:
        """
        Under TLS, a client being read tells a clean close from a
        truncation itself; a paused one cannot, so the watch decides.
        """
        h = Harness()
        alsoProvides(h.transport, ISSLTransport)
        h.watch.sawClose(h.probe.fd)
        self.assertEqual(h.worker.kills, 0)
        h.workerStops()
        h.watch.sawClose(h.probe.fd)
        self.assertEqual(h.worker.kills, 1)

    def test_idleTimeout(self) -> None:
        """
        A client silent for C{--idle-timeout} is gone: killed, aborted.
        """
        h = Harness(idleTimeout=5)
        h.clock.advance(4.9)
        self.assertEqual(h.worker.kills, 0)
        h.clock.advance(0.1)
        self.assertEqual(h.record.reason, EndReason.IDLE_TIMEOUT)
        h.reap()
        self.assertTrue(h.transport.disconnected)

    def test_maxLifetime(self) -> None:
        """
        A worker past its lifetime is killed; the client gets what was
        written, then a FIN.
        """
        h = Harness()
        h.relay.workerLifetimeOver()
        self.assertEqual(h.record.reason, EndReason.MAX_LIFETIME)
        self.assertEqual(h.worker.kills, 1)
        h.reap()
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.transport.disconnected)

    def test_serverStopping(self) -> None:
        h = Harness()
        h.relay.clientGone(EndReason.SERVER_STOPPING)
        self.assertEqual(h.record.reason, EndReason.SERVER_STOPPING)
        h.reap()
        self.assertTrue(h.transport.disconnected)

    def test_firstReasonWins(self) -> None:
        h = Harness()
        h.relay.clientGone(EndReason.IDLE_TIMEOUT)
        h.relay.clientGone(EndReason.SERVER_STOPPING)
        h.connectionLost(LOST)
        self.assertEqual(h.record.reason, EndReason.IDLE_TIMEOUT)
        self.assertEqual(h.worker.kills, 1)

    def test_goneAgainWhileKilledEndsOnce(self) -> None:
        """
        A second departure while the killed worker's reap is awaited (the
        close watch sees the FIN, then the reset that late data provokes; or
        the server stops) changes nothing: one drop, and a worker reaped
        late still ends the connection, once.
        """
        h = Harness()
        h.watch.sawClose(h.probe.fd)
        h.turn()
        h.clock.advance(0.05)
        h.watch.sawReset(h.probe.fd)
        h.relay.clientGone(EndReason.SERVER_STOPPING)
        h.clock.advance(0.05)
        self.assertTrue(h.transport.disconnecting)
        h.connectionLost(LOST)
        self.assertIs(h.relay.state, State.WORKER_EXITING)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(1)
        h.workerKilled()
        self.assertIs(h.relay.state, State.ENDED)
        self.assertEqual([r.reason for r in h.ended], [EndReason.CLIENT_CLOSED])
        self.assertEqual(h.worker.kills, 1)

    def test_outputAfterKillDropped(self) -> None:
        h = Harness()
        h.client.readConnectionLost()
        h.relay.workerOutput(b"late")
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(h.record.bytesOut, 0)

    def test_goneStopsWatching(self) -> None:
        h = Harness()
        h.relay.clientGone(EndReason.SERVER_STOPPING)
        h.reap()
        self.assertEqual(h.watch.watched, {})

    def test_goneDrainsWorkerOutput(self) -> None:
        """
        The worker's output is no longer paced by the gone client: it is
        unregistered and read to its end, so that the worker's end is seen.
        """
        h = Harness()
        self.assertIs(h.transport.producer, h.worker.outputProducer)
        h.client.readConnectionLost()
        h.reap()
        self.assertIsNone(h.transport.producer)
        self.assertTrue(h.worker.outputProducer.drained)


class EndTests(SynchronousTestCase):
    """
    A connection ends once both its worker and its client are done, and is
    reported exactly once.
    """

    def test_connectionLostThenWorkerEnded(self) -> None:
        h = Harness()
        h.connectionLost(LOST)
        self.assertEqual(h.ended, [])
        h.workerKilled()
        self.assertIs(h.relay.state, State.ENDED)
        self.assertEqual(h.ended, [h.record])

    def test_workerEndedThenConnectionLost(self) -> None:
        h = Harness()
        h.client.readConnectionLost()
        h.workerKilled()
        self.assertIs(h.relay.state, State.CLOSING)
        self.assertEqual(h.ended, [])
        h.connectionLost(DONE)
        self.assertEqual(h.ended, [h.record])

    def test_killLatencyRecorded(self) -> None:
        h = Harness()
        h.client.readConnectionLost()
        h.workerKilled()
        self.assertIsNotNone(h.record.killLatencyMS)
        self.assertEqual(h.record.exitSignal, 9)

    def test_workerExited(self) -> None:
        """
        A worker that exits by itself: C{worker-exited}, its status kept,
        no kill, no kill latency.
        """
        h = Harness()
        h.workerExits(3)
        self.assertEqual(h.record.reason, EndReason.WORKER_EXITED)
        self.assertEqual(h.record.exitCode, 3)
        self.assertIsNone(h.record.killLatencyMS)
        self.assertEqual(h.worker.kills, 0)

    def test_probeClosedAtTheEnd(self) -> None:
        h = Harness()
        h.connectionLost(DONE)
        self.assertTrue(h.probe.closed)

    def test_noTimerLeft(self) -> None:
        """
        Every timer of a connection is gone once it has ended.
        """
        h = Harness(idleTimeout=5, heartbeat=1)
        h.workerExits()
        h.client.writeConnectionLost()
        h.connectionLost(DONE)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(len(h.ended), 1)


class HalfCloseForwardTests(SynchronousTestCase):
    """
    Under C{--half-close forward} a client's FIN is the worker's EOF.
    """

    def test_finIsEOF(self) -> None:
        h = Harness(halfClose="forward")
        h.client.readConnectionLost()
        self.assertTrue(h.worker.stdinClosed)
        self.assertEqual(h.worker.kills, 0)
        self.assertIs(h.relay.state, State.INPUT_DONE)

    def test_outputStillDelivered(self) -> None:
        h = Harness(halfClose="forward")
        h.client.readConnectionLost()
        h.relay.workerOutput(b"answer\n")
        self.assertEqual(h.transport.value(), b"answer\n")

    def test_workerEndClosesAfterOutput(self) -> None:
        """
        The client has closed its side: no lingering, a plain close.
        """
        h = Harness(halfClose="forward")
        h.client.readConnectionLost()
        h.workerExits()
        self.assertIs(h.relay.state, State.CLOSING)
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.transport.writeClosed)

    def test_closeWatchFinIgnored(self) -> None:
        """
        The FIN is delivered in order by the transport, after the data
        before it: the watch's early sight of it is not acted on.
        """
        h = Harness(halfClose="forward")
        h.workerStops()
        h.watch.sawClose(h.probe.fd)
        self.assertEqual(h.worker.kills, 0)

    def test_resetAfterFinKills(self) -> None:
        h = Harness(halfClose="forward")
        h.client.readConnectionLost()
        h.watch.sawReset(h.probe.fd)
        self.assertEqual(h.worker.kills, 1)
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)


class FlowControlTests(SynchronousTestCase):
    """
    Bounded buffers both ways.
    """

    def test_readSizeIsAQuarterOfTheReadAhead(self) -> None:
        h = Harness(readAhead=64 * 1024)
        self.assertEqual(h.transport.bufferSize, 16 * 1024)

    def test_readSizeAtMost64KiB(self) -> None:
        h = Harness(readAhead=4 * 1024 * 1024)
        self.assertEqual(h.transport.bufferSize, 64 * 1024)

    def test_fullStdinPausesClient(self) -> None:
        h = Harness()
        h.workerStops()
        self.assertEqual(h.transport.producerState, "paused")

    def test_drainedStdinResumesClient(self) -> None:
        h = Harness()
        h.workerStops()
        h.worker.stdinDrained()
        self.assertEqual(h.transport.producerState, "producing")

    def test_closedStdinResumesClient(self) -> None:
        """
        A worker that closed its stdin reads nothing more: the client is
        read again (its data dropped) so that its close is seen.
        """
        h = Harness()
        h.workerStops()
        h.worker.stdinClosedByWorker()
        self.assertEqual(h.transport.producerState, "producing")

    def test_clientNotReadingPausesWorkerOutput(self) -> None:
        h = Harness()
        h.transport.producer.pauseProducing()
        self.assertTrue(h.worker.outputProducer.paused)
        h.transport.producer.resumeProducing()
        self.assertFalse(h.worker.outputProducer.paused)

    def test_workerEndResumesClient(self) -> None:
        """
        A paused client is read again when its worker ends, so that its
        close is seen during the linger.
        """
        h = Harness()
        h.workerStops()
        h.workerExits()
        self.assertEqual(h.transport.producerState, "producing")


class LingerTests(SynchronousTestCase):
    """
    After the worker exits by itself, its output is delivered, then a FIN,
    and the client's input is read and dropped until it closes too.
    """

    def test_finAfterOutput(self) -> None:
        h = Harness()
        h.relay.workerOutput(b"bye\n")
        h.workerExits()
        self.assertIs(h.relay.state, State.LINGERING)
        self.assertTrue(h.transport.writeClosed)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.transport.value(), b"bye\n")

    def test_inputDropped(self) -> None:
        h = Harness()
        h.workerExits()
        h.client.dataReceived(b"more")
        self.assertEqual(h.worker.stdin, b"")
        self.assertEqual(h.record.bytesIn, 0)

    def test_clientCloseEndsLinger(self) -> None:
        h = Harness()
        h.workerExits()
        h.client.readConnectionLost()
        self.assertTrue(h.transport.disconnecting)

    def test_quietClientClosedAfterOutputDone(self) -> None:
        h = Harness()
        h.workerExits()
        h.client.writeConnectionLost()
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.5)
        self.assertTrue(h.transport.disconnecting)

    def test_unreadInputKeepsLingering(self) -> None:
        h = Harness()
        h.workerExits()
        h.probe.unreadBytes = 100
        h.client.writeConnectionLost()
        h.clock.advance(5)
        self.assertFalse(h.transport.disconnecting)

    def test_limit(self) -> None:
        h = Harness()
        h.workerExits()
        h.probe.unreadBytes = 100
        h.client.writeConnectionLost()
        h.clock.advance(LINGER_SECONDS)
        self.assertTrue(h.transport.disconnecting)

    def test_tlsClosedOutright(self) -> None:
        """
        Under TLS a FIN would go behind the TLS layer's back: the connection
        is closed instead, after the output.
        """
        h = Harness()
        alsoProvides(h.transport, ISSLTransport)
        h.workerExits()
        self.assertFalse(h.transport.writeClosed)
        self.assertTrue(h.transport.disconnecting)

    def test_endsWhenClosed(self) -> None:
        h = Harness()
        h.workerExits()
        h.client.readConnectionLost()
        h.connectionLost(DONE)
        self.assertEqual([r.reason for r in h.ended], [EndReason.WORKER_EXITED])
