"""
Who may connect at all, and how often: address rules (tcpserver's rules,
xinetd's C{only_from}/C{no_access}, systemd's C{IPAddressAllow}/C{Deny}) and
a per-client connection rate (xinetd's C{cps}).

Both look at the client's IP address: the original client's behind the
PROXY protocol.  Clients without one (unix sockets) are not subject to
either: the socket file's mode is their access control.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from twisted_closewatch.addresses import IPAddress, Network, clientIP, clientNetwork
from twisted_closewatch.config import Config

#: Clients remembered by the rate limit at most; past that the one heard
#: from longest ago is forgotten (and starts afresh if it comes back).
RATE_TABLE_SIZE = 65536


def parseNetwork(text: str) -> Network:
    """
    An IPv4 or IPv6 network, C{10.0.0.0/8} or C{2001:db8::/32}; a bare
    address is a network of that one address.

    @raise ValueError: C{text} is not one, or has host bits set.
    """
    return ipaddress.ip_network(text.strip(), strict=True)


class AccessRules:
    """
    C{--allow} and C{--deny}: a client in a denied network is refused; when
    any network is allowed, a client in none of them is refused too.  Deny
    wins over allow.
    """

    def __init__(self, allow: Iterable[Network] = (), deny: Iterable[Network] = ()) -> None:
        self._allow = tuple(allow)
        self._deny = tuple(deny)

    def __bool__(self) -> bool:
        return bool(self._allow or self._deny)

    def permits(self, ip: IPAddress) -> bool:
        if any(ip in network for network in self._deny):
            return False
        return not self._allow or any(ip in network for network in self._allow)


class RateLimiter:
    """
    At most C{rate} new connections per second per client, in bursts of up
    to C{rate}: a token bucket, kept as the time its client's bucket will
    be full again (the generic cell rate algorithm), so that a client is
    forgotten once that time has passed.

    Every entry is at most one second ahead of the time it was last
    updated, and entries are kept in the order of their last update, so the
    ones that may be forgotten are always at the front.
    """

    def __init__(
        self, rate: int, clock: IReactorTime, maxClients: int = RATE_TABLE_SIZE
    ) -> None:
        self._interval = 1.0 / rate
        self._window = 1.0  # rate intervals: the whole bucket
        self._clock = clock
        self._maxClients = maxClients
        # client -> (time the bucket is full again, time of the last update)
        self._full: dict[Network, tuple[float, float]] = {}

    def __len__(self) -> int:
        """
        How many clients are remembered now.
        """
        return len(self._full)

    def allow(self, ip: IPAddress) -> bool:
        """
        Whether a new connection from C{ip} is within its rate; if so, it is
        counted.
        """
        now = self._clock.seconds()
        self._forget(now)
        key = clientNetwork(ip)
        fullAt = max(self._full.pop(key, (now, now))[0], now)
        allowed = fullAt + self._interval - now <= self._window + 1e-9
        if allowed:
            fullAt += self._interval
        self._full[key] = (fullAt, now)
        return allowed

    def _forget(self, now: float) -> None:
        """
        Forget the clients whose bucket is full again, and the least recently
        heard from while the table is full.
        """
        while self._full:
            key = next(iter(self._full))
            if self._full[key][1] + self._window > now and len(self._full) < self._maxClients:
                return
            del self._full[key]


class AccessPolicy:
    """
    The address rules and the rate limit of one server, applied to every
    new client once its address is known.
    """

    def __init__(self, config: Config, clock: IReactorTime) -> None:
        self._rules = AccessRules(config.allow, config.deny)
        self._rate = RateLimiter(config.maxRatePerPeer, clock) if config.maxRatePerPeer else None

    def refusal(self, address: Any) -> str | None:
        """
        Why a client at C{address} may not connect (C{"denied"} by the
        rules, C{"rate"} over its rate), or C{None} if it may.  An allowed
        connection counts towards the client's rate; a denied one does not.
        """
        if not self._rules and self._rate is None:
            return None
        ip = clientIP(address)
        if ip is None:
            return None
        if self._rules and not self._rules.permits(ip):
            return "denied"
        if self._rate is not None and not self._rate.allow(ip):
            return "rate"
        return None
