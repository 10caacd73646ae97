"""
Closing a connection without resetting it.

Closing a socket that still has unread input makes the kernel answer with a
reset instead of a FIN, and a reset throws away whatever output is still
queued for the client.  So a server that is done talking must send its FIN,
then read and drop what the client still sends until the client closes too,
or goes quiet with nothing left unread, or a time limit passes: Apache's
"lingering close".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport


class LingeringClose:
    """
    The lingering close of one connection.  Its protocol must pass on
    C{dataReceived} (L{inputReceived}), C{writeConnectionLost}
    (L{outputDone}), C{readConnectionLost} (L{inputDone}) and
    C{connectionLost} (L{stop}).

    @cvar quiet: seconds without input, after our FIN, that end the linger.
    """

    quiet = 0.5

    def __init__(
        self,
        transport: Any,
        clock: IReactorTime,
        limit: float,
        unread: Callable[[], int] = lambda: 0,
    ) -> None:
        """
        @param unread: how many bytes the client sent that were not read
            yet (its socket's C{FIONREAD}).
        """
        self._transport = transport
        self._clock = clock
        self._limit = limit
        self._unread = unread
        self._lastInput = clock.seconds()
        self._calls: list[IDelayedCall] = []
        self._close: Callable[[], None] = transport.loseConnection

    def start(self) -> None:
        """
        Send a FIN after the output still buffered.

        Twisted's TLS layer would pass C{loseWriteConnection} to the TCP
        transport under it (a bare FIN behind its back), so under TLS the
        end of output is a close_notify instead.  Twisted then waits for the
        client's own close_notify, which many clients never send: the same
        rule as after a FIN then closes the TCP connection beneath, and the
        time limit aborts it.
        """
        loseWriteConnection = getattr(self._transport, "loseWriteConnection", None)
        if ISSLTransport.providedBy(self._transport):
            self._transport.loseConnection()
            self._close = self._closeBeneath
            self._calls.append(
                self._clock.callLater(self._limit, self._transport.abortConnection)
            )
            self._checkQuiet()
            return
        if loseWriteConnection is None:
            self._transport.loseConnection()
            return
        loseWriteConnection()
        self._calls.append(self._clock.callLater(self._limit, self._transport.loseConnection))

    def _closeBeneath(self) -> None:
        """
        Close the transport at the bottom (TCP) under TLS and any wrapper,
        after what it still has to send (our close_notify).
        """
        transport = self._transport
        while getattr(transport, "transport", None) is not None:
            transport = transport.transport
        transport.loseConnection()

    def inputReceived(self) -> None:
        self._lastInput = self._clock.seconds()

    def inputDone(self) -> None:
        self._close()

    def outputDone(self) -> None:
        self._checkQuiet()

    def _checkQuiet(self) -> None:
        quietFor = self._clock.seconds() - self._lastInput
        if quietFor >= self.quiet and self._unread() == 0:
            self._close()
            return
        self._calls.append(
            self._clock.callLater(max(self.quiet - quietFor, 0.05), self._checkQuiet)
        )

    def stop(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
