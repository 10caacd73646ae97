"""
Seeing a client go away while the relay is not reading its socket.

When a worker stops reading its stdin, the relay pauses the client transport
to keep memory bounded; the reactor then stops polling that socket, and a FIN
or RST would go unnoticed until reading resumes.  A close watch keeps an eye
on client sockets for exactly those events, without consuming their data.

On Linux, L{EpollCloseWatch} holds one C{epoll} object for the whole server
with every client socket registered for C{EPOLLRDHUP} only (not C{EPOLLIN}:
queued data must not wake it); the epoll descriptor itself is a reactor
reader.  This is how PostgreSQL's C{client_connection_check_interval} and
nginx see a vanished client.  Watching every socket, not only paused ones,
also lets the server kill first and tidy up later: L{ICloseWatch.poll} is
called before each piece of teardown work, so when a thousand clients leave
at once no kill waits behind the teardown of those that left before it.

Elsewhere, L{PollingCloseWatch} checks the sockets every
L{PollingCloseWatch.interval} seconds with C{poll()} and sees resets and
hang-ups only (no C{POLLRDHUP}): a FIN behind queued data is seen when
reading resumes.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorFDSet, IReactorTime, IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger()

#: Called with no argument: the peer sent a FIN (a close or a half-close).
OnClosed = Callable[[], None]
#: Called with no argument: the connection is dead (RST, timeout, error).
OnReset = Callable[[], None]


class ICloseWatch(Interface):
    """
    Watches sockets the reactor is not reading for their peer's departure.
    """

    def watch(fd: int, onClosed: OnClosed, onReset: OnReset) -> None:
        """
        Start watching C{fd}.  After C{onClosed} has been called the watch
        stays in place for C{onReset} only: after a FIN, only a reset is news.
        """

    def unwatch(fd: int) -> None:
        """
        Stop watching C{fd}; a no-op if it is not watched.  Must be called
        before C{fd} is closed.
        """

    def poll() -> None:
        """
        Report every departure that has happened by now, at once.
        """

    def stop() -> None:
        """
        Release the watch's own resources.
        """


_RDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
_DEAD = getattr(select, "EPOLLHUP", 0x10) | getattr(select, "EPOLLERR", 0x8)


@implementer(ICloseWatch, IReadDescriptor)
class EpollCloseWatch:
    """
    One C{epoll} set of client sockets, itself read by the reactor.
    """

    def __init__(self, reactor: IReactorFDSet) -> None:
        self._reactor = reactor
        self._epoll = select.epoll()
        self._callbacks: dict[int, tuple[OnClosed, OnReset]] = {}
        reactor.addReader(self)

    def __len__(self) -> int:
        return len(self._callbacks)

    def watch(self, fd: int, onClosed: OnClosed, onReset: OnReset) -> None:
        self._epoll.register(fd, _RDHUP)
        self._callbacks[fd] = (onClosed, onReset)

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def fileno(self) -> int:
        return self._epoll.fileno()

    def doRead(self) -> None:
        self.poll()

    def poll(self) -> None:
        while self._callbacks:
            ready = self._epoll.poll(0, 1024)
            closed = []
            for fd, events in ready:
                callbacks = self._callbacks.get(fd)
                if callbacks is None:
                    continue
                onClosed, onReset = callbacks
                # The callback first: it kills the worker, and no bookkeeping
                # of ours (an epoll_ctl each) may delay that.  It usually
                # unwatches the descriptor itself; the descriptor is closed
                # only on a later reactor iteration, so C{fd} cannot have been
                # reused by then.
                if events & _DEAD:
                    onReset()
                    if self._callbacks.get(fd) is callbacks:
                        self.unwatch(fd)
                elif events & _RDHUP:
                    onClosed()
                    closed.append((fd, callbacks))
            # After every callback of the batch (every kill), and before the
            # next poll: level-triggered, the registration is kept for a later
            # reset only, or these FINs would be reported every time.
            for fd, callbacks in closed:
                if self._callbacks.get(fd) is callbacks:
                    self._epoll.modify(fd, 0)
            if len(ready) < 1024:
                return

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "closewatch-epoll"

    def stop(self) -> None:
        self._reactor.removeReader(self)
        self._callbacks.clear()
        self._epoll.close()


@implementer(ICloseWatch)
class PollingCloseWatch:
    """
    The portable fallback: C{poll()} the watched sockets on a timer.
    """

    interval = 0.1

    def __init__(self, reactor: IReactorTime) -> None:
        self._callbacks: dict[int, tuple[OnClosed, OnReset]] = {}
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor

    def __len__(self) -> int:
        return len(self._callbacks)

    def watch(self, fd: int, onClosed: OnClosed, onReset: OnReset) -> None:
        self._callbacks[fd] = (onClosed, onReset)
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def unwatch(self, fd: int) -> None:
        self._callbacks.pop(fd, None)
        if not self._callbacks and self._loop.running:
            self._loop.stop()

    def poll(self) -> None:
        self._check()

    def _check(self) -> None:
        poller = select.poll()
        for fd in self._callbacks:
            poller.register(fd, 0)
        for fd, events in poller.poll(0):
            callbacks = self._callbacks.get(fd)
            if callbacks is not None and events & (select.POLLHUP | select.POLLERR):
                callbacks[1]()  # the kill first, as in EpollCloseWatch.poll
                if self._callbacks.get(fd) is callbacks:
                    self.unwatch(fd)

    def stop(self) -> None:
        self._callbacks.clear()
        if self._loop.running:
            self._loop.stop()


def makeCloseWatch(reactor: Any) -> ICloseWatch:
    """
    The best close watch this platform has.
    """
    if hasattr(select, "epoll"):
        return EpollCloseWatch(reactor)
    return PollingCloseWatch(reactor)
