"""
The command line's rules, in memory: the user timeout that follows the
keepalive settings, errors that name their option, the version, the
keepalive warnings, how a peer is named, and listeners that bind before
the service starts.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import tomllib
from contextlib import redirect_stdout
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.python import usage
from twisted.trial.unittest import SkipTest, TestCase

import twisted_closewatch
from twisted_closewatch import tcp
from twisted_closewatch.addresses import describe
from twisted_closewatch.config import MAX_USER_TIMEOUT, Config
from twisted_closewatch.factory import CloseWatchFactory
from twisted_closewatch.listening import CannotListen, Listener
from twisted_closewatch.options import Options
from twisted_closewatch.service import CloseWatchService

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEEPALIVE = ["--keepalive-idle", "1", "--keepalive-interval", "1", "--keepalive-count", "2"]


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions([*args, "--", "/bin/true"])
    return options


def parseError(*args: str) -> str:
    try:
        parse(*args)
    except usage.UsageError as e:
        return str(e)
    raise AssertionError(f"{args} accepted")


class UserTimeoutTests(TestCase):
    """
    Without C{--user-timeout}, the user timeout is idle + interval x count,
    so that Linux, which ignores the count under a user timeout, drops a
    dead peer when the keepalive settings say; an explicit one wins.
    """

    def test_followsKeepalive(self) -> None:
        config = parse(*KEEPALIVE)["config"]
        self.assertEqual(config.userTimeout, 3)
        self.assertEqual(tcp.keepaliveDeadline(config), 3)

    def test_followsEachOption(self) -> None:
        self.assertEqual(parse("--keepalive-idle", "30")["config"].userTimeout, 90)
        self.assertEqual(parse("--keepalive-interval", "2")["config"].userTimeout, 72)
        self.assertEqual(parse("--keepalive-count", "3")["config"].userTimeout, 90)

    def test_defaultsAgree(self) -> None:
        """
        The defaults keep their documented bound: 60 + 10 x 6 = 120 s, by
        keepalive count and user timeout alike.
        """
        config = parse()["config"]
        self.assertEqual(config, Config(argv=("/bin/true",)))
        self.assertEqual(config.userTimeout, 120)
        self.assertEqual(
            tcp.keepaliveDeadline(config),
            tcp.keepaliveDeadline(Config(userTimeout=0)),
        )

    def test_explicitWins(self) -> None:
        self.assertEqual(parse(*KEEPALIVE, "--user-timeout", "7.5")["config"].userTimeout, 7.5)
        self.assertEqual(parse(*KEEPALIVE, "--user-timeout", "0")["config"].userTimeout, 0)

    def test_library(self) -> None:
        """
        A L{Config} built directly follows the same rule.
        """
        self.assertEqual(Config(keepaliveIdle=5, keepaliveInterval=2, keepaliveCount=3).userTimeout, 11)
        self.assertEqual(Config(keepaliveIdle=5, userTimeout=1).userTimeout, 1)

    def test_bounded(self) -> None:
        """
        The largest keepalive settings do not make a user timeout the
        kernel refuses.
        """
        config = parse(
            "--keepalive-idle", "32767", "--keepalive-interval", "32767", "--keepalive-count", "127"
        )["config"]
        self.assertEqual(config.userTimeout, MAX_USER_TIMEOUT)


class KeepaliveWarningTests(TestCase):
    """
    The unix-socket warning (and the other keepalive warnings) only when a
    keepalive option was given.
    """

    def test_given(self) -> None:
        self.assertFalse(parse()["keepalive-given"])
        self.assertFalse(parse("--no-keepalive")["keepalive-given"])
        for args in (
            ["--keepalive"],
            ["--keepalive-idle", "5"],
            ["--keepalive-interval", "5"],
            ["--keepalive-count", "5"],
            ["--user-timeout", "5"],
        ):
            self.assertTrue(parse(*args)["keepalive-given"], args)

    def test_unixWarning(self) -> None:
        unix = UNIXServerEndpoint(MemoryReactor(), "/nonexistent/x.sock")
        endpoints = [("unix:/nonexistent/x.sock", unix)]
        self.assertEqual(tcp.platformWarnings(Config(), endpoints, False), [])
        [warning] = tcp.platformWarnings(Config(), endpoints, True)
        self.assertIn("'unix:/nonexistent/x.sock'", warning)


class ErrorMessageTests(TestCase):
    """
    Every bad value is an error naming its option.
    """

    def test_everyCoercedOption(self) -> None:
        problems = []
        for row in Options.optParameters:
            if len(row) < 5:
                continue
            name = row[0]
            for value in ("abc", "-1", "nan"):
                try:
                    message = parseError(f"--{name}", value)
                except AssertionError:
                    continue  # a text option taking this value
                if f"--{name}" not in message or repr(value) not in message:
                    problems.append(f"--{name} {value!r}: {message!r}")
        self.assertEqual(problems, [])

    def test_seconds(self) -> None:
        self.assertEqual(
            parseError("--idle-timeout", "abc"), "--idle-timeout: 'abc' is not a number of seconds"
        )
        self.assertEqual(
            parseError("--grace", "-1"), "--grace: '-1': seconds must be a finite number >= 0"
        )

    def test_endpointNumbers(self) -> None:
        self.assertEqual(
            parseError("--listen", "tcp:abc"), "--listen 'tcp:abc': 'abc' is not a whole number"
        )
        self.assertEqual(
            parseError("--listen", "tcp:0:backlog=many"),
            "--listen 'tcp:0:backlog=many': 'many' is not a whole number",
        )
        self.assertEqual(
            parseError("--metrics", "tcp:x"), "--metrics 'tcp:x': 'x' is not a whole number"
        )


class VersionTests(TestCase):
    def test_option(self) -> None:
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit) as exited:
            Options().parseOptions(["--version"])
        self.assertEqual(exited.exception.code, 0)
        self.assertTrue(out.getvalue().startswith(f"closewatch {twisted_closewatch.__version__} ("))

    def test_singleSourced(self) -> None:
        """
        pyproject.toml takes its version from the module, and the installed
        distribution has it.
        """
        self.assertRegex(twisted_closewatch.__version__, r"^\d+\.\d+\.\d+")
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)
        self.assertNotIn("version", project["project"])
        self.assertIn("version", project["project"]["dynamic"])
        self.assertEqual(
            project["tool"]["setuptools"]["dynamic"]["version"],
            {"attr": "twisted_closewatch.__version__"},
        )
        try:
            installed = importlib.metadata.version("twisted-closewatch")
        except importlib.metadata.PackageNotFoundError:
            raise SkipTest("twisted-closewatch is not installed")
        self.assertEqual(installed, twisted_closewatch.__version__)


class DescribeAddressTests(TestCase):
    def test_addresses(self) -> None:
        self.assertEqual(describe(IPv4Address("TCP", "10.0.0.1", 5)), "10.0.0.1:5")
        self.assertEqual(describe(IPv6Address("TCP", "::1", 5)), "[::1]:5")
        self.assertEqual(describe(UNIXAddress(b"/run/client.sock")), "/run/client.sock")
        self.assertEqual(describe(UNIXAddress("")), "unix peer")
        self.assertEqual(describe(UNIXAddress(None)), "unix peer")


class _Endpoint:
    """
    An endpoint that counts its listens and answers with C{result}.
    """

    def __init__(self, result: Any) -> None:
        self.result = result
        self.listens = 0

    def listen(self, factory: Factory) -> defer.Deferred[Any]:
        self.listens += 1
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        return defer.succeed(self.result)


class ListenerTests(TestCase):
    """
    A L{Listener} binds once, early if asked, and says in one line why it
    could not.
    """

    def test_bindOnce(self) -> None:
        reactor = MemoryReactor()
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        listener = Listener(endpoint, Factory(), "--listen 'tcp:0'")
        listener.bind()
        listener.bind()
        listener.privilegedStartService()
        listener.startService()
        self.assertEqual(len(reactor.tcpServers), 1)

    def test_service(self) -> None:
        """
        L{CloseWatchService.bind} binds every endpoint, two given alike
        included, before the service starts.
        """
        reactor = MemoryReactor()
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        factory = CloseWatchFactory(Config(argv=("/bin/true",)), reactor)
        service = CloseWatchService(factory, [endpoint, endpoint], ["--listen 'a'"] * 2)
        service.bind()
        self.assertEqual(len(reactor.tcpServers), 2)
        self.assertFalse(service.running)

    def test_cannotListen(self) -> None:
        error = CannotListenError("127.0.0.1", 80, OSError(98, "Address already in use"))
        endpoint = _Endpoint(error)
        listener = Listener(endpoint, Factory(), "--listen 'tcp:80'")
        with self.assertRaises(CannotListen) as raised:
            listener.bind()
        self.assertEqual(
            str(raised.exception), "--listen 'tcp:80': cannot listen: Address already in use"
        )
        endpoint.result = None
        listener.bind()
        self.assertEqual(endpoint.listens, 2)

    def test_otherErrors(self) -> None:
        listener = Listener(
            _Endpoint(FileNotFoundError(2, "No such file or directory", "/x/y.lock")),
            Factory(),
            "--listen 'unix:/x/y'",
        )
        self.assertRaisesRegex(
            CannotListen, r"^--listen 'unix:/x/y': cannot listen: No such file or directory$",
            listener.bind,
        )
        listener = Listener(_Endpoint(ValueError("bad\nthing")), Factory(), "e")
        self.assertRaisesRegex(CannotListen, r"^e: cannot listen: bad thing$", listener.bind)
