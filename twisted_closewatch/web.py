"""
The WebSocket front door: with C{--websocket}, every listener serves HTTP.

A WebSocket upgrade (on any path, as websocketd does) starts a worker; any
other request gets the built-in console page at C{/} or, with C{--static},
a file from a directory.  The upgrade is where admission happens: the
Origin check (cross-site WebSocket hijacking), then the limits, which take
the worker's slot (a refused upgrade is answered 403 or 503 and starts
nothing); the address rules and the rate limit apply at TCP accept, to
every HTTP connection, as for any other client.

What the worker gets about its client: the UCSPI variables, plus the
CGI-style set websocketd gives (L{cgiEnvironment}).
"""

from __future__ import annotations

import importlib.resources
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

import attr
from twisted.logger import Logger
from twisted.web import http, pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File
from wsproto import ConnectionType
from wsproto.events import AcceptConnection
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from twisted_closewatch import limits
from twisted_closewatch.config import Config
from twisted_closewatch.factory import CloseWatchFactory
from twisted_closewatch.websocket import WebSocketClient, WebSocketSettings
from twisted_closewatch.worker import ProcessStarter

log = Logger()

#: Longest value of one variable built from what the client sent; Twisted
#: also bounds a request's headers to 16 KiB in all.
MAX_VALUE = 4096
#: Headers whose CGI names would be dangerous: C{HTTP_PROXY} is read as a
#: proxy setting by many HTTP libraries ("httpoxy").
_UNSAFE_HEADERS = frozenset({b"proxy"})
_HEADER_NAME = re.compile(rb"^[A-Za-z0-9-]+$")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class WebConfig:
    """
    The settings of the WebSocket front door.

    @ivar binary: raw bytes both ways as binary messages.
    @ivar maxMessage: the largest message either way, in bytes.
    @ivar staticDir: the directory served instead of the console page.
    @ivar allowOrigins: origins allowed besides the server's own
        (normalized, see L{normalOrigin}); C{"*"} allows all.
    """

    binary: bool = False
    maxMessage: int = 1024 * 1024
    staticDir: str | None = None
    allowOrigins: tuple[str, ...] = attr.ib(default=(), converter=tuple)


def normalOrigin(text: str) -> str | None:
    """
    C{text} as an origin is compared: C{scheme://host[:port]} in lower
    case, without a default port; C{None} if it is not an http(s) origin.
    """
    try:
        url = urllib.parse.urlsplit(text.strip())
        port = url.port
    except ValueError:
        return None
    scheme = url.scheme.lower()
    host = url.hostname
    if (
        scheme not in ("http", "https")
        or not host
        or url.path
        or url.query
        or url.fragment
        or url.username is not None
    ):
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _hostAndPort(text: str, defaultPort: int) -> tuple[str, int] | None:
    try:
        url = urllib.parse.urlsplit("//" + text.strip())
        port = url.port
    except ValueError:
        return None
    if not url.hostname or url.path or url.query or url.username is not None:
        return None
    return url.hostname, port if port is not None else defaultPort


class OriginPolicy:
    """
    Which browser pages may open a WebSocket here: by default only the
    server's own (an C{Origin} naming the C{Host} the request was sent to),
    plus the C{--allow-origin} ones.  A client that sends no C{Origin} is
    not a browser page and is let through (a browser always sends one with
    a WebSocket upgrade): what this defends against is another site's page
    using a visitor's browser (its network position, its cookies) to start
    workers.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = frozenset(allowed)
        self._any = "*" in self._allowed

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self._any:
            return True
        normal = normalOrigin(origin)
        if normal is None:
            # "null" (a sandboxed page, a file:), or garbage.
            return origin.strip().lower() in self._allowed
        if normal in self._allowed:
            return True
        if host is None:
            return False
        scheme, _, rest = normal.partition("://")
        ours = _hostAndPort(host, _DEFAULT_PORTS[scheme])
        theirs = _hostAndPort(rest, _DEFAULT_PORTS[scheme])
        return ours is not None and ours == theirs


def cleanValue(raw: bytes) -> str:
    """
    Something a client sent, fit for an environment variable: control
    characters (NUL included) removed, at most L{MAX_VALUE} bytes, and
    the bytes kept as they are (non-UTF-8 ones as surrogate escapes, which
    the spawn turns back into the same bytes).
    """
    return _CONTROL.sub(b"", raw)[:MAX_VALUE].decode("utf-8", "surrogateescape")


def cgiEnvironment(
    uri: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    peer: Any,
    host: Any,
    secure: bool,
) -> dict[str, str]:
    """
    The CGI-style variables websocketd gives its processes: C{REMOTE_ADDR},
    C{REMOTE_PORT}, C{SERVER_NAME}, C{SERVER_PORT}, C{REQUEST_METHOD},
    C{REQUEST_URI}, C{SCRIPT_NAME}, C{PATH_INFO} (percent-decoded),
    C{QUERY_STRING}, C{HTTPS=on} under TLS, and one C{HTTP_*} variable per
    request header (the name upper-cased, C{-} made C{_}; repeated headers
    joined with C{", "}).  Headers whose names hold anything but letters,
    digits and C{-} are left out, so that two headers can never map to one
    name, and so is C{Proxy} (see L{_UNSAFE_HEADERS}).
    """
    path, _, query = uri.partition(b"?")
    env = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_SOFTWARE": "closewatch",
        "REQUEST_METHOD": "GET",
        "REQUEST_URI": cleanValue(uri),
        "SCRIPT_NAME": "",
        "PATH_INFO": cleanValue(urllib.parse.unquote_to_bytes(path)),
        "QUERY_STRING": cleanValue(query),
    }
    if getattr(peer, "host", None) is not None:
        env["REMOTE_ADDR"] = peer.host
        env["REMOTE_PORT"] = str(peer.port)
    if getattr(host, "host", None) is not None:
        env["SERVER_NAME"] = host.host
        env["SERVER_PORT"] = str(host.port)
    if secure:
        env["HTTPS"] = "on"
    joined: dict[str, list[bytes]] = {}
    for name, value in headers:
        if _HEADER_NAME.match(name) and name.lower() not in _UNSAFE_HEADERS:
            joined.setdefault("HTTP_" + name.decode("ascii").upper().replace("-", "_"), []).append(
                value
            )
    for key, values in joined.items():
        env[key] = cleanValue(b", ".join(values))
    return env


def _isUpgrade(request: Request) -> bool:
    upgrade = request.getHeader(b"upgrade")
    return upgrade is not None and upgrade.strip().lower() == b"websocket"


class _Upgrade(Resource):
    """
    A WebSocket upgrade: checked, admitted, handed over to a
    L{WebSocketClient} and its relay.
    """

    isLeaf = True

    def __init__(self, factory: WebSocketFactory) -> None:
        super().__init__()
        self._factory = factory

    def render_GET(self, request: Request) -> bytes | int:
        factory = self._factory
        peer = request.getClientAddress()
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        if not factory.origins.allows(
            None if origin is None else origin.decode("latin-1"),
            None if host is None else host.decode("latin-1"),
        ):
            factory.refused(
                peer,
                "origin",
                f"Origin {cleanValue(origin or b'')[:80]!r} is not this server's "
                f"({cleanValue(host or b'')[:80]!r}) nor an --allow-origin",
            )
            return _plain(request, http.FORBIDDEN, b"cross-origin WebSocket refused\n")
        handshake = H11Handshake(ConnectionType.SERVER)
        headers = [(k, v) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        try:
            handshake.initiate_upgrade_connection(headers, request.uri)
        except RemoteProtocolError as e:
            factory.refused(peer, "bad-header", f"bad WebSocket upgrade: {e}")
            return _plain(request, http.BAD_REQUEST, b"bad WebSocket upgrade\n")
        try:
            connect = factory.admit(peer)
        except limits.Refused:
            request.setHeader(b"retry-after", b"1")
            return _plain(
                request,
                http.SERVICE_UNAVAILABLE,
                factory.config.busyMessage or b"server busy\n",
            )
        # No extension is offered (permessage-deflate would let a small
        # message inflate past --max-message in memory).
        accept = handshake.send(AcceptConnection())
        connection = handshake.connection
        assert connection is not None
        environment = cgiEnvironment(
            request.uri, headers, peer, request.getHost(), request.isSecure()
        )
        client = WebSocketClient(
            connection, connect, factory.settings, factory.reactor, environment
        )
        channel = request.channel
        assert channel.transport is not None
        channel.transport.write(accept)
        # The hook Twisted's own WebSocketResource hands a connection over
        # with: the channel's transport is the client's from now on.
        channel._protocolUpgradeForWebsockets(client)
        return NOT_DONE_YET


def _plain(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"connection", b"close")
    return body


class _Console(Resource):
    """
    The built-in console page, at C{/} only.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._page = (
            importlib.resources.files("twisted_closewatch").joinpath("console.html").read_bytes()
        )

    def render_GET(self, request: Request) -> bytes:
        if request.path != b"/":
            return pages.notFound().render(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src ws: wss:; img-src data:; base-uri 'none'; form-action 'none'; "
            b"frame-ancestors 'none'",
        )
        return self._page


class _StaticFiles(File):
    """
    C{--static}: files, but no directory listings.
    """

    def directoryListing(self) -> IResource:
        return pages.forbidden()


class _Root(Resource):
    """
    Upgrades anywhere go to L{_Upgrade}; everything else to the page.
    """

    def __init__(self, upgrade: IResource, page: IResource) -> None:
        super().__init__()
        self._upgrade = upgrade
        self._page = page

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        if _isUpgrade(request):
            return self._upgrade
        if self._page.isLeaf:
            return self._page
        return self._page.getChildWithDefault(path, request)


class _WebSite(Site):
    def log(self, request: Any) -> None:
        """
        Upgrades are logged by their connections' end; pages are not worth
        a line each.
        """


class WebSocketFactory(CloseWatchFactory):
    """
    A L{CloseWatchFactory} whose connections are HTTP: a worker starts at
    a WebSocket upgrade (see the module's docstring).

    @ivar settings: how the WebSocket connections frame messages.
    @ivar origins: the Origin check.
    @ivar site: the HTTP side.
    """

    def __init__(
        self,
        config: Config,
        web: WebConfig,
        reactor: Any = None,
        metrics: Any = None,
    ) -> None:
        # --heartbeat means WebSocket pings here, not bytes in the stream.
        super().__init__(attr.evolve(config, heartbeat=0), reactor, metrics)
        self.settings = WebSocketSettings(
            binary=web.binary, maxMessage=web.maxMessage, pingInterval=config.heartbeat
        )
        self.origins = OriginPolicy(web.allowOrigins)
        page: IResource = _Console() if web.staticDir is None else _StaticFiles(web.staticDir)
        self.workers = _CGIStarter(
            self.reactor, self.config, lambda: self.guardian, self._killFirst
        )
        # A connection must send its request within --handshake-timeout
        # (and the next one within as long): it holds no slot meanwhile.
        self.site = _WebSite(
            _Root(_Upgrade(self), page),
            timeout=config.handshakeTimeout,
            reactor=self.reactor,
        )

    def connectionReady(self, addr: Any) -> Any:
        """
        An HTTP connection: no slot is taken until it asks for an upgrade.
        """
        return self.site.buildProtocol(addr)


class _CGIStarter(ProcessStarter):
    """
    Starts workers with their WebSocket client's CGI-style variables too.
    """

    def environment(self, client: Any, connectionID: int) -> dict[str, str]:
        """
        The usual environment plus the client's CGI-style variables
        (C{--env} still has the last word).
        """
        env = super().environment(client, connectionID)
        env.update((k, v) for k, v in client.environment.items() if k not in self._config.env)
        return env
