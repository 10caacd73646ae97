"""
The kill path, end to end: the kill comes first, and what follows it (the
reason, the connection's close, the log line) is still right.
"""

from __future__ import annotations

import select
import socket
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import PID_WORKER, Server, readAll, reset, waitGone
from twisted_closewatch.closewatch import EpollCloseWatch

#: C{leave(sock, i)} half-closes when C{i % 3} is this.
HALF = 2


def leave(sock: socket.socket, i: int) -> str:
    """
    The C{i}th client leaves: with a FIN, a reset or a half-close, in
    turn.

    @return: the reason its end should be logged with.
    """
    if i % 3 == 1:
        reset(sock)
        return "client-reset"
    if i % 3 == HALF:
        sock.shutdown(socket.SHUT_WR)
    else:
        sock.close()
    return "client-closed"


class ReasonAfterKillTests(TestCase):
    """
    The reason is worked out after the kill, from the same evidence as
    before: every end is logged with the reason of its client's action.
    (Paused clients, which only the close watch sees go, are in
    L{tests.test_pressure.PausedTests}.)
    """

    def setUp(self) -> None:
        self.server = Server((), PID_WORKER)
        self.addCleanup(self.server.cleanup)

    def test_reasons(self) -> None:
        """
        FINs, resets and half-closes, alternating on one server (the close
        watch and Twisted's reader race for each): each logged with its own
        reason and a SIGKILL, and the half-closed client gets its EOF.
        """
        expected = {}
        for i in range(1, 13):
            sock, pid = self.server.connectWorker()
            expected[i] = leave(sock, i)
            waitGone([pid], 5)
            self.assertEOFIfHalfClosed(sock, i)
        self.assertEnds(expected)

    def assertEOFIfHalfClosed(self, sock: socket.socket, i: int) -> None:
        """
        The C{i}th client, if it half-closed, gets its EOF.
        """
        if i % 3 == HALF:
            self.assertEqual(readAll(sock, timeout=5), b"")
            sock.close()

    def assertEnds(self, expected: dict[int, str]) -> None:
        """
        Each connection's end is logged with its reason and a SIGKILL.
        """
        for i, reason in expected.items():
            end = self.server.endOf(i)
            self.assertEqual((i, end["reason"], end["exit_signal"]), (i, reason, 9))
            self.assertIsInstance(end["kill_latency_ms"], float)

    def test_burstOfCloses(self) -> None:
        """
        30 FINs, resets and half-closes in one loop: every worker is
        killed, every end is logged once with its reason and a SIGKILL,
        every half-closed client gets its EOF, and the slots are back (a
        new client is served).
        """
        conns = [self.server.connectWorker() for _ in range(30)]
        expected = {i: leave(sock, i) for i, (sock, _) in enumerate(conns, 1)}
        waitGone([pid for _, pid in conns], 10)
        for i, (sock, _) in enumerate(conns, 1):
            self.assertEOFIfHalfClosed(sock, i)
        self.assertEnds(expected)
        self.assertEqual(len(self.server.ends()), 30)
        sock, pid = self.server.connectWorker()
        sock.close()
        waitGone([pid], 5)


class EpollCloseWatchOrderTests(TestCase):
    """
    L{EpollCloseWatch} calls back (the relay kills) before its own
    C{epoll_ctl}.
    """

    def setUp(self) -> None:
        if not hasattr(select, "epoll"):
            raise SkipTest("epoll is Linux-only")
        reactor: Any = MemoryReactorClock()
        reactor.addReader = reactor.removeReader = lambda reader: None
        self.watch = EpollCloseWatch(reactor)
        self.addCleanup(self.watch.stop)
        self.calls: list[str] = []
        real, calls = self.watch._epoll, self.calls

        class Recording:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def modify(self, fd: int, mask: int) -> None:
                calls.append("modify")
                real.modify(fd, mask)

            def unregister(self, fd: int) -> None:
                calls.append("unregister")
                real.unregister(fd)

        self.watch._epoll = Recording()  # type: ignore[assignment]

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a, b

    def test_finCallbackFirst(self) -> None:
        ours, theirs = self.pair()
        self.watch.watch(ours.fileno(), lambda: self.calls.append("closed"), lambda: None)
        theirs.shutdown(socket.SHUT_WR)
        self.watch.poll()
        self.assertEqual(self.calls, ["closed", "modify"])
        self.watch.poll()
        self.assertEqual(self.calls, ["closed", "modify"])

    def test_burstKillsBeforeAnyModify(self) -> None:
        """
        Several FINs at once: every callback (every kill) runs before the
        first C{epoll_ctl}, and none is reported twice.
        """
        pairs = [self.pair() for _ in range(5)]
        for i, (ours, theirs) in enumerate(pairs):
            self.watch.watch(ours.fileno(), lambda i=i: self.calls.append(f"closed {i}"),
                             lambda: None)
            theirs.shutdown(socket.SHUT_WR)
        self.watch.poll()
        self.assertEqual(sorted(self.calls[:5]), [f"closed {i}" for i in range(5)])
        self.assertEqual(self.calls[5:], ["modify"] * 5)
        self.watch.poll()
        self.assertEqual(len(self.calls), 10)

    def test_finCallbackUnwatches(self) -> None:
        """
        A callback that unwatches its descriptor itself leaves nothing more
        to do.
        """
        ours, theirs = self.pair()

        def closed() -> None:
            self.calls.append("closed")
            self.watch.unwatch(ours.fileno())

        self.watch.watch(ours.fileno(), closed, lambda: None)
        theirs.shutdown(socket.SHUT_WR)
        self.watch.poll()
        self.assertEqual(self.calls, ["closed", "unregister"])
        self.assertEqual(len(self.watch), 0)

    def test_resetCallbackFirst(self) -> None:
        ours, theirs = self.pair()
        self.watch.watch(ours.fileno(), lambda: None, lambda: self.calls.append("reset"))
        # Hung up both ways: what the watch takes for a dead socket.
        theirs.close()
        ours.shutdown(socket.SHUT_WR)
        self.watch.poll()
        self.assertEqual(self.calls, ["reset", "unregister"])
        self.assertEqual(len(self.watch), 0)
