"""
Containment settings, the spawner's wire format and the options that
choose them, without a process.
"""

from __future__ import annotations

import math
import resource

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_closewatch import containment, spawnerprocess
from twisted_closewatch.options import Options

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_ONLY = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"


class AmountTests(SynchronousTestCase):
    def test_units(self) -> None:
        self.assertEqual(containment.parseAmount("64"), 64)
        self.assertEqual(containment.parseAmount("256k"), 256 * 1024)
        self.assertEqual(containment.parseAmount("256m"), 256 * 1024**2)
        self.assertEqual(containment.parseAmount("2G"), 2 * 1024**3)
        self.assertEqual(containment.parseAmount("unlimited"), resource.RLIM_INFINITY)

    def test_bad(self) -> None:
        for text in ("", "-1", "1.5m", "12x", "lots"):
            self.assertRaises(containment.ContainmentError, containment.parseAmount, text)


class RlimitTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertEqual(
            containment.parseRlimit("as=256m"), (resource.RLIMIT_AS, 256 * 1024**2)
        )
        self.assertEqual(containment.parseRlimit("nofile=64"), (resource.RLIMIT_NOFILE, 64))
        self.assertEqual(containment.parseRlimit("CPU=5"), (resource.RLIMIT_CPU, 5))
        self.assertEqual(set(containment.RLIMITS), {"as", "cpu", "data", "fsize", "nofile",
                                                     "nproc", "core"})

    def test_bad(self) -> None:
        for text in ("stack=1m", "as", "=5", "as=", "nofile=many"):
            with self.assertRaises(containment.ContainmentError) as caught:
                containment.parseRlimit(text)
            self.assertIn(f"--rlimit {text!r}", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))


class CgroupDiscoveryTests(SynchronousTestCase):
    def test_hybrid(self) -> None:
        self.assertEqual(containment.cgroup2Root(HYBRID), "/sys/fs/cgroup/unified")

    def test_unified(self) -> None:
        self.assertEqual(containment.cgroup2Root(UNIFIED), "/sys/fs/cgroup")

    def test_none(self) -> None:
        self.assertIsNone(containment.cgroup2Root(V1_ONLY))

    def test_escapedPath(self) -> None:
        line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n"
        self.assertEqual(containment.cgroup2Root(line), "/mnt/my cgroups")

    def test_ownCgroup(self) -> None:
        text = "4:memory:/x\n0::/system.slice/closewatch.service\n"
        self.assertEqual(containment.ownCgroup(text), "/system.slice/closewatch.service")
        self.assertIsNone(containment.ownCgroup("4:memory:/x\n"))


class ContainmentTests(SynchronousTestCase):
    def test_cgroupOff(self) -> None:
        """
        C{--cgroup off} needs no cgroup v2 and gives none; limits need one.
        """
        off = containment.Containment(cgroup="off")
        self.assertEqual(containment.cgroupBase(off), (None, None))
        self.assertRaises(
            containment.ContainmentError,
            containment.cgroupBase,
            containment.Containment(cgroup="off", cgroupLimits={"pids.max": "10"}),
        )

    def test_user(self) -> None:
        self.assertEqual(containment.resolveUser("0"), (0, 0))
        self.assertEqual(containment.resolveUser("root"), (0, 0))
        self.assertRaises(containment.ContainmentError, containment.resolveUser, "no such user")
        self.assertEqual(containment.resolveGroup("0"), 0)
        self.assertRaises(containment.ContainmentError, containment.resolveGroup, "no such group")


class WireFormatTests(SynchronousTestCase):
    def test_request(self) -> None:
        data = spawnerprocess.encodeRequest(
            7, ["/bin/cat", "-u"], {"A": "1"}, cgroup="w7",
            rlimits=[(resource.RLIMIT_NOFILE, 64)], uid=65534, gid=65534,
        )
        self.assertEqual(
            spawnerprocess.decodeMessage(data),
            {"id": 7, "argv": ["/bin/cat", "-u"], "env": {"A": "1"}, "unset": [], "cwd": None,
             "cgroup": "w7", "rlimits": [[resource.RLIMIT_NOFILE, 64]], "uid": 65534,
             "gid": 65534},
        )

    def test_pythonRequest(self) -> None:
        message = spawnerprocess.decodeMessage(spawnerprocess.encodeRequest(1, None, {}))
        self.assertIsNone(message["argv"])
        self.assertIsNone(message["cgroup"])
        self.assertEqual(message["rlimits"], [])

    def test_environmentDelta(self) -> None:
        """
        A request carries how the worker's environment differs from the
        spawner's: what is set or changed, and what is removed.
        """
        base = {"PATH": "/bin", "HOME": "/root", "LANG": "C"}
        env = {"PATH": "/bin", "LANG": "C.UTF-8", "TCPREMOTEIP": "127.0.0.1"}
        changed, unset = spawnerprocess.environmentDelta(base, env)
        self.assertEqual(changed, {"LANG": "C.UTF-8", "TCPREMOTEIP": "127.0.0.1"})
        self.assertEqual(unset, ["HOME"])
        self.assertEqual(spawnerprocess.applyEnvironment(base, changed, unset), env)
        self.assertEqual(base["HOME"], "/root")
        self.assertEqual(spawnerprocess.environmentDelta(env, env), ({}, []))

    def test_notAnObject(self) -> None:
        self.assertRaises(ValueError, spawnerprocess.decodeMessage, b"[1]")
        self.assertRaises(ValueError, spawnerprocess.decodeMessage, b"{")

    def test_descriptorsCloseOnExec(self) -> None:
        """
        Descriptors received with a message are close-on-exec, so that no
        worker spawned meanwhile inherits another's pipe.
        """
        import os
        import socket

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r, w = os.pipe()
        try:
            socket.send_fds(a, [b"{}"], [r, w])
            data, fds = spawnerprocess.recvFds(b, 3, bytearray(16))
            self.assertEqual(data, b"{}")
            self.assertEqual(len(fds), 2)
            self.assertEqual([os.get_inheritable(fd) for fd in fds], [False, False])
            for fd in fds:
                os.close(fd)
        finally:
            for fd in (r, w):
                os.close(fd)
            a.close()
            b.close()

    def test_requestTooLong(self) -> None:
        """
        A request the spawner could not receive whole is refused before it
        is sent: C{E2BIG}, not a wait for an answer that cannot come.
        """
        import errno
        import socket

        from twisted.internet.testing import MemoryReactorClock

        from twisted_closewatch.spawner import Spawner

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        spawner = Spawner(MemoryReactorClock(), None, containment.Containment(cgroup="off"))
        spawner._control = a
        huge = {"X": "x" * spawnerprocess.MESSAGE_MAX}
        error = self.assertRaises(OSError, spawner.ask, ["/bin/true"], huge, [])
        self.assertEqual(error.errno, errno.E2BIG)
        b.setblocking(False)
        self.assertRaises(BlockingIOError, b.recv, 1)

    def test_cgroupKill(self) -> None:
        """
        C{cgroupKill} writes C{1} to C{cgroup.kill}; a cgroup that is gone
        is no error, anything else is.
        """
        import os

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "cgroup.kill")
        with open(path, "w"):
            pass
        self.assertTrue(spawnerprocess.cgroupKill(directory))
        with open(path) as f:
            self.assertEqual(f.read(), "1")
        self.assertFalse(spawnerprocess.cgroupKill(os.path.join(directory, "gone")))
        os.rename(path, path + ".away")
        os.mkdir(path)
        self.assertRaises(IsADirectoryError, spawnerprocess.cgroupKill, directory)

    def test_messageTooLong(self) -> None:
        """
        A message longer than the buffer is an error, and the descriptors
        it carried are closed, not leaked.
        """
        import os
        import socket

        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        socket.send_fds(a, [b"x" * 17], [r])
        os.close(r)
        before = sorted(os.listdir("/proc/self/fd"))
        self.assertRaises(ValueError, spawnerprocess.recvFds, b, 3, bytearray(16))
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), before)

    def test_exitStatus(self) -> None:
        self.assertEqual(spawnerprocess._callEntryPoint(lambda: None), 0)
        self.assertEqual(spawnerprocess._callEntryPoint(lambda: 3), 3)
        self.assertEqual(spawnerprocess._callEntryPoint(lambda: 256 + 4), 4)

        def exits() -> None:
            raise SystemExit(5)

        self.assertEqual(spawnerprocess._callEntryPoint(exits), 5)


class OptionTests(SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--cgroup", "off", *args])
        return options

    def assertUsageError(self, args: tuple[str, ...], fragment: str) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*args)
        self.assertIn(fragment, str(caught.exception))

    def test_badContainment(self) -> None:
        for args, fragment in [
            (("--python-worker", "m:f", "--", "/bin/cat"), "exclude each other"),
            (("--python-worker", "justamodule"), "MODULE:FUNCTION"),
            (("--cgroup", "maybe"), "--cgroup 'maybe'"),
            (("--worker-memory", "256m"), "--worker-memory"),
            (("--worker-memory", "lots"), "--worker-memory 'lots'"),
            (("--worker-pids", "0"), "--worker-pids"),
            (("--worker-group", "no such group"), "--worker-group"),
        ]:
            self.assertUsageError(args, fragment)

    def test_containment(self) -> None:
        config = self.parse(
            "--rlimit", "nofile=64", "--rlimit", "as=1g", "--worker-user", "0",
            "--", "/bin/cat",
        )["config"]
        self.assertEqual(
            config.containment.rlimits,
            ((resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_AS, 1024**3)),
        )
        self.assertEqual((config.containment.uid, config.containment.gid), (0, 0))
        self.assertEqual(config.containment.cgroup, "off")
        self.assertIsNone(config.pythonWorker)

    def test_defaultIsWarm(self) -> None:
        from twisted_closewatch import spawner

        config = self.parse()["config"]
        expected = "twisted_closewatch.sqlworker:main" if spawner.available() else None
        self.assertEqual(config.pythonWorker, expected)


class ReapScheduleTests(SynchronousTestCase):
    """
    The spawner reaps a lone exit at once, a burst's once it pauses, and
    never later than L{spawnerprocess.REAP_DELAY} after the first.
    """

    def test_loneExitAtOnce(self) -> None:
        reaps = spawnerprocess.ReapSchedule()
        self.assertTrue(reaps.exited(100.0))
        reaps.reaped(100.0)
        self.assertTrue(reaps.exited(100.0 + 2 * spawnerprocess.REAP_QUIET))
        self.assertEqual(reaps.timeout(100.0, None), None)

    def test_burstOnceItPauses(self) -> None:
        quiet = spawnerprocess.REAP_QUIET
        reaps = spawnerprocess.ReapSchedule()
        self.assertTrue(reaps.exited(100.0))
        reaps.reaped(100.0)
        last = 100.0 + quiet / 2
        self.assertFalse(reaps.exited(100.0 + quiet / 4))
        self.assertFalse(reaps.exited(last))
        self.assertFalse(reaps.due(100.0 + quiet))
        self.assertEqual(reaps.timeout(last, None), math.ceil(quiet * 1000))
        self.assertEqual(reaps.timeout(last, 1), 1)
        self.assertTrue(reaps.due(last + quiet))
        reaps.reaped(last + quiet)
        self.assertFalse(reaps.due(200.0))

    def test_burstBounded(self) -> None:
        """
        Exits that never pause are still reaped every REAP_DELAY.
        """
        quiet, delay = spawnerprocess.REAP_QUIET, spawnerprocess.REAP_DELAY
        reaps = spawnerprocess.ReapSchedule()
        reaps.exited(100.0)
        reaps.reaped(100.0)
        now = 100.0
        while not reaps.due(now):
            now += quiet / 2
            reaps.exited(now)
        # The first exit put off came at 100 + quiet / 2; each step is quiet / 2.
        self.assertLessEqual(now, 100.0 + quiet + delay)
        self.assertGreater(now, 100.0 + delay - quiet)

    def test_steadyStreamIsNoBurst(self) -> None:
        """
        One client after another, a few hundred a second: each exit is
        reaped at once, not held for a burst that is not there.
        """
        reaps = spawnerprocess.ReapSchedule()
        now = 100.0
        for _ in range(20):
            self.assertTrue(reaps.exited(now))
            reaps.reaped(now)
            now += 0.0025

    def test_burstFoundAtTheFirstReap(self) -> None:
        """
        Several exits found by the first reap (the spawner woke late): one
        is reaped, the rest once the burst pauses.
        """
        quiet = spawnerprocess.REAP_QUIET
        reaps = spawnerprocess.ReapSchedule()
        self.assertTrue(reaps.exited(100.0))
        reaps.reaped(100.0)
        reaps.more(100.0)
        self.assertFalse(reaps.due(100.0 + quiet / 2))
        self.assertTrue(reaps.due(100.0 + quiet))
