"""
Spooling: what a client sends while its worker is not reading goes on to
disk, so that the client is still read and its close still seen.

Without a spool, a worker that stops reading pauses its client once the
read-ahead is full; the client's kernel then holds the rest, and a FIN sent
behind it waits in the client's own send queue, where no server can see it.
With one, the client is read on into a per-connection file (as nginx
spools request bodies beyond its memory buffer), up to C{--spool-max} per
connection and C{--spool-total} for the server; only past those, or when
the disk refuses, is the client paused as before.

L{SpooledInput} is the worker's stdin as the relay writes it: the producer
the stdin pipe paces, which sends the client's bytes to the worker while it
reads, holds the read-ahead in memory, sends what is past it to the spool
while the worker does not read, and feeds the worker from the spool, in
order, as its stdin drains (the client paused meanwhile: a worker that
reads, only slower than its client, gets its input through memory, as
without a spool; see L{InputState}).  Once a connection spools, its
read-ahead goes to the spool too: a stalled connection holds one piece in
memory, the one its stdin's writer is writing, not its read-ahead.
L{SpoolFile} is one connection's file, a ring in an unlinked file;
L{SpoolBudget}, owned by the factory, is what all the connections' files
may take together.

The file I/O is synchronous, on the reactor: C{pwrite}s of a client's read
(at most 1 MiB) and C{pread}s of 64 KiB against a file the page cache
holds, and a C{ftruncate} when a spool is emptied (see C{bench/README.md},
"Spooling", for what each costs).
"""

from __future__ import annotations

import enum
import errno
import os
import tempfile
from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twisted_closewatch.client import IClient
from twisted_closewatch.config import Config
from twisted_closewatch.pacing import Pacing
from twisted_closewatch.record import ConnectionRecord
from twisted_closewatch.splice import SplicePipe
from twisted_closewatch.worker import IWorker

log = Logger()

#: The most read from a spool file at once, to feed the worker.
FEED_SIZE = 64 * 1024

#: Seconds a worker being fed its spool may take no more before its client
#: is read (and spooled) again.
DRAIN_PATIENCE = 0.05

#: The most read from a client at once while its bytes go to the spool, and
#: no more than its spool has room for: reads larger than the relay's own (a
#: quarter of the read-ahead) reach a FIN behind a backlog about three times
#: sooner (see C{bench/README.md}), and hold nothing in memory but the read.
SPOOL_READ_SIZE = 1024 * 1024

#: What C{open(O_TMPFILE)} fails with where the file system does not support it.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})


def openUnlinked(directory: str) -> int:
    """
    A new file in C{directory} that has no name, so that nothing is left of
    it once it is closed, whatever kills the process: C{O_TMPFILE} (Linux
    3.11+, on most local file systems), else a C{mkstemp} file unlinked at
    once.  The descriptor is close-on-exec: no worker inherits it.

    @raise OSError: it cannot be made.
    """
    flags = getattr(os, "O_TMPFILE", 0)
    if flags:
        try:
            return os.open(directory, flags | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
    fd, path = tempfile.mkstemp(prefix="closewatch-spool-", dir=directory)
    os.unlink(path)
    return fd


def budgetFor(config: Config) -> SpoolBudget | None:
    """
    The spool budget of a server with C{config}, or C{None} if it does not
    spool (C{--spool-max 0} or C{--spool-total 0}, or C{--direct}: no byte
    passes through the server).
    """
    if config.direct or not (config.spoolMax and config.spoolTotal):
        return None
    return SpoolBudget(config.spoolDir, config.spoolMax, config.spoolTotal)


class SpoolBudget:
    """
    What the spool files of one server may hold on disk together, and how
    they are made.

    A file is charged for its length, not for its unread bytes: what a
    ring-shaped file has written stays on disk until it is emptied and
    truncated.

    @ivar inUse: bytes charged now (the spool space in use).
    @ivar spooled: bytes ever written to a spool file.
    """

    def __init__(
        self, directory: str, perConnection: int, total: int, readSize: int = SPOOL_READ_SIZE
    ) -> None:
        """
        @param directory: where the files are made.
        @param perConnection: the most one connection's spool holds.
        @param total: the most all of them hold together.
        @param readSize: the most read from a client at once while it is
            spooled.
        """
        self.directory = directory
        self.perConnection = perConnection
        self.total = total
        self.readSize = readSize
        self.inUse = 0
        self.spooled = 0

    def reserve(self, size: int) -> int:
        """
        Charge up to C{size} bytes, as many as the total allows.

        @return: how many were charged.
        """
        granted = max(min(size, self.total - self.inUse), 0)
        self.inUse += granted
        return granted

    def release(self, size: int) -> None:
        self.inUse -= size

    def open(self) -> SpoolFile:
        """
        A new, empty spool file.

        @raise OSError: it cannot be made.
        """
        return SpoolFile(openUnlinked(self.directory), self)


class SpoolFile:
    """
    One connection's spool: a ring of at most C{budget.perConnection} bytes
    in an unlinked file, read in the order it was written.

    @ivar size: bytes written and not read yet.
    @ivar error: the error that stopped the last L{append}, if one did.
    """

    def __init__(self, fd: int, budget: SpoolBudget) -> None:
        self._fd = fd
        self._budget = budget
        self._capacity = budget.perConnection
        self._head = 0
        self._length = 0
        self.size = 0
        self.error: OSError | None = None

    def append(self, data: bytes) -> int:
        """
        Write as much of C{data} as the limits and the disk take.

        @return: how many bytes of C{data} were taken, from its start; if
            fewer than all because of an error, L{error} says which.
        """
        self.error = None
        view = memoryview(data)[: self._capacity - self.size]
        taken = 0
        while taken < len(view):
            tail = (self._head + self.size) % self._capacity
            piece = view[taken : taken + self._capacity - tail]
            growth = tail + len(piece) - self._length
            if growth > 0:
                # Charged before it is written, so never less than the file
                # holds (more, until it is emptied, if the write fails).
                granted = self._budget.reserve(growth)
                self._length += granted
                piece = piece[: len(piece) - growth + granted]
                if not piece:
                    break
            try:
                written = os.pwrite(self._fd, piece, tail)
            except OSError as e:
                self.error = e
                break
            taken += written
            self.size += written
        self._budget.spooled += taken
        return taken

    def room(self) -> int:
        """
        How much L{append} takes now: up to the ring's end as far as the
        file may grow within the server's budget, then, once that end is
        reached, the ring's start up to the oldest byte not read yet.  Not
        the space the file is charged for less what it holds: while the
        budget keeps the file short of the ring's end, what was read at
        its start cannot be written again (until the spool is emptied).
        """
        tail = (self._head + self.size) % self._capacity
        if self.size and tail <= self._head:
            # Around the ring's end already: up to the oldest byte.
            return self._head - tail
        free = max(self._budget.total - self._budget.inUse, 0)
        end = min(self._capacity, self._length + free)
        room = end - tail
        if end == self._capacity:
            room += self._head
        return min(room, self._capacity - self.size)

    def read(self, size: int) -> bytes:
        """
        Up to C{size} of the oldest bytes not read yet.

        @raise OSError: the file cannot be read (they are lost).
        """
        size = min(size, self.size, self._capacity - self._head)
        data = os.pread(self._fd, size, self._head)
        if len(data) != size:
            raise OSError(errno.EIO, "spool file shorter than written")
        self._head = (self._head + size) % self._capacity
        self.size -= size
        return data

    def empty(self) -> None:
        """
        Forget what it holds and give its space back (the ring starts over).
        """
        self._head = self.size = 0
        if self._length:
            self._budget.release(self._length)
            self._length = 0
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass

    def close(self) -> None:
        self.empty()
        os.close(self._fd)


class InputState(enum.Enum):
    """
    Where the client's bytes go now.
    """

    #: To the worker's stdin, or, while it has not passed on the last piece
    #: it was given, to memory behind it, up to the read-ahead: the spool is
    #: empty.
    DIRECT = "direct"
    #: To the spool: the worker does not read (more than the read-ahead
    #: waited for its stdin, or it stopped while fed its spool).
    SPOOLING = "spooling"
    #: The worker reads again: the client is paused while the worker is fed
    #: the spool, so that a worker that is only slower than its client does
    #: not have everything pass through the disk.  Back to L{SPOOLING} if
    #: the worker stops for L{DRAIN_PATIENCE}.
    DRAINING = "draining"
    #: The client is paused: the read-ahead is full and the spool cannot
    #: take more (a limit, the disk, or no spool); what it still sends
    #: waits in memory.
    PAUSED = "paused"
    #: Nowhere: the worker closed its stdin, or the connection is over.
    CLOSED = "closed"


@implementer(IPushProducer)
class SpooledInput:
    """
    The worker's stdin as the relay writes it, and the producer that stdin
    paces (Twisted's process transport has no C{stopProducing} of its own
    to pass on, so this sits between it and the client): bytes go to the
    worker, or, while it does not read, to the spool, and from the spool to
    the worker as its stdin drains, in order.

    The stdin's writer pauses this producer as soon as it holds bytes its
    pipe has not taken (see L{twisted_closewatch.worker.WorkerHandle}), and
    is given the next piece when it has passed that one on: what waits
    meanwhile is held here, in memory, so that it can go on to the spool.
    Past the read-ahead (the writer's piece, what waits, and the read that
    crosses the line), what waits goes to the spool, in order, and so does
    what follows; without a budget (spooling off), the client is paused.

    @param failed: called if spooled bytes cannot be read back: they are
        lost, and the connection cannot go on.
    @param readSize: the most read from the client at once when its bytes
        are not spooled (L{SpoolBudget.readSize} when they are).
    @param readAhead: the most held in memory for the worker.
    """

    state = InputState.DIRECT
    _spool: SpoolFile | None = None
    _pipe: SplicePipe | None = None
    _patience: IDelayedCall | None = None
    _errorLogged = False
    _eofPending = False

    def __init__(
        self,
        worker: IWorker,
        client: IClient,
        pacing: Pacing,
        record: ConnectionRecord,
        budget: SpoolBudget | None,
        clock: IReactorTime,
        failed: Callable[[], None],
        readSize: int,
        readAhead: int,
    ) -> None:
        self._worker = worker
        self._clock = clock
        self._client = client
        self._readSize = readSize
        self._pacing = pacing
        self._record = record
        self._budget = budget
        self._failed = failed
        self._stdinReady = True
        #: Bytes waiting for the worker's stdin in memory, in order, behind
        #: the spool: the read-ahead, and what the spool did not take.
        self._held: deque[bytes] = deque()
        self._heldSize = 0
        #: Past this much waiting, the worker is taken to have stopped
        #: reading: the writer's piece and the read that crosses it are the
        #: rest of the read-ahead.
        self._heldLimit = readAhead - 2 * readSize
        worker.paceInput(self)

    def write(self, data: bytes) -> None:
        """
        The client sent C{data} for the worker.
        """
        state = self.state
        if state is InputState.DIRECT and self._stdinReady:
            self._worker.write(data)
        elif state is InputState.SPOOLING:
            self._spoolOrHold(data)
        elif state is not InputState.CLOSED:
            self._hold(data)
            if state is InputState.DIRECT and self._heldSize > self._heldLimit:
                if self._budget is None:
                    self._pause()
                else:
                    self._spoolAgain()

    def spliceFrom(self, spliced: Callable[[int], None]) -> None:
        """
        If the client can be spliced from, and the worker's stdin pipe made
        fit for it (L{SplicePipe}: its bound), let the client's bytes go
        into the pipe by the kernel whenever nothing waits before them
        (L{_spliceTarget}), telling C{spliced} how many.  Before the first
        byte: the pipe is halved while it is empty.

        Only with a spool: a pipe fit for splicing holds between half and
        all of its size before its worker's input is paused (as large as
        the client's segments make its spliced slots), and without a spool
        the pipe and the read-ahead are all a backlog has before the client
        is paused and a FIN behind the rest waits unseen in the client's
        own send queue.  With one, the spool takes what the pipe does not.
        """
        if self._budget is None or not self._client.spliceable():
            return
        fd = self._worker.idleStdin()
        if fd is not None:
            self._pipe = SplicePipe.halve(fd)
        if self._pipe is not None:
            self._client.spliceInto(self._spliceTarget, spliced)

    def _spliceTarget(self) -> tuple[int, int] | None:
        """
        Whether the client's next bytes may go into the worker's pipe by a
        splice now, and how many at most: only if they would come next there,
        nothing waiting before them anywhere (the spool is empty and not
        being fed, L{InputState.DIRECT}; nothing is held in memory; the
        stdin's writer holds nothing not yet in the pipe, and is open, so
        that the descriptor is still this pipe's), and the pipe has room
        within its bound.  Otherwise they are read and written as usual.
        """
        pipe = self._pipe
        if (
            pipe is None
            or self.state is not InputState.DIRECT
            or self._held
            or self._worker.idleStdin() != pipe.fd
        ):
            return None
        room = pipe.room()
        return (pipe.fd, room) if room > 0 else None

    def closeStdin(self) -> None:
        """
        End the worker's input, once it has been given what is held and
        spooled, and its stdin's writer has passed it all on: a writer
        told to close while it holds a piece resumes its paused producer
        once the piece is written, and never closes.
        """
        if self.state is InputState.DIRECT and self._stdinReady:
            self._worker.closeStdin()
        elif self.state is not InputState.CLOSED:
            self._eofPending = True

    def stop(self) -> None:
        """
        Nothing more goes to the worker: drop what is held, and neither
        feed the worker nor read the client again.  Cheap: the spool file
        is given back by L{discard}, later (its truncation takes about a
        millisecond per 10 MiB).
        """
        self.state = InputState.CLOSED
        self._held.clear()
        self._heldSize = 0
        self._bePatient(False)

    def discard(self) -> None:
        """
        L{stop}, and give the spool file back.
        """
        self.stop()
        if self._spool is not None:
            spool, self._spool = self._spool, None
            spool.close()

    # IPushProducer, for the worker's stdin.

    def pauseProducing(self) -> None:
        """
        The worker's stdin holds bytes its pipe has not taken yet.
        """
        self._stdinReady = False
        if self.state is InputState.DRAINING:
            self._bePatient(True)

    def resumeProducing(self) -> None:
        """
        The worker's stdin has passed on all it was given: give it what is
        spooled, then what is held, a piece at a time, the client paused
        meanwhile if anything was spooled, and once both are empty take the
        client's bytes directly again.
        """
        self._stdinReady = True
        self._bePatient(False)
        if self.state is InputState.SPOOLING:
            if self._spool is None or not self._spool.size:
                # A pause too short to have spooled anything.
                self._drained()
                return
            self.state = InputState.DRAINING
            self._pacing.pauseClient()
        while self._stdinReady and self.state is not InputState.CLOSED:
            spool = self._spool
            if spool is not None and spool.size:
                try:
                    chunk = spool.read(FEED_SIZE)
                except OSError as e:
                    self._readFailed(e)
                    return
                self._worker.write(chunk)
            elif self._held:
                self._worker.write(self._unhold())
            else:
                if self.state is not InputState.DIRECT or self._eofPending:
                    self._drained()
                return

    def stopProducing(self) -> None:
        """
        The worker closed its stdin: what the client sends from now on is
        dropped, and the client is read again so that its close is seen.
        """
        self.discard()
        self._pacing.resumeClient()

    # Internals.

    def _spoolAgain(self) -> None:
        """
        The worker is not reading: what the client sends goes to the spool,
        behind what was held while the spool was being fed.
        """
        draining = self.state is InputState.DRAINING
        self.state = InputState.SPOOLING
        held, self._held, self._heldSize = self._held, deque(), 0
        while held and self.state is InputState.SPOOLING:
            self._spoolOrHold(held.popleft())
        for data in held:
            self._hold(data)
        if self.state is InputState.SPOOLING:
            self._readForSpool()
            if draining:
                self._pacing.resumeClient()

    def _bePatient(self, waiting: bool) -> None:
        """
        Start or stop waiting for a worker being fed its spool to read again.
        """
        if self._patience is not None and self._patience.active():
            self._patience.cancel()
        self._patience = None
        if waiting:
            self._patience = self._clock.callLater(DRAIN_PATIENCE, self._spoolAgain)

    def _spoolOrHold(self, data: bytes) -> None:
        taken = 0
        spool = self._spool
        if spool is None:
            spool = self._open()
        if spool is not None:
            taken = spool.append(data)
            self._record.bytesSpooled += taken
            if spool.error is not None:
                self._logError("cannot write to the spool", spool.error)
        if taken < len(data):
            self._hold(data[taken:])
            self._pause()
        else:
            self._readForSpool()

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._heldSize += len(data)

    def _unhold(self) -> bytes:
        """
        The next piece for the worker's stdin: the oldest held bytes, and
        those behind them up to one of the relay's reads, together (a
        WebSocket client's messages come many to a read, and the writer is
        given one piece a turn).
        """
        held = self._held
        data = held.popleft()
        if held and len(data) + len(held[0]) <= self._readSize:
            pieces = [data]
            size = len(data)
            while held and size + len(held[0]) <= self._readSize:
                pieces.append(held.popleft())
                size += len(pieces[-1])
            data = b"".join(pieces)
        self._heldSize -= len(data)
        return data

    def _readForSpool(self) -> None:
        """
        Read the client in pieces as large as the spool takes, so that what
        a limit leaves over to hold in memory is one of the relay's own reads.
        """
        assert self._budget is not None
        size = self._budget.readSize
        if self._spool is not None:
            size = min(size, self._spool.room())
        self._client.setReadSize(max(size, self._readSize))

    def _open(self) -> SpoolFile | None:
        assert self._budget is not None
        try:
            self._spool = self._budget.open()
        except OSError as e:
            self._logError("cannot make a spool file", e)
        return self._spool

    def _pause(self) -> None:
        self.state = InputState.PAUSED
        self._pacing.pauseClient()

    def _drained(self) -> None:
        """
        Spool and memory are empty, the worker's stdin is not full.
        """
        if self._spool is not None:
            self._spool.empty()
        if self.state is InputState.PAUSED or self.state is InputState.DRAINING:
            self._pacing.resumeClient()
        self._client.setReadSize(self._readSize)
        self.state = InputState.DIRECT
        if self._eofPending:
            self._eofPending = False
            self._worker.closeStdin()

    def _logError(self, what: str, error: OSError) -> None:
        """
        Once per connection: the client is paused instead, and the spool is
        tried again the next time it is needed.
        """
        if not self._errorLogged:
            self._errorLogged = True
            log.warn(
                "[{connection_id}] {what} in {spool_dir}: {error}; the client is paused",
                connection_id=self._record.connectionID,
                what=what,
                spool_dir=self._budget.directory if self._budget else None,
                error=error.strerror or str(error),
                errno=error.errno,
            )

    def _readFailed(self, error: OSError) -> None:
        log.error(
            "[{connection_id}] cannot read the spool back: {error}; the connection is ended",
            connection_id=self._record.connectionID,
            error=error.strerror or str(error),
            errno=error.errno,
        )
        self.discard()
        self._failed()
