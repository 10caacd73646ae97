"""
Reading a connection's addresses: for the log, for the per-peer limit and
for a worker's environment.  The one place that knows Twisted's address
types (C{IPv4Address}, C{IPv6Address}, C{UNIXAddress}, ...).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import UNIXAddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: IPv6 clients are counted per /64 by the per-client limits: one
#: subscriber's usual allocation, which one client can hop across at will.
IPV6_CLIENT_PREFIX = 64


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


def clientIP(address: Any) -> IPAddress | None:
    """
    The IP address of a TCP peer (an IPv4-mapped IPv6 address as the IPv4
    address it is; the original client's when the PROXY protocol named it);
    C{None} for a peer without one.
    """
    if getattr(address, "type", None) not in ("TCP", "TCP6"):
        return None
    try:
        ip = ipaddress.ip_address(address.host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def clientNetwork(ip: IPAddress) -> Network:
    """
    The addresses the per-client limits count as one client: an IPv4
    address alone, an IPv6 address's /64.
    """
    prefix = IPV6_CLIENT_PREFIX if ip.version == 6 else 32
    return ipaddress.ip_network((ip, prefix), strict=False)


def peerKey(address: Any) -> str | None:
    """
    What the per-peer limit counts by: the client's address (its /64 for
    IPv6, see L{clientNetwork}); C{None} for transports without one, which
    the per-peer limit does not apply to.
    """
    ip = clientIP(address)
    if ip is None:
        return None
    return str(ip) if ip.version == 4 else str(clientNetwork(ip))


def ucspiEnvironment(host: Any, peer: Any) -> dict[str, str]:
    """
    The variables tcpserver, s6 and inetd-style servers give a worker about
    its connection.  TCP (v4 and v6) gets C{PROTO=TCP} and the C{TCP*}
    addresses; other transports get C{PROTO} only, named after the address
    type (C{UNIX} for a unix socket).
    """
    if getattr(peer, "type", None) in ("TCP", "TCP6"):
        return {
            "PROTO": "TCP",
            "TCPREMOTEIP": peer.host,
            "TCPREMOTEPORT": str(peer.port),
            "TCPLOCALIP": getattr(host, "host", ""),
            "TCPLOCALPORT": str(getattr(host, "port", "")),
        }
    name = type(peer).__name__.removesuffix("Address").upper() or "UNKNOWN"
    return {"PROTO": name}
