"""
The command line of C{twistd closewatch}.

Every value is checked here, so that a bad one is a one-line usage error
and not a traceback at start-up or, worse, at the first connection.
"""

from __future__ import annotations

import codecs
import math
import os
import platform
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attr
from twisted.copyright import version as twistedVersion
from twisted.python import usage

from twisted_closewatch import __version__, access, handshake, metrics, proxy
from twisted_closewatch.config import MAX_USER_TIMEOUT, Config, defaultCommand

DEFAULT_LISTEN = "tcp:8787:interface=127.0.0.1"

#: How to install the production extra (Prometheus, TLS): from a checkout,
#: since the project is not on a package index.
_PRODUCTION_EXTRA = "pip install '.[production]' in a closewatch checkout"

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parseSize(text: str) -> int:
    """
    A byte count: C{65536}, C{256k}, C{4m}, C{1g} (powers of 1024; a
    trailing C{b} or C{ib} is allowed).
    """
    match = _SIZE.match(text)
    if match is None:
        raise usage.UsageError(f"{text!r} is not a size (examples: 65536, 256k, 4m)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parseSeconds(text: str, *, maximum: float = 10**7) -> float:
    """
    A non-negative, finite number of seconds, fractions allowed.
    """
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"{text!r} is not a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise usage.UsageError(f"{text!r}: seconds must be a finite number >= 0")
    if value > maximum:
        raise usage.UsageError(f"{text!r}: at most {maximum:g} seconds")
    return value


def parseWholeNumber(text: str, *, minimum: int, maximum: int, what: str = "value") -> int:
    """
    A whole number in C{[minimum, maximum]}; the kernel takes whole seconds
    for keepalive timers, so fractions are refused rather than rounded.
    """
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"{text!r}: {what} must be a whole number")
    if not minimum <= value <= maximum:
        raise usage.UsageError(f"{text!r}: {what} must be between {minimum} and {maximum}")
    return value


def parseBytes(text: str) -> bytes:
    """
    Bytes written with Python escapes: C{\\n}, C{\\r\\n}, C{\\x00}.
    """
    try:
        return codecs.escape_decode(text.encode("utf-8"))[0]  # type: ignore[attr-defined]
    except ValueError as e:
        raise usage.UsageError(f"{text!r}: bad escape ({e})")


def resolveCommand(name: str) -> str:
    """
    The absolute path of the executable C{name} names, as a shell would
    find it.
    """
    if os.sep in name:
        path = os.path.abspath(name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise usage.UsageError(f"{name}: not an executable file")
    found = shutil.which(name)
    if found is None:
        raise usage.UsageError(f"{name}: command not found in PATH")
    return os.path.abspath(found)


def _default(name: str) -> Any:
    """
    The default of L{Config}'s field C{name}, for the help text.
    """
    return attr.fields_dict(Config)[name].default


def _naming(option: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    C{parse}, its usage errors naming C{--option}: L{usage.Options} reports
    a coercer's error as it is, without the option it was given to.
    """

    def parseOption(text: str) -> Any:
        try:
            return parse(text)
        except usage.UsageError as e:
            if f"--{option}" in str(e):
                raise
            raise usage.UsageError(f"--{option}: {e}") from None

    return parseOption


def _namingTheirOption(parameters: Sequence[list[Any]]) -> list[list[Any]]:
    """
    C{optParameters} rows, every coercer wrapped by L{_naming}.
    """
    return [
        [*row[:4], _naming(row[0], row[4]), *row[5:]] if len(row) > 4 else row
        for row in parameters
    ]


#: The liveness options whose value, when given, goes into L{Config} as is
#: (when not given, L{Config}'s default applies).
_KEEPALIVE = {
    "keepalive-idle": "keepaliveIdle",
    "keepalive-interval": "keepaliveInterval",
    "keepalive-count": "keepaliveCount",
    "user-timeout": "userTimeout",
}


class Options(usage.Options):
    """
    twistd closewatch [OPTIONS] [-- COMMAND [ARG ...]]
    """

    synopsis = "[options] [-- COMMAND [ARG ...]]"
    longdesc = (
        "Run COMMAND once per client connection: the client's bytes are its "
        "stdin, its stdout goes back to the client, its stderr to the log.  "
        "The moment the client is gone (closed, reset, dead, or silent for "
        "--idle-timeout) the worker's whole process group is killed.  "
        "Without COMMAND, an embedded SQL worker over SQLite is served "
        "(database: $CLOSEWATCH_DATABASE, default ./closewatch.sqlite3)."
    )

    optFlags = [
        ["keepalive", None, "Turn on TCP keepalive on client sockets (default)."],
        ["no-keepalive", None, "Turn off TCP keepalive on client sockets."],
    ]

    optParameters = _namingTheirOption([
        [
            "half-close",
            None,
            "kill",
            "What a client's FIN (shutdown(SHUT_WR)) means: 'kill' the worker "
            "at once, or 'forward' it as EOF on the worker's stdin and deliver "
            "all its output before closing.",
        ],
        [
            "read-ahead",
            None,
            "256k",
            "Client bytes held in memory per connection beyond the worker's "
            "stdin pipe before the client is paused (e.g. 65536, 256k, 4m).",
            parseSize,
        ],
        [
            "keepalive-idle",
            None,
            None,
            (
                "Seconds of silence before the first keepalive probe (whole, 1-32767). "
                f"[default: {_default('keepaliveIdle')}]"
            ),
            lambda v: parseWholeNumber(v, minimum=1, maximum=32767, what="--keepalive-idle"),
        ],
        [
            "keepalive-interval",
            None,
            None,
            (
                "Seconds between keepalive probes (whole, 1-32767). "
                f"[default: {_default('keepaliveInterval')}]"
            ),
            lambda v: parseWholeNumber(v, minimum=1, maximum=32767, what="--keepalive-interval"),
        ],
        [
            "keepalive-count",
            None,
            None,
            (
                "Unanswered keepalive probes before the client is dead (1-127); "
                "Linux ignores it under an explicit --user-timeout, which then "
                f"decides. [default: {_default('keepaliveCount')}]"
            ),
            lambda v: parseWholeNumber(v, minimum=1, maximum=127, what="--keepalive-count"),
        ],
        [
            "user-timeout",
            None,
            None,
            (
                "Seconds sent data may stay unacknowledged (or the client's window "
                "closed) before the client is dead (Linux TCP_USER_TIMEOUT, "
                "millisecond precision); 0 = kernel default. Linux then also ends "
                "an idle dead client at the first keepalive probe at or after it. "
                "[default: --keepalive-idle + --keepalive-interval x "
                f"--keepalive-count, so that both agree: {Config().userTimeout:g} "
                "with their defaults]"
            ),
            lambda v: parseSeconds(v, maximum=MAX_USER_TIMEOUT),
        ],
        [
            "heartbeat",
            None,
            0.0,
            "Seconds without output to the client after which --heartbeat-data "
            "is written; 0 = off.",
            parseSeconds,
        ],
        [
            "heartbeat-data",
            None,
            "\\n",
            "The heartbeat, with Python escapes (\\x00, \\r\\n).",
            parseBytes,
        ],
        [
            "idle-timeout",
            None,
            0.0,
            "Seconds without input from the client after which it is taken "
            "for gone; time the client is paused by closewatch does not count. "
            "0 = off.",
            parseSeconds,
        ],
        [
            "max-workers",
            None,
            1000,
            "Connections with a worker at most; more clients get "
            "--busy-message and are closed (1-1000000).",
            lambda v: parseWholeNumber(v, minimum=1, maximum=10**6, what="--max-workers"),
        ],
        [
            "busy-message",
            None,
            None,
            "What a client refused by --max-workers or --max-per-peer is sent "
            "before the close, with Python escapes (\\r\\n); none by default.",
            parseBytes,
        ],
        [
            "max-per-peer",
            None,
            0,
            "Connections with a worker per client IP address at most (behind "
            "haproxy:, the original client's); 0 = off.",
            lambda v: parseWholeNumber(v, minimum=0, maximum=10**6, what="--max-per-peer"),
        ],
        [
            "max-lifetime",
            None,
            0.0,
            "Seconds a worker may run before it is killed; 0 = off.",
            parseSeconds,
        ],
        [
            "grace",
            None,
            0.0,
            "Seconds between SIGTERM and SIGKILL when a worker is killed; "
            "0 = SIGKILL at once.",
            lambda v: parseSeconds(v, maximum=3600),
        ],
        [
            "handshake-timeout",
            None,
            10.0,
            (
                "Seconds a client may take over its TLS handshake (ssl:) or its "
                "PROXY header (haproxy:) before it is closed; it holds no worker "
                "meanwhile (0.1-3600)."
            ),
            lambda v: _positiveSeconds(v, "--handshake-timeout", maximum=3600),
        ],
        [
            "max-handshakes",
            None,
            1000,
            (
                "Connections in a TLS handshake or before their PROXY header at "
                "most; more are closed at once (0 = no limit, up to 1000000)."
            ),
            lambda v: parseWholeNumber(v, minimum=0, maximum=10**6, what="--max-handshakes"),
        ],
        [
            "max-rate-per-peer",
            None,
            0,
            (
                "New connections per second per client IP (per /64 for IPv6; "
                "behind haproxy:, the original client's) at most, in bursts of "
                "as many; more are closed at once. 0 = off."
            ),
            lambda v: parseWholeNumber(v, minimum=0, maximum=10**6, what="--max-rate-per-peer"),
        ],
        [
            "metrics",
            None,
            None,
            "A Twisted server endpoint serving Prometheus metrics over HTTP at "
            "/metrics, e.g. tcp:9787:interface=127.0.0.1 (needs prometheus_client).",
        ],
    ])

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["env"] = {}
        self["command"] = []
        self["allow"] = []
        self["deny"] = []
        self["warnings"] = []

    def opt_allow(self, network: str) -> None:
        """
        Accept clients from this network only (repeatable, IPv4 or IPv6, e.g. 10.0.0.0/8, 2001:db8::/32; an address alone is itself); with any --allow, every other client is refused. Behind haproxy:, the original client's address.
        """
        self["allow"].append(_parseNetwork(network, "--allow"))

    def opt_deny(self, network: str) -> None:
        """
        Refuse clients from this network (repeatable, IPv4 or IPv6); deny wins over --allow.
        """
        self["deny"].append(_parseNetwork(network, "--deny"))

    def opt_version(self) -> None:
        """
        Print closewatch's version, Twisted's and Python's, and exit.
        """
        print(
            f"closewatch {__version__} (Twisted {twistedVersion}, "
            f"Python {platform.python_version()})"
        )
        sys.exit(0)

    def opt_listen(self, description: str) -> None:
        """
        A Twisted server endpoint to listen on (repeatable): tcp, tcp6, unix, ssl, systemd, haproxy, ... [default: tcp:8787:interface=127.0.0.1]
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_env(self, assignment: str) -> None:
        """
        NAME=VALUE added to every worker's environment (repeatable).
        """
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise usage.UsageError(f"--env {assignment!r}: expected NAME=VALUE")
        self["env"][name] = value

    def parseArgs(self, *command: str) -> None:
        self["command"] = list(command)

    def postOptions(self) -> None:
        # usage.Options coerces given values only; these defaults are written
        # as a user would write them, for --help.
        for name, parse in _TEXT_DEFAULTS.items():
            if isinstance(self[name], str):
                self[name] = parse(self[name])
        if self["half-close"] not in ("kill", "forward"):
            raise usage.UsageError(
                f"--half-close {self['half-close']!r}: expected 'kill' or 'forward'"
            )
        if self["keepalive"] and self["no-keepalive"]:
            raise usage.UsageError("--keepalive and --no-keepalive contradict each other")
        self["keepalive-given"] = bool(self["keepalive"]) or any(
            self[name] is not None for name in _KEEPALIVE
        )
        if self["heartbeat"] and not self["heartbeat-data"]:
            raise usage.UsageError("--heartbeat-data must not be empty with --heartbeat on")
        if self["read-ahead"] < 4096:
            raise usage.UsageError("--read-ahead must be at least 4k")
        if self["read-ahead"] > 1024**3:
            raise usage.UsageError("--read-ahead must be at most 1g")
        if self["command"]:
            self["argv"] = (resolveCommand(self["command"][0]), *self["command"][1:])
        else:
            self["argv"] = defaultCommand()
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        self["endpoints"] = [_parseEndpoint(d) for d in self["listen"]]
        self["warnings"] = [w for e in self["endpoints"] for w in _unixModeWarnings(e)]
        if self["metrics"] is not None:
            if not metrics.available():
                raise usage.UsageError(
                    "--metrics needs prometheus_client: "
                    f"{_PRODUCTION_EXTRA}, or pip install prometheus_client"
                )
            self["metrics-endpoint"] = _parseEndpoint(self["metrics"], "--metrics")
        else:
            self["metrics-endpoint"] = None
        self["config"] = self.config()

    def config(self) -> Config:
        """
        The L{Config} these options describe.
        """
        return Config(
            argv=self["argv"],
            env=dict(self["env"]),
            halfClose=self["half-close"],
            readAhead=self["read-ahead"],
            keepalive=not self["no-keepalive"],
            **{field: self[name] for name, field in _KEEPALIVE.items() if self[name] is not None},
            heartbeat=self["heartbeat"],
            heartbeatData=self["heartbeat-data"],
            idleTimeout=self["idle-timeout"],
            maxWorkers=self["max-workers"],
            maxPerPeer=self["max-per-peer"],
            maxLifetime=self["max-lifetime"],
            grace=self["grace"],
            busyMessage=self["busy-message"] or b"",
            handshakeTimeout=self["handshake-timeout"],
            maxHandshakes=self["max-handshakes"],
            allow=self["allow"],
            deny=self["deny"],
            maxRatePerPeer=self["max-rate-per-peer"],
        )


_TEXT_DEFAULTS = {"read-ahead": parseSize, "heartbeat-data": parseBytes, "busy-message": parseBytes}


def _positiveSeconds(text: str, option: str, maximum: float) -> float:
    seconds = parseSeconds(text, maximum=maximum)
    if seconds < 0.1:
        raise usage.UsageError(f"{option} {text!r}: at least 0.1 seconds")
    return seconds


def _parseNetwork(text: str, option: str) -> access.Network:
    try:
        return access.parseNetwork(text)
    except ValueError as e:
        raise usage.UsageError(f"{option} {text!r}: {e}")


#: Endpoint arguments are split at colons not escaped with a backslash.
_ENDPOINT_FIELDS = re.compile(r"(?<!\\):")
#: The mode of a unix socket whose endpoint does not say.
UNIX_SOCKET_MODE = "600"


def _parseEndpoint(description: str, option: str = "--listen") -> Any:
    """
    The endpoint C{description} names.  C{haproxy:} is closewatch's own
    PROXY-protocol front door (see L{twisted_closewatch.proxy}); C{ssl:}
    endpoints get the TLS handshake gate (L{twisted_closewatch.handshake});
    a unix socket is made mode 0600 unless the description gives C{mode=}.
    """
    from twisted.internet import endpoints, reactor

    kind, _, rest = description.partition(":")
    try:
        if kind.lower() == "haproxy":
            if rest.partition(":")[0].lower() == "ssl":
                raise ValueError(
                    "TLS behind the PROXY protocol is not supported: terminate TLS "
                    "in HAProxy, or listen on ssl: without haproxy:"
                )
            return proxy.proxyEndpoint(_bindable(_serverFromString(endpoints, reactor, rest)))
        endpoint = _bindable(_serverFromString(endpoints, reactor, description))
        if kind.lower() == "ssl":
            return handshake.FrontDoorEndpoint(endpoint, handshake.TLSGateFactory)
        return endpoint
    except ImportError as e:
        if e.name != "OpenSSL":
            raise
        raise usage.UsageError(
            f"{option} {description!r}: TLS needs pyOpenSSL: "
            f"{_PRODUCTION_EXTRA}, or pip install 'twisted[tls]'"
        )
    except Exception as e:
        raise usage.UsageError(f"{option} {description!r}: {_endpointError(e)}")


_NOT_AN_INT = re.compile(r"^invalid literal for int\(\) with base 10: (.*)$")


def _endpointError(error: Exception) -> str:
    """
    What is wrong with an endpoint description, from what Twisted's parser
    raised: C{int()}'s own words for a port or a backlog that is no number
    say so in the user's terms.
    """
    match = _NOT_AN_INT.match(str(error))
    if match:
        return f"{match.group(1)} is not a whole number"
    return str(error) or type(error).__name__


def _serverFromString(endpoints: Any, reactor: Any, description: str) -> Any:
    fields = _ENDPOINT_FIELDS.split(description)
    if fields[0].lower() == "unix" and not any(f.startswith("mode=") for f in fields[1:]):
        description += f":mode={UNIX_SOCKET_MODE}"
    return endpoints.serverFromString(reactor, description)


def _unixModeWarnings(endpoint: Any) -> list[str]:
    """
    A warning for a unix socket anyone may connect to, when the server runs
    as root: any local user could then start workers as root.
    """
    for _ in range(4):  # through front doors
        mode = getattr(endpoint, "_mode", None)
        if isinstance(mode, int):
            if mode & 0o002 and os.geteuid() == 0:
                return [
                    (
                        f"unix socket {endpoint._address!r} is world-writable (mode "
                        f"{mode:o}) and the server runs as root: any local user can "
                        f"start workers"
                    )
                ]
            return []
        endpoint = getattr(endpoint, "_wrappedEndpoint", None)
    return []


def _bindable(endpoint: Any) -> Any:
    """
    C{endpoint}, unless its port or unix path can never be bound: Twisted
    parses them unchecked, and the bind at start-up would fail with a
    traceback instead of a usage error.
    """
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not between 0 and 65535")
    if getattr(endpoint, "_address", None) in ("", b""):
        raise ValueError("the unix socket path is empty")
    return endpoint
