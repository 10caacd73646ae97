"""
Spooling, end to end: a client whose worker is not reading is read on into
a spool file, so that its close behind a backlog is seen at once; the
worker gets every byte in order; the limits and a full disk pause the client
without losing anything; and a server killed mid-spool leaves no file.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib

from twisted.trial.unittest import TestCase

from tests.support import (
    PID_WORKER,
    Server,
    children,
    pidfdWaitGone,
    readLine,
    scrapeMetrics,
    wait,
    waitGone,
)

MiB = 1024 * 1024
METRICS = ["--metrics", "tcp:0:interface=127.0.0.1"]

#: Says its pid, reads nothing until it gets SIGUSR1, then reads its stdin
#: to the end and says how many bytes it read and their CRC-32.
GATED_CRC_WORKER = [
    sys.executable,
    "-c",
    "import os, signal, zlib\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
    "print(os.getpid(), flush=True)\n"
    "signal.sigwait({signal.SIGUSR1})\n"
    "crc = n = 0\n"
    "while chunk := os.read(0, 1 << 20):\n"
    "    crc = zlib.crc32(chunk, crc)\n"
    "    n += len(chunk)\n"
    "print(n, crc, flush=True)\n",
]


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Sender(threading.Thread):
    """
    Sends C{data} in the background, counting what the kernel took, then
    half-closes.
    """

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = memoryview(data)
        self.sent = 0
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.sock.settimeout(60)
            while self.sent < len(self.data):
                self.sent += self.sock.send(self.data[self.sent : self.sent + 65536])
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = e

    def stalled(self, quiet: float = 0.5, timeout: float = 10.0) -> int:
        """
        Wait until the server has taken nothing for C{quiet} seconds; return
        what was sent by then.
        """
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            if self.sent == last:
                return last
            last = self.sent
            time.sleep(quiet)
        raise AssertionError(f"still sending after {timeout} s ({self.sent} bytes)")


def spoolFiles(directory: str, pids: list[int]) -> list[str]:
    """
    The descriptors of C{pids} open on files in C{directory}.
    """
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith(directory + "/"):
                found.append(f"{pid}/{fd} -> {target}")
    return found


def descendants(pid: int) -> list[int]:
    """
    The processes C{pid} started, and theirs (the guardian, the spawner,
    the workers).
    """
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


class SpoolTests(TestCase):
    def setUp(self) -> None:
        self.spoolDir = tempfile.mkdtemp(prefix="closewatch-spool-")
        self.addCleanup(shutil.rmtree, self.spoolDir, True)

    def server(self, args: list[str], command: list[str] = GATED_CRC_WORKER) -> Server:
        server = Server(["--spool-dir", self.spoolDir, *args], command)
        self.addCleanup(server.cleanup)
        return server

    def checkDelivered(self, sock: socket.socket, pid: int, data: bytes) -> None:
        """
        Let the gated worker read: it got C{data}, whole and in order.
        """
        os.kill(pid, signal.SIGUSR1)
        line = readLine(sock, 30)
        self.assertEqual(line.split(), [str(len(data)).encode(), str(zlib.crc32(data)).encode()])

    def scrape(self, server: Server) -> dict[str, float]:
        return {name: value for (name, _), value in scrapeMetrics(server).items()}

    def test_closeBehindABacklogKills(self) -> None:
        """
        With the default settings, a client that sends 8 MiB its worker
        never reads (32 times the read-ahead) and closes has its worker
        killed at once: everything was read, so its FIN was too.  (Without
        the spool, the FIN waits in the client's own send queue.)  The close
        watch sees the FIN as it arrives, whatever is still unread before it
        in the server's socket buffer.
        """
        server = self.server([], PID_WORKER)
        sock, pid = server.connectWorker()
        sock.settimeout(10)
        sock.sendall(b"b" * (8 * MiB))
        sock.close()
        self.assertTrue(pidfdWaitGone(pid, 3), "the worker survived a close behind 8 MiB")
        end = server.endOf(1)
        self.assertEqual(end["reason"], "client-closed")
        self.assertGreater(end["bytes_spooled"], 4 * MiB)

    def test_orderAndIntegrity(self) -> None:
        """
        64 MiB sent to a worker that reads nothing until all is sent: the
        server spools it, and the worker then reads every byte in order,
        then its EOF (C{--half-close forward}).
        """
        server = self.server(["--half-close", "forward"])
        sock, pid = server.connectWorker()
        data = payload(64 * MiB, 1)
        sender = Sender(sock, data)
        sender.start()
        sender.join(30)
        self.assertIsNone(sender.error)
        self.assertEqual(sender.sent, len(data), "the spool did not take the 64 MiB")
        self.checkDelivered(sock, pid, data)
        end = server.endOf(1)
        self.assertEqual(end["reason"], "worker-exited")
        self.assertGreater(end["bytes_spooled"], 32 * MiB)

    def test_perConnectionLimitPauses(self) -> None:
        """
        Past C{--spool-max} the client is paused: its spool holds no more,
        and nothing it sent is lost.
        """
        server = self.server(["--half-close", "forward", "--spool-max", "1m", *METRICS])
        sock, pid = server.connectWorker()
        data = payload(32 * MiB, 2)
        sender = Sender(sock, data)
        sender.start()
        self.assertLess(sender.stalled(), len(data))
        figures = self.scrape(server)
        self.assertEqual(figures["closewatch_spool_bytes"], MiB)
        self.checkDelivered(sock, pid, data)
        sender.join(10)
        self.assertIsNone(sender.error)

    def test_totalLimitIsShared(self) -> None:
        """
        C{--spool-total} holds for all connections together: two clients
        of non-reading workers are paused with at most that much on disk,
        and both workers get all their bytes.
        """
        server = self.server(["--half-close", "forward", "--spool-total", "1m", *METRICS])
        connections = []
        for seed in (3, 4):
            sock, pid = server.connectWorker()
            data = payload(16 * MiB, seed)
            sender = Sender(sock, data)
            sender.start()
            connections.append((sock, pid, data, sender))
        for _, _, data, sender in connections:
            self.assertLess(sender.stalled(), len(data))
        figures = self.scrape(server)
        self.assertEqual(figures["closewatch_spool_bytes"], MiB)
        self.assertEqual(figures["closewatch_spool_limit_bytes"], MiB)
        for sock, pid, data, sender in connections:
            self.checkDelivered(sock, pid, data)
            sender.join(10)
        after = self.scrape(server)
        self.assertEqual(after["closewatch_spool_bytes"], 0)
        self.assertGreaterEqual(after["closewatch_spooled_bytes_total"], MiB)

    def test_fullDirectoryPauses(self) -> None:
        """
        A spool directory that runs out of space (a 4 MiB tmpfs) pauses the
        client, loses and reorders nothing, and is logged once.
        """
        if os.geteuid() != 0:
            raise self.skipTest("mounting a tmpfs needs root")
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", self.spoolDir], check=True
        )
        self.addCleanup(subprocess.run, ["umount", self.spoolDir], check=True)
        server = self.server(["--half-close", "forward"])
        sock, pid = server.connectWorker()
        data = payload(24 * MiB, 5)
        sender = Sender(sock, data)
        sender.start()
        self.assertLess(sender.stalled(), len(data))
        self.checkDelivered(sock, pid, data)
        sender.join(10)
        server.endOf(1)
        warnings = [e for e in server.events() if e.get("namespace") == "twisted_closewatch.spool"]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("No space left on device", warnings[0]["text"])
        self.assertEqual(os.listdir(self.spoolDir), [])

    def test_serverKilledLeavesNoFile(self) -> None:
        """
        The spool file has no name from the start: a server SIGKILLed while
        it spools leaves nothing in the spool directory, and no process
        (its workers, its helpers) holds the file.
        """
        server = self.server([], PID_WORKER)
        sock, pid = server.connectWorker()
        sock.settimeout(10)
        sock.sendall(b"k" * (8 * MiB))
        held = wait(lambda: spoolFiles(self.spoolDir, [server.pid]))
        self.assertEqual(len(held), 1, held)
        self.assertTrue(held[0].endswith(" (deleted)"), held)
        self.assertEqual(os.listdir(self.spoolDir), [])
        others = descendants(server.pid)
        self.assertIn(pid, others)
        self.assertEqual(spoolFiles(self.spoolDir, others), [])
        server.process.kill()
        server.process.wait(10)
        waitGone(others, 10)
        sock.close()
        self.assertEqual(os.listdir(self.spoolDir), [])
        self.assertEqual(spoolFiles(self.spoolDir, [server.pid, *others]), [])
