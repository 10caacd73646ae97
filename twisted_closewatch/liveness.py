"""
Telling a silent client from a live one, on the reactor's clock.

An idle timeout gives up on a client that sends nothing; a heartbeat makes
a silent worker's connection carry data, so that a dead client shows up as
a write error (and, with C{TCP_USER_TIMEOUT}, as unacknowledged data: see
L{twisted_closewatch.tcp}).

Twisted's C{TimeoutMixin} is not used: it resets on writes, so a server's
own heartbeats would keep a dead peer alive.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted_closewatch.client import IClient
from twisted_closewatch.config import Config
from twisted_closewatch.record import EndReason


class ConnectionLiveness:
    """
    The idle timeout and the heartbeat of one connection: a policy told what
    the connection does, which calls C{onDead} when the client is to be
    taken for gone.

    Both timers run on timestamps rather than being reset on every chunk:
    resetting a delayed call per read or write would cost a heap operation
    per chunk at full relay speed.
    """

    _idleCall: IDelayedCall | None = None
    _heartbeatCall: IDelayedCall | None = None

    def __init__(
        self,
        clock: IReactorTime,
        config: Config,
        client: IClient,
        onDead: Callable[[EndReason], None],
    ) -> None:
        self._clock = clock
        self._config = config
        self._client = client
        self._onDead = onDead
        self._lastRead = self._lastWrite = clock.seconds()
        self._running = False
        self._clientFinished = False

    def start(self) -> None:
        self._running = True
        self._lastRead = self._lastWrite = self._clock.seconds()
        self._startIdle()
        if self._config.heartbeat:
            self._heartbeatCall = self._clock.callLater(
                self._config.heartbeat, self._checkHeartbeat
            )

    def stop(self) -> None:
        """
        The connection is going: no more timeouts, no more heartbeats.
        """
        self._running = False
        for call in (self._idleCall, self._heartbeatCall):
            if call is not None and call.active():
                call.cancel()
        self._idleCall = self._heartbeatCall = None

    def clientSent(self) -> None:
        self._lastRead = self._clock.seconds()

    def clientWritten(self) -> None:
        self._lastWrite = self._clock.seconds()

    def clientFinished(self) -> None:
        """
        The client half-closed (and the worker gets the EOF): it has nothing
        more to send, so its silence from now on is no sign of death.
        """
        self._clientFinished = True
        self.paused()

    def paused(self) -> None:
        """
        The relay stopped reading the client: the silence is ours, not the
        client's, so the idle clock stops.
        """
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None

    def resumed(self) -> None:
        self._lastRead = self._clock.seconds()
        if self._idleCall is None:
            self._startIdle()

    def _startIdle(self) -> None:
        if self._running and self._config.idleTimeout and not self._clientFinished:
            self._idleCall = self._clock.callLater(self._config.idleTimeout, self._checkIdle)

    def _checkIdle(self) -> None:
        remaining = self._lastRead + self._config.idleTimeout - self._clock.seconds()
        if remaining > 0:
            self._idleCall = self._clock.callLater(remaining, self._checkIdle)
            return
        self._idleCall = None
        self._onDead(EndReason.IDLE_TIMEOUT)

    def _checkHeartbeat(self) -> None:
        now = self._clock.seconds()
        if self._client.outputPaused():
            # The client is not taking what was written: the connection is
            # not silent (the kernel retransmits or probes it, and the user
            # timeout applies), and a heartbeat would only grow the buffer.
            self._lastWrite = now
        remaining = self._lastWrite + self._config.heartbeat - now
        if remaining <= 0:
            self._client.write(self._config.heartbeatData)
            self._lastWrite = now
            remaining = self._config.heartbeat
        self._heartbeatCall = self._clock.callLater(remaining, self._checkHeartbeat)


class KernelIdleTimeout:
    """
    The idle timeout of a connection whose bytes the server never sees
    (C{--direct}): the kernel's time since the client last sent data
    (C{tcpi_last_data_recv}) says how long it has been silent.

    A check that finds the client's data still unread in the socket starts
    the period again: the silence may then be the worker's, which is not
    reading, as time a relay keeps its client paused does not count.  The
    timer runs on the reactor's clock; a connection whose socket cannot
    tell (not TCP) has none.
    """

    #: The soonest a check is repeated: the kernel's clock moves in jiffies.
    recheck = 0.01

    _call: IDelayedCall | None = None

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        silence: Callable[[], float | None],
        unread: Callable[[], int],
        onIdle: Callable[[EndReason], None],
    ) -> None:
        """
        @param silence: seconds since the client last sent data, or C{None}
            if the socket cannot tell (or the client will send no more):
            the timer then stops.
        @param unread: bytes the client sent that were not read yet.
        """
        self._clock = clock
        self._timeout = timeout
        self._silence = silence
        self._unread = unread
        self._onIdle = onIdle
        self._busy = clock.seconds()

    def start(self) -> None:
        if self._timeout:
            self._busy = self._clock.seconds()
            self._call = self._clock.callLater(self._timeout, self._check)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        silence = self._silence()
        if silence is None:
            return
        now = self._clock.seconds()
        if self._unread():
            self._busy = now
        remaining = self._timeout - min(silence, now - self._busy)
        if remaining <= 0:
            self._onIdle(EndReason.IDLE_TIMEOUT)
            return
        self._call = self._clock.callLater(max(remaining, self.recheck), self._check)
