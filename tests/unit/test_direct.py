"""
C{--direct} in memory: the owner's transitions, the idle timeout from the
kernel's time since the client's last data (on a fake clock), the byte
counts from C{TCP_INFO}, and the start-up conflicts.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides

from tests.unit.fakes import (
    FakeProbe,
    FakeWorker,
    HalfCloseableTransport,
    Harness,
    spawnFailure,
)
from twisted_closewatch import tcp
from twisted_closewatch.client import IClient
from twisted_closewatch.config import Config, InvalidSetting
from twisted_closewatch.direct import DirectConnection, State
from twisted_closewatch.liveness import KernelIdleTimeout
from twisted_closewatch.options import Options
from twisted_closewatch.record import EndReason
from twisted_closewatch.relay import LINGER_SECONDS, SpawnFailed
from twisted_closewatch.tcp import TCPInfo, lossReason, transferred
from twisted_closewatch.worker import IWorkerSink

ESTABLISHED, CLOSE, CLOSE_WAIT, FIN_WAIT2 = 1, 7, 8, 5


def info(state: int = ESTABLISHED, received: int = 0, acked: int = 0, idle: float = 0) -> TCPInfo:
    return TCPInfo(
        state=state,
        retransmits=0,
        probes=0,
        rtt=0.0,
        lastAckRecv=0.0,
        notSent=0,
        lastDataRecv=idle,
        bytesAcked=acked,
        bytesReceived=received,
    )


class SocketProbe(FakeProbe):
    """
    A client socket whose blocking flag, C{TCP_INFO} and unread bytes the
    test sets and reads.
    """

    def __init__(self, actions: list[str]) -> None:
        super().__init__(actions)
        self.blocking = False
        self.tcp: TCPInfo | None = info()
        self.consumedBytes = 0
        self.received: list[int | OSError] = []

    def setBlocking(self, blocking: bool) -> None:
        self.blocking = blocking
        self.actions.append("blocking" if blocking else "non-blocking")

    def info(self) -> TCPInfo | None:
        return self.tcp

    def consumed(self) -> int:
        return self.consumedBytes

    def stopLingering(self) -> None:
        self.actions.append("stop-lingering")

    def dropInput(self) -> int:
        """
        The next of L{received}: a count of bytes, an error to raise, or
        nothing to read.
        """
        if not self.received:
            raise BlockingIOError()
        outcome = self.received.pop(0)
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def close(self) -> None:
        self.actions.append("close-probe")
        super().close()


class DirectHarness(Harness):
    """
    A L{DirectConnection} in place of the relay, over a L{SocketProbe}.

    @ivar stdio: the descriptors workers were given as stdin and stdout.
    """

    def __init__(self, tls: bool = False, consumed: int = 0, **kwargs: Any) -> None:
        self.stdio: list[int] = []
        self._consumed = consumed
        transport = HalfCloseableTransport()
        if tls:
            alsoProvides(transport, ISSLTransport)
        super().__init__(transport=transport, direct=True, **kwargs)

    def makeProbe(self) -> SocketProbe:
        probe = SocketProbe(self.actions)
        probe.consumedBytes = self._consumed
        return probe

    def makeOwner(self, client: IClient) -> DirectConnection:
        return DirectConnection(
            client,
            self.record,
            self.config,
            self.clock,
            self.watch,
            self._startDirect,
            self.ended.append,
        )

    def _startDirect(self, sink: IWorkerSink, stdio: int) -> FakeWorker:
        self.actions.append("spawn")
        self.stdio.append(stdio)
        return self._startWorker(sink)

    @property
    def direct(self) -> DirectConnection:
        assert isinstance(self.connection, DirectConnection)
        return self.connection

    def exits(self, code: int | None = 0, signal: int | None = None) -> None:
        self.direct.workerReaped()
        self.direct.workerEnded(code, signal)


DONE = Failure(ConnectionDone())
LOST = Failure(ConnectionLost())


class HandoverTests(SynchronousTestCase):
    """
    The worker gets the socket, blocking, and the transport is left alone.
    """

    def test_socketGiven(self) -> None:
        h = DirectHarness()
        self.assertIs(h.direct.state, State.RUNNING)
        self.assertEqual(h.stdio, [h.probe.fd])
        self.assertEqual(h.record.pid, h.worker.pid)
        self.assertEqual(h.transport.producerState, "paused")
        self.assertTrue(h.probe.blocking)
        self.assertEqual(h.actions[:2], ["blocking", "spawn"])
        self.assertIn(h.probe.fd, h.watch.watched)
        self.assertIs(h.probe.configuredWith, h.config)

    def test_serverNeverTouchesTheBytes(self) -> None:
        """
        Nothing is written to the transport while the worker runs.
        """
        h = DirectHarness()
        h.clock.advance(100)
        self.assertEqual(h.transport.value(), b"")
        self.assertFalse(h.transport.disconnecting)

    def test_spawnFailed(self) -> None:
        """
        A worker that cannot start: the socket is non-blocking again for
        the reactor, and the connection closes as a spawn failure.
        """
        h = DirectHarness(spawnError=spawnFailure())
        self.assertIsInstance(h.connection, SpawnFailed)
        self.assertFalse(h.probe.blocking)
        self.assertTrue(h.transport.disconnecting)
        h.client.connectionLost(DONE)
        self.assertEqual([r.reason for r in h.ended], [EndReason.SPAWN_FAILED])

    def test_tlsRefused(self) -> None:
        """
        A TLS client has no socket of its own to give: no worker is started.
        """
        h = DirectHarness(tls=True)
        self.assertIsInstance(h.connection, SpawnFailed)
        self.assertNotIn("spawn", h.actions)

    def test_reapedWhileSpawning(self) -> None:
        """
        A worker reaped before its start returns: the socket is taken back
        at once, and never watched.
        """
        h = DirectHarness(reapedWhileSpawning=True)
        self.assertIs(h.direct.state, State.LINGERING)
        self.assertNotIn(h.probe.fd, h.watch.watched)
        self.assertFalse(h.probe.blocking)


class DepartureTests(SynchronousTestCase):
    """
    The client leaves: the kill first, the socket left alone until the
    worker is reaped, then closed.
    """

    def test_finKills(self) -> None:
        h = DirectHarness()
        h.watch.sawClose(h.probe.fd)
        # The group, then what left it (its cgroup).
        self.assertEqual(h.actions[-2:], ["kill", "stragglers"])
        self.assertIs(h.direct.state, State.KILLED)
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)
        # The worker may still hold the socket: no shutdown, no close.
        self.assertFalse(h.transport.disconnecting)
        self.assertTrue(h.probe.blocking)
        h.probe.tcp = info(CLOSE_WAIT, received=101, acked=7)
        h.direct.workerReaped()
        self.assertIs(h.direct.state, State.CLIENT_GONE)
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.probe.blocking)
        self.assertNotIn(h.probe.fd, h.watch.watched)
        self.assertEqual((h.record.bytesIn, h.record.bytesOut), (100, 7))
        h.client.connectionLost(DONE)
        self.assertIs(h.direct.state, State.WORKER_EXITING)
        self.assertEqual(h.ended, [])
        h.direct.workerEnded(None, 9)
        self.assertIs(h.direct.state, State.ENDED)
        self.assertEqual(h.ended, [h.record])
        self.assertTrue(h.probe.closed)

    def test_resetKillsAndAborts(self) -> None:
        h = DirectHarness()
        h.watch.sawReset(h.probe.fd)
        self.assertEqual(h.actions[-3:], ["kill", "stragglers", "probe"])
        h.probe.tcp = info(CLOSE, received=5)
        h.exits(None, 9)
        self.assertIs(h.direct.state, State.CLOSING)
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)
        self.assertEqual(h.record.bytesIn, 5, "no FIN assumed after a reset")
        h.client.connectionLost(LOST)
        self.assertEqual(h.ended, [h.record])

    def test_halfCloseForward(self) -> None:
        """
        Under C{--half-close forward} a FIN is the worker's to read; a reset
        later still kills.
        """
        h = DirectHarness(halfClose="forward")
        h.watch.sawClose(h.probe.fd)
        self.assertEqual(h.worker.kills, 0)
        self.assertIs(h.direct.state, State.RUNNING)
        h.watch.sawReset(h.probe.fd)
        self.assertEqual(h.worker.kills, 1)
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)

    def test_onlyTheFirstDeparture(self) -> None:
        h = DirectHarness()
        h.watch.sawClose(h.probe.fd)
        h.direct.clientGone(EndReason.SERVER_STOPPING)
        h.watch.sawReset(h.probe.fd)
        self.assertEqual(h.worker.kills, 1)
        self.assertEqual(h.record.reason, EndReason.CLIENT_CLOSED)

    def test_graceKeepsTheSocket(self) -> None:
        """
        Under C{--grace} the worker may run on after its kill: the socket is
        still left alone until it is reaped.
        """
        h = DirectHarness(grace=5)
        h.worker.dying = False
        h.direct.clientGone(EndReason.SERVER_STOPPING)
        h.clock.advance(4)
        self.assertFalse(h.transport.disconnecting)
        h.direct.workerReaped()
        self.assertTrue(h.transport.disconnecting)

    def test_maxLifetimeClosesGracefully(self) -> None:
        h = DirectHarness()
        h.direct.workerLifetimeOver()
        h.direct.workerReaped()
        self.assertEqual(h.record.reason, EndReason.MAX_LIFETIME)
        self.assertTrue(h.transport.disconnecting)

    def test_closedUnderTheWorker(self) -> None:
        """
        A connection closed while the worker runs (not by the server, which
        never does): the worker is killed first, the end waits for it.
        """
        h = DirectHarness()
        h.client.connectionLost(LOST)
        self.assertEqual(h.worker.kills, 1)
        self.assertIs(h.direct.state, State.WORKER_EXITING)
        self.assertTrue(h.probe.closed)
        self.assertNotIn(h.probe.fd, h.watch.watched)
        h.exits(None, 9)
        self.assertEqual(h.ended, [h.record])
        self.assertEqual(h.record.reason, EndReason.CLIENT_RESET)

    def test_connectionLostEndsAfterTheWorker(self) -> None:
        """
        Closed before the worker ended: the end waits for the worker.
        """
        h = DirectHarness()
        h.watch.sawClose(h.probe.fd)
        h.direct.workerReaped()
        h.direct.workerEnded(None, 9)
        self.assertIs(h.direct.state, State.CLOSING)
        h.client.connectionLost(DONE)
        self.assertEqual(h.ended, [h.record])


class WorkerEndTests(SynchronousTestCase):
    """
    The worker exits by itself: the socket is the server's again, a FIN
    goes out after what the worker wrote.
    """

    def test_lingers(self) -> None:
        h = DirectHarness()
        h.probe.tcp = info(ESTABLISHED, received=10, acked=20)
        h.direct.workerReaped()
        self.assertIs(h.direct.state, State.LINGERING)
        self.assertTrue(h.transport.writeClosed)
        self.assertFalse(h.probe.blocking)
        self.assertEqual((h.record.bytesIn, h.record.bytesOut), (10, 20))
        # The client's input is dropped through the probe, never waiting,
        # not read by the transport (see test_lingerShared).
        self.assertEqual(h.transport.producerState, "paused")
        [drain] = h.clock.getReaders()
        self.assertEqual(drain.fileno(), h.probe.fd)
        h.probe.received = [4]
        drain.doRead()
        drain.doRead()
        h.direct.workerEnded(0, None)
        self.assertIs(h.direct.state, State.CLOSING)
        self.assertFalse(h.transport.disconnecting)
        h.probe.received = [0]
        drain.doRead()
        self.assertEqual(h.clock.getReaders(), [])
        self.assertTrue(h.transport.disconnecting)
        h.client.connectionLost(DONE)
        self.assertEqual(h.ended, [h.record])
        self.assertEqual(h.record.reason, EndReason.WORKER_EXITED)

    def test_serverOptionsAgain(self) -> None:
        """
        Taken back, the socket gets the server's keepalive and user timeout
        again, whatever the worker set: they bound the lingering close.
        """
        h = DirectHarness()
        h.probe.configuredWith = None
        h.exits()
        self.assertIs(h.probe.configuredWith, h.config)

    def test_lingerReset(self) -> None:
        """
        A reset while the input is dropped: the connection is aborted, and
        the probe read no more.
        """
        h = DirectHarness()
        h.exits()
        [drain] = h.clock.getReaders()
        h.probe.received = [ConnectionResetError()]
        drain.doRead()
        self.assertEqual(h.clock.getReaders(), [])
        self.assertTrue(h.transport.disconnected)

    def test_lingerDropsUntilQuiet(self) -> None:
        """
        What is dropped through the probe is input all the same: the close
        waits for the client to be quiet after its last.
        """
        h = DirectHarness()
        h.exits()
        [drain] = h.clock.getReaders()
        h.client.writeConnectionLost()
        h.clock.advance(0.4)
        h.probe.received = [100]
        drain.doRead()
        h.clock.advance(0.4)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.2)
        self.assertTrue(h.transport.disconnecting)
        h.client.connectionLost(DONE)
        self.assertEqual(h.clock.getReaders(), [])

    def test_lingerOptionOff(self) -> None:
        """
        The probe's close is the server's last of the socket: whatever
        C{SO_LINGER} the worker set is off first, so that the close cannot
        block the reactor.
        """
        h = DirectHarness()
        h.exits()
        h.client.readConnectionLost()
        h.client.connectionLost(DONE)
        self.assertEqual(h.actions[-2:], ["stop-lingering", "close-probe"])

    def test_lingerBounded(self) -> None:
        h = DirectHarness()
        h.exits()
        h.clock.advance(LINGER_SECONDS)
        self.assertTrue(h.transport.disconnecting)

    def test_headerBytesNotCounted(self) -> None:
        """
        What the server read itself before the handover (a PROXY header) is
        not the client's: it is taken off the count.
        """
        h = DirectHarness(consumed=44)
        h.probe.tcp = info(CLOSE_WAIT, received=44 + 22 + 1)
        h.exits()
        self.assertEqual(h.record.bytesIn, 22)

    def test_notTCP(self) -> None:
        """
        A socket without C{TCP_INFO} (unix) counts nothing.
        """
        h = DirectHarness()
        h.probe.tcp = None
        h.exits()
        self.assertEqual((h.record.bytesIn, h.record.bytesOut), (0, 0))


class TransferredTests(SynchronousTestCase):
    """
    Linux counts a FIN as a byte; L{transferred} takes it off.
    """

    def test_established(self) -> None:
        self.assertEqual(transferred(info(ESTABLISHED, 5, 3), reset=False), (5, 3))

    def test_peerFin(self) -> None:
        self.assertEqual(transferred(info(CLOSE_WAIT, 6, 3), reset=False), (5, 3))

    def test_ourFinAcked(self) -> None:
        self.assertEqual(transferred(info(FIN_WAIT2, 5, 4), reset=False), (5, 3))

    def test_bothFins(self) -> None:
        self.assertEqual(transferred(info(CLOSE, 6, 4), reset=False), (5, 3))

    def test_reset(self) -> None:
        self.assertEqual(transferred(info(CLOSE, 2, 0), reset=True), (2, 0))


class StopLingeringTests(SynchronousTestCase):
    """
    L{tcp.SocketProbe.stopLingering} on a real socket.
    """

    def lingerAfter(self, onOff: int, seconds: int) -> tuple[int, int]:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", onOff, seconds))
        tcp.SocketProbe(ours).stopLingering()
        linger = ours.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        return struct.unpack("ii", linger)

    def test_timeoutTurnedOff(self) -> None:
        """
        A linger with a timeout (a worker's) is turned off (Linux keeps
        the timeout it had, unused).
        """
        self.assertEqual(self.lingerAfter(1, 30)[0], 0)

    def test_resetKept(self) -> None:
        """
        A linger without a timeout (Twisted's C{abortConnection}: a reset)
        is kept.
        """
        self.assertEqual(self.lingerAfter(1, 0), (1, 0))

    def test_closed(self) -> None:
        """
        A closed socket: nothing to do, and no error.
        """
        sock = socket.socket()
        sock.close()
        tcp.SocketProbe(sock).stopLingering()


class DropInputTests(SynchronousTestCase):
    """
    L{tcp.SocketProbe.dropInput} on a real socket that another holder made
    blocking.
    """

    def setUp(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.theirs.close)
        self.addCleanup(self.ours.close)
        self.ours.setblocking(True)
        # Were it to wait, it would fail after this long rather than hang.
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        self.probe = tcp.SocketProbe(self.ours)

    def test_nothingToRead(self) -> None:
        """
        Nothing to read: it does not wait for the client.
        """
        started = time.monotonic()
        self.assertRaises(BlockingIOError, self.probe.dropInput)
        self.assertLess(time.monotonic() - started, 2.5)

    def test_dropped(self) -> None:
        self.theirs.sendall(b"x" * 10)
        self.assertEqual(self.probe.dropInput(), 10)
        self.assertRaises(BlockingIOError, self.probe.dropInput)

    def test_ended(self) -> None:
        self.theirs.shutdown(socket.SHUT_WR)
        self.assertEqual(self.probe.dropInput(), 0)


class UnixPeerTests(SynchronousTestCase):
    """
    A unix socket client (no C{TCP_INFO}): its close is a hang-up without
    an error, a close over unread input a reset.
    """

    def test_close(self) -> None:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        peer.close()
        self.assertEqual(lossReason(ours, Config()), EndReason.CLIENT_CLOSED)

    def test_closeOverUnreadInput(self) -> None:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ours.close)
        ours.sendall(b"never read")
        peer.close()
        self.assertEqual(lossReason(ours, Config()), EndReason.CLIENT_RESET)


class KernelIdleTimeoutTests(SynchronousTestCase):
    """
    The idle timeout from C{tcpi_last_data_recv}, on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.lastData = 0.0
        self.silence: float | None = 0.0
        self.unread = 0
        self.gone: list[EndReason] = []

    def idle(self, timeout: float = 5) -> KernelIdleTimeout:
        timer = KernelIdleTimeout(
            self.clock,
            timeout,
            lambda: None if self.silence is None else self.clock.seconds() - self.lastData,
            lambda: self.unread,
            self.gone.append,
        )
        timer.start()
        return timer

    def test_silentClient(self) -> None:
        self.idle()
        self.clock.advance(4.99)
        self.assertEqual(self.gone, [])
        self.clock.advance(0.01)
        self.assertEqual(self.gone, [EndReason.IDLE_TIMEOUT])

    def test_countsFromTheLastData(self) -> None:
        self.idle()
        self.clock.advance(3)
        self.lastData = self.clock.seconds()
        self.clock.advance(2)
        self.assertEqual(self.gone, [])
        self.clock.advance(2.99)
        self.assertEqual(self.gone, [])
        self.clock.advance(0.01)
        self.assertEqual(self.gone, [EndReason.IDLE_TIMEOUT])

    def test_unreadDataIsNotSilence(self) -> None:
        """
        Data the worker has not read: the silence is the worker's, and the
        period starts again.
        """
        self.idle()
        self.unread = 100
        self.clock.advance(5)
        self.clock.advance(20)
        self.assertEqual(self.gone, [])
        self.unread = 0
        self.clock.advance(5)
        self.assertEqual(self.gone, [EndReason.IDLE_TIMEOUT])

    def test_offAtZero(self) -> None:
        self.idle(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_notTCP(self) -> None:
        """
        A socket that cannot tell (not TCP) has no idle timeout.
        """
        self.silence = None
        self.idle()
        self.clock.advance(100)
        self.assertEqual(self.gone, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self) -> None:
        timer = self.idle()
        timer.stop()
        self.clock.advance(100)
        self.assertEqual(self.gone, [])

    def test_notAfterTheFIN(self) -> None:
        """
        Under C{--half-close forward}, once the client's FIN is in it sends
        nothing more and waits for its answer: its silence is no sign of
        death (a relay's idle clock stops at the FIN too).
        """
        h = DirectHarness(idleTimeout=2, halfClose="forward")
        h.probe.tcp = info(CLOSE_WAIT, idle=5.0)
        h.clock.advance(10)
        self.assertEqual(h.worker.kills, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_throughTheConnection(self) -> None:
        """
        A direct connection's idle timeout kills its worker, and the socket
        is aborted once the worker is reaped.
        """
        h = DirectHarness(idleTimeout=2)
        h.probe.tcp = info(idle=1.0)
        h.clock.advance(2)
        self.assertEqual(h.worker.kills, 0)
        h.probe.tcp = info(idle=2.0)
        h.clock.advance(1)
        self.assertEqual(h.record.reason, EndReason.IDLE_TIMEOUT)
        h.direct.workerReaped()
        self.assertTrue(h.transport.disconnecting)


class ConflictTests(SynchronousTestCase):
    """
    What cannot work directly is a one-line usage error naming the conflict.
    """

    def refused(self, *args: str) -> str:
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--direct", *args, "--", "/bin/cat"])
        return str(caught.exception)

    def test_websocket(self) -> None:
        self.assertIn("--websocket", self.refused("--websocket"))

    def test_tls(self) -> None:
        self.assertIn("ssl:", self.refused("-l", "ssl:8443:privateKey=k.pem"))

    def test_tlsBehindProxy(self) -> None:
        self.assertIn("TLS", self.refused("-l", "haproxy:ssl:8443:privateKey=k.pem"))

    def test_heartbeat(self) -> None:
        self.assertIn("--heartbeat does not apply", self.refused("--heartbeat", "1"))

    def test_readAhead(self) -> None:
        self.assertIn("--read-ahead", self.refused("--read-ahead", "1m"))

    def test_idleTimeoutOnUnix(self) -> None:
        message = self.refused("-l", "haproxy:unix:/tmp/x.sock", "--idle-timeout", "3")
        self.assertIn("--idle-timeout needs TCP_INFO", message)

    def test_configHeartbeat(self) -> None:
        """
        A library user's L{Config} refuses the heartbeat too.
        """
        self.assertRaises(InvalidSetting, Config, direct=True, heartbeat=1.0)

    def test_accepted(self) -> None:
        options = Options()
        options.parseOptions(
            ["--direct", "--idle-timeout", "3", "--half-close", "forward", "--", "/bin/cat"]
        )
        self.assertTrue(options["config"].direct)
