"""
The server's side of a helper process (the guardian, the spawner): started
with the server, replaced if it dies, and let go when the server stops.

A helper's only way out is the end of what ties it to the server (a pipe,
a socket): L{Helper.stop} closes it, waits for the helper's exit and kills
it if it takes longer than C{stopTimeout}.  A helper that ends while the
server is not stopping is reported to L{Helper.helperLost}, which says what
it cost and replaces it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: Seconds before a helper that could not be started is tried again.
RETRY_DELAY = 1.0


class HelperProtocol(ProcessProtocol):
    """
    A helper process of the server: its end, with its pid, goes to C{ended}.
    """

    def __init__(self, ended: Callable[[int, Failure], None]) -> None:
        self._ended = ended
        self._pid: int | None = None

    def connectionMade(self) -> None:
        self._pid = getattr(self.transport, "pid", None)

    def processEnded(self, reason: Failure) -> None:
        self._ended(self._pid or 0, reason)


def helperCommand(module: str, *args: str) -> list[str]:
    """
    The command line of a helper process whose code is C{module} (a file):
    isolated (C{-I -S}), so that no C{PYTHON*} variable and no site
    directory changes it and it starts small.
    """
    return [sys.executable, "-I", "-S", module, *args]


class Helper:
    """
    A helper process, from the server's side.

    Subclasses say how it starts (L{start}, which calls L{spawnHelper}), how
    its tie to the server is cut (L{hangUp}), what is left to do once it
    has exited after a stop (L{helperStopped}) and what its unexpected end
    costs (L{helperLost}).

    @cvar name: what the logs call it.
    @cvar stopTimeout: seconds it has to exit once its tie is cut.
    @cvar startErrors: what L{start} raises when it cannot start.
    """

    name = "helper"
    stopTimeout = 10.0
    startErrors: tuple[type[Exception], ...] = (OSError,)

    _process: Any = None
    _stopCall: IDelayedCall | None = None
    _retryCall: IDelayedCall | None = None

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stopping = False
        self._stopped: list[defer.Deferred[None]] = []

    @property
    def pid(self) -> int | None:
        """
        The helper's pid while it runs.
        """
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """
        Start the helper.

        @raise OSError: it could not be started.
        """
        raise NotImplementedError()

    def spawnHelper(
        self,
        argv: Sequence[str],
        childFDs: Mapping[int, int],
        environment: Mapping[str, str] | None = None,
    ) -> None:
        """
        Start C{argv} as the helper, with C{environment} (by default the
        server's).

        @raise OSError: it could not be started.
        """
        self._process = self._reactor.spawnProcess(
            HelperProtocol(self._helperEnded),
            argv[0],
            list(argv),
            env=dict(os.environ if environment is None else environment),
            childFDs=dict(childFDs),
        )

    def hangUp(self) -> None:
        """
        Cut the helper's tie to the server (and forget it): it exits.
        """
        raise NotImplementedError()

    def helperStopped(self) -> None:
        """
        The helper has exited after L{stop}.
        """

    def helperLost(self, pid: int, reason: Failure) -> None:
        """
        The helper ended while the server was not stopping: replace it.
        """
        raise NotImplementedError()

    def stop(self) -> defer.Deferred[None]:
        """
        Cut the helper's tie: it does what it must when the server is gone
        (nothing is left to do after a clean stop) and exits.

        @return: fires once it has exited.
        """
        self._stopping = True
        if self._retryCall is not None and self._retryCall.active():
            self._retryCall.cancel()
        if self._process is None:
            return defer.succeed(None)
        self.hangUp()
        self._stopCall = self._reactor.callLater(
            self.stopTimeout, self._process.signalProcess, "KILL"
        )
        d: defer.Deferred[None] = defer.Deferred()
        self._stopped.append(d)
        return d

    def restart(self) -> None:
        """
        Start a new helper now or, if it cannot start, every L{RETRY_DELAY}
        seconds until one does, unless the server stops.
        """
        try:
            self.start()
        except self.startErrors as e:
            log.error("cannot start the {helper}: {error}", helper=self.name, error=e)
            self._retryCall = self._reactor.callLater(RETRY_DELAY, self.restart)

    def _helperEnded(self, pid: int, reason: Failure) -> None:
        self._process = None
        self.hangUp()
        if not self._stopping:
            self.helperLost(pid, reason)
            return
        if self._stopCall is not None and self._stopCall.active():
            self._stopCall.cancel()
        self.helperStopped()
        waiting, self._stopped = self._stopped, []
        for d in waiting:
            d.callback(None)
