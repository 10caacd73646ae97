"""
Reading a connection's addresses: for the log, for the per-peer limit and
for a worker's environment.  The one place that knows Twisted's address
types (C{IPv4Address}, C{IPv6Address}, C{UNIXAddress}, ...).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import UNIXAddress


def describe(address: Any) -> str:
    """
    How a peer is named in the log: C{host:port} (C{[host]:port} for IPv6),
    a unix socket client's path, or C{unix peer} for the usual unix client,
    which has none.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        path = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        return path or "unix peer"
    return str(address)


def peerKey(address: Any) -> str | None:
    """
    What the per-peer limit counts by: the IP address of a TCP peer (the
    original client's when the PROXY protocol named it); C{None} for
    transports without one, which the per-peer limit does not apply to.
    """
    if getattr(address, "type", None) in ("TCP", "TCP6"):
        host: str = address.host
        return host
    return None


def ucspiEnvironment(host: Any, peer: Any) -> dict[str, str]:
    """
    The variables tcpserver, s6 and inetd-style servers give a worker about
    its connection.  TCP (v4 and v6) gets C{PROTO=TCP} and the C{TCP*}
    addresses; other transports get C{PROTO} only, named after the address
    type (C{UNIX} for a unix socket).
    """
    if peerKey(peer) is not None:
        return {
            "PROTO": "TCP",
            "TCPREMOTEIP": peer.host,
            "TCPREMOTEPORT": str(peer.port),
            "TCPLOCALIP": getattr(host, "host", ""),
            "TCPLOCALPORT": str(getattr(host, "port", "")),
        }
    name = type(peer).__name__.removesuffix("Address").upper() or "UNKNOWN"
    return {"PROTO": name}
