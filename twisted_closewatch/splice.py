"""
A plain TCP client's bytes and its worker's output moved by the kernel,
with C{splice(2)} (Linux, Python 3.10+), instead of through Python: the
client's socket into the worker's stdin pipe, the worker's stdout pipe into
the client's socket.

Both directions, because together they win where each alone barely does
(C{closewatch_bench.py}'s throughput test, C{cat} 256 MiB each way at once,
one alternating run; see C{bench/README.md}): 782 MB/s and 0.44 ms of
server CPU per MiB with both, against 402 MB/s and 1.05 ms copying, 401
MB/s splicing the input alone and 494 MB/s the output alone.  The pages
move between socket and pipe without a copy to user space and back, and
without a Python call per chunk; with one direction still copied, the
server's CPU is what the worker waits for, and its stalls send the input
through the spool.

Nothing here decides I{when} to splice: that is for whoever knows what
waits before the next bytes (the worker's input,
L{twisted_closewatch.spool.SpooledInput}, for the client's bytes; the relay
and its client's transport for the worker's output).  Here:

    - L{SplicePipe}: the worker's stdin pipe made fit for splicing, and
      the most one splice may move into it now (the bound: see there).
    - L{SplicedInput}, L{SplicedOutput}: the C{doRead} of the client's TCP
      transport and of the worker's stdout, which splice when their target
      says so and are the descriptor's own read otherwise, so flow control,
      the spool and the close watch see nothing new.

Where C{os.splice} or the pipe-size C{fcntl}s are missing (not Linux,
Python before 3.10), L{SPLICE} is false and nothing is spliced.
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import socket
import termios
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.main import CONNECTION_LOST

_F_GETPIPE_SZ: int | None = getattr(fcntl, "F_GETPIPE_SZ", None)
_F_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)

#: Whether this system can splice a socket into a pipe and bound it.
SPLICE = hasattr(os, "splice") and _F_GETPIPE_SZ is not None and _F_SETPIPE_SZ is not None

#: Non-blocking on the pipe too (the socket already is), and pages moved
#: rather than copied where the kernel can.
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


def spliceable(transport: Any) -> bool:
    """
    Whether C{transport} is a TCP connection that carries the worker's
    input and output as they are: Twisted's own TCP transport (not TLS,
    not a PROXY header's or another wrapper, which are other classes), over
    IPv4 or IPv6 (not a unix socket, whose transport is a TCP one's
    subclass), on a system that splices.
    """
    sock = getattr(transport, "socket", None)
    return (
        SPLICE
        and isinstance(transport, tcp.Connection)
        and sock is not None
        and sock.family in (socket.AF_INET, socket.AF_INET6)
    )


def _queued(fd: int) -> int:
    """
    The bytes in pipe C{fd}, spliced and written alike (C{FIONREAD}).
    """
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count, True)
    return count[0]


class SplicePipe:
    """
    A worker's stdin pipe with spliced bytes in it, never holding more than
    the pipe as it was made.

    A pipe counts its capacity in page-sized slots (C{F_GETPIPE_SZ} is
    slots times the page size), and a pipe is full when its slots are, not
    its bytes.  A C{write} puts at most a page in a slot: it fills the last
    written slot up to a page, then takes new ones.  A splice from a socket
    puts one of the socket's buffers in a slot, as large as it is (up to 64
    KiB on loopback), and never shares it with a write.  So a pipe of N
    slots holds N pages of written bytes, but up to 16 times that spliced:
    a splice bounded by slots alone let a 1 MiB pipe take a 16 MiB backlog.

    The bound, exact whatever the mix: the pipe of C{P} bytes (N slots) is
    shrunk to C{P/2} (N/2 slots), and a splice moves at most C{P/2} less
    the bytes in the pipe (C{FIONREAD}, spliced and written together).
    Spliced bytes enter only by a splice, after which the pipe holds at
    most C{P/2} bytes, and only leave it after: at most C{P/2} of them are
    ever in the pipe.  Written bytes take at most a page per slot of N/2:
    at most C{P/2}.  Together, at most C{P}, what the pipe held before,
    and so the relay's bound (the pipe, plus the read-ahead in memory) is
    kept: C{tests/test_pressure.py}.  Bounding splices by C{P - FIONREAD}
    in the full pipe was not enough: the writes that follow a pipe full in
    bytes still find free slots, and a stalled worker's pipe held up to
    twice its size.

    @ivar fd: the pipe's write end.
    @ivar limit: the most bytes the pipe may hold after a splice (C{P/2}).
    """

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit

    @classmethod
    def halve(cls, fd: int) -> SplicePipe | None:
        """
        Shrink the empty pipe C{fd} to half its slots, for splicing.

        @return: the pipe, or C{None} if it cannot be spliced into within
            its bound: it holds bytes already, or is one page, or the system
            refused (the pipe is left as it was).
        """
        assert _F_GETPIPE_SZ is not None and _F_SETPIPE_SZ is not None
        try:
            if _queued(fd):
                return None
            size = fcntl.fcntl(fd, _F_GETPIPE_SZ)
            half = size // 2
            if half < mmap.PAGESIZE:
                return None
            # Rounded by the kernel to a power of two of pages: P was one,
            # so P/2 is taken as it is; checked all the same.
            if fcntl.fcntl(fd, _F_SETPIPE_SZ, half) != half:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
                return None
        except OSError:
            return None
        return cls(fd, half)

    def room(self) -> int:
        """
        The most the next splice may move: C{P/2} less what the pipe holds.

        @raise OSError: the pipe is gone.
        """
        return self.limit - _queued(self.fd)


#: Where to splice now and how much at most, or C{None} to read as usual.
SpliceTarget = Callable[[], "tuple[int, int] | None"]


class SplicingRead:
    """
    The C{doRead} of a descriptor Twisted reads: it splices into what its
    target gives, and is the descriptor's own read when the target gives
    nothing, or when a splice moves nothing (the source at its end, or
    empty, or the target full): that read sees the end as it would without
    splicing, and bytes it reads take the copying path and its flow control
    (a full target pauses the source there).  An error is the subclass's to
    handle: which end it belongs to depends on the direction.

    @param source: the descriptor whose C{doRead} is taken over.
    @param target: gives the descriptor to splice into and the most to
        move, or C{None} to read as usual.
    @param spliced: told how many bytes each splice moved.
    """

    def __init__(
        self,
        source: Any,
        target: SpliceTarget,
        spliced: Callable[[int], None],
    ) -> None:
        self._source = source
        self._read = source.doRead
        self._target = target
        self._spliced = spliced

    def install(self) -> None:
        """
        Take over the source's reads: the reactor calls its C{doRead}.
        """
        self._source.doRead = self.doRead

    def doRead(self) -> ConnectionLost | ConnectionDone | None:
        where = self._target()
        if where is None:
            return self._read()
        into, size = where
        try:
            moved = os.splice(self._source.fileno(), into, size, flags=_FLAGS)
        except BlockingIOError:
            moved = 0
        except OSError as e:
            return self._failed(e)
        if not moved:
            return self._read()
        self._spliced(moved)
        return None

    def _failed(self, error: OSError) -> ConnectionLost | ConnectionDone | None:
        raise NotImplementedError()


class SplicedInput(SplicingRead):
    """
    A client's TCP transport read into its worker's stdin pipe.
    """

    def _failed(self, error: OSError) -> ConnectionLost | ConnectionDone | None:
        """
        The pipe's reader is gone (C{EPIPE}: the worker closed its stdin):
        Twisted's read, and the relay's path for it.  Else the socket's
        error, which the splice has consumed: the connection is lost, as
        Twisted's read returns it for an error.
        """
        if error.errno == errno.EPIPE:
            return self._read()
        return CONNECTION_LOST


class SplicedOutput(SplicingRead):
    """
    A worker's stdout read into its client's TCP socket.

    @param failed: called when the socket fails (reset, or closed): the
        splice has consumed its error, so the client's transport may never
        see it, and the relay is told at once.
    """

    def __init__(
        self,
        source: Any,
        target: SpliceTarget,
        spliced: Callable[[int], None],
        failed: Callable[[], None],
    ) -> None:
        super().__init__(source, target, spliced)
        self._socketFailed = failed

    def _failed(self, error: OSError) -> None:
        self._socketFailed()
        return None
