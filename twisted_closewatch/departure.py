"""
How a client leaves, as its socket tells: one client socket in the close
watch, and the end reason read from it.

Twisted reports every socket error as a plain C{ConnectionLost}, and may
already have consumed the pending error; the reason is read from
closewatch's own duplicate of the socket (L{tcp.SocketProbe}) instead.
Transports without a socket (a test's, a future one) have no probe: their
FIN is C{client-closed} and their loss C{client-reset}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import error
from twisted.python.failure import Failure

from twisted_closewatch.closewatch import ICloseWatch
from twisted_closewatch.config import Config
from twisted_closewatch.record import EndReason
from twisted_closewatch.tcp import SocketProbe


class ClientDeparture:
    """
    A client's socket, configured for C{config} (keepalive, user timeout)
    and, from L{watch} to L{close}, watched by C{closeWatch}.

    @param onGone: called when the watch sees the client leave, with a way
        to tell the reason (to be used after the kill).
    @param readsItsClose: whether the client's own protocol is reading and
        telling its close apart now (TLS, not paused).
    """

    def __init__(
        self,
        probe: SocketProbe | None,
        config: Config,
        closeWatch: ICloseWatch,
        onGone: Callable[[Callable[[], EndReason]], None],
        readsItsClose: Callable[[], bool],
    ) -> None:
        self._probe = probe
        self._config = config
        self._closeWatch = closeWatch
        self._onGone = onGone
        self._readsItsClose = readsItsClose
        if probe is not None:
            probe.configure(config)

    def watch(self) -> None:
        if self._probe is not None:
            self._closeWatch.watch(self._probe.fileno(), self._closeSeen, self._resetSeen)

    def _closeSeen(self) -> None:
        """
        The close watch saw a FIN, possibly behind data not read yet.  Under
        C{forward} it is delivered in order, after that data, by the
        client.  A client that tells a clean close from a truncation (TLS)
        is left to tell it while it is being read.
        """
        if self._config.halfClose != "forward" and not self._readsItsClose():
            self._onGone(lambda: EndReason.CLIENT_CLOSED)

    def _resetSeen(self) -> None:
        """
        The close watch saw a reset or a timeout, which the socket's pending
        error still names (the client has not read it yet).
        """
        self._onGone(self.deathReason)

    def unwatch(self) -> None:
        if self._probe is not None:
            self._closeWatch.unwatch(self._probe.fileno())

    def close(self) -> None:
        """
        The connection is closed: stop watching, and let the socket go.
        """
        if self._probe is not None:
            self.unwatch()
            self._probe.close()
            self._probe = None

    def finReason(self) -> EndReason:
        """
        Why the client's input ended: a FIN, or a reset seen as one.
        """
        if self._probe is None:
            return EndReason.CLIENT_CLOSED
        return self._probe.finReason()

    def deathReason(self) -> EndReason:
        """
        Why the connection died: a reset, keepalive or the user timeout.
        """
        if self._probe is None:
            return EndReason.CLIENT_RESET
        return self._probe.lossReason(self._config)

    def lossReason(self, reason: Failure) -> EndReason:
        """
        Why the connection was lost, C{reason} being what Twisted says.
        """
        if reason.check(error.ConnectionDone):
            return EndReason.CLIENT_CLOSED
        return self.deathReason()
