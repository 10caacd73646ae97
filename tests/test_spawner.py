"""
The spawner end to end: warm Python workers, containment (cgroup v2,
rlimits, user), and what happens when the spawner or the server dies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import (
    Server,
    alive,
    children,
    openFDs,
    readAll,
    readLine,
    runTwistd,
    spawners,
    wait,
    waitGone,
    workers,
)
from twisted_closewatch import containment, spawner

#: A worker that starts a daemon (its own session, so it leaves the
#: worker's process group), says both pids, then waits.
DAEMON_WORKER = [
    "/bin/sh",
    "-c",
    (
        'setsid sh -c "exec sleep 100000" </dev/null >/dev/null 2>&1 & '
        "echo $$ $!; exec sleep 100000"
    ),
]


def _needSpawner() -> None:
    if not spawner.available():
        raise SkipTest("the spawner needs pidfds (Linux 5.3+)")


def _needRoot() -> None:
    if os.geteuid() != 0:
        raise SkipTest("needs root")


def _needCgroups() -> None:
    _needRoot()
    try:
        containment.findCgroupBase()
    except containment.ContainmentError as e:
        raise SkipTest(f"no cgroup v2 for workers here: {e}") from None


def _serverCgroup(server: Server) -> str | None:
    """
    The server's cgroup, if it made one.
    """
    try:
        path = os.path.join(containment.findCgroupBase(), f"closewatch-{server.pid}")
    except containment.ContainmentError:
        return None
    return path if os.path.isdir(path) else None


def _cgroupsOf(server: Server) -> list[str]:
    """
    The worker cgroups under the server's own cgroup, if it has one.
    """
    path = _serverCgroup(server)
    if path is None:
        return []
    return sorted(name for name in os.listdir(path) if name.startswith("w"))


class SpawnerTestCase(TestCase):
    def setUp(self) -> None:
        _needSpawner()

    def startServer(self, args=(), command=()) -> Server:
        server = Server(list(args), list(command))
        self.addCleanup(server.cleanup)
        return server

    def reply(self, server: Server) -> bytes:
        """
        Everything a worker that needs no input writes.
        """
        with server.connect() as sock:
            return readAll(sock)


class PythonWorkerTests(SpawnerTestCase):
    args = ("--python-worker", "tests.pyworkers:describe", "--half-close", "forward")

    def test_contract(self) -> None:
        """
        A warm Python worker gets the UCSPI variables, its connection id and
        C{--env}, exactly fds 0-2, its own session, a random generator
        reseeded per fork, and a module imported once, in the spawner.
        """
        server = self.startServer([*self.args, "--env", "EXTRA=1"])
        reports = []
        for _ in range(2):
            sock = server.connect()
            reports.append(json.loads(readLine(sock)))
            sock.sendall(b"echo\n")
            self.assertEqual(readLine(sock), b"echo\n")
            sock.close()
        first, second = reports
        env = first["env"]
        self.assertEqual(env["PROTO"], "TCP")
        self.assertEqual(env["TCPREMOTEIP"], "127.0.0.1")
        self.assertEqual(env["TCPLOCALPORT"], str(server.port))
        self.assertEqual(env["EXTRA"], "1")
        self.assertEqual(env["CLOSEWATCH_CONNECTION_ID"], "1")
        self.assertEqual(second["env"]["CLOSEWATCH_CONNECTION_ID"], "2")
        # The listing's own descriptor is the only one above 2.
        self.assertEqual(len(first["fds"]), 4, first["fds"])
        self.assertEqual(first["fds"][:3], [0, 1, 2])
        self.assertEqual(first["sid"], first["pid"])
        self.assertNotEqual(first["random"], second["random"])
        self.assertEqual(first["importedIn"], second["importedIn"])
        self.assertIn(first["importedIn"], spawners(server.pid))

    def test_exitStatus(self) -> None:
        """
        The function's return value is the worker's exit status.
        """
        server = self.startServer(["--python-worker", "tests.pyworkers:status"])
        self.assertEqual(self.reply(server), b"")
        self.assertEqual(server.endOf(1)["exit_code"], 7)

    def test_raises(self) -> None:
        """
        A worker that raises: its traceback is logged, it exits 1, and the
        server serves the next client.
        """
        server = self.startServer(["--python-worker", "tests.pyworkers:raises"])
        self.reply(server)
        self.assertEqual(server.endOf(1)["exit_code"], 1)
        wait(lambda: "RuntimeError: a worker bug" in server.output(), 5)
        self.reply(server)
        self.assertEqual(server.endOf(2)["exit_code"], 1)

    def test_importFails(self) -> None:
        """
        A module that cannot be imported is a one-line start-up error.
        """
        result = runTwistd(["--python-worker", "tests.pyworkers_broken:main"])
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", output)
        self.assertIn(
            "--python-worker 'tests.pyworkers_broken:main': ImportError: this module is "
            "broken on purpose",
            output.strip().splitlines()[-1],
        )

    def test_exclusiveWithCommand(self) -> None:
        result = runTwistd(["--python-worker", "tests.pyworkers:status", "--", "/bin/cat"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("exclude each other", _lastLine(result))


class CgroupTests(SpawnerTestCase):
    def test_setsidDaemonKilled(self) -> None:
        """
        With the cgroup on, a daemon a worker started in a session of its
        own dies with the worker, and the worker's cgroup is removed.
        """
        _needCgroups()
        server = self.startServer(["--cgroup", "on"], DAEMON_WORKER)
        sock, worker, daemon = _daemonWorker(server)
        self.assertEqual(len(_cgroupsOf(server)), 1)
        sock.close()
        waitGone([worker, daemon], 3)
        wait(lambda: not _cgroupsOf(server), 3)
        self.assertEqual(server.endOf(1)["reason"], "client-closed")

    def test_cgroupOff(self) -> None:
        """
        With C{--cgroup off}, the process group is the kill's reach: a
        setsid daemon survives its worker (the documented limit).
        """
        server = self.startServer(["--cgroup", "off"], DAEMON_WORKER)
        sock, worker, daemon = _daemonWorker(server)
        self.addCleanup(_kill, daemon)
        sock.close()
        waitGone([worker], 3)
        time.sleep(0.2)
        self.assertTrue(alive(daemon))

    def test_serverKilled(self) -> None:
        """
        A server killed with SIGKILL: every worker dies, setsid daemons
        included (cgroup on), and the cgroups are removed.
        """
        _needCgroups()
        server = self.startServer(["--cgroup", "on"], DAEMON_WORKER)
        socks, pids = [], []
        for _ in range(3):
            sock, worker, daemon = _daemonWorker(server)
            pids += [worker, daemon]
            socks.append(sock)
        helper = spawners(server.pid)
        base = os.path.join(containment.findCgroupBase(), f"closewatch-{server.pid}")
        server.process.kill()
        server.process.wait(5)
        self.assertLess(waitGone(pids + helper, 3), 2.0)
        wait(lambda: not os.path.exists(base), 3)
        for sock in socks:
            sock.close()

    def test_autoFallsBack(self) -> None:
        """
        C{--cgroup auto} where no cgroup v2 hierarchy is mounted (here: the
        server in a mount namespace of its own, the hierarchy unmounted
        there) serves, says why in one start-up line, and kills workers by
        process group: a setsid daemon survives (the documented limit).
        """
        _needCgroups()
        with open("/proc/self/mountinfo") as f:
            root = containment.cgroup2Root(f.read())
        unshare = shutil.which("unshare")
        if unshare is None or root is None:
            raise SkipTest("needs unshare (util-linux) and a cgroup v2 hierarchy")
        server = Server(
            [], DAEMON_WORKER,
            wrapper=[unshare, "--mount", "--propagation", "private",
                     "/bin/sh", "-c", 'umount -l "$0" && exec "$@"', root],
        )
        self.addCleanup(server.cleanup)
        sock, worker, daemon = _daemonWorker(server)
        self.addCleanup(_kill, daemon)
        warnings = [
            e["text"] for e in server.events()
            if e.get("level") == "warn" and "--cgroup auto" in e.get("text", "")
        ]
        self.assertEqual(
            warnings,
            ["--cgroup auto: workers get no cgroup (no cgroup v2 hierarchy is mounted); "
             "they are killed by process group, which a setsid daemon leaves"],
        )
        self.assertFalse(os.path.exists(os.path.join(root, f"closewatch-{server.pid}")))
        sock.close()
        waitGone([worker], 3)
        time.sleep(0.2)
        self.assertTrue(alive(daemon))
        self.assertEqual(server.endOf(1)["reason"], "client-closed")

    def test_memoryNeedsController(self) -> None:
        """
        C{--worker-memory} where the memory controller is not available to
        the server's cgroup is a start-up error naming the option.
        """
        _needCgroups()
        base = containment.findCgroupBase()
        with open(os.path.join(base, "cgroup.controllers")) as f:
            if "memory" in f.read().split():
                raise SkipTest("the memory controller is available here")
        result = runTwistd(["--worker-memory", "256m"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--worker-memory", _lastLine(result))
        self.assertIn("memory controller", _lastLine(result))


def _daemonWorker(server: Server) -> tuple[socket.socket, int, int]:
    """
    Connect to a L{DAEMON_WORKER} and wait until its daemon has left the
    worker's session.
    """
    sock = server.connect()
    worker, daemon = map(int, readLine(sock).split())
    wait(lambda: os.getsid(daemon) == daemon, 5)
    return sock, worker, daemon


def _lastLine(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr).strip().splitlines()[-1]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class LimitTests(SpawnerTestCase):
    def test_addressSpace(self) -> None:
        """
        C{--rlimit as=256m}: a worker allocating 512 MB fails.
        """
        script = "b = bytearray(512 * 1024 * 1024); print('allocated')"
        server = self.startServer(
            ["--rlimit", "as=256m"],
            ["/bin/sh", "-c", f'{sys.executable} -c "{script}" 2>&1; echo "status $?"'],
        )
        out = self.reply(server)
        self.assertIn(b"MemoryError", out)
        self.assertIn(b"status 1", out)
        self.assertNotIn(b"allocated", out)

    def test_nofile(self) -> None:
        server = self.startServer(
            ["--rlimit", "nofile=64"], ["/bin/sh", "-c", "ulimit -n; ulimit -Hn"]
        )
        self.assertEqual(self.reply(server), b"64\n64\n")

    def test_nofilePythonWorker(self) -> None:
        """
        Limits apply to warm Python workers too.
        """
        server = self.startServer(
            ["--rlimit", "nofile=64", "--python-worker", "tests.pyworkers:describe"]
        )
        sock = server.connect()
        report = json.loads(readLine(sock))
        sock.close()
        self.assertEqual(report["fds"][:3], [0, 1, 2])
        out = self.reply(
            self.startServer(["--rlimit", "cpu=5"], ["/bin/sh", "-c", "ulimit -t"])
        )
        self.assertEqual(out, b"5\n")

    def test_workerUser(self) -> None:
        """
        C{--worker-user nobody}: workers run as nobody, in nobody's group
        only.
        """
        _needRoot()
        import pwd

        nobody = pwd.getpwnam("nobody")
        server = self.startServer(
            ["--worker-user", "nobody"], ["/bin/sh", "-c", "id -u; id -g; id -G"]
        )
        self.assertEqual(
            self.reply(server).split(),
            [str(nobody.pw_uid).encode(), str(nobody.pw_gid).encode(),
             str(nobody.pw_gid).encode()],
        )

    def test_badOptions(self) -> None:
        for args, message in [
            (["--rlimit", "stack=1m"], "--rlimit 'stack=1m'"),
            (["--rlimit", "as=lots"], "--rlimit 'as=lots'"),
            (["--worker-user", "no-such-user-here"], "--worker-user 'no-such-user-here'"),
            (["--cgroup", "maybe"], "--cgroup 'maybe'"),
        ]:
            result = runTwistd(args)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertNotIn("Traceback", result.stdout + result.stderr)
            self.assertIn(message, _lastLine(result))


class SpawnerLifeTests(SpawnerTestCase):
    def test_spawnerKilled(self) -> None:
        """
        A spawner killed with SIGKILL is logged and replaced; the workers it
        had started are killed and their connections end; new clients are
        served.
        """
        server = self.startServer(
            [], ["/bin/sh", "-c", "echo $$; exec sleep 100000"]
        )
        sock, pid = server.connectWorker()
        first = spawners(server.pid)
        self.assertEqual(len(first), 1)
        os.kill(first[0], signal.SIGKILL)
        self.assertEqual(readAll(sock), b"")
        waitGone([pid], 3)
        wait(lambda: "ended unexpectedly" in server.output(), 5)
        second = wait(lambda: [p for p in spawners(server.pid) if p not in first], 10)
        sock2, pid2 = server.connectWorker()
        self.assertIn(pid2, children(second[0]))
        sock2.close()
        waitGone([pid2], 3)
        self.assertEqual(server.endOf(1)["exit_signal"], signal.SIGKILL)
        wait(lambda: not _cgroupsOf(server), 3)
        base = _serverCgroup(server)
        self.assertEqual(server.stop(), 0)
        if base is not None:
            self.assertFalse(os.path.exists(base))

    def test_churn(self) -> None:
        """
        1,000 connections come and go: no descriptor, process or cgroup is
        left behind.
        """
        server = self.startServer([], ["/bin/echo", "hi"])
        with server.connect() as sock:
            self.assertEqual(readAll(sock), b"hi\n")
        server.endOf(1)
        before = openFDs(server.pid)
        count = 1000
        for _ in range(count - 1):
            with server.connect() as sock:
                readAll(sock)
        wait(lambda: len(server.ends()) >= count, 30)
        wait(lambda: not workers(server.pid), 10)
        self.assertEqual(openFDs(server.pid), before)
        helper = spawners(server.pid)[0]
        self.assertLess(len(openFDs(helper)), 10)
        wait(lambda: not _cgroupsOf(server), 5)
