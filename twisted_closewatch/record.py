"""
What is known and logged about one connection, and why connections end.

Plain data, imported by whoever reports a connection (the factory's log
event, the metrics) and by whoever decides its end (the relay); it imports
nothing of closewatch.
"""

from __future__ import annotations

import enum
import time

import attr


class EndReason(enum.StrEnum):
    """
    Why a connection ended: the C{reason} of its end-of-connection log event
    and the label of the C{closewatch_worker_ends} metric.
    """

    CLIENT_CLOSED = "client-closed"
    CLIENT_RESET = "client-reset"
    #: Kept for the metrics contract: a FIN from C{shutdown(SHUT_WR)} cannot
    #: be told from a close, so this is never produced.
    HALF_CLOSE = "half-close"
    KEEPALIVE = "keepalive"
    USER_TIMEOUT = "user-timeout"
    IDLE_TIMEOUT = "idle-timeout"
    WORKER_EXITED = "worker-exited"
    MAX_LIFETIME = "max-lifetime"
    SERVER_STOPPING = "server-stopping"
    SPAWN_FAILED = "spawn-failed"
    #: C{--websocket}: the client sent a close frame.
    WEBSOCKET_CLOSED = "websocket-closed"
    #: C{--websocket}: the client broke the protocol, or sent a message
    #: over C{--max-message}.
    WEBSOCKET_ERROR = "websocket-error"
    #: C{--websocket --heartbeat}: a ping was not answered in time.
    PING_TIMEOUT = "ping-timeout"
    #: What the client sent was spooled and cannot be read back: the worker
    #: cannot get its input whole and in order.
    SPOOL_ERROR = "spool-error"


#: Ends after which the client still gets what was sent to it, then a FIN
#: (a WebSocket client: a close frame, then a FIN).  After the others it is
#: dead or not worth waiting for (a stopping server must not wait on a
#: client that does not read): it gets a reset.
CLOSE_GRACEFULLY = frozenset(
    {
        EndReason.CLIENT_CLOSED,
        EndReason.MAX_LIFETIME,
        EndReason.WEBSOCKET_CLOSED,
        EndReason.WEBSOCKET_ERROR,
    }
)


@attr.s(auto_attribs=True)
class ConnectionRecord:
    """
    What the end-of-connection log event says about one connection.

    C{started} and C{goneAt} are C{time.monotonic()} readings: they only
    serve the reported duration and kill latency, never a timer.
    """

    connectionID: int
    peer: str = ""
    started: float = attr.ib(factory=time.monotonic)
    pid: int | None = None
    reason: EndReason | None = None
    goneAt: float | None = None
    exitCode: int | None = None
    exitSignal: int | None = None
    bytesIn: int = 0
    bytesOut: int = 0
    bytesSpooled: int = 0
    bytesSpliced: int = 0
    bytesSplicedOut: int = 0
    killLatencyMS: float | None = None
    stderrDropped: int = 0

    def seenGone(self) -> None:
        """
        The client was seen gone now: the kill latency counts from here.
        """
        self.goneAt = time.monotonic()

    def workerEnded(self, exitCode: int | None, exitSignal: int | None) -> None:
        """
        The worker was reaped now: after the client left (a kill, whose
        latency is measured) or by itself.
        """
        self.exitCode = exitCode
        self.exitSignal = exitSignal
        if self.goneAt is not None:
            self.killLatencyMS = (time.monotonic() - self.goneAt) * 1000
        elif self.reason is None:
            self.reason = EndReason.WORKER_EXITED

    def duration(self) -> float:
        return time.monotonic() - self.started

    def exitDescription(self) -> str:
        """
        How the worker ended, for the log line.
        """
        if self.exitSignal is not None:
            description = f"killed by signal {self.exitSignal}"
        elif self.exitCode is not None:
            description = f"exited with status {self.exitCode}"
        else:
            return "never started"
        if self.killLatencyMS is not None:
            description += f" {self.killLatencyMS:.2f} ms after the client was gone"
        return description
