"""
The JSON log lines' schema, and where they go, in memory.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import datetime, timedelta

from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import TestCase

from twisted_closewatch import logs


def event(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "log_time": 1764597902.123456,
        "log_level": LogLevel.info,
        "log_namespace": "twisted_closewatch.factory",
        "log_format": "[{connection_id}] {peer} ended: {reason}",
        "log_source": object(),
        "log_logger": object(),
    }
    base.update(fields)
    return base


class RecordTests(TestCase):
    def test_schema(self) -> None:
        line = logs.eventAsJSONLine(
            event(connection_id=7, peer="127.0.0.1:4000", reason="client-closed",
                  kill_latency_ms=0.5, exit_code=None)
        )
        self.assertTrue(line.endswith("\n"))
        self.assertNotIn("\n", line[:-1])
        self.assertEqual(
            json.loads(line),
            {
                "time": "2025-12-01T14:05:02.123456+00:00",
                "level": "info",
                "namespace": "twisted_closewatch.factory",
                "text": "[7] 127.0.0.1:4000 ended: client-closed",
                "connection_id": 7,
                "peer": "127.0.0.1:4000",
                "reason": "client-closed",
                "kill_latency_ms": 0.5,
                "exit_code": None,
            },
        )

    def test_time(self) -> None:
        record = logs.eventAsRecord(event())
        parsed = datetime.fromisoformat(record["time"])
        self.assertEqual(parsed.utcoffset(), timedelta(0))
        self.assertAlmostEqual(parsed.timestamp(), 1764597902.123456, places=5)

    def test_levels(self) -> None:
        for level in LogLevel.iterconstants():
            self.assertEqual(logs.eventAsRecord(event(log_level=level))["level"], level.name)

    def test_unsafeValues(self) -> None:
        """
        Values JSON has no type for are written as text, and the line stays
        strict JSON.
        """
        record = logs.eventAsRecord(
            event(
                log_format="x",
                data=b"\xffbytes",
                ratio=float("nan"),
                big=float("inf"),
                peer=object.__new__(type("Address", (), {"__str__": lambda self: "addr"})),
                nested={1: [b"a", (2, 3)], "k": {"set": frozenset([4])}},
            )
        )
        self.assertEqual(record["data"], "\ufffdbytes")
        self.assertEqual((record["ratio"], record["big"]), ("nan", "inf"))
        self.assertEqual(record["peer"], "addr")
        self.assertEqual(record["nested"], {"1": ["a", [2, 3]], "k": {"set": [4]}})
        json.loads(logs.eventAsJSONLine(event(ratio=float("nan"))))

    def test_collisionsAndBookkeeping(self) -> None:
        """
        Twisted's own keys and the legacy log's are not copied; a field
        named like a schema key keeps its value under C{field_NAME}.
        """
        record = logs.eventAsRecord(
            event(
                log_format="hello",
                text="mine",
                level=3,
                message=("legacy",),
                isError=0,
                system="-",
                time=1.0,
                format="%s",
            )
        )
        self.assertEqual(record["text"], "hello")
        self.assertEqual((record["field_text"], record["field_level"]), ("mine", 3))
        for key in ("message", "isError", "system", "format", "log_source", "log_format"):
            self.assertNotIn(key, record)
        self.assertEqual(record["time"], "2025-12-01T14:05:02.123456+00:00")

    def test_failure(self) -> None:
        try:
            raise ZeroDivisionError("it broke")
        except ZeroDivisionError:
            failure = Failure()
        record = logs.eventAsRecord(
            event(log_format="it broke", log_failure=failure, log_level=LogLevel.critical)
        )
        self.assertEqual(record["text"], "it broke")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["level"], "critical")


class DestinationTests(TestCase):
    """
    Where the lines go, by twistd's rules for its own log.
    """

    def setUp(self) -> None:
        handler = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, handler)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def test_stdout(self) -> None:
        self.assertIs(logs._logFile({"nodaemon": True, "logfile": None}), sys.stdout)
        self.assertIs(logs._logFile({"nodaemon": True, "logfile": "-"}), sys.stdout)
        self.assertIs(logs._logFile({}), sys.stdout)
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)

    def test_daemonToStdout(self) -> None:
        self.assertRaises(SystemExit, logs._logFile, {"nodaemon": False, "logfile": "-"})

    def test_file(self) -> None:
        """
        C{--logfile}, with or without C{-n}, is a twistd L{LogFile}, which
        C{SIGUSR1} rotates.
        """
        for nodaemon in (True, False):
            path = os.path.abspath(self.mktemp())
            logFile = logs._logFile({"nodaemon": nodaemon, "logfile": path})
            self.addCleanup(logFile.close)
            self.assertIsInstance(logFile, LogFile)
            self.assertEqual(logFile.path, path)
            self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def test_observerWrites(self) -> None:
        path = self.mktemp()
        logs.recordTwistdOptions({"nodaemon": True, "logfile": path})
        self.addCleanup(logs.recordTwistdOptions, None)
        observer = logs.jsonObserver()
        observer(event(connection_id=1, peer="p", reason="r"))
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["connection_id"], 1)
