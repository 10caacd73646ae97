"""
The worker handle, driven like Twisted's test_procmon drives procmon: a fake
process transport and a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.unit.fakes import FakeProcess
from twisted_closewatch import worker as workerModule
from twisted_closewatch.config import Config
from twisted_closewatch.record import ConnectionRecord
from twisted_closewatch.worker import STDERR_LINES_PER_SECOND, IWorkerSink, WorkerHandle


@implementer(IWorkerSink)
class RecordingSink:
    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def workerOutput(self, data: bytes) -> None:
        self.events.append(("output", data))

    def workerLifetimeOver(self) -> None:
        self.events.append("lifetime")

    def workerReaped(self) -> None:
        self.events.append("reaped")

    def workerEnded(self, exitCode: int | None, exitSignal: int | None) -> None:
        self.events.append(("ended", exitCode, exitSignal))


class HandleTestCase(SynchronousTestCase):
    def handle(self, **config: Any) -> WorkerHandle:
        self.clock = MemoryReactorClock()
        self.events: list[Any] = []
        self.record = ConnectionRecord(3)
        self.processes: list[FakeProcess] = []

        def spawn(protocol: Any) -> FakeProcess:
            process = FakeProcess(protocol)
            self.processes.append(process)
            return process

        return WorkerHandle(
            self.clock,
            Config(argv=("/bin/cat",), **config),
            RecordingSink(self.events),
            self.record,
            spawn,
            lambda: self.events.append("slot back"),
        )

    @property
    def process(self) -> FakeProcess:
        return self.processes[0]


class KillTests(HandleTestCase):
    """
    The kill: the whole group, with C{SIGKILL} at once or after
    C{--grace} from a C{SIGTERM}.
    """

    def test_killAtOnce(self) -> None:
        handle = self.handle()
        self.assertTrue(handle.kill())
        self.assertEqual(self.process.signals, ["KILL"])

    def test_killedWorkerMutedUntilReaped(self) -> None:
        """
        A worker sent C{SIGKILL} is not read until its reap (its pipes'
        closing would wake the server ahead of it); then its stderr is
        drained and its pipes dropped.
        """
        handle = self.handle()
        handle.kill()
        self.assertTrue(self.process.muted)
        self.assertFalse(self.process.stderrDrained)
        self.process.protocol.processExited(None)
        self.assertTrue(self.process.stderrDrained)
        self.assertTrue(self.process.lost)

    def test_stragglersLater(self) -> None:
        """
        The kill is one signal to the group; what left the group (its
        cgroup) is killed by L{WorkerHandle.killStragglers}, after the
        burst.
        """
        handle = self.handle()
        handle.kill()
        self.assertEqual(self.process.signals, ["KILL"])
        handle.killStragglers()
        self.assertEqual(self.process.signals, ["KILL", "stragglers"])

    def test_noStragglersKilledInAGrace(self) -> None:
        """
        Under C{--grace} the cgroup is killed with the C{SIGKILL} at the
        grace's end, not before.
        """
        handle = self.handle(grace=2)
        handle.kill()
        handle.killStragglers()
        self.assertEqual(self.process.signals, ["TERM"])

    def test_noStragglersKilledAfterReap(self) -> None:
        """
        A worker reaped before its stragglers' kill: the spawner killed its
        cgroup before the reap, and the cgroup may be gone.
        """
        handle = self.handle()
        handle.kill()
        self.process.protocol.processExited(None)
        handle.killStragglers()
        self.assertEqual(self.process.signals, ["KILL"])

    def test_graceTermThenKill(self) -> None:
        """
        Under a grace period the worker is not dying at once, nor muted.
        """
        handle = self.handle(grace=2)
        self.assertFalse(handle.kill())
        self.assertFalse(self.process.muted)
        self.assertEqual(self.process.signals, ["TERM"])
        self.clock.advance(2)
        self.assertEqual(self.process.signals, ["TERM", "KILL"])

    def test_graceOverWhenReaped(self) -> None:
        """
        A worker that ends within the grace gets no C{SIGKILL}, and no
        timer is left behind.
        """
        handle = self.handle(grace=2)
        handle.kill()
        self.process.exit(None, 15)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.process.signals, ["TERM"])

    def test_secondKillNoSecondTerm(self) -> None:
        handle = self.handle(grace=2)
        handle.kill()
        handle.kill()
        self.assertEqual(self.process.signals, ["TERM"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_killOfExitedWorker(self) -> None:
        """
        A worker already gone is not an error, and gets no grace timer.
        """
        handle = self.handle(grace=2)
        self.process.exited = True
        self.assertFalse(handle.kill())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_killAfterReapDropsOutput(self) -> None:
        """
        A reaped worker whose pipes are held open by an escaped process:
        once killed, the rest of its output is not waited for.
        """
        handle = self.handle()
        self.process.protocol.processExited(None)
        self.assertFalse(self.process.lost)
        self.assertFalse(handle.kill())
        self.assertTrue(self.process.lost)

    def test_reapAfterKillDropsOutput(self) -> None:
        handle = self.handle()
        handle.kill()
        self.assertFalse(self.process.lost)
        self.process.protocol.processExited(None)
        self.assertTrue(self.process.lost)


class ExitAtOnceTests(HandleTestCase):
    """
    Twisted reaps a worker that exits at once before its spawn returns.
    """

    def test_reapedWhileSpawning(self) -> None:
        def spawn(protocol: Any) -> FakeProcess:
            process = FakeProcess(protocol)
            self.processes.append(process)
            process.exited = True
            process.pid = None  # type: ignore[assignment]
            protocol.processExited(None)
            return process

        self.clock = MemoryReactorClock()
        self.events = []
        self.processes = []
        handle = WorkerHandle(
            self.clock, Config(), RecordingSink(self.events), ConnectionRecord(1), spawn
        )
        self.assertEqual(handle.pid, FakeProcess.pid)
        self.assertEqual(self.events, ["reaped"])
        self.assertFalse(handle.kill())


class LifetimeTests(HandleTestCase):
    """
    C{--max-lifetime}: a worker that has run that long is reported.
    """

    def test_offByDefault(self) -> None:
        self.handle()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reportedWhenOver(self) -> None:
        self.handle(maxLifetime=10)
        self.clock.advance(9.9)
        self.assertNotIn("lifetime", self.events)
        self.clock.advance(0.1)
        self.assertIn("lifetime", self.events)

    def test_cancelledWhenEnded(self) -> None:
        self.handle(maxLifetime=10)
        self.process.exit(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EventTests(HandleTestCase):
    """
    What the worker does reaches the sink.
    """

    def test_output(self) -> None:
        self.handle()
        self.process.protocol.childDataReceived(1, b"out")
        self.assertEqual(self.events, [("output", b"out")])

    def test_endedAfterSlotGivenBack(self) -> None:
        """
        The server hears of the reap (and gives the slot back) before the
        relay hears of the end.
        """
        self.handle()
        self.process.exit(None, 9)
        self.assertEqual(self.events, ["reaped", "slot back", ("ended", None, 9)])

    def test_exitStatus(self) -> None:
        self.handle()
        self.process.exit(3)
        self.assertEqual(self.events[-1], ("ended", 3, None))

    def test_stdinPacesTheGivenProducer(self) -> None:
        """
        The worker's stdin pauses, resumes and stops what reads the client.
        """
        handle = self.handle()
        producer = object()
        handle.paceInput(producer)  # type: ignore[arg-type]
        self.assertIs(self.process.producer, producer)

    def test_stdinPausesAsSoonAsItHoldsAnything(self) -> None:
        """
        The stdin's writer pauses the worker's input as soon as it holds
        bytes the pipe has not taken: the read-ahead is held by the input,
        which can move it to the spool, not by the writer.
        """
        self.handle(readAhead=64 * 1024)
        self.assertEqual(self.process.pipes[0].bufferSize, 0)

    def test_outputPacing(self) -> None:
        handle = self.handle()
        handle.outputProducer.pauseProducing()
        self.assertFalse(self.process.pipes[1].reading)
        handle.drainOutput()
        self.assertTrue(self.process.pipes[1].reading)


class StderrTests(HandleTestCase):
    """
    A worker's stderr is logged a line per event, at a bounded rate.
    """

    def setUp(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.patch(workerModule, "log", Logger(observer=self.logged.append))

    def test_linePerEvent(self) -> None:
        self.handle()
        self.process.protocol.childDataReceived(2, b"one\ntw")
        self.process.protocol.childDataReceived(2, b"o\n")
        self.assertEqual([e["line"] for e in self.logged], ["one", "two"])

    def test_rateBounded(self) -> None:
        self.handle()
        flood = b"x\n" * (STDERR_LINES_PER_SECOND + 10)
        self.process.protocol.childDataReceived(2, flood)
        self.assertEqual(len(self.logged), STDERR_LINES_PER_SECOND)
        self.assertEqual(self.record.stderrDropped, 10)
        self.clock.advance(1)
        self.process.protocol.childDataReceived(2, b"y\n")
        self.assertEqual(self.logged[-1]["line"], "y")

    def test_partialLineFlushedAtEnd(self) -> None:
        self.handle()
        self.process.protocol.childDataReceived(2, b"no newline")
        self.process.exit(1)
        self.assertEqual([e["line"] for e in self.logged], ["no newline"])
