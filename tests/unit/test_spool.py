"""
The spool's logic, against real temporary files and a fake worker: the
ring's order, the budget's accounting, feeding the worker in order, the
client paused at the limits and on errors (logged once), EOF after the
spool under C{--half-close forward}.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import tempfile

from twisted.internet.error import ConnectionLost
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import Harness
from twisted_closewatch.config import Config, InvalidSetting
from twisted_closewatch.record import EndReason
from twisted_closewatch.relay import State
from twisted_closewatch.spool import (
    DRAIN_PATIENCE,
    InputState,
    SpoolBudget,
    SpoolFile,
    budgetFor,
    openUnlinked,
)


def inMemory(h: Harness) -> int:
    """
    The client's bytes the server holds in memory for the worker: what its
    stdin's writer keeps, and what waits for it.
    """
    assert h.worker.writer is not None
    return h.worker.writer.holding() + h.relay._input._heldSize


def pattern(size: int, seed: int = 0) -> bytes:
    """
    C{size} bytes whose order shows: a counter, not a repeated byte.
    """
    return bytes((seed + i * 7 + i // 251) % 256 for i in range(size))


class _Budget(SpoolBudget):
    """
    A budget whose files are opened with C{flags} (a file that cannot be
    written or read back, to get the kernel's errors).
    """

    def __init__(self, directory: str, perConnection: int, total: int, flags: int) -> None:
        super().__init__(directory, perConnection, total)
        self._flags = flags

    def open(self) -> SpoolFile:
        path = os.path.join(self.directory, "readonly")
        with open(path, "wb"):
            pass
        fd = os.open(path, self._flags)
        os.unlink(path)
        return SpoolFile(fd, self)


class SpoolFileTests(SynchronousTestCase):
    """
    One connection's file: a ring, charged to the server's budget.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="closewatch-spool-test-")
        self.addCleanup(os.rmdir, self.directory)

    def spool(self, perConnection: int = 100, total: int = 1000) -> SpoolFile:
        self.budget = SpoolBudget(self.directory, perConnection, total)
        return self.budget.open()

    def test_unlinkedAndCloseOnExec(self) -> None:
        """
        The file has no name from the start, and no worker inherits it.
        """
        fd = openUnlinked(self.directory)
        self.addCleanup(os.close, fd)
        self.assertEqual(os.fstat(fd).st_nlink, 0)
        self.assertEqual(os.listdir(self.directory), [])
        self.assertTrue(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)

    def test_orderAcrossTheRingsEnd(self) -> None:
        """
        Written and read in pieces that wrap around the end of the ring,
        the bytes come back in the order they were written.
        """
        spool = self.spool(perConnection=100)
        self.addCleanup(spool.close)
        data = pattern(1000)
        written = read = 0
        out = b""
        while read < len(data):
            written += spool.append(data[written : written + 37]) if written < len(data) else 0
            chunk = spool.read(23)
            read += len(chunk)
            out += chunk
        self.assertEqual(out, data)
        self.assertEqual(spool.size, 0)
        self.assertLessEqual(os.fstat(spool._fd).st_size, 100)

    def test_perConnectionLimit(self) -> None:
        """
        A write is taken up to the spool's limit, no further.
        """
        spool = self.spool(perConnection=100)
        self.addCleanup(spool.close)
        self.assertEqual(spool.append(b"a" * 90), 90)
        self.assertEqual(spool.append(b"b" * 11), 10)
        self.assertIsNone(spool.error)
        self.assertEqual(spool.append(b"c"), 0)
        self.assertEqual(spool.read(200), b"a" * 90 + b"b" * 10)
        self.assertEqual(spool.append(b"c" * 10), 10)
        self.assertEqual(spool.read(200), b"c" * 10)

    def test_budgetChargesTheFilesLength(self) -> None:
        """
        The budget is charged for what the files hold on disk, shared by
        every file, and given back when a file is emptied or closed.
        """
        first = self.spool(perConnection=100, total=150)
        second = self.budget.open()
        self.assertEqual(first.append(b"x" * 100), 100)
        self.assertEqual(self.budget.inUse, 100)
        # Read back, but still on disk: still charged.
        first.read(100)
        self.assertEqual(self.budget.inUse, 100)
        self.assertEqual(second.append(b"y" * 80), 50)
        self.assertEqual(self.budget.inUse, 150)
        first.empty()
        self.assertEqual(os.fstat(first._fd).st_size, 0)
        self.assertEqual(self.budget.inUse, 50)
        self.assertEqual(second.append(b"z" * 30), 30)
        self.assertEqual(second.read(100), b"y" * 50 + b"z" * 30)
        first.close()
        second.close()
        self.assertEqual(self.budget.inUse, 0)
        self.assertEqual(self.budget.spooled, 180)

    def test_roomIsWhatAppendTakes(self) -> None:
        """
        L{SpoolFile.room} is what L{SpoolFile.append} would take now, in any
        state of the ring and of a budget shared with another file: above
        all once the budget binds, when the part of the ring read already
        but not yet reached again cannot be written (the room sizes a
        client's read, and what a spool does not take is held in memory).
        """
        rng = random.Random(13)
        spool = self.spool(perConnection=64, total=100)
        other = self.budget.open()
        self.addCleanup(other.close)
        self.addCleanup(spool.close)
        checked = 0
        for _ in range(400):
            action = rng.randrange(6)
            if action == 0:
                room = spool.room()
                self.assertEqual(spool.append(b"x" * 100), room)
                checked += bool(room)
            elif action == 1:
                spool.append(b"y" * rng.randrange(1, 40))
            elif action == 2:
                spool.read(rng.randrange(1, 40))
            elif action == 3:
                other.append(b"z" * rng.randrange(1, 40))
            elif action == 4:
                other.read(64)
                other.empty()
            elif rng.randrange(4) == 0:
                spool.empty()
        self.assertGreater(checked, 20)

    def test_writeError(self) -> None:
        """
        A write the kernel refuses takes nothing, says why, and charges
        nothing once the file is emptied.
        """
        budget = _Budget(self.directory, 100, 1000, os.O_RDONLY)
        spool = budget.open()
        self.assertEqual(spool.append(b"data"), 0)
        assert spool.error is not None
        self.assertEqual(spool.error.errno, errno.EBADF)
        spool.close()
        self.assertEqual(budget.inUse, 0)

    def test_budgetFor(self) -> None:
        """
        A server spools unless C{--spool-max} or C{--spool-total} is 0.
        """
        budget = budgetFor(Config(argv=("/bin/cat",), spoolDir=self.directory))
        assert budget is not None
        self.assertEqual(
            (budget.directory, budget.perConnection, budget.total),
            (self.directory, 64 * 1024**2, 1024**3),
        )
        self.assertIsNone(budgetFor(Config(argv=("/bin/cat",), spoolMax=0)))
        self.assertIsNone(budgetFor(Config(argv=("/bin/cat",), spoolTotal=0)))


class SpooledInputTests(SynchronousTestCase):
    """
    A relay whose worker stops reading spools what its client sends, and
    feeds it to the worker in order.
    """

    READ_AHEAD = 4096

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="closewatch-spool-test-")
        self.addCleanup(os.rmdir, self.directory)
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def harness(
        self, budget: SpoolBudget | None = None, perConnection: int = 10_000, **config: object
    ) -> Harness:
        if budget is None:
            budget = SpoolBudget(self.directory, perConnection, 1_000_000)
        self.budget = budget
        return Harness(spool=budget, readAhead=self.READ_AHEAD, pipe=1000, **config)

    def send(self, h: Harness, data: bytes, size: int = 300) -> None:
        for offset in range(0, len(data), size):
            h.client.dataReceived(data[offset : offset + size])

    def drain(self, h: Harness) -> None:
        """
        Let the worker read until its input goes to it directly again.
        """
        for _ in range(100):
            h.worker.readsAll()
            if h.relay._input.state is InputState.DIRECT and not h.relay._input._heldSize:
                return
            if h.worker.stdinClosed:
                return
        self.fail(f"still {h.relay._input.state} after 100 reads")

    def pausedThenDelivered(self, h: Harness, data: bytes) -> None:
        """
        Sending C{data} pauses the client; the worker then gets all it was
        sent, in order, and the client is read again.
        """
        before = h.worker.stdin
        self.send(h, data)
        self.assertEqual(h.transport.producerState, "paused")
        self.drain(h)
        self.assertEqual(h.worker.stdin, before + data)
        self.assertEqual(h.transport.producerState, "producing")

    def warnings(self) -> list[dict[str, object]]:
        return [e for e in self.events if e.get("log_level") in (LogLevel.warn, LogLevel.error)]

    def test_spooledInOrder(self) -> None:
        """
        Past a full stdin the client is still read; the worker gets every
        byte, in order, as it reads, and the spool is given back once empty.
        """
        h = self.harness()
        data = pattern(9000)
        self.send(h, data)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertLess(len(h.worker.stdin), 1400)
        self.assertEqual(h.record.bytesIn, 9000)
        self.assertGreater(self.budget.inUse, 0)
        self.drain(h)
        self.assertEqual(h.worker.stdin, data)
        self.assertEqual(self.budget.inUse, 0)
        self.assertIs(h.relay._input.state, InputState.DIRECT)
        self.assertEqual(h.record.bytesSpooled, self.budget.spooled)
        self.assertGreater(h.record.bytesSpooled, 0)

    def test_feedIsBounded(self) -> None:
        """
        The worker is fed from the spool only until its stdin is full again:
        the spool is never read into memory whole.
        """
        h = self.harness()
        self.send(h, pattern(9000))
        before = len(h.worker.stdin)
        h.worker.readsAll()
        self.assertLessEqual(len(h.worker.stdin) - h.worker.consumed, 1000 + 64 * 1024)
        self.assertLess(len(h.worker.stdin) - before, 9000)

    def test_newBytesWaitBehindTheSpool(self) -> None:
        """
        What the client sends while the spool is being fed goes behind it.
        """
        h = self.harness()
        first, second = pattern(5000, 1), pattern(5000, 2)
        self.send(h, first)
        h.worker.readsAll()
        self.send(h, second)
        self.drain(h)
        self.assertEqual(h.worker.stdin, first + second)

    def test_limitPausesThenResumes(self) -> None:
        """
        Past C{--spool-max} the client is paused, what it sent held in
        order; once the worker has read everything, it is read again.
        """
        h = self.harness(perConnection=2000)
        self.pausedThenDelivered(h, pattern(6000))
        self.assertEqual(self.warnings(), [])

    def test_budgetExhaustedPauses(self) -> None:
        """
        A server-wide budget used up by others pauses the client, too.
        """
        budget = SpoolBudget(self.directory, 10_000, 1500)
        budget.reserve(1000)
        h = self.harness(budget)
        self.pausedThenDelivered(h, pattern(4000))
        self.assertEqual(budget.inUse, 1000)

    def test_writeErrorPausesAndIsLoggedOnce(self) -> None:
        """
        A spool the disk refuses pauses the client, loses and reorders
        nothing, and is logged once for the connection however often it
        recurs.
        """
        h = self.harness(_Budget(self.directory, 10_000, 100_000, os.O_RDONLY))
        self.pausedThenDelivered(h, pattern(3000, 3))
        self.pausedThenDelivered(h, pattern(3000, 4))
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["errno"], errno.EBADF)

    def test_noDirectoryPauses(self) -> None:
        """
        A spool file that cannot be made (the directory is gone) pauses the
        client, and is logged once.
        """
        h = self.harness(SpoolBudget(os.path.join(self.directory, "gone"), 10_000, 100_000))
        self.pausedThenDelivered(h, pattern(3000))
        self.assertEqual([e["errno"] for e in self.warnings()], [errno.ENOENT])

    def test_readErrorEndsTheConnection(self) -> None:
        """
        Spooled bytes that cannot be read back are lost: the worker is
        killed rather than given its input with a hole in it.
        """
        h = self.harness(_Budget(self.directory, 10_000, 100_000, os.O_WRONLY))
        self.send(h, pattern(3000))
        h.worker.readsAll()
        self.assertEqual(h.worker.kills, 1)
        self.assertIs(h.relay.state, State.KILLED)
        self.assertEqual(h.record.reason, EndReason.SPOOL_ERROR)
        self.assertEqual(self.budget.inUse, 0)

    def test_forwardEOFAfterTheSpool(self) -> None:
        """
        Under C{--half-close forward} the worker's EOF comes after all that
        was spooled.
        """
        h = self.harness(halfClose="forward")
        data = pattern(5000)
        self.send(h, data)
        h.client.readConnectionLost()
        self.assertFalse(h.worker.stdinClosed)
        self.drain(h)
        self.assertTrue(h.worker.stdinClosed)
        self.assertEqual(h.worker.stdin, data)

    def test_finBehindTheSpoolKills(self) -> None:
        """
        Under C{--half-close kill} a FIN read behind spooled bytes kills at
        once, and the spool is given back once the worker is reaped.
        """
        h = self.harness()
        self.send(h, pattern(5000))
        h.client.readConnectionLost()
        self.assertEqual(h.worker.kills, 1)
        h.reap()
        self.assertEqual(self.budget.inUse, 0)

    def test_workerClosesStdin(self) -> None:
        """
        A worker that closes its stdin drops the spool, and the client is
        read again so that its close is seen.
        """
        h = self.harness(perConnection=2000)
        self.send(h, pattern(6000))
        h.worker.stdinClosedByWorker()
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(self.budget.inUse, 0)
        h.client.dataReceived(b"dropped")
        self.assertEqual(self.budget.inUse, 0)

    def test_clientGoneGivesTheSpoolBack(self) -> None:
        h = self.harness()
        self.send(h, pattern(5000))
        h.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.budget.inUse, 0)

    def test_noSpoolPausesPastTheReadAhead(self) -> None:
        """
        Without spooling, a worker that does not read pauses its client
        once the read-ahead is full, as before, and gets it all in order.
        """
        h = Harness(readAhead=self.READ_AHEAD, pipe=1000)
        # The stdin's writer holds the first read, memory the next 2048.
        self.send(h, pattern(2100))
        self.assertEqual(h.transport.producerState, "producing")
        self.send(h, pattern(300, 1))
        self.assertEqual(h.transport.producerState, "paused")
        self.assertLessEqual(inMemory(h), self.READ_AHEAD)
        self.drain(h)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.worker.stdin, pattern(2100) + pattern(300, 1))

    def test_readAheadGoesToTheSpoolInOrder(self) -> None:
        """
        Once the worker is taken to have stopped reading (the read-ahead is
        full), what memory held goes to the spool ahead of what follows: a
        stalled connection holds only the piece its stdin's writer has, and
        the worker still gets every byte in order.
        """
        h = self.harness()
        data = pattern(9000)
        self.send(h, data)
        self.assertIs(h.relay._input.state, InputState.SPOOLING)
        self.assertEqual(h.relay._input._heldSize, 0)
        self.assertEqual(inMemory(h), 300)
        self.assertEqual(self.budget.spooled, 9000 - 300)
        self.drain(h)
        self.assertEqual(h.worker.stdin, data)

    def test_shortStallStaysInMemory(self) -> None:
        """
        A worker that stops for less than the read-ahead does not have its
        input pass through the disk.
        """
        h = self.harness()
        data = pattern(2300)
        self.send(h, data)
        self.assertIs(h.relay._input.state, InputState.DIRECT)
        self.assertEqual(inMemory(h), 2300)
        self.drain(h)
        self.assertEqual(h.worker.stdin, data)
        self.assertEqual(self.budget.spooled, 0)

    def test_readingWorkerGetsOnePieceAtATime(self) -> None:
        """
        While the worker reads, its stdin's writer is given one piece at a
        time and what arrives meanwhile waits in memory: nothing is
        spooled, lost or reordered, and no more than a read waits.
        """
        h = self.harness()
        for i in range(30):
            self.send(h, pattern(600, i), 600)
            self.assertLessEqual(inMemory(h), 1200)
            h.worker.readsAll()
        self.drain(h)
        self.assertEqual(h.worker.stdin, b"".join(pattern(600, i) for i in range(30)))
        self.assertEqual(self.budget.spooled, 0)

    def test_smallPiecesGoTogether(self) -> None:
        """
        Small pieces that wait while the stdin's writer is busy (WebSocket
        messages, many to a read) are given to it together, up to one of
        the relay's reads, not one per turn of the reactor.
        """
        h = self.harness()
        for i in range(120):
            h.client.dataReceived(pattern(10, i))
        writer = h.worker.writer
        assert writer is not None
        writer.emptied()
        # The first piece written, then the next 102 (1020 bytes: one
        # 1024-byte read) at once.
        self.assertEqual(len(h.worker.stdin), 10 + 1020)
        self.drain(h)
        self.assertEqual(h.worker.stdin, b"".join(pattern(10, i) for i in range(120)))

    def test_forwardEOFAfterWhatMemoryHolds(self) -> None:
        """
        Under C{--half-close forward} the worker's EOF waits for what its
        stdin has not been given yet, even when nothing was spooled.
        """
        h = self.harness(halfClose="forward")
        self.send(h, pattern(1000))
        h.client.readConnectionLost()
        self.assertFalse(h.worker.stdinClosed)
        self.drain(h)
        h.worker.readsAll()
        self.assertTrue(h.worker.stdinClosed)
        self.assertEqual(h.worker.stdin, pattern(1000))

    def test_forwardEOFBehindTheWritersPiece(self) -> None:
        """
        An EOF that comes while the stdin's writer still holds a piece (and
        nothing else waits) reaches the worker once the piece is written:
        the stdin is closed only with the writer empty, as Twisted's writer
        resumes its paused producer then rather than close.
        """
        h = self.harness(halfClose="forward")
        self.send(h, pattern(1200), 1200)
        h.client.readConnectionLost()
        self.assertFalse(h.worker.stdinClosed)
        h.worker.readsAll()
        h.worker.readsAll()
        self.assertTrue(h.worker.stdinClosed)
        self.assertEqual(h.worker.stdin, pattern(1200))

    def test_largerReadsWhileSpooling(self) -> None:
        """
        While the client's bytes go to the spool it is read in larger
        pieces (they are not held in memory), and in the relay's own size
        again once they go to the worker.
        """
        budget = SpoolBudget(self.directory, 10_000, 100_000, readSize=4096)
        h = self.harness(budget)
        self.assertEqual(h.transport.bufferSize, 1024)
        self.send(h, pattern(3000))
        self.assertEqual(h.transport.bufferSize, 4096)
        self.drain(h)
        self.assertEqual(h.transport.bufferSize, 1024)

    def test_readsNoMoreThanTheSpoolTakes(self) -> None:
        """
        Near its limit, the client is read in pieces the spool still takes,
        never smaller than the relay's own reads.
        """
        budget = SpoolBudget(self.directory, 5000, 100_000, readSize=4096)
        h = self.harness(budget)
        # 1200 to the worker's stdin, then 2400 past the read-ahead: to
        # the spool, which takes 5000.
        self.send(h, pattern(3600), 1200)
        self.assertEqual(h.transport.bufferSize, 2600)
        self.send(h, pattern(1300), 1300)
        self.assertEqual(h.transport.bufferSize, 1300)
        self.send(h, pattern(1300), 1300)
        self.assertEqual(h.transport.bufferSize, 1024)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(budgetFor(Config(argv=("/bin/cat",))).readSize, 1024**2)  # type: ignore[union-attr]

    def test_killStopsAndTheDropGivesBack(self) -> None:
        """
        A kill stops the input at once (the client is not read, the worker
        not fed again), and the spool file is given back when the killed
        worker's connection is dropped, after its reap.
        """
        h = self.harness(perConnection=2000)
        self.send(h, pattern(6000))
        h.client.readConnectionLost()
        self.assertIs(h.relay.state, State.KILLED)
        self.assertIs(h.relay._input.state, InputState.CLOSED)
        self.assertGreater(self.budget.inUse, 0)
        before = len(h.worker.stdin)
        h.worker.readsAll()
        self.assertEqual(len(h.worker.stdin), before)
        self.assertEqual(h.transport.producerState, "paused")
        h.reap()
        self.assertEqual(self.budget.inUse, 0)

    def test_readingWorkerIsFedWithTheClientPaused(self) -> None:
        """
        A worker that reads again is fed its spool with the client paused,
        so that a worker only slower than its client does not have all its
        input pass through the disk; the client's bytes go to it directly
        once the spool is empty.
        """
        h = self.harness()
        self.send(h, pattern(5000, 1))
        h.worker.readsAll()
        self.assertIs(h.relay._input.state, InputState.DRAINING)
        self.assertEqual(h.transport.producerState, "paused")
        self.drain(h)
        self.assertEqual(h.transport.producerState, "producing")
        spooled = h.record.bytesSpooled
        self.send(h, pattern(600, 2), 600)
        self.assertEqual(h.record.bytesSpooled, spooled)
        self.assertEqual(h.worker.stdin, pattern(5000, 1) + pattern(600, 2))

    def test_workerStopsWhileFed(self) -> None:
        """
        A worker that stops reading while it is fed its spool has its client
        read (and spooled) again after L{DRAIN_PATIENCE}, behind what arrived
        meanwhile, in order.
        """
        h = self.harness(perConnection=400_000)
        # More than one feed (64 KiB) spooled: the worker is fed part of it.
        first, late, second = pattern(200_000, 1), pattern(200, 2), pattern(3000, 3)
        self.send(h, first, 4096)
        h.worker.readsAll()
        self.assertIs(h.relay._input.state, InputState.DRAINING)
        # Still arriving from the transport's last read, behind the spool.
        h.client.dataReceived(late)
        h.clock.advance(DRAIN_PATIENCE)
        self.assertIs(h.relay._input.state, InputState.SPOOLING)
        self.assertEqual(h.transport.producerState, "producing")
        self.send(h, second)
        self.drain(h)
        self.assertEqual(h.worker.stdin, first + late + second)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class SettingsTests(SynchronousTestCase):
    """
    The spool's settings, as a library user gives them: checked like the
    command line's, naming the option.
    """

    def assertRefused(self, fragment: str, **settings: object) -> None:
        with self.assertRaises(InvalidSetting) as caught:
            Config(argv=("/bin/cat",), **settings)  # type: ignore[arg-type]
        self.assertIn(fragment, str(caught.exception))

    def test_sizes(self) -> None:
        self.assertRefused("--spool-max must be a size >= 0", spoolMax=-1)
        self.assertRefused("--spool-total must be at most 1024g", spoolTotal=1024**4 + 1)
        self.assertRefused("--spool-max must be a size", spoolMax=1.5)
        self.assertEqual(Config(argv=("/bin/cat",), spoolMax=0).spoolMax, 0)

    def test_directory(self) -> None:
        directory = tempfile.mkdtemp(prefix="closewatch-spool-test-")
        self.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "file")
        with open(path, "w"):
            pass
        self.addCleanup(os.unlink, path)
        self.assertRefused("--spool-dir is not a directory", spoolDir=path)
        self.assertRefused("--spool-dir is not a directory", spoolDir=os.path.join(path, "x"))
        self.assertEqual(Config(argv=("/bin/cat",), spoolDir=directory).spoolDir, directory)
        self.assertEqual(Config(argv=("/bin/cat",)).spoolDir, tempfile.gettempdir())
