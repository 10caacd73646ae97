"""
The command line of C{twistd closewatch}, derived from L{Config}.

Every option that sets a L{Config} field is made from that field's
L{Setting}: its name, help, parser and default come from there, and its
value is checked by the field's own validator as it is parsed, so that a
bad one is a one-line usage error naming the option and the value, not a
traceback at start-up or, worse, at the first connection.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attr
from twisted.copyright import version as twistedVersion
from twisted.python import usage

from twisted_closewatch import (
    __version__,
    _compat,
    access,
    containment,
    handshake,
    proxy,
    spawner,
)
from twisted_closewatch.config import (
    SQL_WORKER_ENTRY_POINT,
    Config,
    InvalidSetting,
    Setting,
    defaultCommand,
    parseSize,
    settings,
)

if TYPE_CHECKING:
    # Imported where --websocket and --metrics are handled: twisted.web,
    # wsproto and prometheus_client are about 4 MB of a server's memory
    # that one without them never uses.
    from twisted_closewatch import web

DEFAULT_LISTEN = "tcp:8787:interface=127.0.0.1"

#: How to install the production extra (Prometheus, TLS): from a checkout,
#: since the project is not on a package index.
_PRODUCTION_EXTRA = "pip install '.[production]' in a closewatch checkout"

#: The options that ask for keepalive or the user timeout explicitly.
_KEEPALIVE = ("keepalive-idle", "keepalive-interval", "keepalive-count", "user-timeout")


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


def _problem(error: InvalidSetting, text: str, option: str) -> usage.UsageError:
    """
    A usage error for C{text} given to C{--option}, naming both.
    """
    message = error.describe(text, f"--{option}")
    if f"--{option}" not in message:
        message = f"--{option}: {message}"
    return usage.UsageError(message)


def _coercer(field: attr.Attribute[Any], setting: Setting) -> Callable[[str], Any]:
    """
    Parse an option's text with its setting and check the value with its
    field's own validator.
    """

    def coerce(text: str) -> Any:
        try:
            value = setting.parse(text)
            if field.validator is not None:
                field.validator(None, field, value)
        except InvalidSetting as e:
            raise _problem(e, text, setting.option) from None
        return value

    return coerce


def _parameter(field: attr.Attribute[Any], setting: Setting) -> list[Any]:
    """
    The C{optParameters} entry of a setting.  Its default is left to
    L{Config} (an option not given is not passed on); C{--help} shows it.
    """
    shown = setting.showDefault(field.default)
    help = f"{setting.help} [default: {shown}]" if shown else setting.help
    return [setting.option, None, None, help, _coercer(field, setting)]


def _workerPids(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 2**22:
        raise usage.UsageError(f"--worker-pids {text!r}: expected a whole number from 1 to {2**22}")
    return value


def _amount(text: str, option: str) -> int:
    try:
        return containment.parseAmount(text)
    except containment.ContainmentError as e:
        raise usage.UsageError(f"{option} {e}") from None


def _maxMessage(text: str) -> int:
    try:
        size = parseSize(text)
    except InvalidSetting as e:
        raise usage.UsageError(f"--max-message: {e}") from None
    if not 125 <= size <= 1024**3:
        raise usage.UsageError(f"--max-message {text!r}: must be between 125 and 1g")
    return size


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
        [
            "websocket",
            None,
            (
                "Serve HTTP on every --listen endpoint: a WebSocket upgrade starts a "
                "worker (each text message a line on its stdin, each line of its "
                "output a message), GET / serves a console page."
            ),
        ],
        [
            "binary",
            None,
            "With --websocket: raw bytes both ways as binary messages instead of lines.",
        ],
        [
            "direct",
            None,
            (
                "Give each worker the client's socket itself as its stdin and stdout "
                "(inetd's way: no byte passes through the server); the server still kills "
                "it when the client leaves. Not with ssl: listeners, --websocket or "
                "--heartbeat."
            ),
        ],
    ]

    optParameters = [
        *(_parameter(field, setting) for field, setting in settings()),
        [
            "python-worker",
            None,
            None,
            "MODULE:FUNCTION: a warm Python worker. The spawner imports MODULE "
            "once and, per connection, forks a child that calls FUNCTION() with "
            "fds 0-2, sys.std* and os.environ set up; its return value is the "
            "exit status. Exclusive with -- COMMAND.",
        ],
        [
            "cgroup",
            None,
            "auto",
            "Each worker in a cgroup v2 of its own, killed whole (setsid "
            "daemons included) with cgroup.kill: 'on', 'off', or 'auto' (on "
            "where possible: root or a delegated cgroup, Linux 5.14+).",
        ],
        [
            "worker-memory",
            None,
            None,
            "memory.max of each worker's cgroup (e.g. 256m); needs the memory "
            "controller in the cgroup v2 hierarchy.",
            lambda v: _amount(v, "--worker-memory"),
        ],
        [
            "worker-pids",
            None,
            None,
            "pids.max of each worker's cgroup; needs the pids controller in "
            "the cgroup v2 hierarchy.",
            _workerPids,
        ],
        [
            "worker-user",
            None,
            None,
            "Run workers as USER (name or uid; its primary group unless "
            "--worker-group), supplementary groups cleared.",
        ],
        [
            "worker-group",
            None,
            None,
            "Run workers as GROUP (name or gid), supplementary groups cleared.",
        ],
        [
            "metrics",
            None,
            None,
            "A Twisted server endpoint serving Prometheus metrics over HTTP at "
            "/metrics, e.g. tcp:9787:interface=127.0.0.1 (needs prometheus_client).",
        ],
        [
            "max-message",
            None,
            None,
            (
                "With --websocket: the largest message, in bytes (a larger one from the "
                "client closes with code 1009; a longer line from the worker is split) "
                "[default: 1m]."
            ),
            _maxMessage,
        ],
        [
            "static",
            None,
            None,
            "With --websocket: serve the files of this directory instead of the console page.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["env"] = {}
        self["command"] = []
        self["allow"] = []
        self["deny"] = []
        self["warnings"] = []
        self["rlimit"] = []
        self["cgroup-warning"] = None
        self["allow-origin"] = []

    def opt_allow_origin(self, origin: str) -> None:
        """
        With --websocket: let pages from this origin (scheme://host[:port]) open WebSockets too (repeatable; '*' allows any page); by default only the server's own pages may, and clients that send no Origin (not browsers).
        """  # noqa: E501
        self["allow-origin"].append(_parseOrigin(origin))

    def opt_allow(self, network: str) -> None:
        """
        Accept clients from this network only (repeatable, IPv4 or IPv6, e.g. 10.0.0.0/8, 2001:db8::/32; an address alone is itself); with any --allow, every other client is refused. Behind haproxy:, the original client's address.
        """  # noqa: E501
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
        """  # noqa: E501
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

    def opt_rlimit(self, assignment: str) -> None:
        """
        NAME=VALUE: a resource limit of every worker (repeatable): as, cpu, data, fsize, nofile, nproc, core; sizes like 256m, or unlimited.
        """  # noqa: E501
        try:
            self["rlimit"].append(containment.parseRlimit(assignment))
        except containment.ContainmentError as e:
            raise usage.UsageError(str(e)) from None

    def parseArgs(self, *command: str) -> None:
        self["command"] = list(command)

    def postOptions(self) -> None:
        if self["keepalive"] and self["no-keepalive"]:
            raise usage.UsageError("--keepalive and --no-keepalive contradict each other")
        self["keepalive-given"] = bool(self["keepalive"]) or any(
            self[name] is not None for name in _KEEPALIVE
        )
        if self["command"]:
            argv = (resolveCommand(self["command"][0]), *self["command"][1:])
        else:
            argv = defaultCommand()
        pythonWorker = _pythonEntryPoint(self["python-worker"], bool(self["command"]))
        try:
            workerContainment = _containment(self)
        except containment.ContainmentError as e:
            raise usage.UsageError(str(e)) from None
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["direct"]:
            self._checkDirect()
        self["endpoints"] = [_parseEndpoint(d) for d in self["listen"]]
        self["warnings"] = [w for e in self["endpoints"] for w in _unixModeWarnings(e)]
        if self["cgroup-warning"] is not None:
            self["warnings"].append(self["cgroup-warning"])
        if self["metrics"] is not None:
            from twisted_closewatch import metrics

            if not metrics.available():
                raise usage.UsageError(
                    "--metrics needs prometheus_client: "
                    f"{_PRODUCTION_EXTRA}, or pip install prometheus_client"
                )
            self["metrics-endpoint"] = _parseEndpoint(self["metrics"], "--metrics")
        else:
            self["metrics-endpoint"] = None
        given = {
            field.name: self[setting.option]
            for field, setting in settings()
            if self[setting.option] is not None
        }
        try:
            self["config"] = Config(
                argv=argv,
                env=dict(self["env"]),
                keepalive=not self["no-keepalive"],
                allow=self["allow"],
                deny=self["deny"],
                pythonWorker=pythonWorker,
                containment=workerContainment,
                direct=bool(self["direct"]),
                **given,
            )
        except InvalidSetting as e:
            raise usage.UsageError(str(e)) from None
        self["web"] = self._webConfig()

    def _checkDirect(self) -> None:
        """
        Refuse what cannot work when the worker owns the client's socket:
        whatever needs the server to see, change or add to the bytes.
        """
        if self["websocket"]:
            raise usage.UsageError(
                "--direct and --websocket exclude each other (WebSocket frames are "
                "decoded by the server)"
            )
        for option in ("heartbeat-data", "read-ahead"):
            if self[option] is not None:
                raise usage.UsageError(
                    f"--{option} does not apply to --direct (no byte passes through the server)"
                )
        for description in self["listen"]:
            kind, _, rest = description.lower().partition(":")
            if kind == "haproxy":
                kind = rest.partition(":")[0]
            if kind == "ssl":
                raise usage.UsageError(
                    f"--direct cannot serve --listen {description!r}: TLS is decrypted by the "
                    "server (terminate TLS in HAProxy and listen on haproxy:tcp:, or drop --direct)"
                )
            if kind == "unix" and self["idle-timeout"]:
                raise usage.UsageError(
                    f"--idle-timeout needs TCP_INFO under --direct, which the unix socket "
                    f"--listen {description!r} has not"
                )

    def _webConfig(self) -> web.WebConfig | None:
        """
        The L{web.WebConfig} of C{--websocket}, after checking the options
        that go with it (or not).
        """
        webOnly = [
            option
            for option, given in (
                ("--binary", self["binary"]),
                ("--static", self["static"] is not None),
                ("--allow-origin", self["allow-origin"]),
                ("--max-message", self["max-message"] is not None),
            )
            if given
        ]
        if not self["websocket"]:
            if webOnly:
                raise usage.UsageError(f"{webOnly[0]} needs --websocket")
            return None
        if self["config"].halfClose != "kill":
            raise usage.UsageError(
                "--half-close forward does not apply to --websocket (a WebSocket "
                "has no half-close: its client's close frame ends it)"
            )
        if self["heartbeat-data"] is not None:
            raise usage.UsageError(
                "--heartbeat-data does not apply to --websocket (--heartbeat sends WebSocket pings)"
            )
        from twisted_closewatch import web

        static = self["static"]
        if static is not None:
            if not os.path.isdir(static):
                raise usage.UsageError(f"--static {static!r}: not a directory")
            static = os.path.abspath(static)
        if "*" in self["allow-origin"]:
            self["warnings"].append(
                "--allow-origin '*': any web page a visitor opens can start workers "
                "here through the visitor's browser"
            )
        maxMessage = self["max-message"]
        return web.WebConfig(
            binary=bool(self["binary"]),
            maxMessage=web.WebConfig().maxMessage if maxMessage is None else maxMessage,
            staticDir=static,
            allowOrigins=self["allow-origin"],
        )


def _parseOrigin(text: str) -> str:
    from twisted_closewatch import web

    if text.strip() in ("*", "null"):
        return text.strip()
    origin = web.normalOrigin(text)
    if origin is None:
        raise usage.UsageError(
            f"--allow-origin {text!r}: expected scheme://host[:port] (http or https), 'null' or '*'"
        )
    return origin


def _pythonEntryPoint(entryPoint: str | None, command: bool) -> str | None:
    """
    The warm Python worker to run: C{--python-worker}'s, checked by
    importing it as the spawner will, or the embedded SQL worker's when no
    command is given and a spawner can run here.
    """
    if entryPoint is None:
        if command or not spawner.available():
            return None
        return SQL_WORKER_ENTRY_POINT
    if command:
        raise usage.UsageError("--python-worker and -- COMMAND exclude each other")
    module, sep, function = entryPoint.partition(":")
    if not (sep and module and function):
        raise usage.UsageError(f"--python-worker {entryPoint!r}: expected MODULE:FUNCTION")
    if not spawner.available():
        raise usage.UsageError("--python-worker needs pidfds (Linux 5.3 or later)")
    error = spawner.checkEntryPoint(entryPoint)
    if error is not None:
        raise usage.UsageError(f"--python-worker {entryPoint!r}: {error}")
    return entryPoint


def _containment(options: Options) -> containment.Containment:
    """
    The containment the options ask for, resolved against this host.

    @raise containment.ContainmentError: it cannot work here.
    """
    mode = options["cgroup"]
    if mode not in ("auto", "on", "off"):
        raise containment.ContainmentError(
            f"--cgroup {mode!r}: expected 'auto', 'on' or 'off'"
        )
    limits = {}
    if options["worker-memory"] is not None:
        limits["memory.max"] = str(options["worker-memory"])
    if options["worker-pids"] is not None:
        limits["pids.max"] = str(options["worker-pids"])
    uid = gid = None
    if options["worker-user"] is not None:
        uid, gid = containment.resolveUser(options["worker-user"])
    if options["worker-group"] is not None:
        gid = containment.resolveGroup(options["worker-group"])
    result = containment.Containment(
        cgroup=mode, cgroupLimits=limits, rlimits=tuple(options["rlimit"]), uid=uid, gid=gid
    )
    if not spawner.available():
        if mode == "on" or limits or result.rlimits or uid is not None or gid is not None:
            raise containment.ContainmentError(
                "--cgroup on, --worker-memory, --worker-pids, --rlimit, --worker-user and "
                "--worker-group need a spawner, which needs pidfds (Linux 5.3 or later)"
            )
        return result
    _, options["cgroup-warning"] = containment.cgroupBase(result)
    return result


def _parseNetwork(text: str, option: str) -> access.Network:
    try:
        return access.parseNetwork(text)
    except ValueError as e:
        raise usage.UsageError(f"{option} {text!r}: {e}") from None


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
        ) from None
    except Exception as e:
        raise usage.UsageError(f"{option} {description!r}: {_endpointError(e)}") from None


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
        mode = _compat.unixSocketMode(endpoint)
        if mode is not None:
            if mode & 0o002 and os.geteuid() == 0:
                return [
                    (
                        f"unix socket {_compat.unixSocketPath(endpoint)!r} is world-writable "
                        f"(mode {mode:o}) and the server runs as root: any local user can "
                        f"start workers"
                    )
                ]
            return []
        endpoint = _compat.wrappedEndpoint(endpoint)
    return []


def _bindable(endpoint: Any) -> Any:
    """
    C{endpoint}, unless its port or unix path can never be bound: Twisted
    parses them unchecked, and the bind at start-up would fail with a
    traceback instead of a usage error.
    """
    port = _compat.endpointPort(endpoint)
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not between 0 and 65535")
    if _compat.unixSocketPath(endpoint) in ("", b""):
        raise ValueError("the unix socket path is empty")
    return endpoint
