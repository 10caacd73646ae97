"""
End-to-end tests of L{twisted_closewatch.stopsignals}: real C{twistd -n
closewatch}, a stop signal that lands while the server is writing its log
(see L{tests.busylogger}), and a C{SIGHUP} ignored under C{nohup}.
"""

from __future__ import annotations

import os
import signal

from twisted.trial.unittest import TestCase

from tests.support import DEFAULT_SIGNALS, Server, waitGone


class SignalWhileLoggingTests(TestCase):
    def stopWhileLogging(self, number: int) -> None:
        """
        Send C{number} from inside the log observer, as it writes the end of
        one connection, with two more workers running: the handler must not
        log (the observer would be entered again, where a real log file's
        lock can hang the server for good), and the server stops as it
        promises: the line logged once, every worker killed and reaped, one
        C{server-stopping} end each, exit status 0.
        """
        trigger = os.path.abspath(self.mktemp())
        server = Server(
            wrapper=DEFAULT_SIGNALS,
            logger="tests.busylogger.observer",
            env={"BUSYLOGGER_TRIGGER": trigger},
        )
        self.addCleanup(server.cleanup)
        held = [server.connectWorker() for _ in range(2)]
        for sock, _ in held:
            self.addCleanup(sock.close)
        sock, closed = server.connectWorker()
        with open(trigger + ".new", "w") as f:
            f.write(str(number))
        os.rename(trigger + ".new", trigger)
        sock.close()

        self.assertEqual(server.process.wait(30), 0)
        self.assertFalse(os.path.exists(trigger), "the observer never sent the signal")
        events = server.events()
        self.assertEqual([e for e in events if e.get("reentered")], [])
        name = signal.Signals(number).name
        texts = [e.get("text") for e in events]
        self.assertEqual(texts.count(f"Received {name}, shutting down."), 1)
        pids = [pid for _, pid in held]
        waitGone([*pids, closed], 5)
        reasons = {e["pid"]: e["reason"] for e in server.ends()}
        self.assertEqual(
            reasons, {closed: "client-closed", **dict.fromkeys(pids, "server-stopping")}
        )

    def test_sigterm(self) -> None:
        self.stopWhileLogging(signal.SIGTERM)

    def test_sigint(self) -> None:
        self.stopWhileLogging(signal.SIGINT)

    def test_sighup(self) -> None:
        self.stopWhileLogging(signal.SIGHUP)


class NoHangUpTests(TestCase):
    def test_nohup(self) -> None:
        """
        Under C{nohup}, C{SIGHUP} is left ignored: the server keeps
        serving, and stops on the C{SIGTERM} sent after it (had it taken
        the C{SIGHUP}, it would have logged it before).
        """
        server = Server(wrapper=["nohup"])
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        self.addCleanup(sock.close)
        server.process.send_signal(signal.SIGHUP)
        self.assertEqual(server.stop(), 0)
        texts = [e.get("text") for e in server.events()]
        self.assertNotIn("Received SIGHUP, shutting down.", texts)
        self.assertIn("Received SIGTERM, shutting down.", texts)
        waitGone([pid], 5)
