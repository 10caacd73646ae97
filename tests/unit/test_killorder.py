"""
The kill comes first: whichever way the relay learns that its client is
gone, signalling the worker is the first thing it does, and the rest (the
reason's socket probing, unwatching, producers, the transport's close)
follows.  See the "Kill path" section of C{bench/README.md} for why.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from twisted_closewatch.config import Config
from twisted_closewatch.relay import DROP_DELAY, WorkerRelay
from twisted_closewatch.spawn import _WorkerOutput


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []


class _Pipe:
    bufferSize = 0
    disconnecting = False

    def startReading(self) -> None:
        pass

    def stopReading(self) -> None:
        pass


class _Worker:
    """
    Stands in for L{twisted_closewatch.spawn.WorkerProcess}.
    """

    pid = 4242

    def __init__(self) -> None:
        self.pipes = {0: _Pipe(), 1: _Pipe(), 2: _Pipe()}
        self.lost = self.muted = self.drained = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def closeStdin(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.lost = True

    def mute(self) -> None:
        self.muted = True

    def drainStderr(self) -> None:
        self.drained = True


class _Probe:
    """
    The relay's duplicate of the client socket: records the probing that
    names a loss.
    """

    def __init__(self, recorder: _Recorder, error: int = 0) -> None:
        self._recorder = recorder
        self._error = error

    def fileno(self) -> int:
        return 99

    @property
    def family(self) -> int:
        return socket.AF_INET

    def getsockopt(self, level: int, name: int, size: int = 0) -> Any:
        self._recorder.calls.append("getsockopt")
        if name == socket.SO_ERROR:
            error, self._error = self._error, 0
            return error
        raise OSError("no TCP_INFO here")

    def close(self) -> None:
        pass


class _CloseWatch:
    def __init__(self, recorder: _Recorder) -> None:
        self._recorder = recorder

    def unwatch(self, fd: int) -> None:
        self._recorder.calls.append("unwatch")


class _Transport(StringTransport):
    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self._recorder = recorder

    def unregisterProducer(self) -> None:
        self._recorder.calls.append("unregisterProducer")
        super().unregisterProducer()

    def loseConnection(self) -> None:
        self._recorder.calls.append("loseConnection")
        super().loseConnection()

    def abortConnection(self) -> None:
        self._recorder.calls.append("abortConnection")
        super().loseConnection()


class _Factory:
    """
    What a relay needs of L{twisted_closewatch.factory.CloseWatchFactory}.
    """

    def __init__(self, recorder: _Recorder, config: Config) -> None:
        self.reactor = MemoryReactorClock()
        self.config = config
        self.closeWatch = _CloseWatch(recorder)
        self.worker = _Worker()
        self.ended: list[WorkerRelay] = []
        self._recorder = recorder

    def spawnWorker(self, relay: WorkerRelay) -> _Worker:
        return self.worker

    def killWorker(self, worker: _Worker) -> None:
        self._recorder.calls.append("kill")

    def workerReaped(self, relay: WorkerRelay) -> None:
        pass

    def connectionEnded(self, relay: WorkerRelay) -> None:
        self.ended.append(relay)


def _relay(error: int = 0, **config: Any) -> tuple[WorkerRelay, _Recorder, _Factory]:
    """
    A running relay with a fake worker, transport and socket probe (whose
    pending error is C{error}), all recording into one list.
    """
    recorder = _Recorder()
    factory = _Factory(recorder, Config(argv=("/bin/true",), **config))
    relay = WorkerRelay(factory, 1)  # type: ignore[arg-type]
    relay.makeConnection(_Transport(recorder))
    relay._probe = _Probe(recorder, error)  # type: ignore[assignment]
    return relay, recorder, factory


class RelayKillFirstTests(TestCase):
    """
    L{WorkerRelay} signals the worker before anything else.
    """

    relay = staticmethod(_relay)

    def test_finOnTheReadPath(self) -> None:
        """
        A FIN read by Twisted: the kill precedes the C{SO_ERROR} read that
        tells a FIN from a reset, and the reason is still C{client-closed}.
        """
        relay, recorder, _ = self.relay()
        relay.readConnectionLost()
        self.assertEqual(recorder.calls[:2], ["kill", "getsockopt"])
        self.assertEqual(relay.record.reason, "client-closed")

    def test_resetSeenAsEndOfInput(self) -> None:
        """
        An RST that Twisted takes for the end of input is still named a
        reset, from the error pending on the socket, read after the kill.
        """
        relay, recorder, _ = self.relay(error=errno.ECONNRESET)
        relay.readConnectionLost()
        self.assertEqual(recorder.calls[:2], ["kill", "getsockopt"])
        self.assertEqual(relay.record.reason, "client-reset")

    def test_closeWatchFin(self) -> None:
        relay, recorder, _ = self.relay()
        relay._clientClosed()
        self.assertEqual(recorder.calls, ["kill"])
        self.assertEqual(relay.record.reason, "client-closed")

    def test_closeWatchReset(self) -> None:
        """
        A reset seen by the close watch: kill, then the probing that names
        it.
        """
        relay, recorder, _ = self.relay(error=errno.ECONNRESET)
        relay._clientDead()
        self.assertEqual(recorder.calls[0], "kill")
        self.assertIn("getsockopt", recorder.calls)
        self.assertEqual(relay.record.reason, "client-reset")

    def test_connectionLost(self) -> None:
        """
        A connection lost with the worker running: the kill before
        unwatching, the liveness timers and the reason's probing.
        """
        relay, recorder, _ = self.relay()
        relay.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(recorder.calls[:2], ["kill", "unwatch"])
        self.assertEqual(relay.record.reason, "client-reset")

    def test_connectionDone(self) -> None:
        relay, recorder, _ = self.relay()
        relay.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(recorder.calls[0], "kill")
        self.assertEqual(relay.record.reason, "client-closed")

    def test_onlyOneKill(self) -> None:
        """
        Both the close watch and the read path see the same FIN: one kill,
        one reason, no probing the second time.
        """
        relay, recorder, _ = self.relay()
        relay._clientClosed()
        relay.readConnectionLost()
        self.assertEqual(recorder.calls, ["kill"])
        self.assertEqual(relay.record.reason, "client-closed")


class RelayDropAfterReapTests(TestCase):
    """
    After a C{SIGKILL}, the client's connection is dropped once the worker
    is reaped (the dying worker gets the CPU first), or after
    L{DROP_DELAY} at the latest; with a grace period, at once.
    """

    relay = staticmethod(_relay)

    def test_dropOnReap(self) -> None:
        relay, recorder, factory = self.relay()
        relay._clientClosed()
        self.assertEqual(recorder.calls, ["kill"])
        self.assertFalse(relay.transport.disconnecting)
        relay.workerExited()
        self.assertEqual(
            recorder.calls, ["kill", "unwatch", "unregisterProducer", "loseConnection"]
        )
        self.assertTrue(factory.worker.muted)
        self.assertTrue(factory.worker.drained)
        self.assertTrue(factory.worker.lost)
        self.assertEqual(factory.reactor.getDelayedCalls(), [])

    def test_resetIsAborted(self) -> None:
        relay, recorder, _ = self.relay()
        relay.clientGone("client-reset")
        relay.workerExited()
        self.assertEqual(recorder.calls[-1], "abortConnection")

    def test_dropWithoutReap(self) -> None:
        """
        A worker that is not reaped in time (stuck in the kernel) does not
        keep its client's connection open.
        """
        relay, recorder, factory = self.relay()
        relay._clientClosed()
        factory.reactor.advance(DROP_DELAY)
        self.assertEqual(recorder.calls[-1], "loseConnection")
        self.assertTrue(relay.transport.disconnecting)

    def test_graceDropsAtOnce(self) -> None:
        """
        Under C{--grace} the worker may take seconds to go: the client is
        not kept waiting for it.
        """
        relay, recorder, factory = self.relay(grace=5)
        relay._clientClosed()
        self.assertEqual(
            recorder.calls, ["kill", "unwatch", "unregisterProducer", "loseConnection"]
        )
        self.assertFalse(factory.worker.muted)
        self.assertEqual(factory.reactor.getDelayedCalls(), [])

    def test_lostBeforeReap(self) -> None:
        """
        The client's transport ends before the reap: the pending drop is
        cancelled, and the end is reported once the worker has ended.
        """
        relay, recorder, factory = self.relay()
        relay.clientGone("client-reset")
        relay.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(factory.reactor.getDelayedCalls(), [])
        relay.workerExited()
        relay.workerEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(factory.ended, [relay])
        self.assertEqual(relay.record.reason, "client-reset")
        self.assertNotIn("loseConnection", recorder.calls)

    def test_noLingerForAGoneClient(self) -> None:
        """
        The worker's end, once the client was found gone, does not start a
        lingering close of the connection being dropped.
        """
        relay, _, _ = self.relay()
        relay._clientClosed()
        relay.workerExited()
        relay.workerEnded(Failure(ProcessTerminated(signal=9)))
        self.assertIsNone(relay._linger)


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
