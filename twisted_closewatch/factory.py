"""
The factory a server listens with: admission, then one L{Relay} and one
worker per connection.

A library user serves it through
L{twisted_closewatch.service.CloseWatchService}, which also starts the
guardian that kills the workers if the process dies (a factory listened
with directly has none, so a C{kill -9} of the process would leave its
workers running)::

    from twisted.internet import endpoints, reactor
    from twisted_closewatch.config import Config
    from twisted_closewatch.factory import CloseWatchFactory
    from twisted_closewatch.service import CloseWatchService

    factory = CloseWatchFactory(Config(argv=("/bin/cat",)))
    endpoint = endpoints.serverFromString(reactor, "tcp:8787:interface=127.0.0.1")
    service = CloseWatchService(factory, [endpoint])
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()

A bad setting raises L{twisted_closewatch.config.InvalidSetting} from
L{Config} itself, naming the option it corresponds to.

The factory makes each relay with what it needs (the config, the reactor as
its clock, the close watch, a worker starter) and hears back from it once,
when the connection has ended: it logs and counts from that record.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel

from twisted_closewatch import access, limits, spawn, spool
from twisted_closewatch.addresses import clientIP, describe
from twisted_closewatch.aftermath import Aftermath
from twisted_closewatch.client import ByteStreamClient, IClient, IClientEvents
from twisted_closewatch.closewatch import ICloseWatch, makeCloseWatch
from twisted_closewatch.config import Config
from twisted_closewatch.direct import DirectConnection
from twisted_closewatch.record import ConnectionRecord, EndReason
from twisted_closewatch.relay import Relay, SpawnFailed, connect
from twisted_closewatch.worker import IWorkerSink, ProcessStarter, WorkerHandle

if TYPE_CHECKING:
    from twisted_closewatch.guardian import Guardian
    from twisted_closewatch.metrics import ServerMetrics
    from twisted_closewatch.spawner import Spawner

log = Logger()


class CloseWatchFactory(Factory):
    """
    Spawns a worker for every connection and kills it when the client goes.

    Admission happens in two steps, which the front doors (L{handshake},
    L{proxy}) call separately and L{buildProtocol} together: L{screen}, the
    moment the client's address is known (at TCP accept, or once a PROXY
    header has named it), and L{connectionReady} once the connection is
    ready for a worker (at once, or once its TLS handshake is done).

    @ivar connections: the connections alive now.
    @ivar limits: the slots admitted connections hold, and the places at
        the front doors.
    @ivar access: the address rules and rate limit new clients are screened
        by.
    @ivar workers: how a connection's worker is started.
    @ivar metrics: where accepts, spawns and ends are counted, if anywhere.
    @ivar aftermath: where the work that follows the kills waits.
    @ivar spool: what the connections' spool files may hold together, if
        they spool.
    @ivar guardian: what kills the workers if the server dies, if anything
        (L{twisted_closewatch.service.CloseWatchService} sets it).
    @ivar spawner: what starts the workers, if not the server itself
        (L{twisted_closewatch.service.CloseWatchService} sets it).
    """

    guardian: Guardian | None = None
    spawner: Spawner | None = None

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        metrics: ServerMetrics | None = None,
        *,
        closeWatch: ICloseWatch | None = None,
        spawnProcess: Callable[..., Any] = spawn.spawnWorker,
    ) -> None:
        """
        @param closeWatch: the close watch; by default the best this
            platform has, made when first needed.
        @param spawnProcess: starts a worker process, with the signature of
            L{spawn.spawnWorker}.
        """
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = config
        self.metrics = metrics
        self.connections = LiveConnections()
        self.limits = limits.Limits(config.maxWorkers, config.maxPerPeer, config.maxHandshakes)
        self.access = access.AccessPolicy(config, reactor)
        self._ids = itertools.count(1)
        self._closeWatch = closeWatch
        self.aftermath = Aftermath(reactor, self._killFirst)
        self.spool = spool.budgetFor(config)
        if metrics is not None and self.spool is not None:
            metrics.watchSpool(self.spool)
        self.workers = ProcessStarter(
            reactor,
            config,
            lambda: self.guardian,
            self._killFirst,
            spawnProcess,
            spawner=lambda: self.spawner,
        )

    @property
    def closeWatch(self) -> ICloseWatch:
        if self._closeWatch is None:
            self._closeWatch = makeCloseWatch(self.reactor)
        return self._closeWatch

    def _killFirst(self) -> None:
        """
        Kill whoever has left by now, before the teardown work of an end.
        """
        self.closeWatch.poll()

    def startFactory(self) -> None:
        spawn.closeOnExecSweep()
        spawn.raiseFileLimit()

    def stopFactory(self) -> None:
        if self._closeWatch is not None and not self.connections:
            self._closeWatch.stop()
            self._closeWatch = None

    def buildProtocol(self, addr: Any) -> Protocol:
        """
        The protocol for a connection from C{addr} (the original client's
        address behind the PROXY protocol) that is ready for a worker: a
        client of a relay, or a protocol that closes it if it is refused.
        """
        return self.screen(addr) or self.connectionReady(addr)

    def screen(self, addr: Any) -> Protocol | None:
        """
        Count a new client at C{addr} and apply the address rules and rate
        limit to it.

        @return: C{None} if it may go on, else a protocol that closes its
            connection at once.
        """
        if self.metrics is not None:
            self.metrics.accepted()
        reason = self.access.refusal(addr)
        if reason is None:
            return None
        self.refused(addr, reason)
        return limits.Rejection()

    def connectionReady(self, addr: Any) -> Protocol:
        """
        A client for a screened connection from C{addr}, whose relay takes a
        slot and starts a worker as it is connected, or a L{limits.Refusal}
        if a limit is reached.
        """
        try:
            connect = self.admit(addr)
        except limits.Refused:
            return limits.Refusal(self.config.busyMessage, self.reactor)
        return ByteStreamClient(connect, self.reactor)

    def admit(self, addr: Any) -> Callable[[IClient], IClientEvents]:
        """
        Take a slot for a client at C{addr}: what makes its relay (and
        starts its worker) once its L{IClient} is connected.  The WebSocket
        front door (L{twisted_closewatch.web}) calls this at the upgrade.

        @raise limits.Refused: a limit is reached (the refusal is logged
            and counted).
        """
        try:
            slot = self.limits.admit(addr)
        except limits.Refused as refused:
            self.refused(addr, refused.reason)
            raise
        return partial(self._connect, slot, next(self._ids))

    def refused(self, addr: Any, reason: str, detail: str | None = None) -> None:
        """
        Log and count a connection from C{addr} refused a worker for
        C{reason}; a C{detail} (what was wrong with what the client sent)
        makes the line a warning.
        """
        _logRefusal(addr, reason, detail)
        if self.metrics is not None:
            self.metrics.refused(reason)

    def _connect(self, slot: limits.Slot, connectionID: int, client: IClient) -> IClientEvents:
        record = ConnectionRecord(connectionID, describe(client.peer))
        ended = partial(self._ended, slot)
        arguments = (
            client,
            record,
            self.config,
            self.reactor,
            self.closeWatch,
            partial(self._startWorker, slot, client, record),
            ended,
        )

        def makeOwner() -> Relay | DirectConnection:
            if self.config.direct:
                return DirectConnection(*arguments)
            return Relay(*arguments, self.aftermath, self.spool)

        connection = connect(client, record, ended, makeOwner)
        self.connections.add(connectionID, connection)
        return connection

    def _startWorker(
        self,
        slot: limits.Slot,
        client: IClient,
        record: ConnectionRecord,
        sink: IWorkerSink,
        stdio: int | None = None,
    ) -> WorkerHandle:
        """
        Start the worker of a connection (given C{stdio}, the client's
        socket, as its stdin and stdout); its slot is given back once it is
        reaped, while its last output may still be on its way.

        @raise OSError: it could not be started.
        """
        started = time.perf_counter()
        worker = self.workers.start(sink, client, record, partial(self._reaped, slot), stdio)
        if self.metrics is not None:
            self.metrics.spawned(time.perf_counter() - started)
        return worker

    def _reaped(self, slot: limits.Slot) -> None:
        slot.release()
        if self.metrics is not None:
            self.metrics.reaped()

    def _ended(self, slot: limits.Slot, record: ConnectionRecord) -> None:
        """
        A connection has ended: log its end, count it, give its slot back if
        its worker did not (it never started), forget it.
        """
        # Logging is the dearest part of an end.
        self._killFirst()
        slot.release()
        _logEnd(record)
        if self.metrics is not None:
            self.metrics.ended(record)
        self.connections.remove(record.connectionID)

    def stopWorkers(self, reason: EndReason = EndReason.SERVER_STOPPING) -> defer.Deferred[None]:
        """
        Kill every worker and drop every connection.

        @return: fires once every worker has been reaped.
        """
        return self.connections.stop(reason)


class LiveConnections:
    """
    The connections alive now, by connection id, and who waits for none to
    be.
    """

    def __init__(self) -> None:
        self._connections: dict[int, Relay | DirectConnection | SpawnFailed] = {}
        self._allEnded: list[defer.Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._connections)

    def add(self, connectionID: int, connection: Relay | DirectConnection | SpawnFailed) -> None:
        self._connections[connectionID] = connection

    def remove(self, connectionID: int) -> None:
        self._connections.pop(connectionID, None)
        if not self._connections:
            waiting, self._allEnded = self._allEnded, []
            for d in waiting:
                d.callback(None)

    def stop(self, reason: EndReason) -> defer.Deferred[None]:
        """
        Tell every connection its client must go.

        @return: fires once none is left.
        """
        for connection in list(self._connections.values()):
            connection.clientGone(reason)
        if not self._connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._allEnded.append(d)
        return d


def _logEnd(record: ConnectionRecord) -> None:
    """
    The one event that says how a connection went.
    """
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
        exit_description=record.exitDescription(),
        duration=record.duration(),
        bytes_in=record.bytesIn,
        bytes_out=record.bytesOut,
        bytes_spooled=record.bytesSpooled,
        bytes_spliced=record.bytesSpliced,
        bytes_spliced_out=record.bytesSplicedOut,
        kill_latency_ms=record.killLatencyMS,
        stderr_dropped=record.stderrDropped,
    )


def _logRefusal(addr: Any, reason: str, detail: str | None) -> None:
    log.emit(
        LogLevel.info if detail is None else LogLevel.warn,
        "refused {peer}: {reason}" + ("" if detail is None else " ({detail})"),
        peer=str(clientIP(addr) or describe(addr)),
        reason=reason,
        detail=detail,
        refused=True,
    )
