"""
The factory a server listens with: one L{WorkerRelay} and one worker per
connection.

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
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel

from twisted_closewatch import access, limits, spawn
from twisted_closewatch.closewatch import ICloseWatch, makeCloseWatch
from twisted_closewatch.config import Config
from twisted_closewatch.relay import WorkerProcessProtocol, WorkerRelay, describeAddress

if TYPE_CHECKING:
    from twisted_closewatch.guardian import Guardian
    from twisted_closewatch.metrics import ServerMetrics

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

    Admission happens in two steps, which the front doors (L{handshake},
    L{proxy}) call separately and L{buildProtocol} together: L{screen}, the
    moment the client's address is known (at TCP accept, or once a PROXY
    header has named it), and L{connectionReady} once the connection is
    ready for a worker (at once, or once its TLS handshake is done).

    @ivar relays: the connections alive now.
    @ivar limits: the slots admitted connections hold, and the places at
        the front doors.
    @ivar access: the address rules and rate limit new clients are screened
        by.
    @ivar metrics: where accepts, spawns and ends are counted, if anywhere.
    @ivar guardian: what kills the workers if the server dies, if anything
        (L{twisted_closewatch.service.CloseWatchService} sets it).
    """

    guardian: Guardian | None = None

    def __init__(
        self, config: Config, reactor: Any = None, metrics: ServerMetrics | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = config
        self.metrics = metrics
        self.relays: set[WorkerRelay] = set()
        self._serverEnvironment = dict(os.environ)
        self.limits = limits.Limits(config.maxWorkers, config.maxPerPeer, config.maxHandshakes)
        self.access = access.AccessPolicy(config, reactor)
        self._slots: dict[WorkerRelay, limits.Slot] = {}
        self._lifetimes: dict[WorkerRelay, IDelayedCall] = {}
        self._graceKills: dict[spawn.WorkerProcess, IDelayedCall] = {}
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
        spawn.raiseFileLimit()

    def stopFactory(self) -> None:
        if self._closeWatch is not None and not self.relays:
            self._closeWatch.stop()
            self._closeWatch = None

    def buildProtocol(self, addr: Any) -> Protocol:
        """
        The protocol for a connection from C{addr} (the original client's
        address behind the PROXY protocol) that is ready for a worker: a
        relay, or a protocol that closes it if it is refused.
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
        A relay for a screened connection from C{addr}, which takes a slot
        and starts a worker as it is connected, or a L{limits.Refusal} if a
        limit is reached.
        """
        try:
            slot = self.limits.admit(addr)
        except limits.Refused as refused:
            self.refused(addr, refused.reason)
            return limits.Refusal(self.config.busyMessage, self.reactor)
        relay = WorkerRelay(self, next(self._ids))
        self.relays.add(relay)
        self._slots[relay] = slot
        return relay

    def refused(self, addr: Any, reason: str, detail: str | None = None) -> None:
        """
        Log and count a connection from C{addr} refused a worker for
        C{reason}; a C{detail} (what was wrong with what the client sent)
        makes the line a warning.
        """
        log.emit(
            LogLevel.info if detail is None else LogLevel.warn,
            "refused {peer}: {reason}" + ("" if detail is None else " ({detail})"),
            peer=limits.peerKey(addr) or describeAddress(addr),
            reason=reason,
            detail=detail,
            refused=True,
        )
        if self.metrics is not None:
            self.metrics.refused(reason)

    def workerEnvironment(self, relay: WorkerRelay) -> Mapping[str, str]:
        """
        The server's environment (as it was when the factory was made), the
        connection's UCSPI variables and id, then C{--env}.
        """
        transport = relay.transport
        env = self._serverEnvironment.copy()
        env.update(ucspiEnvironment(transport.getHost(), transport.getPeer()))
        env["CLOSEWATCH_CONNECTION_ID"] = str(relay.record.connectionID)
        env.update(self.config.env)
        return env

    def spawnWorker(self, relay: WorkerRelay) -> spawn.WorkerProcess:
        """
        Start the worker for C{relay}.

        @raise OSError: it could not be started.
        """
        started = time.perf_counter()
        worker = spawn.spawnWorker(
            self.reactor,
            WorkerProcessProtocol(relay),
            self.config.argv,
            self.workerEnvironment(relay),
            self.config.pipeSize,
            self.guardian,
            self.closeWatch.poll,
        )
        if self.metrics is not None:
            self.metrics.spawned(time.perf_counter() - started)
        if self.config.maxLifetime:
            self._lifetimes[relay] = self.reactor.callLater(
                self.config.maxLifetime, relay.clientGone, "max-lifetime"
            )
        return worker

    def killWorker(self, worker: spawn.WorkerProcess) -> None:
        """
        Kill C{worker}'s whole process group: with C{SIGKILL} at once or,
        given a grace period, with C{SIGTERM} first and C{SIGKILL} once the
        grace is over (procmon's C{killTime}), unless it is reaped before.
        """
        if not self.config.grace:
            _signal(worker, "KILL")
        elif worker not in self._graceKills and _signal(worker, "TERM"):
            self._graceKills[worker] = self.reactor.callLater(
                self.config.grace, _signal, worker, "KILL"
            )

    def workerReaped(self, relay: WorkerRelay) -> None:
        """
        The worker of C{relay} has been reaped: its slot is free (while its
        last output may still be on its way to the client), its timers are
        moot.
        """
        self._slots[relay].release()
        for call in (self._lifetimes.pop(relay, None), self._graceKills.pop(relay.worker, None)):
            if call is not None and call.active():
                call.cancel()
        if self.metrics is not None:
            self.metrics.reaped()

    def connectionEnded(self, relay: WorkerRelay) -> None:
        """
        Both sides of C{relay} are done: log its end, count it, give its
        slot back if its worker did not (it never started), forget it.
        """
        # Logging is the dearest part of an end: kill whoever else has left
        # meanwhile first.
        self.closeWatch.poll()
        self.relays.discard(relay)
        self._slots.pop(relay).release()
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
            exit_description=_exitDescription(
                record.exitCode, record.exitSignal, record.killLatencyMS
            ),
            duration=_since(record.started),
            bytes_in=record.bytesIn,
            bytes_out=record.bytesOut,
            kill_latency_ms=record.killLatencyMS,
            stderr_dropped=record.stderrDropped,
        )
        if self.metrics is not None:
            self.metrics.ended(record)
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


def _signal(worker: spawn.WorkerProcess, name: str) -> bool:
    """
    Signal C{worker}'s group; C{False} if it is gone already.
    """
    try:
        worker.signalProcess(name)
    except ProcessExitedAlready:
        return False
    return True


def _since(started: float) -> float:
    return time.monotonic() - started


def _exitDescription(code: int | None, signal: int | None, killLatencyMS: float | None) -> str:
    if signal is not None:
        description = f"killed by signal {signal}"
    elif code is not None:
        description = f"exited with status {code}"
    else:
        return "never started"
    if killLatencyMS is not None:
        description += f" {killLatencyMS:.2f} ms after the client was gone"
    return description
