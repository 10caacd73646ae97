"""
closewatch as a Twisted service: start the guardian and the spawner,
listen on endpoints, and on stop, kill every worker, wait until all are
reaped, and let the spawner and the guardian go.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint

from twisted_closewatch._compat import clearExitSignal
from twisted_closewatch.factory import CloseWatchFactory
from twisted_closewatch.guardian import Guardian
from twisted_closewatch.listening import Listener
from twisted_closewatch.record import EndReason
from twisted_closewatch.spawner import Spawner, available
from twisted_closewatch.stopsignals import STOP_SIGNALS, StopSignals


class CloseWatchService(MultiService):
    """
    Serves C{factory} on every endpoint in C{endpoints}, with a guardian
    that kills the workers if the server process dies.

    @param descriptions: how each endpoint is named in errors, as the user
        wrote it (C{--listen 'tcp:8787'}); by default its C{repr}.
    """

    def __init__(
        self,
        factory: CloseWatchFactory,
        endpoints: Iterable[IStreamServerEndpoint],
        descriptions: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        self.factory = factory
        endpoints = list(endpoints)
        descriptions = descriptions or map(repr, endpoints)
        for endpoint, description in zip(endpoints, descriptions, strict=True):
            Listener(endpoint, factory, description).setServiceParent(self)
        self.guardian = Guardian(factory.reactor)
        self.spawner: Spawner | None = None
        config = factory.config
        if config.pythonWorker is not None or available():
            self.spawner = Spawner(
                factory.reactor, config.pythonWorker, config.containment, self.guardian
            )

    def bind(self) -> None:
        """
        Listen on every endpoint now, before the service starts; twistd's
        C{makeService} does it before daemonizing (see
        L{twisted_closewatch.listening}).

        @raise twisted_closewatch.listening.CannotListen: an endpoint refused.
        """
        for child in self:
            if isinstance(child, Listener):
                child.bind()

    def startService(self) -> None:
        """
        Start the guardian, then the spawner, before any connection is
        served: no worker may run without them.

        @raise SpawnerError: the spawner cannot start.
        """
        self.guardian.start()
        self.factory.guardian = self.guardian
        # Once the reactor runs, after it has installed its own handlers.
        self.factory.reactor.callWhenRunning(StopSignals(self.factory.reactor).install)
        if self.spawner is not None:
            # SpawnerError if it cannot, which is rare: the options have
            # checked the Python worker's import already.
            self.spawner.start()
            self.factory.spawner = self.spawner
        super().startService()

    def stopService(self) -> Deferred[Any]:
        """
        Stop listening first, so that no new worker starts, then kill the
        workers that are running.
        """
        d: Deferred[Any] = super().stopService()
        d.addCallback(lambda _: self.factory.stopWorkers(EndReason.SERVER_STOPPING))
        if self.spawner is not None:
            d.addCallback(lambda _: self.spawner.stop() if self.spawner else None)
        d.addCallback(lambda _: self.guardian.stop())
        d.addCallback(self._stoppedCleanly)
        return d

    def _stoppedCleanly(self, result: None) -> None:
        """
        Every worker is reaped: a stop asked for with a signal has
        succeeded.  twistd would otherwise re-raise the signal to exit with
        it, which init systems and scripts read as a failure.
        """
        clearExitSignal(self.factory.reactor, STOP_SIGNALS)
