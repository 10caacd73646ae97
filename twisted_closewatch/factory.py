"""
The factory a server listens with: one L{WorkerRelay} and one worker per
connection.  This is the library entry point::

    from twisted.internet import endpoints, reactor
    from twisted_closewatch.config import Config
    from twisted_closewatch.factory import CloseWatchFactory

    factory = CloseWatchFactory(Config(argv=("/bin/cat",)))
    endpoints.serverFromString(reactor, "tcp:8787").listen(factory)
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from twisted_closewatch import spawn
from twisted_closewatch.closewatch import ICloseWatch, makeCloseWatch
from twisted_closewatch.config import Config
from twisted_closewatch.relay import WorkerProcessProtocol, WorkerRelay

log = Logger()


def ucspiEnvironment(host: Any, peer: Any) -> dict[str, str]:
    """
    The variables tcpserver, s6 and inetd-style servers give a worker about
    its connection.  TCP (v4 and v6) gets C{PROTO=TCP} and the C{TCP*}
    addresses; other transports get C{PROTO} only, named after the address
    type (C{UNIX} for a unix socket).
    """
    if getattr(peer, "type", None) in ("TCP", "TCP6"):
        return {
            "PROTO": "TCP",
            "TCPREMOTEIP": peer.host,
            "TCPREMOTEPORT": str(peer.port),
            "TCPLOCALIP": getattr(host, "host", ""),
            "TCPLOCALPORT": str(getattr(host, "port", "")),
        }
    name = type(peer).__name__.removesuffix("Address").upper() or "UNKNOWN"
    return {"PROTO": name}


class CloseWatchFactory(Factory):
    """
    Spawns a worker for every connection and kills it when the client goes.

    @ivar relays: the connections alive now.
    """

    def __init__(self, config: Config, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = config
        self.relays: set[WorkerRelay] = set()
        self._ids = itertools.count(1)
        self._closeWatch: ICloseWatch | None = None
        self._allEnded: list[defer.Deferred[None]] = []

    @property
    def closeWatch(self) -> ICloseWatch:
        if self._closeWatch is None:
            self._closeWatch = makeCloseWatch(self.reactor)
        return self._closeWatch

    def startFactory(self) -> None:
        spawn.closeOnExecSweep()

    def stopFactory(self) -> None:
        if self._closeWatch is not None and not self.relays:
            self._closeWatch.stop()
            self._closeWatch = None

    def buildProtocol(self, addr: Any) -> WorkerRelay:
        relay = WorkerRelay(self, next(self._ids))
        self.relays.add(relay)
        return relay

    def workerEnvironment(self, relay: WorkerRelay) -> Mapping[str, str]:
        transport = relay.transport
        env = dict(os.environ)
        env.update(ucspiEnvironment(transport.getHost(), transport.getPeer()))
        env["CLOSEWATCH_CONNECTION_ID"] = str(relay.record.connectionID)
        env.update(self.config.env)
        return env

    def spawnWorker(self, relay: WorkerRelay) -> spawn.WorkerProcess:
        """
        Start the worker for C{relay}.

        @raise OSError: it could not be started.
        """
        return spawn.spawnWorker(
            self.reactor,
            WorkerProcessProtocol(relay),
            self.config.argv,
            self.workerEnvironment(relay),
            self.config.pipeSize,
        )

    def killWorker(self, worker: spawn.WorkerProcess) -> None:
        """
        Kill C{worker}'s whole process group.
        """
        try:
            worker.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def connectionEnded(self, relay: WorkerRelay) -> None:
        """
        Both sides of C{relay} are done: log its end, forget it.
        """
        self.relays.discard(relay)
        record = relay.record
        log.info(
            "[{connection_id}] {peer} ended: {reason}, worker {pid} "
            "{exit_description}, {bytes_in} bytes in, {bytes_out} bytes out, "
            "{duration:.3f} s",
            connection_id=record.connectionID,
            peer=record.peer,
            pid=record.pid,
            reason=record.reason,
            exit_code=record.exitCode,
            exit_signal=record.exitSignal,
            exit_description=_exitDescription(record.exitCode, record.exitSignal),
            duration=_since(record.started),
            bytes_in=record.bytesIn,
            bytes_out=record.bytesOut,
            kill_latency_ms=record.killLatencyMS,
            stderr_dropped=record.stderrDropped,
        )
        if not self.relays:
            waiting, self._allEnded = self._allEnded, []
            for d in waiting:
                d.callback(None)

    def stopWorkers(self, reason: str = "server-stopping") -> defer.Deferred[None]:
        """
        Kill every worker and drop every connection.

        @return: fires once every worker has been reaped.
        """
        for relay in list(self.relays):
            relay.clientGone(reason)
        if not self.relays:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._allEnded.append(d)
        return d


def _since(started: float) -> float:
    return time.monotonic() - started


def _exitDescription(code: int | None, signal: int | None) -> str:
    if signal is not None:
        return f"killed by signal {signal}"
    if code is not None:
        return f"exited with status {code}"
    return "never started"
