"""
Prometheus metrics of one server, served over HTTP at C{/metrics}.

Built on C{prometheus_client} and its Twisted resource, with a registry of
the server's own rather than the process-wide default one, so that several
servers (or tests) in one process never share or collide on a metric.
C{prometheus_client} is optional (the C{production} extra); L{available}
says whether it is installed.

Byte counts and end reasons are added when a connection ends, not per
chunk: the relay's hot path pays nothing for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from twisted_closewatch.listening import Listener
from twisted_closewatch.record import ConnectionRecord, EndReason

if TYPE_CHECKING:
    from twisted_closewatch.spool import SpoolBudget

try:
    import prometheus_client
except ImportError:  # the production extra is not installed
    prometheus_client = None  # type: ignore[assignment]

#: Every reason a connection ends for, reported as 0 before it first happens.
END_REASONS = tuple(reason.value for reason in EndReason)
#: Every reason a connection is refused a worker for: a limit on workers, on
#: connections at the front doors, the access rules, the per-client rate,
#: a TLS handshake or PROXY header not done in time or malformed (or a
#: malformed WebSocket upgrade), or a cross-site WebSocket upgrade.
REFUSAL_REASONS = (
    "max-workers",
    "max-per-peer",
    "max-handshakes",
    "denied",
    "rate",
    "handshake-timeout",
    "bad-header",
    "origin",
)

KILL_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip
SPAWN_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
)  # fmt: skip


def available() -> bool:
    """
    Whether C{prometheus_client} is installed.
    """
    return prometheus_client is not None


class ServerMetrics:
    """
    What one server counts; the factory reports events to it.

    @ivar registry: the C{CollectorRegistry} holding these metrics only.
    """

    def __init__(self) -> None:
        pc = prometheus_client
        if pc is None:
            raise RuntimeError("prometheus_client is not installed")
        self.registry = pc.CollectorRegistry(auto_describe=True)
        r = self.registry
        self._accepted = pc.Counter(
            "closewatch_connections_accepted",
            "Connections accepted, including those then refused a worker "
            "(behind the PROXY protocol, once their header has been read).",
            registry=r,
        )
        self._refused = pc.Counter(
            "closewatch_connections_refused",
            "Connections refused a worker, by the limit that refused them.",
            ["reason"],
            registry=r,
        )
        self._active = pc.Gauge(
            "closewatch_workers_active", "Workers running now.", registry=r
        )
        self._ends = pc.Counter(
            "closewatch_worker_ends",
            "Connections ended, by reason (why the worker ended or was killed).",
            ["reason"],
            registry=r,
        )
        self._killLatency = pc.Histogram(
            "closewatch_kill_latency_seconds",
            "From the client seen gone to its worker reaped (including any --grace).",
            buckets=KILL_LATENCY_BUCKETS,
            registry=r,
        )
        self._spawnLatency = pc.Histogram(
            "closewatch_spawn_latency_seconds",
            "Time the server spent starting a worker.",
            buckets=SPAWN_LATENCY_BUCKETS,
            registry=r,
        )
        self._received = pc.Counter(
            "closewatch_received_bytes",
            "Bytes received from clients, counted when their connection ends.",
            registry=r,
        )
        self._sent = pc.Counter(
            "closewatch_sent_bytes",
            "Bytes of worker output sent to clients, counted when their connection ends.",
            registry=r,
        )
        for reason in END_REASONS:
            self._ends.labels(reason)
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason)

    def accepted(self) -> None:
        self._accepted.inc()

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def spawned(self, seconds: float) -> None:
        self._active.inc()
        self._spawnLatency.observe(seconds)

    def reaped(self) -> None:
        self._active.dec()

    def ended(self, record: ConnectionRecord) -> None:
        self._ends.labels(record.reason or "unknown").inc()
        if record.killLatencyMS is not None:
            self._killLatency.observe(record.killLatencyMS / 1000)
        self._received.inc(record.bytesIn)
        self._sent.inc(record.bytesOut)

    def watchSpool(self, budget: SpoolBudget) -> None:
        """
        Report the spool's bytes written and space in use, read from
        C{budget} at each scrape: nothing is counted on the byte path.
        """
        self.registry.register(_SpoolCollector(budget))

    def resource(self) -> IResource:
        """
        A web resource tree with these metrics at C{/metrics}.
        """
        # Imported here: this module of prometheus_client imports the reactor.
        from prometheus_client.twisted import MetricsResource

        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        return root

    def service(
        self, endpoint: IStreamServerEndpoint, description: str = "--metrics"
    ) -> IService:
        """
        A service serving L{resource} over HTTP on C{endpoint}, named
        C{description} in errors.
        """
        return Listener(endpoint, _MetricsSite(self.resource()), description)


class _SpoolCollector:
    """
    The spool's figures, as a custom collector reads them.
    """

    def __init__(self, budget: SpoolBudget) -> None:
        self._budget = budget

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily(
            "closewatch_spooled_bytes",
            "Client bytes written to spool files while their worker was not reading.",
            value=self._budget.spooled,
        )
        yield GaugeMetricFamily(
            "closewatch_spool_bytes",
            "Spool space in use now: the length of every connection's spool file.",
            value=self._budget.inUse,
        )
        yield GaugeMetricFamily(
            "closewatch_spool_limit_bytes",
            "--spool-total: the most the spool files may hold together.",
            value=self._budget.total,
        )


class _MetricsSite(Site):
    def log(self, request: Any) -> None:
        """
        A scrape every few seconds is not worth a log line each.
        """
