"""
Splicing a client's bytes into its worker's stdin: the pipe's bound against
the kernel's own accounting (real pipes and a real loopback connection, no
process), the transport's read that splices, and the decision of when a
splice may happen, which the worker's input owns (a fake worker and clock).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.unit.fakes import FakeWorker, Harness
from twisted_closewatch import splice
from twisted_closewatch.client import ByteStreamClient
from twisted_closewatch.record import EndReason
from twisted_closewatch.splice import SplicedInput, SplicedOutput, SplicePipe, spliceable
from twisted_closewatch.spool import InputState, SpoolBudget
from twisted_closewatch.worker import IWorkerSink

KiB = 1024
MiB = 1024 * KiB


def requireSplice() -> None:
    if not splice.SPLICE:
        raise SkipTest("no splice(2) here (Linux and Python 3.10+ only)")


def makePipe(test: SynchronousTestCase, size: int = MiB) -> tuple[int, int]:
    """
    A non-blocking pipe of C{size} bytes, as a worker's stdin is made.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    test.addCleanup(os.close, r)
    test.addCleanup(os.close, w)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except OSError as e:
        raise SkipTest(f"cannot make a {size}-byte pipe here: {e}") from None
    return r, w


def queued(fd: int) -> int:
    return splice._queued(fd)


def loopback(test: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    """
    A connected pair of TCP sockets on loopback: the client's, and the
    server's (non-blocking, as a transport's).
    """
    listener = socket.create_server(("127.0.0.1", 0))
    test.addCleanup(listener.close)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    server.setblocking(False)
    test.addCleanup(client.close)
    test.addCleanup(server.close)
    return client, server


def waitQueued(sock: socket.socket, size: int) -> None:
    """
    Until the kernel has C{size} bytes queued for C{sock} to read (on
    loopback, at once: bounded by a count, not by time).
    """
    for _ in range(10_000):
        count = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
        if count >= size:
            return
    raise AssertionError(f"{count} of {size} bytes arrived")


class SplicePipeTests(SynchronousTestCase):
    """
    The pipe made fit for splicing, and the room a splice may fill.
    """

    def setUp(self) -> None:
        requireSplice()

    def test_halved(self) -> None:
        """
        A pipe of P bytes is shrunk to P/2 slots' worth, and a splice may
        fill P/2 less what it holds.
        """
        _r, w = makePipe(self)
        pipe = SplicePipe.halve(w)
        assert pipe is not None
        self.assertEqual(fcntl.fcntl(w, fcntl.F_GETPIPE_SZ), MiB // 2)
        self.assertEqual(pipe.limit, MiB // 2)
        self.assertEqual(pipe.room(), MiB // 2)
        os.write(w, b"x" * 10_000)
        self.assertEqual(pipe.room(), MiB // 2 - 10_000)

    def test_notEmpty(self) -> None:
        """
        A pipe that holds bytes is not spliced into, and left as it is: its
        slots might not fit in half.
        """
        _r, w = makePipe(self)
        os.write(w, b"x")
        self.assertIsNone(SplicePipe.halve(w))
        self.assertEqual(fcntl.fcntl(w, fcntl.F_GETPIPE_SZ), MiB)

    def test_onePage(self) -> None:
        """
        A pipe of one page cannot be halved.
        """
        _r, w = makePipe(self, 4096)
        if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) != 4096:
            raise SkipTest("pages are not 4 KiB here")
        self.assertIsNone(SplicePipe.halve(w))

    def fill(self, w: int, spliceRoom: Callable[[], int]) -> int:
        """
        What a stalled worker's pipe holds once a client has sent 4 MiB in
        64 KiB pieces: each spliced while C{spliceRoom} allows, then written
        while the pipe takes it (Twisted's writer, once splices stop).
        """
        client, server = loopback(self)
        piece = b"y" * (64 * KiB)
        for _ in range(64):
            client.sendall(piece)
            waitQueued(server, len(piece))
            room = spliceRoom()
            if room > 0:
                try:
                    os.splice(server.fileno(), w, min(room, len(piece)), flags=splice._FLAGS)
                except BlockingIOError:
                    pass
            try:
                while True:
                    data = server.recv(len(piece))
                    os.write(w, data)
            except BlockingIOError:
                pass
        return queued(w)

    def test_boundHolds(self) -> None:
        """
        However splices and writes mix, the halved pipe never holds more
        than the pipe did before it was halved.
        """
        _r, w = makePipe(self)
        pipe = SplicePipe.halve(w)
        assert pipe is not None
        self.assertLessEqual(self.fill(w, pipe.room), MiB)

    def test_boundInBytesAloneFails(self) -> None:
        """
        Why the pipe is halved: bounding splices by the full pipe's room in
        bytes, the writes that follow still find free slots, and the pipe
        holds more than its size (the kernel's behaviour this module is
        built around; were it to change, the halving could go).
        """
        _r, w = makePipe(self)

        def room() -> int:
            return MiB - queued(w)

        self.assertGreater(self.fill(w, room), MiB)


class FakeTransport:
    """
    The parts of a TCP transport L{SplicingRead} uses: its socket's
    descriptor and its own read, which reads as Twisted's does and keeps
    what it read.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.received = b""

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> Any:
        try:
            data = self.socket.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            return CONNECTION_LOST
        if not data:
            return CONNECTION_DONE
        self.received += data
        return None


class SplicingReadTests(SynchronousTestCase):
    """
    The client's read that splices, against a real connection and pipe.
    """

    def setUp(self) -> None:
        requireSplice()
        self.client, server = loopback(self)
        self.r, self.w = makePipe(self)
        self.transport = FakeTransport(server)
        self.moved: list[int] = []
        self.where: tuple[int, int] | None = (self.w, MiB // 2)
        SplicedInput(self.transport, lambda: self.where, self.moved.append).install()

    def read(self) -> Any:
        return self.transport.doRead()

    def send(self, data: bytes) -> None:
        self.client.sendall(data)
        waitQueued(self.transport.socket, len(data))

    def readUntilEnd(self) -> Any:
        for _ in range(10_000):
            result = self.read()
            if result is not None:
                return result
        self.fail("the connection did not end")

    def test_spliced(self) -> None:
        """
        The client's bytes go into the pipe, as many as were there, and
        the transport's own read is not called.
        """
        self.send(b"hello")
        self.assertIsNone(self.read())
        self.assertEqual(self.moved, [5])
        self.assertEqual(os.read(self.r, 100), b"hello")
        self.assertEqual(self.transport.received, b"")

    def test_atMostTheRoom(self) -> None:
        """
        A splice moves no more than its target allows.
        """
        self.where = (self.w, 3)
        self.send(b"hello")
        self.read()
        self.assertEqual(os.read(self.r, 100), b"hel")

    def test_noTarget(self) -> None:
        """
        Without a target, the transport reads as usual.
        """
        self.where = None
        self.send(b"hello")
        self.assertIsNone(self.read())
        self.assertEqual((self.transport.received, self.moved), (b"hello", []))

    def test_end(self) -> None:
        """
        The client's FIN is left to the transport's read, which ends the
        reading as without splicing.
        """
        self.client.shutdown(socket.SHUT_WR)
        self.assertIsInstance(self.readUntilEnd(), ConnectionDone)
        self.assertEqual(self.moved, [])

    def test_reset(self) -> None:
        """
        A reset, the same way, loses the connection.
        """
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.close()
        self.assertIsInstance(self.readUntilEnd(), ConnectionLost)

    def test_readerGone(self) -> None:
        """
        A pipe whose reader is gone (the worker closed its stdin) is left
        to Twisted's read, and the relay's path for it.
        """
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.addCleanup(os.close, w)
        os.close(r)
        self.where = (w, MiB // 2)
        self.send(b"x")
        self.assertIsNone(self.read())
        self.assertEqual((self.transport.received, self.moved), (b"x", []))

    def test_pipeFull(self) -> None:
        """
        A pipe whose slots are full is left to Twisted's read (and the
        writer's pacing, and the spool).
        """
        try:
            while True:
                os.write(self.w, b"z")
        except BlockingIOError:
            pass
        self.send(b"x")
        self.assertIsNone(self.read())
        self.assertEqual((self.transport.received, self.moved), (b"x", []))


class SpliceableTests(SynchronousTestCase):
    """
    Which transports are spliced: Twisted's own TCP transport over IP, on
    a system that splices.
    """

    def connection(self, sock: socket.socket) -> tcp.Connection:
        self.addCleanup(sock.close)
        return tcp.Connection(sock, Protocol(), MemoryReactor())

    def test_tcp(self) -> None:
        requireSplice()
        _, server = loopback(self)
        self.assertTrue(spliceable(self.connection(server)))

    def test_unix(self) -> None:
        """
        A unix socket's transport is a TCP one's subclass, and not spliced.
        """
        left, right = socket.socketpair()
        self.addCleanup(right.close)
        self.assertFalse(spliceable(self.connection(left)))

    def test_otherTransports(self) -> None:
        """
        Not a wrapper (TLS, a PROXY header's) or a test's transport.
        """
        _, server = loopback(self)
        self.assertFalse(spliceable(FakeTransport(server)))
        self.assertFalse(spliceable(object()))

    def test_noSplice(self) -> None:
        """
        Where C{os.splice} is missing (not Linux, Python before 3.10),
        nothing is spliced.
        """
        self.patch(splice, "SPLICE", False)
        _, server = loopback(self)
        self.assertFalse(spliceable(self.connection(server)))


class FakeReader:
    """
    The parts of a worker's stdout reader L{SplicingRead} uses: the pipe's
    descriptor and its own read, which keeps what it read and says the end.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.received = b""

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        if not data:
            return CONNECTION_DONE
        self.received += data
        return None


class SplicingOutputTests(SynchronousTestCase):
    """
    The worker's stdout read that splices into the client's socket.
    """

    def setUp(self) -> None:
        requireSplice()
        self.client, self.server = loopback(self)
        self.client.settimeout(10)
        self.r, self.w = makePipe(self)
        self.reader = FakeReader(self.r)
        self.moved: list[int] = []
        target = (self.server.fileno(), MiB)
        self.failures = 0
        SplicedOutput(self.reader, lambda: target, self.moved.append, self.failed).install()

    def failed(self) -> None:
        self.failures += 1

    def test_spliced(self) -> None:
        """
        The worker's output goes into the socket, in order, unread.
        """
        os.write(self.w, b"out")
        self.assertIsNone(self.reader.doRead())
        self.assertEqual((self.moved, self.reader.received), ([3], b""))
        self.assertEqual(self.client.recv(10), b"out")

    def test_socketFull(self) -> None:
        """
        A socket that takes no more leaves the output to the reader's own
        read: the relay writes it, and its flow control pauses the reader.
        """
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        block = b"o" * 65536
        try:
            while True:
                self.server.send(block)
        except BlockingIOError:
            pass
        os.write(self.w, b"more")
        self.assertIsNone(self.reader.doRead())
        self.assertEqual((self.moved, self.reader.received), ([], b"more"))

    def test_workerEnded(self) -> None:
        """
        The worker's end of its stdout is left to the reader's read.
        """
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.addCleanup(os.close, r)
        os.close(w)
        self.reader.fd = r
        self.assertIsInstance(self.reader.doRead(), ConnectionDone)
        self.assertEqual(self.failures, 0)

    def test_clientReset(self) -> None:
        """
        A client that reset its connection fails the splice, whose error
        is then gone from the socket: the relay is told at once, and the
        output stays in the pipe.
        """
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.close()
        os.write(self.w, b"out")
        for _ in range(10_000):
            self.reader.doRead()
            if self.failures:
                break
        self.assertEqual((self.failures, self.moved, queued(self.r)), (1, [], 3))


class SpliceableClient(ByteStreamClient):
    """
    A client that says it can be spliced from, and keeps what the relay
    gives it to splice with.
    """

    target: Callable[[], tuple[int, int] | None] | None = None
    spliced: Callable[[int], None]

    def spliceable(self) -> bool:
        return True

    def spliceInto(
        self, target: Callable[[], tuple[int, int] | None], spliced: Callable[[int], None]
    ) -> None:
        self.target = target
        self.spliced = spliced


class SplicingHarness(Harness):
    """
    A relay whose client can be spliced from and whose worker's stdin is a
    real pipe.
    """

    clientType: type[ByteStreamClient] = SpliceableClient

    def __init__(self, stdinFD: int, **kwargs: Any) -> None:
        self.stdinFD = stdinFD
        super().__init__(**kwargs)

    def makeWorker(self, sink: IWorkerSink) -> FakeWorker:
        worker = super().makeWorker(sink)
        worker.stdinFD = self.stdinFD
        return worker


class _PlainHarness(SplicingHarness):
    clientType = ByteStreamClient


class DecisionTests(SynchronousTestCase):
    """
    The worker's input decides when the client's bytes may be spliced:
    only when nothing waits before them, and within the pipe's bound.
    """

    def setUp(self) -> None:
        requireSplice()
        self.r, self.w = makePipe(self)
        self.directory = self.mktemp()
        os.mkdir(self.directory)

    def harness(
        self, spliceable: bool = True, spool: bool = True, **config: Any
    ) -> SplicingHarness:
        harnessType = SplicingHarness if spliceable else _PlainHarness
        budget = SpoolBudget(self.directory, 100_000, 1_000_000) if spool else None
        h = harnessType(self.w, spool=budget, readAhead=4096, pipe=1000, **config)
        self.addCleanup(h.relay._input.discard)
        return h

    def target(self, h: SplicingHarness) -> tuple[int, int] | None:
        client = h.client
        assert isinstance(client, SpliceableClient) and client.target is not None
        return client.target()

    def test_direct(self) -> None:
        """
        While the client's bytes go to the worker directly and its writer
        is idle, they may be spliced into its halved pipe, as many as the
        bound leaves room for.
        """
        h = self.harness()
        self.assertEqual(self.target(h), (self.w, MiB // 2))
        os.write(self.w, b"x" * 1000)
        self.assertEqual(self.target(h), (self.w, MiB // 2 - 1000))
        os.write(self.w, b"x" * (MiB // 2 - 1000))
        self.assertIsNone(self.target(h))

    def test_notSpliceable(self) -> None:
        """
        A client that cannot be spliced from (TLS, a unix socket, a PROXY
        header's wrapper, a WebSocket) leaves the pipe as it was made.
        """
        self.harness(spliceable=False)
        self.assertEqual(fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ), MiB)

    def test_notWithoutASpool(self) -> None:
        """
        Without a spool, the pipe is kept whole for a backlog (a spliced
        pipe holds less before the client is paused), and nothing is
        spliced into it.
        """
        h = self.harness(spool=False)
        client = h.client
        assert isinstance(client, SpliceableClient)
        self.assertIsNone(client.target)
        self.assertEqual(fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ), MiB)

    def test_writerBusy(self) -> None:
        """
        Bytes that Twisted's writer holds come first: no splice until it
        has written them.
        """
        h = self.harness()
        h.worker.writerIdle = False
        self.assertIsNone(self.target(h))
        h.worker.writerIdle = True
        self.assertIsNotNone(self.target(h))

    def test_notWhileSpooled(self) -> None:
        """
        While the client's bytes go to the spool, and while the spool is fed
        to the worker, what the client sends next waits behind it: no
        splice, until the spool is empty and the writer idle again.
        """
        h = self.harness()
        first, second = b"a" * 3000, b"b" * 3000
        h.client.dataReceived(first)
        h.client.dataReceived(second)
        self.assertIs(h.relay._input.state, InputState.SPOOLING)
        self.assertIsNone(self.target(h))
        h.worker.readsAll()
        self.assertIs(h.relay._input.state, InputState.DRAINING)
        self.assertIsNone(self.target(h))
        for _ in range(100):
            if h.relay._input.state is InputState.DIRECT:
                break
            h.worker.readsAll()
        self.assertIs(h.relay._input.state, InputState.DIRECT)
        self.assertIsNotNone(self.target(h))
        self.assertEqual(h.worker.stdin, first + second)

    def test_notWhileHeld(self) -> None:
        """
        Bytes held in memory (the spool full, the client paused) come
        before the client's next bytes.
        """
        h = self.harness()
        h.relay._input._held.append(b"held")
        self.assertIsNone(self.target(h))

    def test_notAfterTheEnd(self) -> None:
        """
        Once the worker is killed, or has closed its stdin, nothing goes to
        it any more.
        """
        h = self.harness()
        h.worker.stdinClosedByWorker()
        self.assertIsNone(self.target(h))
        h2 = self.harness()
        h2.relay.clientGone(EndReason.CLIENT_CLOSED)
        self.assertIsNone(self.target(h2))

    def test_counted(self) -> None:
        """
        Spliced bytes are the client's bytes in, and counted apart too.
        """
        h = self.harness()
        client = h.client
        assert isinstance(client, SpliceableClient)
        h.client.dataReceived(b"abc")
        client.spliced(1000)
        self.assertEqual((h.record.bytesIn, h.record.bytesSpliced), (1003, 1000))
