"""
Under pressure: a paused relay still sees its client go, memory stays
bounded both ways, and spawning works with many connections open.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import TestCase

from tests.support import (
    PID_WORKER,
    Server,
    outq,
    pidfdWaitGone,
    readAll,
    readLine,
    reset,
    rssKiB,
    wait,
    waitGone,
)

#: The worker's stdin pipe (1 MiB) plus the read-ahead plus some more: with
#: a worker that never reads, the relay is paused and the rest sits in the
#: server's socket buffer, leaving nothing queued on the client side.  The
#: rest must fit the buffer as it is when nobody reads it (about 83 KiB of
#: data under the default tcp_rmem): the kernel grows a receive buffer only
#: as fast as its reader reads, and a server slowed by other work read too
#: slowly for 128 KiB more to fit (the client's queue then never emptied).
READ_AHEAD = 64 * 1024
BACKLOG = 1024 * 1024 + READ_AHEAD + 32 * 1024


def sendBacklog(sock: socket.socket, total: int = BACKLOG) -> None:
    """
    Send C{total} bytes in steps, each acknowledged by the server's kernel
    before the next, so that nothing is left queued on the client's side
    and a FIN sent now reaches the server at once.
    """
    sock.settimeout(10)
    step = 16 * 1024
    for offset in range(0, total, step):
        sock.sendall(b"q" * min(step, total - offset))
        try:
            wait(lambda: outq(sock) == 0, 10, 0.002)
        except AssertionError:
            # Seen once in a while on a machine loaded by several suites at
            # once, never alone: say what both ends' kernels held (the
            # server's receive buffer and window, the client's queue).
            port = sock.getsockname()[1]
            sockets = subprocess.run(
                ["ss", "-tmni", f"( sport = :{port} or dport = :{port} )"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            raise AssertionError(
                f"{outq(sock)} bytes of {offset + step} still queued after 10 s:\n{sockets}"
            ) from None


class PausedTests(TestCase):
    """
    A client paused because its worker does not read is still watched.
    Without a spool (C{--spool-max 0}) the client is paused past the
    read-ahead, as it is past the spool's limits with one.
    """

    args: tuple[str, ...] = ("--read-ahead", "64k", "--spool-max", "0")
    command: tuple[str, ...] = tuple(PID_WORKER)

    def setUp(self) -> None:
        self.server = Server(self.args, self.command)
        self.addCleanup(self.server.cleanup)

    def test_closeWhilePaused(self) -> None:
        sock, pid = self.server.connectWorker()
        sendBacklog(sock)
        sock.close()
        self.assertTrue(pidfdWaitGone(pid, 5), "worker survived a paused close")
        end = self.server.endOf(1)
        self.assertEqual(end["reason"], "client-closed")
        # The relay really was paused: it read no more than pipe + read-ahead.
        self.assertLessEqual(end["bytes_in"], 1024 * 1024 + READ_AHEAD)

    def test_resetWhilePaused(self) -> None:
        sock, pid = self.server.connectWorker()
        sendBacklog(sock)
        reset(sock)
        self.assertTrue(pidfdWaitGone(pid, 5), "worker survived a paused reset")
        self.assertEqual(self.server.endOf(1)["reason"], "client-reset")

    def test_halfCloseKillWhilePaused(self) -> None:
        sock, pid = self.server.connectWorker()
        sendBacklog(sock)
        sock.shutdown(socket.SHUT_WR)
        self.assertTrue(pidfdWaitGone(pid, 5), "worker survived a paused half-close")
        sock.close()

    def test_otherConnectionsKeepFlowing(self) -> None:
        """
        A paused connection does not hold up its neighbours.
        """
        paused, pausedPID = self.server.connectWorker()
        sendBacklog(paused)
        other, otherPID = self.server.connectWorker()
        other.close()
        self.assertTrue(pidfdWaitGone(otherPID, 5))
        paused.close()
        self.assertTrue(pidfdWaitGone(pausedPID, 5))


class PausedForwardTests(TestCase):
    def test_queuedDataThenEOF(self) -> None:
        """
        Under C{forward}, a FIN behind queued data is delivered after it:
        the worker reads every byte, then EOF, and its answer gets back.
        """
        server = Server(
            ["--read-ahead", "64k", "--spool-max", "0", "--half-close", "forward"],
            ["/bin/sh", "-c", "echo ready; sleep 1; wc -c"],
        )
        self.addCleanup(server.cleanup)
        sock = server.connect()
        self.assertEqual(readLine(sock), b"ready\n")
        sendBacklog(sock)
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(readAll(sock).strip(), str(BACKLOG).encode())
        self.assertEqual(server.endOf(1)["reason"], "worker-exited")


class MemoryTests(TestCase):
    """
    No direction can make the server hold an unbounded amount of data.
    """

    LIMIT_KIB = 32 * 1024

    def test_clientFloodsNonReader(self) -> None:
        """
        128 MiB sent at a worker that never reads: the client stalls (past
        the default spool's 64 MiB on disk) and the server's memory grows
        by far less than 64 MiB.
        """
        server = Server([], PID_WORKER)
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        before = rssKiB(server.pid)
        sock.settimeout(3)
        sent = 0
        chunk = b"f" * 65536
        try:
            while sent < 128 * 1024 * 1024:
                sent += sock.send(chunk)
        except TimeoutError:
            pass
        self.assertLess(sent, 128 * 1024 * 1024, "nothing ever pushed back")
        self.assertLess(rssKiB(server.pid) - before, self.LIMIT_KIB)
        # A FIN would wait in the client's own send queue behind the unsent
        # data (zero window); a reset is sent at once.
        reset(sock)
        waitGone([pid], 10)

    def test_workerFloodsNonReader(self) -> None:
        """
        A worker writing 64 MiB at a client that never reads is paused; the
        server's memory stays bounded, and the client's close still kills it.
        """
        server = Server([], ["/bin/sh", "-c", "echo $$; exec head -c 67108864 /dev/zero"])
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        before = rssKiB(server.pid)
        time.sleep(2)
        self.assertLess(rssKiB(server.pid) - before, self.LIMIT_KIB)
        self.assertTrue(pidfdWaitGone(pid, 0) is False, "the flood finished unread")
        sock.close()
        self.assertTrue(pidfdWaitGone(pid, 10))

    def test_unusedFeaturesNotImported(self) -> None:
        """
        twisted.web, wsproto and prometheus_client (about 4 MB of a
        server's memory) are imported only by the options that use them.
        """
        script = (
            "import json, sys\n"
            "from twisted_closewatch.tap import Options\n"
            "Options().parseOptions(sys.argv[1:])\n"
            "optional = {'twisted.web', 'wsproto', 'prometheus_client'}\n"
            "print(json.dumps(sorted(optional & set(sys.modules))))\n"
        )

        def imported(*args: str) -> list[str]:
            out = subprocess.run(
                [sys.executable, "-c", script, *args, "--", "/bin/cat"],
                capture_output=True, text=True, timeout=60, check=True,
            )
            return list(json.loads(out.stdout))

        self.assertEqual(imported(), [])
        self.assertEqual(
            imported("--websocket", "--metrics", "tcp:0:interface=127.0.0.1"),
            ["prometheus_client", "twisted.web", "wsproto"],
        )


class ManyConnectionsTests(TestCase):
    COUNT = 1000

    def test_spawnWithManyOpen(self) -> None:
        """
        With 1,000 other connections (and workers) alive, a new client still
        gets its worker, and closing them all kills them all.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard < 4 * self.COUNT:
            raise self.skipTest(f"descriptor limit {hard} is too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        server = Server(["--max-workers", str(2 * self.COUNT)], PID_WORKER)
        self.addCleanup(server.cleanup)
        socks = []
        self.addCleanup(lambda: [s.close() for s in socks])
        for _ in range(self.COUNT):
            socks.append(server.connect())
        pids = [int(readLine(s, 30)) for s in socks]
        sock, pid = server.connectWorker()
        self.assertNotIn(pid, pids)
        sock.close()
        for s in socks:
            s.close()
        waitGone(pids + [pid], 60)
        wait(lambda: len(server.ends()) == self.COUNT + 1, 30)
