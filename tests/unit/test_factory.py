"""
The factory: admission, the worker's environment, and what is logged and
counted when a connection ends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.fakes import FakeCloseWatch, FakeProcess, HalfCloseableTransport, spawnFailure
from twisted_closewatch import factory as factoryModule
from twisted_closewatch import metrics
from twisted_closewatch.config import Config
from twisted_closewatch.factory import CloseWatchFactory
from twisted_closewatch.limits import Refusal
from twisted_closewatch.record import EndReason


def peer(host: str = "192.0.2.1", port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class FactoryTestCase(SynchronousTestCase):
    spawnError: OSError | None = None

    def setUp(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.patch(factoryModule, "log", Logger(observer=self.logged.append))

    def makeFactory(self, **config: Any) -> CloseWatchFactory:
        self.clock = MemoryReactorClock()
        self.watch = FakeCloseWatch()
        self.processes: list[FakeProcess] = []
        self.environments: list[dict[str, str]] = []
        self.metrics = metrics.ServerMetrics() if metrics.available() else None
        self.factory = CloseWatchFactory(
            Config(argv=("/bin/cat",), **config),
            self.clock,
            self.metrics,
            closeWatch=self.watch,
            spawnProcess=self._spawn,
        )
        return self.factory

    def _spawn(self, reactor: Any, protocol: Any, **kwargs: Any) -> FakeProcess:
        if self.spawnError is not None:
            raise self.spawnError
        self.environments.append(dict(kwargs["environment"]))
        process = FakeProcess(protocol)
        self.processes.append(process)
        return process

    def connect(self, address: Any = None) -> tuple[Any, HalfCloseableTransport]:
        address = address or peer()
        protocol = self.factory.buildProtocol(address)
        transport = HalfCloseableTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def ends(self) -> list[dict[str, Any]]:
        return [e for e in self.logged if "ended:" in e.get("log_format", "")]


class AdmissionTests(FactoryTestCase):
    """
    C{--max-workers} and C{--max-per-peer}: past them a client gets
    C{--busy-message} and no worker.
    """

    def test_maxWorkers(self) -> None:
        self.makeFactory(maxWorkers=1, busyMessage=b"busy\r\n")
        self.connect()
        protocol, transport = self.connect(peer("192.0.2.2"))
        self.assertIsInstance(protocol, Refusal)
        self.assertEqual(transport.value(), b"busy\r\n")
        self.assertEqual(len(self.processes), 1)

    def test_maxPerPeer(self) -> None:
        self.makeFactory(maxPerPeer=1)
        self.connect(peer("192.0.2.1", 1))
        refused, _ = self.connect(peer("192.0.2.1", 2))
        admitted, _ = self.connect(peer("192.0.2.2", 3))
        self.assertIsInstance(refused, Refusal)
        self.assertNotIsInstance(admitted, Refusal)

    def test_maxPerPeerCountsAnIPv6Subnet(self) -> None:
        """
        An IPv6 client is its /64, as for the rate limit: one that owns a
        /64 cannot spread its workers over it.
        """
        self.makeFactory(maxPerPeer=1)
        self.connect(IPv6Address("TCP", "2001:db8:0:1::1", 1))
        refused, _ = self.connect(IPv6Address("TCP", "2001:db8:0:1::2", 2))
        admitted, _ = self.connect(IPv6Address("TCP", "2001:db8:0:2::1", 3))
        self.assertIsInstance(refused, Refusal)
        self.assertNotIsInstance(admitted, Refusal)
        self.assertEqual(self.factory.limits.perPeer("2001:db8:0:1::/64"), 1)

    def test_slotBackWhenReaped(self) -> None:
        """
        The slot comes back when the worker is reaped, while its output may
        still be on its way to the client.
        """
        self.makeFactory(maxWorkers=1)
        self.connect()
        self.processes[0].exit(0)
        self.assertEqual(self.factory.limits.active, 0)
        self.assertEqual(self.ends(), [])

    def test_slotBackAfterSpawnFailure(self) -> None:
        self.spawnError = spawnFailure()
        self.makeFactory(maxWorkers=1)
        protocol, transport = self.connect()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.limits.active, 0)
        self.assertEqual([e["reason"] for e in self.ends()], [EndReason.SPAWN_FAILED])


class EnvironmentTests(FactoryTestCase):
    """
    A worker gets the server's environment, the UCSPI variables, its
    connection id, then C{--env}.
    """

    def test_tcp(self) -> None:
        self.makeFactory(env={"MODE": "ro"})
        self.connect(peer("192.0.2.9", 5555))
        env = self.environments[0]
        self.assertEqual(env["PROTO"], "TCP")
        self.assertEqual(env["TCPREMOTEIP"], "192.0.2.9")
        self.assertEqual(env["TCPREMOTEPORT"], "5555")
        self.assertEqual(env["CLOSEWATCH_CONNECTION_ID"], "1")
        self.assertEqual(env["MODE"], "ro")

    def test_unix(self) -> None:
        self.makeFactory()
        self.connect(UNIXAddress(b"/run/x.sock"))
        self.assertEqual(self.environments[0]["PROTO"], "UNIX")
        self.assertNotIn("TCPREMOTEIP", self.environments[0])

    def test_connectionIDs(self) -> None:
        self.makeFactory()
        self.connect()
        self.connect()
        self.assertEqual([e["CLOSEWATCH_CONNECTION_ID"] for e in self.environments], ["1", "2"])


class EndTests(FactoryTestCase):
    """
    One log event per connection, from the relay's single end signal.
    """

    def test_loggedOnce(self) -> None:
        self.makeFactory()
        protocol, _ = self.connect()
        protocol.dataReceived(b"abc")
        protocol.readConnectionLost()
        self.assertEqual(self.processes[0].signals, ["KILL"])
        self.processes[0].exit(None, 9)
        protocol.connectionLost(Failure(ConnectionDone()))
        [event] = self.ends()
        self.assertEqual(event["reason"], EndReason.CLIENT_CLOSED)
        self.assertEqual(event["pid"], FakeProcess.pid)
        self.assertEqual(event["exit_signal"], 9)
        self.assertEqual(event["bytes_in"], 3)
        self.assertIsNotNone(event["kill_latency_ms"])

    def test_closeWatchPolledFirst(self) -> None:
        """
        Before the dear part of an end (the log event), whoever else has
        left meanwhile is killed.
        """
        self.makeFactory()
        protocol, _ = self.connect()
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.watch.polls, 0)
        self.processes[0].exit(None, 9)
        self.assertEqual(self.watch.polls, 1)

    def test_metricsByReason(self) -> None:
        if self.makeFactory() and self.metrics is None:
            raise self.skipTest("prometheus_client is not installed")
        protocol, _ = self.connect()
        self.processes[0].exit(0)
        protocol.connectionLost(Failure(ConnectionDone()))
        assert self.metrics is not None
        sample = self.metrics.registry.get_sample_value
        self.assertEqual(sample("closewatch_worker_ends_total", {"reason": "worker-exited"}), 1)
        self.assertEqual(sample("closewatch_workers_active"), 0)

    def test_everyReasonReportedFromTheStart(self) -> None:
        """
        Every end reason is a metrics label, at 0 before it first happens.
        """
        if self.makeFactory() and self.metrics is None:
            raise self.skipTest("prometheus_client is not installed")
        assert self.metrics is not None
        sample = self.metrics.registry.get_sample_value
        ends = {r.value: sample("closewatch_worker_ends_total", {"reason": r}) for r in EndReason}
        self.assertEqual(ends, {r.value: 0 for r in EndReason})


class StopTests(FactoryTestCase):
    """
    Stopping the server kills every worker and waits for every end.
    """

    def test_stopWorkers(self) -> None:
        self.makeFactory()
        first, _ = self.connect()
        second, _ = self.connect()
        stopped = self.factory.stopWorkers()
        self.assertEqual([p.signals for p in self.processes], [["KILL"], ["KILL"]])
        for protocol, process in zip((first, second), self.processes, strict=True):
            self.assertNoResult(stopped)
            process.exit(None, 9)
            protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertEqual(
            [e["reason"] for e in self.ends()], [EndReason.SERVER_STOPPING] * 2
        )

    def test_nothingToStop(self) -> None:
        self.makeFactory()
        self.successResultOf(self.factory.stopWorkers())
