"""
The client's bytes spliced into the worker's stdin, end to end: whole and
in order across splices, copies and the spool; the relay's bound on what a
worker that does not read is given, while splicing; no splice for a client
whose bytes are not the worker's input as they arrive (a unix socket, a
PROXY header); a reset still a reset.
"""

from __future__ import annotations

import random
import socket
import sys
import threading
import time
import zlib

from twisted.trial.unittest import TestCase

from tests.support import (
    PID_WORKER,
    Server,
    pidfdWaitGone,
    readLine,
    reset,
    unixSocketPath,
    wait,
)
from tests.test_pressure import BACKLOG, READ_AHEAD, sendBacklog
from twisted_closewatch.splice import SPLICE

MiB = 1024 * 1024

#: Says its pid, then reads its stdin to the end, stopping for half a
#: second after the first MiB (so that its pipe fills and the server
#: spools meanwhile), and says how many bytes it read and their CRC-32.
CRC_WORKER = [
    sys.executable,
    "-c",
    "import os, time, zlib\n"
    "print(os.getpid(), flush=True)\n"
    "crc = n = 0\n"
    "paused = False\n"
    "while chunk := os.read(0, 1 << 16):\n"
    "    crc = zlib.crc32(chunk, crc)\n"
    "    n += len(chunk)\n"
    "    if n > 1 << 20 and not paused:\n"
    "        paused = True\n"
    "        time.sleep(0.5)\n"
    "print(n, crc, flush=True)\n",
]


def sendThenCheck(test: TestCase, sock: socket.socket, parts: list[bytes]) -> None:
    """
    Send C{parts}, a second apart (the worker drains in between, and the
    server goes back to splicing), then the FIN, and check that the
    worker read them all, in order.
    """
    for i, part in enumerate(parts):
        if i:
            time.sleep(1)
        sender = threading.Thread(target=sock.sendall, args=(part,), daemon=True)
        sender.start()
        sender.join(30)
        test.assertFalse(sender.is_alive(), "the server stopped reading")
    sock.shutdown(socket.SHUT_WR)
    data = b"".join(parts)
    line = readLine(sock, 30)
    test.assertEqual(line.split(), [str(len(data)).encode(), str(zlib.crc32(data)).encode()])


class SpliceTests(TestCase):
    def setUp(self) -> None:
        if not SPLICE:
            raise self.skipTest("no splice(2) here (Linux and Python 3.10+ only)")

    def test_wholeAndInOrder(self) -> None:
        """
        4 MiB to a worker that reads, stops a while, and reads on, then 2
        MiB more once it has caught up: it gets every byte in order, then
        its EOF (C{--half-close forward}); the bytes went by splice and
        through the spool both, and each is counted once.
        """
        server = Server(["--half-close", "forward"], CRC_WORKER)
        self.addCleanup(server.cleanup)
        sock, _ = server.connectWorker()
        self.addCleanup(sock.close)
        rng = random.Random(7)
        parts = [rng.randbytes(4 * MiB), rng.randbytes(2 * MiB)]
        sendThenCheck(self, sock, parts)
        end = server.endOf(1)
        self.assertEqual(end["bytes_in"], 6 * MiB)
        self.assertGreater(end["bytes_spliced"], 0)
        self.assertGreater(end["bytes_spooled"], 0)

    def test_boundedWhileSpliced(self) -> None:
        """
        A worker that never reads is given no more than its stdin pipe and
        the read-ahead, though its pipe is filled by splices (which put up
        to 64 KiB in each of a pipe's page-sized slots): the rest goes to
        the spool, and the client's close is seen behind it.
        """
        server = Server(["--read-ahead", "64k"], PID_WORKER)
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        sendBacklog(sock, 2 * BACKLOG)
        sock.close()
        self.assertTrue(pidfdWaitGone(pid, 5), "worker survived a close behind a backlog")
        end = server.endOf(1)
        self.assertEqual(end["reason"], "client-closed")
        self.assertEqual(end["bytes_in"], 2 * BACKLOG)
        self.assertGreater(end["bytes_spliced"], 0)
        self.assertGreater(end["bytes_spooled"], 0)
        self.assertLessEqual(end["bytes_in"] - end["bytes_spooled"], 1024 * 1024 + READ_AHEAD)

    def test_resetWhileSpliced(self) -> None:
        """
        A client reset in the middle of a transfer its worker keeps up with
        is logged as a reset, its worker killed.
        """
        server = Server([], ["/bin/sh", "-c", "echo $$; exec cat >/dev/null"])
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        sock.sendall(b"r" * (4 * MiB))
        reset(sock)
        self.assertTrue(pidfdWaitGone(pid, 5))
        end = server.endOf(1)
        self.assertEqual(end["reason"], "client-reset")
        self.assertGreater(end["bytes_spliced"], 0)


#: Says its pid, then writes 6 MiB of a known sequence in pieces.
OUTPUT_WORKER = [
    sys.executable,
    "-c",
    "import os, random, sys\n"
    "print(os.getpid(), flush=True)\n"
    "data = random.Random(11).randbytes(6 << 20)\n"
    "for i in range(0, len(data), 100_000):\n"
    "    sys.stdout.buffer.write(data[i : i + 100_000])\n"
    "    sys.stdout.flush()\n",
]


class OutputTests(TestCase):
    """
    The worker's output spliced into its client's socket.
    """

    def setUp(self) -> None:
        if not SPLICE:
            raise self.skipTest("no splice(2) here (Linux and Python 3.10+ only)")

    def test_wholeAndInOrder(self) -> None:
        """
        A client that stops reading a while (its socket fills, the server
        buffers, then pauses the worker's output) gets the worker's output
        whole and in order; it went by splice, and is counted once.
        """
        server = Server([], OUTPUT_WORKER)
        self.addCleanup(server.cleanup)
        sock, pid = server.connectWorker()
        self.addCleanup(sock.close)
        received = bytearray()
        while len(received) < MiB:
            received += sock.recv(65536)
        time.sleep(0.5)
        expected = random.Random(11).randbytes(6 * MiB)
        while len(received) < len(expected):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        self.assertEqual(len(received), len(expected))
        self.assertTrue(received == expected, "the output came back out of order")
        end = server.endOf(1)
        self.assertEqual(end["bytes_out"], len(f"{pid}\n") + len(expected))
        self.assertGreater(end["bytes_spliced_out"], 0)

    def test_resetWhileSplicing(self) -> None:
        """
        A client that resets while its worker's endless output is spliced
        to it is a reset, though the splice may be what meets the reset
        (and consumes its error): the worker is killed, and the reason is
        read from the socket.
        """
        server = Server([], ["/bin/sh", "-c", "echo $$; exec cat /dev/zero"])
        self.addCleanup(server.cleanup)
        for connection in range(1, 4):
            sock, pid = server.connectWorker()
            sock.recv(1 << 20)
            reset(sock)
            self.assertTrue(pidfdWaitGone(pid, 5))
            end = server.endOf(connection)
            self.assertEqual(end["reason"], "client-reset")
            self.assertGreater(end["bytes_spliced_out"], 0)


class NotSplicedTests(TestCase):
    """
    Clients whose bytes reach the server through something else than a
    plain TCP transport are read and written as before.
    """

    def check(self, server: Server, sock: socket.socket, splicedOut: bool = False) -> None:
        """
        2 MiB through C{sock}'s worker, whole and in order, none spliced
        in, and none out unless C{splicedOut}.
        """
        self.addCleanup(sock.close)
        sock.settimeout(10)
        self.assertTrue(readLine(sock).strip().isdigit())
        sendThenCheck(self, sock, [random.Random(3).randbytes(2 * MiB)])
        end = server.endOf(1)
        self.assertEqual((end["bytes_in"], end["bytes_spliced"]), (2 * MiB, 0))
        self.assertEqual(end["bytes_spliced_out"] > 0, splicedOut)

    def test_unix(self) -> None:
        path = unixSocketPath(self)
        server = Server(["--half-close", "forward"], CRC_WORKER, listen=f"unix:{path}")
        self.addCleanup(server.cleanup)
        sock = socket.socket(socket.AF_UNIX)
        wait(lambda: sock.connect_ex(path) == 0, 30)
        self.check(server, sock)

    def test_noSpool(self) -> None:
        """
        Without a spool the client's bytes are copied, so that its worker's
        pipe takes its whole size of a backlog (the worker's output is
        still spliced).
        """
        server = Server(["--half-close", "forward", "--spool-max", "0"], CRC_WORKER)
        self.addCleanup(server.cleanup)
        self.check(server, server.connect(), splicedOut=True)

    def test_proxyHeader(self) -> None:
        server = Server(
            ["--half-close", "forward"], CRC_WORKER, listen="haproxy:tcp:0:interface=127.0.0.1"
        )
        self.addCleanup(server.cleanup)
        server.port = wait(server._listeningPort, 30)
        sock = server.connect()
        sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 8787\r\n")
        self.check(server, sock)
