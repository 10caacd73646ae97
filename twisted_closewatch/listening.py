"""
Listening on an endpoint as a service that can bind before it starts.

twistd calls the plugin's C{makeService} before it daemonizes (and before
it sheds privileges): a port bound there is inherited by the daemon, and a
port that cannot be bound is reported on the user's terminal, as one line,
with the exit status set.  A port that fails only when the service starts
is reported after the fork, as a traceback in the log and a truncated line
from twistd's status pipe.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory

from twisted_closewatch import _compat


class CannotListen(Exception):
    """
    An endpoint could not be listened on; the message is one line naming
    the endpoint and the reason.
    """


class Listener(StreamServerEndpointService):
    """
    Serves a factory on an endpoint, from L{bind} on if that was called
    before the service started, or else from C{privilegedStartService}.

    @ivar description: how the endpoint is named in errors, as the user
        wrote it (C{--listen 'tcp:8787'}).
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: Factory[Any], description: str
    ) -> None:
        super().__init__(endpoint, factory)
        _compat.raiseListenErrors(self)
        self.description = description

    def bind(self) -> None:
        """
        Listen now, unless this listener is listening already.

        @raise CannotListen: the endpoint refused at once.
        """
        if _compat.listening(self):
            return
        try:
            super().privilegedStartService()
        except Exception as e:
            _compat.forgetListening(self)
            raise CannotListen(f"{self.description}: cannot listen: {describeError(e)}") from e

    def privilegedStartService(self) -> None:
        self.bind()


def describeError(error: BaseException) -> str:
    """
    The reason in C{error}, on one line and without a traceback's words:
    the system's message for an C{OSError} (the path or port is in the
    endpoint's name already).
    """
    reason: Any = error
    if isinstance(error, CannotListenError) and error.socketError is not None:
        reason = error.socketError
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return " ".join(str(reason).split()) or type(reason).__name__
