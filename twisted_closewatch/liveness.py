"""
Telling a dead or silent client from a slow one.

A client whose machine lost power sends no FIN and no RST.  TCP keepalive
and C{TCP_USER_TIMEOUT} make the kernel give up on it (the relay then sees
C{ETIMEDOUT}); an idle timeout gives up on a client that sends nothing; a
heartbeat makes a silent worker's connection carry data, so a dead client
shows up as a write error.

Twisted's C{TimeoutMixin} is not used: it resets on writes, so a server's
own heartbeats would keep a dead peer alive.

How Linux combines the two timers (measured on 6.x, see L{keepaliveDeadline}):

  - keepalive probes an idle connection (nothing unacknowledged, nothing
    queued) after C{--keepalive-idle} seconds of silence from the peer, then
    every C{--keepalive-interval} seconds;
  - without C{TCP_USER_TIMEOUT}, the peer is dead after C{--keepalive-count}
    unanswered probes: C{idle + count * interval} seconds of silence;
  - with C{TCP_USER_TIMEOUT} set, the count is ignored: the peer is dead at
    the first probe time at or after C{--user-timeout} seconds of silence
    (and never before one probe went unanswered).  With the defaults
    (60/10/5, user timeout 120) a dead idle client is dropped after 120 s,
    not 110 s;
  - C{TCP_USER_TIMEOUT} alone governs data the peer does not acknowledge
    (retransmissions) and a receive window the peer keeps closed (zero
    window probes): Linux drops a client that keeps its window at zero for
    longer than the user timeout even if it answers every probe.

How a loss is told apart (L{lossReason}), from what Linux shows on a
duplicate of the socket after the connection died (measured):

  - C{SO_ERROR} is the reason (C{ECONNRESET}, C{ETIMEDOUT}) only until the
    first C{recv}/C{send} returns it: when Twisted was reading the socket,
    its C{recv} consumed it and C{SO_ERROR} reads 0; when the relay was
    paused, the close watch is woken by the error and C{SO_ERROR} still
    holds it;
  - C{TCP_INFO} survives in state C{TCP_CLOSE}, but the kernel purged the
    send queue: C{tcpi_unacked} and C{tcpi_backoff} read 0 whatever
    happened.  C{tcpi_retransmits} (retransmission timeout), C{tcpi_probes}
    (keepalive probes) and C{tcpi_notsent_bytes} (data the peer's closed
    window never let out) are kept, and so is C{tcpi_last_ack_recv};
  - an RST that answers a retransmission or a keepalive probe (a rebooted
    peer) leaves those counters set too, so when C{SO_ERROR} is gone a
    timeout is only believed if the peer has been silent for as long as the
    configured timeout needs.  Known limit: a closed-window peer that dies
    with the error consumed is called C{client-reset} unless it had been
    silent for the whole user timeout.
"""

from __future__ import annotations

import errno
import math
import socket
import struct
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.internet.interfaces import IDelayedCall

from twisted_closewatch.config import Config

if TYPE_CHECKING:
    from twisted_closewatch.relay import WorkerRelay

_LINUX = sys.platform.startswith("linux")
#: macOS calls TCP_KEEPIDLE TCP_KEEPALIVE.
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPCNT = getattr(socket, "TCP_KEEPCNT", None)
#: Linux only; the constant is missing from older Pythons' socket module.
_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18 if _LINUX else None)
#: Linux's struct tcp_info is the only one read here.
_TCP_INFO = getattr(socket, "TCP_INFO", 11 if _LINUX else None) if _LINUX else None
_TCP_CLOSE = 7

#: Errors the peer's stack sent: an RST (or our own write after it).
RESET_ERRORS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ECONNREFUSED})
#: Errors the kernel gives up with: ETIMEDOUT, or the last ICMP error seen
#: while retransmitting or probing (Linux reports that soft error instead).
TIMEOUT_ERRORS = frozenset(
    {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)


class TCPInfo(NamedTuple):
    """
    The fields of Linux's C{struct tcp_info} that tell a loss apart.
    """

    state: int
    retransmits: int
    probes: int
    rtt: float  # seconds, smoothed
    lastAckRecv: float  # seconds since the peer last acknowledged anything
    notSent: int  # bytes queued that the peer's window never let out


# (offset, format) in struct tcp_info; notsent_bytes needs Linux 4.6.
_FIELDS = {
    "state": (0, "B"),
    "retransmits": (2, "B"),
    "probes": (3, "B"),
    "last_ack_recv": (56, "I"),
    "rtt": (68, "I"),
    "notsent_bytes": (144, "I"),
}
_TCP_INFO_SIZE = 256


def tcpInfo(sock: socket.socket) -> TCPInfo | None:
    """
    The loss-telling fields of C{sock}'s C{TCP_INFO}, or C{None} off Linux
    or for a socket that is not TCP.

    @raise OSError: the socket cannot be queried.
    """
    if _TCP_INFO is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    if len(raw) < 72:
        return None
    values = {}
    for name, (offset, fmt) in _FIELDS.items():
        end = offset + struct.calcsize(fmt)
        values[name] = struct.unpack_from("=" + fmt, raw, offset)[0] if end <= len(raw) else 0
    return TCPInfo(
        state=values["state"],
        retransmits=values["retransmits"],
        probes=values["probes"],
        rtt=values["rtt"] / 1e6,
        lastAckRecv=values["last_ack_recv"] / 1000,
        notSent=values["notsent_bytes"],
    )


def keepaliveDeadline(config: Config, userTimeoutApplies: bool = _USER_TIMEOUT is not None) -> float | None:
    """
    Seconds of silence from a dead idle peer after which Linux drops it by
    keepalive; C{None} with keepalive off.

    Without a user timeout: C{idle + count * interval}.  With one, Linux
    ignores the count and gives up at the first probe time
    (C{idle + k * interval}, C{k >= 1}) at or after the user timeout.
    """
    if not config.keepalive:
        return None
    idle, interval = config.keepaliveIdle, config.keepaliveInterval
    userTimeout = config.userTimeout if userTimeoutApplies else 0
    if not userTimeout:
        return idle + config.keepaliveCount * interval
    return idle + interval * max(1, math.ceil((userTimeout - idle) / interval - 1e-9))


def kernelRetransmitTimeout(retries2: int | None = None) -> float:
    """
    The least time Linux retransmits unacknowledged data without a user
    timeout before it gives up: C{tcp_retries2} backed-off retransmissions
    from the 200 ms minimum RTO, capped at 120 s each (924.6 s for the
    default of 15).
    """
    if retries2 is None:
        try:
            with open("/proc/sys/net/ipv4/tcp_retries2") as f:
                retries2 = int(f.read())
        except (OSError, ValueError):
            retries2 = 15
    rtoMin, rtoMax = 0.2, 120.0
    threshold = int(math.log2(rtoMax / rtoMin))
    if retries2 <= threshold:
        return ((2 << retries2) - 1) * rtoMin
    return ((2 << threshold) - 1) * rtoMin + (retries2 - threshold) * rtoMax


def lossReason(probe: socket.socket | None, config: Config) -> str:
    """
    Why a connection died, read from a duplicate of its socket: one of
    C{client-reset}, C{keepalive}, C{user-timeout}.

    Reads (and so clears) C{SO_ERROR}.  When it still holds the error (the
    close watch saw it while the relay was paused) the error decides
    between a reset and a timeout, and C{TCP_INFO} between keepalive and
    the user timeout.  When Twisted's C{recv} or C{send} consumed it first,
    C{TCP_INFO} alone decides, and a timeout is believed only when the
    connection is closed and the peer has been silent for as long as the
    configured timeout takes; anything else is a reset.
    """
    if probe is None:
        return "client-reset"
    try:
        pending = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        info = tcpInfo(probe)
    except OSError:
        return "client-reset"
    if pending in RESET_ERRORS:
        return "client-reset"
    if pending:
        # The kernel's verdict is a timeout (or an unknown error: a reset).
        if pending not in TIMEOUT_ERRORS:
            return "client-reset"
        if info is None:
            return "keepalive" if config.keepalive else "user-timeout"
        if info.retransmits or info.notSent:
            return "user-timeout"
        if info.probes:
            return "keepalive"
        return "keepalive" if config.keepalive else "user-timeout"
    if info is None or info.state != _TCP_CLOSE:
        return "client-reset"
    userTimeout = config.userTimeout if _USER_TIMEOUT is not None else 0
    if info.retransmits or info.notSent:
        needed = userTimeout or kernelRetransmitTimeout()
        return "user-timeout" if _silentFor(info, needed) else "client-reset"
    if info.probes and config.keepalive:
        needed = keepaliveDeadline(config) or 0
        return "keepalive" if _silentFor(info, needed) else "client-reset"
    return "client-reset"


def _silentFor(info: TCPInfo, seconds: float) -> bool:
    """
    Whether the peer has acknowledged nothing for about C{seconds}: jiffy
    rounding and one round trip of in-flight data are allowed for.
    """
    slack = 0.25 + 2 * info.rtt + 0.05 * seconds
    return info.lastAckRecv >= seconds - slack


def socketOptions(config: Config) -> list[tuple[int, int, int]]:
    """
    The C{setsockopt} calls that C{config} asks for on a TCP client socket,
    leaving out what this platform cannot do.
    """
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(config.keepalive))]
    if config.keepalive:
        for name, value in (
            (_KEEPIDLE, config.keepaliveIdle),
            (_KEEPINTVL, config.keepaliveInterval),
            (_KEEPCNT, config.keepaliveCount),
        ):
            if name is not None:
                options.append((socket.IPPROTO_TCP, name, max(1, math.ceil(value))))
    if config.userTimeout and _USER_TIMEOUT is not None:
        options.append((socket.IPPROTO_TCP, _USER_TIMEOUT, math.ceil(config.userTimeout * 1000)))
    return options


def socketOf(transport: Any) -> socket.socket | None:
    """
    The socket under C{transport}, or C{None} if it has none.  Under TLS the
    transport's handle is the TLS connection, not the socket: the socket is
    the handle of the transport beneath it.

    @raise OSError: the socket cannot be had (it is closed).
    """
    while transport is not None:
        getHandle = getattr(transport, "getHandle", None)
        if getHandle is None:
            return None
        handle = getHandle()
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
    return None


def applySocketOptions(sock: socket.socket, config: Config) -> None:
    """
    Set L{socketOptions} on C{sock} if it is a TCP socket; what the kernel
    refuses is left at its default.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, name, value in socketOptions(config):
        try:
            sock.setsockopt(level, name, value)
        except OSError:
            pass


def platformWarnings(
    config: Config, endpoints: Iterable[Any] = (), keepaliveGiven: bool = True
) -> list[str]:
    """
    What C{config} asks for that this platform, or the endpoints listened
    on, cannot do: one line each, to be logged once at start-up.

    @param endpoints: L{IStreamServerEndpoint}s, or C{(description,
        endpoint)} pairs to name them in the warning.
    @param keepaliveGiven: whether keepalive or the user timeout were asked
        for, rather than left at their defaults: only then is a setting that
        cannot apply worth a warning.
    """
    warnings: list[str] = []
    if not keepaliveGiven:
        return warnings
    if config.keepalive and None in (_KEEPIDLE, _KEEPINTVL, _KEEPCNT):
        warnings.append("this platform cannot tune keepalive timers; kernel defaults apply")
    if config.userTimeout and _USER_TIMEOUT is None:
        warnings.append("--user-timeout needs Linux (TCP_USER_TIMEOUT); ignored")
    for item in endpoints:
        description, endpoint = item if isinstance(item, tuple) else (None, item)
        if config.keepalive and _isUnixEndpoint(endpoint):
            name = description or type(endpoint).__name__
            warnings.append(
                f"--keepalive and --user-timeout do not apply to the unix socket "
                f"endpoint {name!r}; ignored there"
            )
    return warnings


def _isUnixEndpoint(endpoint: Any) -> bool:
    from twisted.internet.endpoints import UNIXServerEndpoint

    for _ in range(8):  # through wrappers such as haproxy:
        if isinstance(endpoint, UNIXServerEndpoint):
            return True
        if getattr(endpoint, "addressFamily", None) == getattr(socket, "AF_UNIX", object()):
            return True  # systemd:domain=UNIX, adopted sockets
        wrapped = getattr(endpoint, "_wrappedEndpoint", None)
        if wrapped is None:
            return False
        endpoint = wrapped
    return False


class ConnectionLiveness:
    """
    The keepalive settings, idle timeout and heartbeat of one connection.

    Both timers run on timestamps rather than being reset on every chunk:
    resetting a delayed call per read or write would cost a heap operation
    per chunk at full relay speed.
    """

    _idleCall: IDelayedCall | None = None
    _heartbeatCall: IDelayedCall | None = None

    def __init__(self, reactor: Any, config: Config, relay: WorkerRelay) -> None:
        self._reactor = reactor
        self._config = config
        self._relay = relay
        self._lastRead = self._lastWrite = time.monotonic()
        self._running = False
        self._clientFinished = False

    def configureSocket(self, sock: socket.socket) -> None:
        applySocketOptions(sock, self._config)

    def start(self) -> None:
        self._running = True
        self._lastRead = self._lastWrite = time.monotonic()
        if self._config.idleTimeout and not self._clientFinished:
            self._idleCall = self._reactor.callLater(self._config.idleTimeout, self._checkIdle)
        if self._config.heartbeat:
            self._heartbeatCall = self._reactor.callLater(
                self._config.heartbeat, self._checkHeartbeat
            )

    def stop(self) -> None:
        self._running = False
        for call in (self._idleCall, self._heartbeatCall):
            if call is not None and call.active():
                call.cancel()
        self._idleCall = self._heartbeatCall = None

    def clientSent(self) -> None:
        self._lastRead = time.monotonic()

    def clientWritten(self) -> None:
        self._lastWrite = time.monotonic()

    def clientFinished(self) -> None:
        """
        The client half-closed (and the worker gets the EOF): it has nothing
        more to send, so its silence from now on is no sign of death.
        """
        self._clientFinished = True
        self.paused()

    def paused(self) -> None:
        """
        The relay stopped reading the client: the silence is ours, not the
        client's, so the idle clock stops.
        """
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None

    def resumed(self) -> None:
        self._lastRead = time.monotonic()
        if (
            self._running
            and self._config.idleTimeout
            and self._idleCall is None
            and not self._clientFinished
        ):
            self._idleCall = self._reactor.callLater(self._config.idleTimeout, self._checkIdle)

    def _checkIdle(self) -> None:
        remaining = self._lastRead + self._config.idleTimeout - time.monotonic()
        if remaining > 0:
            self._idleCall = self._reactor.callLater(remaining, self._checkIdle)
            return
        self._idleCall = None
        self._relay.clientGone("idle-timeout")

    def _checkHeartbeat(self) -> None:
        self._heartbeatCall = None
        transport = self._relay.transport
        if (
            transport is None
            or self._relay.record.goneAt is not None
            or getattr(transport, "disconnecting", False)
            or getattr(transport, "_aborting", False)
        ):
            # Going away (or draining a finished worker's output): no more
            # heartbeats, which would land after the worker's last bytes.
            return
        if getattr(transport, "producerPaused", False):
            # The client is not taking what was written: the connection is
            # not silent (the kernel retransmits or probes it, and the user
            # timeout applies), and a heartbeat would only grow the buffer.
            self._lastWrite = time.monotonic()
        remaining = self._lastWrite + self._config.heartbeat - time.monotonic()
        if remaining <= 0:
            transport.write(self._config.heartbeatData)
            self._lastWrite = time.monotonic()
            remaining = self._config.heartbeat
        self._heartbeatCall = self._reactor.callLater(remaining, self._checkHeartbeat)
