"""
The settings of one closewatch server, as plain data, with their defaults,
their checks and how each is written on the command line, each said once.

A library user builds a L{Config} directly; a value out of range raises
L{InvalidSetting} (a L{ValueError}) naming the setting's option::

    Config(argv=("/bin/cat",), idleTimeout=30, maxWorkers=100)

L{twisted_closewatch.options.Options} is derived from these fields: every
field with a L{Setting} is an option, parsed by the setting's C{parse} and
checked by the field's own validator as it is given, so the command line
and the library accept exactly the same values.
"""

from __future__ import annotations

import codecs
import ipaddress
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import attr

from twisted_closewatch.addresses import Network
from twisted_closewatch.containment import Containment

#: The longest C{TCP_USER_TIMEOUT} Linux takes: milliseconds in a C int.
MAX_USER_TIMEOUT = 2**31 // 1000

#: The key of a field's L{Setting} in its attrs metadata.
SETTING = "closewatch.setting"

#: A check of one field's value: an attrs validator raising L{InvalidSetting}.
Check = Callable[[Any, "attr.Attribute[Any]", Any], None]


class InvalidSetting(ValueError):
    """
    A value a setting does not take.  Its message is a template of
    C{{value}} (the value's C{repr}) and C{{option}} (the option's name), so
    that the command line can show the text that was given.
    """

    def __init__(self, template: str, value: Any, option: str = "") -> None:
        self.template = template
        self.option = option
        super().__init__(self.describe(value))

    def describe(self, value: Any, option: str | None = None) -> str:
        return self.template.format(value=repr(value), option=option or self.option)


@attr.s(frozen=True, auto_attribs=True)
class Setting:
    """
    How one L{Config} field is given on the command line.

    @ivar option: the long option's name, without the dashes.
    @ivar help: what it means, for C{--help}.
    @ivar parse: turns the option's text into the field's value; raises
        L{InvalidSetting} for text that is no such value.
    @ivar shown: the default as a user would write it, if not as Python
        prints it.
    """

    option: str
    help: str
    parse: Callable[[str], Any] = str
    shown: str | None = None

    def showDefault(self, default: Any) -> str:
        """
        C{default} as a user would write this option.
        """
        if self.shown is not None:
            return self.shown
        if isinstance(default, bytes):
            return codecs.escape_encode(default)[0].decode("ascii")
        if isinstance(default, float):
            return f"{default:g}"
        return str(default)


def setting(
    default: Any,
    option: str,
    help: str,
    parse: Callable[[str], Any] = str,
    validator: Check | None = None,
    shown: str | None = None,
) -> Any:
    """
    A L{Config} field that is also a command-line option.  Its validator
    checks the value alone (checks across fields are in
    C{Config.__attrs_post_init__}), so that the option can run it on what
    was given.
    """
    return attr.ib(
        default=default,
        validator=validator,
        metadata={SETTING: Setting(option, help, parse, shown)},
    )


def settings() -> list[tuple[attr.Attribute[Any], Setting]]:
    """
    Every L{Config} field that is an option, with its L{Setting}.
    """
    return [(f, f.metadata[SETTING]) for f in attr.fields(Config) if SETTING in f.metadata]


# How values are written.

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parseSize(text: str) -> int:
    """
    A byte count: C{65536}, C{256k}, C{4m}, C{1g} (powers of 1024; a
    trailing C{b} or C{ib} is allowed).
    """
    match = _SIZE.match(text)
    if match is None:
        raise InvalidSetting("{value} is not a size (examples: 65536, 256k, 4m)", text)
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parseSeconds(text: str) -> float:
    """
    A number of seconds, fractions allowed (the field says which).
    """
    try:
        return float(text)
    except ValueError:
        raise InvalidSetting("{value} is not a number of seconds", text) from None


def parseWholeNumber(text: str) -> int:
    """
    A whole number; the kernel takes whole seconds for keepalive timers, so
    fractions are refused rather than rounded.
    """
    try:
        return int(text)
    except ValueError:
        raise InvalidSetting("{value}: {option} must be a whole number", text) from None


def parseBytes(text: str) -> bytes:
    """
    Bytes written with Python escapes: C{\\n}, C{\\r\\n}, C{\\x00}.
    """
    try:
        value: bytes = codecs.escape_decode(text.encode("utf-8"))[0]
    except ValueError as e:
        raise InvalidSetting(f"{{value}}: bad escape ({e})", text) from None
    return value


# What values are allowed.


def _option(attribute: attr.Attribute[Any]) -> str:
    return "--" + attribute.metadata[SETTING].option


def between(minimum: int, maximum: int) -> Check:
    """
    A whole number from C{minimum} to C{maximum}.
    """

    def check(instance: Any, attribute: attr.Attribute[Any], value: Any) -> None:
        option = _option(attribute)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidSetting("{value}: {option} must be a whole number", value, option)
        if not minimum <= value <= maximum:
            raise InvalidSetting(
                f"{{value}}: {{option}} must be between {minimum} and {maximum}", value, option
            )

    return check


def seconds(maximum: float = 10**7, minimum: float = 0) -> Check:
    """
    A finite number of seconds from C{minimum} to C{maximum}.
    """

    def check(instance: Any, attribute: attr.Attribute[Any], value: Any) -> None:
        option = _option(attribute)
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise InvalidSetting("{value}: seconds must be a finite number >= 0", value, option)
        if value < minimum:
            raise InvalidSetting(
                f"{{option}} {{value}}: at least {minimum:g} seconds", value, option
            )
        if value > maximum:
            raise InvalidSetting(f"{{value}}: at most {maximum:g} seconds", value, option)

    return check


def _readAhead(instance: Any, attribute: attr.Attribute[Any], value: int) -> None:
    if value < 4096:
        raise InvalidSetting("{value}: {option} must be at least 4k", value, "--read-ahead")
    if value > 1024**3:
        raise InvalidSetting("{value}: {option} must be at most 1g", value, "--read-ahead")


#: The largest C{--spool-max} and C{--spool-total}: 1 TiB.
SPOOL_LIMIT = 1024**4


def _spoolSize(instance: Any, attribute: attr.Attribute[Any], value: int) -> None:
    option = _option(attribute)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSetting("{value}: {option} must be a size >= 0", value, option)
    if value > SPOOL_LIMIT:
        raise InvalidSetting("{value}: {option} must be at most 1024g", value, option)


def parseDirectory(text: str) -> str:
    """
    A directory, made absolute: the server may change its working directory
    (C{twistd} without C{-n} goes to C{/}).
    """
    if not text.strip():
        raise InvalidSetting("{value}: {option} is not a directory", text)
    return os.path.abspath(text)


def _spoolDir(instance: Any, attribute: attr.Attribute[Any], value: str) -> None:
    if not isinstance(value, str):
        raise InvalidSetting("{value}: {option} must be a path", value, "--spool-dir")
    if not os.path.isdir(value):
        raise InvalidSetting("{value}: {option} is not a directory", value, "--spool-dir")
    if not os.access(value, os.W_OK | os.X_OK):
        raise InvalidSetting("{value}: {option} is not writable", value, "--spool-dir")


def _halfClose(instance: Any, attribute: attr.Attribute[Any], value: str) -> None:
    if value not in ("kill", "forward"):
        raise InvalidSetting(
            "{option} {value}: expected 'kill' or 'forward'", value, "--half-close"
        )


def _networks(instance: Any, attribute: attr.Attribute[Any], value: tuple[Any, ...]) -> None:
    for network in value:
        if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise InvalidSetting("{value} is not an IP network", network, attribute.name)


#: The embedded SQL worker as a warm Python worker.
SQL_WORKER_ENTRY_POINT = "twisted_closewatch.sqlworker:main"


def defaultCommand() -> tuple[str, ...]:
    """
    The embedded SQL worker, run by the interpreter running the server.
    """
    return (sys.executable, "-m", "twisted_closewatch.sqlworker")


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Config:
    """
    @ivar argv: the worker command, C{argv[0]} an absolute path.
    @ivar env: extra environment for workers, over the server's own.
    @ivar pipeSize: capacity asked for the worker's pipes (Linux).
    @ivar keepalive: turn on C{SO_KEEPALIVE} on client sockets.
    @ivar allow: the networks clients may connect from; empty allows all
        but C{deny}.
    @ivar deny: the networks clients may not connect from (over C{allow}).
    @ivar pythonWorker: C{MODULE:FUNCTION}, a warm Python worker the
        spawner forks per connection instead of running C{argv}; C{None}
        runs C{argv}.
    @ivar containment: what bounds each worker started by a spawner.
    @ivar direct: give each worker the client's socket itself as its stdin
        and stdout (C{--direct}): no byte passes through the server, which
        keeps a duplicate in the close watch only (see
        L{twisted_closewatch.direct}).

    The other fields are the options of the same names: see each field's
    L{Setting}, or C{twistd closewatch --help}.
    """

    argv: tuple[str, ...] = attr.ib(factory=defaultCommand, converter=tuple)
    env: dict[str, str] = attr.ib(factory=dict)
    pipeSize: int = 1024 * 1024
    keepalive: bool = True
    allow: tuple[Network, ...] = attr.ib(default=(), converter=tuple, validator=_networks)
    deny: tuple[Network, ...] = attr.ib(default=(), converter=tuple, validator=_networks)
    halfClose: str = setting(
        "kill",
        "half-close",
        "What a client's FIN (shutdown(SHUT_WR)) means: 'kill' the worker at once, or "
        "'forward' it as EOF on the worker's stdin and deliver all its output before closing.",
        validator=_halfClose,
    )
    readAhead: int = setting(
        256 * 1024,
        "read-ahead",
        "Client bytes held in memory per connection beyond the worker's stdin pipe before "
        "the client is paused (e.g. 65536, 256k, 4m).",
        parseSize,
        _readAhead,
        shown="256k",
    )
    spoolMax: int = setting(
        64 * 1024**2,
        "spool-max",
        "Client bytes a connection may hold on disk (--spool-dir) while its worker is not "
        "reading, beyond the read-ahead, before the client is paused; 0 = no spooling.",
        parseSize,
        _spoolSize,
        shown="64m",
    )
    spoolTotal: int = setting(
        1024**3,
        "spool-total",
        "Client bytes all connections together may hold on disk (--spool-dir); past it, "
        "clients are paused instead.",
        parseSize,
        _spoolSize,
        shown="1g",
    )
    spoolDir: str = setting(
        attr.Factory(tempfile.gettempdir),
        "spool-dir",
        "An existing, writable directory for the spool files (unlinked at once, so "
        "nothing is left behind).",
        parseDirectory,
        _spoolDir,
        shown="the system's temporary directory: $TMPDIR, else /tmp",
    )
    keepaliveIdle: int = setting(
        60,
        "keepalive-idle",
        "Seconds of silence before the first keepalive probe (whole, 1-32767).",
        parseWholeNumber,
        between(1, 32767),
    )
    keepaliveInterval: int = setting(
        10,
        "keepalive-interval",
        "Seconds between keepalive probes (whole, 1-32767).",
        parseWholeNumber,
        between(1, 32767),
    )
    keepaliveCount: int = setting(
        6,
        "keepalive-count",
        "Unanswered keepalive probes before the client is dead (1-127); Linux ignores it "
        "under an explicit --user-timeout, which then decides.",
        parseWholeNumber,
        between(1, 127),
    )
    userTimeout: float = setting(
        attr.Factory(lambda config: config.keepaliveAgrees(), takes_self=True),
        "user-timeout",
        "Seconds sent data may stay unacknowledged (or the client's window closed) before "
        "the client is dead (Linux TCP_USER_TIMEOUT, millisecond precision); 0 = kernel "
        "default. Linux then also ends an idle dead client at the first keepalive probe at "
        "or after it.",
        parseSeconds,
        seconds(MAX_USER_TIMEOUT),
        shown="--keepalive-idle + --keepalive-interval x --keepalive-count, so that both "
        "agree: 120 with their defaults",
    )
    heartbeat: float = setting(
        0.0,
        "heartbeat",
        "Seconds without output to the client after which --heartbeat-data is written; "
        "0 = off.",
        parseSeconds,
        seconds(),
    )
    heartbeatData: bytes = setting(
        b"\n",
        "heartbeat-data",
        "The heartbeat, with Python escapes (\\x00, \\r\\n).",
        parseBytes,
    )
    idleTimeout: float = setting(
        0.0,
        "idle-timeout",
        "Seconds without input from the client after which it is taken for gone; time the "
        "client is paused by closewatch does not count. 0 = off.",
        parseSeconds,
        seconds(),
    )
    maxWorkers: int = setting(
        1000,
        "max-workers",
        "Connections with a worker at most; more clients get --busy-message and are closed "
        "(1-1000000).",
        parseWholeNumber,
        between(1, 10**6),
    )
    busyMessage: bytes = setting(
        b"",
        "busy-message",
        "What a client refused by --max-workers or --max-per-peer is sent before the close, "
        "with Python escapes (\\r\\n); none by default.",
        parseBytes,
    )
    maxPerPeer: int = setting(
        0,
        "max-per-peer",
        "Connections with a worker per client IP address (per /64 for IPv6) at most "
        "(behind haproxy:, the original client's); 0 = off.",
        parseWholeNumber,
        between(0, 10**6),
    )
    maxLifetime: float = setting(
        0.0,
        "max-lifetime",
        "Seconds a worker may run before it is killed; 0 = off.",
        parseSeconds,
        seconds(),
    )
    grace: float = setting(
        0.0,
        "grace",
        "Seconds between SIGTERM and SIGKILL when a worker is killed; 0 = SIGKILL at once.",
        parseSeconds,
        seconds(3600),
    )
    handshakeTimeout: float = setting(
        10.0,
        "handshake-timeout",
        "Seconds a client may take over its TLS handshake (ssl:) or its PROXY header "
        "(haproxy:) before it is closed; it holds no worker meanwhile (0.1-3600).",
        parseSeconds,
        seconds(3600, minimum=0.1),
    )
    maxHandshakes: int = setting(
        1000,
        "max-handshakes",
        "Connections in a TLS handshake or before their PROXY header at most; more are "
        "closed at once (0 = no limit, up to 1000000).",
        parseWholeNumber,
        between(0, 10**6),
    )
    maxRatePerPeer: int = setting(
        0,
        "max-rate-per-peer",
        "New connections per second per client IP (per /64 for IPv6; behind haproxy:, the "
        "original client's) at most, in bursts of as many; more are closed at once. 0 = off.",
        parseWholeNumber,
        between(0, 10**6),
    )
    pythonWorker: str | None = None
    containment: Containment = attr.ib(factory=Containment)
    direct: bool = False

    def __attrs_post_init__(self) -> None:
        """
        The checks that involve several fields (each field checks itself).
        """
        if self.heartbeat and not self.heartbeatData:
            raise InvalidSetting(
                "{option} must not be empty with --heartbeat on", b"", "--heartbeat-data"
            )
        if self.direct and self.heartbeat:
            raise InvalidSetting(
                "{option} does not apply to --direct: the worker writes to the client "
                "itself, and the server cannot add bytes to its stream",
                self.heartbeat,
                "--heartbeat",
            )

    def keepaliveAgrees(self) -> float:
        """
        The user timeout by default: C{keepaliveIdle + keepaliveInterval *
        keepaliveCount}.  Linux ignores the keepalive count while a user
        timeout is set, so the two must agree for the keepalive settings to
        act as given.
        """
        return min(
            self.keepaliveIdle + self.keepaliveInterval * self.keepaliveCount, MAX_USER_TIMEOUT
        )

    @property
    def clientReadSize(self) -> int:
        """
        The most read from the client at once: a quarter of the read-ahead
        (at most 64 KiB).  The worker's input holds the rest of the
        read-ahead (L{twisted_closewatch.spool.SpooledInput}), so at most
        the read-ahead is ever held in memory for the worker.
        """
        return max(min(self.readAhead // 4, 64 * 1024), 1)
