"""
What the kernel knows about a client's TCP socket: the options that make it
give up on a dead peer, and why a connection died.

A client whose machine lost power sends no FIN and no RST.  TCP keepalive
and C{TCP_USER_TIMEOUT} make the kernel give up on it (the relay then sees
C{ETIMEDOUT}).  L{SocketProbe} is closewatch's own duplicate of a client
socket: what the close watch polls and what these facts are read from,
even after the transport has closed its descriptor.

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
import fcntl
import math
import socket
import struct
import sys
import termios
from collections.abc import Iterable
from typing import Any, NamedTuple

from twisted.logger import Logger

from twisted_closewatch import _compat
from twisted_closewatch.config import Config
from twisted_closewatch.record import EndReason

log = Logger()

_LINUX = sys.platform.startswith("linux")
#: macOS calls TCP_KEEPIDLE TCP_KEEPALIVE.
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPCNT = getattr(socket, "TCP_KEEPCNT", None)
#: Linux only; the constant is missing from older Pythons' socket module.
_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18 if _LINUX else None)
#: Linux's struct tcp_info is the only one read here.
_TCP_INFO = getattr(socket, "TCP_INFO", 11 if _LINUX else None) if _LINUX else None
_TCP_FIN_WAIT2 = 5
_TCP_TIME_WAIT = 6
_TCP_CLOSE = 7
_TCP_CLOSE_WAIT = 8
_TCP_LAST_ACK = 9
_TCP_CLOSING = 11

#: Errors the peer's stack sent: an RST (or our own write after it).
RESET_ERRORS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ECONNREFUSED})
#: Errors the kernel gives up with: ETIMEDOUT, or the last ICMP error seen
#: while retransmitting or probing (Linux reports that soft error instead).
TIMEOUT_ERRORS = frozenset(
    {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)


class TCPInfo(NamedTuple):
    """
    The fields of Linux's C{struct tcp_info} that tell a loss apart, and
    those that count and time what a connection carried (for C{--direct},
    where no byte passes through the server).
    """

    state: int
    retransmits: int
    probes: int
    rtt: float  # seconds, smoothed
    lastAckRecv: float  # seconds since the peer last acknowledged anything
    notSent: int  # bytes queued that the peer's window never let out
    lastDataRecv: float = 0.0  # seconds since the peer last sent data
    bytesAcked: int = 0  # bytes sent and acknowledged, our FIN included
    bytesReceived: int = 0  # bytes received, the peer's FIN included

    @property
    def peerFinished(self) -> bool:
        """
        Whether the peer's FIN has been received: it will send no more data.
        """
        return self.state in _PEER_FIN_IN


# (offset, format) in struct tcp_info; the byte counts need Linux 4.1 and
# 4.2, notsent_bytes 4.6.
_FIELDS = {
    "state": (0, "B"),
    "retransmits": (2, "B"),
    "probes": (3, "B"),
    "last_data_recv": (52, "I"),
    "last_ack_recv": (56, "I"),
    "rtt": (68, "I"),
    "bytes_acked": (120, "Q"),
    "bytes_received": (128, "Q"),
    "notsent_bytes": (144, "I"),
}
_TCP_INFO_SIZE = 256
#: struct linger: l_onoff, l_linger (seconds).
_LINGER = struct.Struct("ii")


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
        lastDataRecv=values["last_data_recv"] / 1000,
        bytesAcked=values["bytes_acked"],
        bytesReceived=values["bytes_received"],
    )


#: States in which the peer's FIN has been received (C{TCP_CLOSE} too,
#: unless the connection was reset: see L{transferred}).
_PEER_FIN_IN = frozenset({_TCP_CLOSE_WAIT, _TCP_LAST_ACK, _TCP_CLOSING, _TCP_TIME_WAIT})
#: States in which our FIN has been acknowledged (C{TCP_CLOSE} likewise).
_OUR_FIN_ACKED = frozenset({_TCP_FIN_WAIT2, _TCP_TIME_WAIT})


def transferred(info: TCPInfo, reset: bool) -> tuple[int, int]:
    """
    The data bytes a connection received and sent (acknowledged), from its
    C{TCP_INFO}.

    Linux counts a FIN as a byte in C{tcpi_bytes_received} and
    C{tcpi_bytes_acked} (it takes a sequence number), so a FIN known from
    the state is taken off.  A connection that reached C{TCP_CLOSE}
    without a reset exchanged both FINs; after a reset neither is assumed
    (a FIN before the reset is then counted as one byte).
    """
    closedCleanly = info.state == _TCP_CLOSE and not reset
    peerFin = info.state in _PEER_FIN_IN or closedCleanly
    ourFinAcked = info.state in _OUR_FIN_ACKED or closedCleanly
    return (
        max(info.bytesReceived - peerFin, 0),
        max(info.bytesAcked - ourFinAcked, 0),
    )


def keepaliveDeadline(
    config: Config, userTimeoutApplies: bool = _USER_TIMEOUT is not None
) -> float | None:
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


def lossReason(probe: socket.socket | None, config: Config) -> EndReason:
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
    pending = pendingError(probe)
    if probe is None or pending is None:
        return EndReason.CLIENT_RESET
    try:
        info = tcpInfo(probe)
    except OSError:
        return EndReason.CLIENT_RESET
    if pending in RESET_ERRORS:
        return EndReason.CLIENT_RESET
    if info is None and not pending and probe.family == getattr(socket, "AF_UNIX", None):
        # A unix peer's close is a hang-up without an error (it is
        # ECONNRESET when the peer left input unread).
        return EndReason.CLIENT_CLOSED
    if pending:
        # The kernel's verdict is a timeout (or an unknown error: a reset).
        if pending not in TIMEOUT_ERRORS:
            return EndReason.CLIENT_RESET
        if info is None:
            return EndReason.KEEPALIVE if config.keepalive else EndReason.USER_TIMEOUT
        if info.retransmits or info.notSent:
            return EndReason.USER_TIMEOUT
        if info.probes:
            return EndReason.KEEPALIVE
        return EndReason.KEEPALIVE if config.keepalive else EndReason.USER_TIMEOUT
    if info is None or info.state != _TCP_CLOSE:
        return EndReason.CLIENT_RESET
    userTimeout = config.userTimeout if _USER_TIMEOUT is not None else 0
    if info.retransmits or info.notSent:
        needed = userTimeout or kernelRetransmitTimeout()
        return EndReason.USER_TIMEOUT if _silentFor(info, needed) else EndReason.CLIENT_RESET
    if info.probes and config.keepalive:
        needed = keepaliveDeadline(config) or 0
        return EndReason.KEEPALIVE if _silentFor(info, needed) else EndReason.CLIENT_RESET
    return EndReason.CLIENT_RESET


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
        wrapped = _compat.wrappedEndpoint(endpoint)
        if wrapped is None:
            return False
        endpoint = wrapped
    return False


def finReason(probe: socket.socket | None) -> EndReason:
    """
    Why Twisted reported the end of the client's input: C{client-closed}
    for a FIN, C{client-reset} if an RST's error is pending on the socket.
    Twisted's epoll reactor takes an error event without readable data for
    a clean end of input, and Linux shows an arriving RST that way for a
    moment (the soak sees it about once in a thousand resets).
    """
    if pendingError(probe) in RESET_ERRORS:
        return EndReason.CLIENT_RESET
    return EndReason.CLIENT_CLOSED


def pendingError(sock: socket.socket | None) -> int | None:
    """
    The error pending on C{sock} (C{SO_ERROR}, which reading clears), 0 for
    none, C{None} if it cannot be read.
    """
    if sock is None:
        return None
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return None


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


def unread(sock: socket.socket | None) -> int:
    """
    Bytes received on C{sock} and not read yet (0 if unknown).
    """
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(raw, sys.byteorder, signed=True)


class SocketProbe:
    """
    A duplicate of a client's socket, ours to poll and to query after the
    transport has closed its own descriptor, so that a connection loss can
    be told apart (reset, keepalive, user timeout) and a watched descriptor
    number can never be reused under the close watch.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    @classmethod
    def of(cls, transport: Any) -> SocketProbe | None:
        """
        A probe of C{transport}'s socket (see L{socketOf}), or C{None} if it
        has none.
        """
        try:
            sock = socketOf(transport)
            return None if sock is None else cls(sock.dup())
        except OSError as e:
            if e.errno != errno.EBADF:
                log.warn("cannot watch client socket: {error}", error=e)
            return None

    def fileno(self) -> int:
        return self.socket.fileno()

    def configure(self, config: Config) -> None:
        applySocketOptions(self.socket, config)

    def finReason(self) -> EndReason:
        return finReason(self.socket)

    def lossReason(self, config: Config) -> EndReason:
        return lossReason(self.socket, config)

    def unread(self) -> int:
        return unread(self.socket)

    def setBlocking(self, blocking: bool) -> None:
        """
        Make the socket (every descriptor of it: the flag belongs to the
        open file) blocking, as a worker given it expects, or non-blocking
        again, as the reactor needs it.
        """
        self.socket.setblocking(blocking)

    def dropInput(self, size: int = 65536) -> int:
        """
        Read and drop up to C{size} bytes of the client's input without
        waiting (C{MSG_DONTWAIT}), whatever the socket's blocking flag, which
        every holder of the socket shares and may change.

        @return: how many; 0 once the client's input has ended.
        @raise BlockingIOError: there is nothing to read now.
        @raise OSError: the connection is lost.
        """
        return len(self.socket.recv(size, socket.MSG_DONTWAIT))

    def stopLingering(self) -> None:
        """
        Make the socket's last close return at once, before it is closed.

        C{SO_LINGER} with a timeout, which a C{--direct} worker may set on
        the socket it was given, makes the close that releases the socket
        wait, up to that timeout, for the client to take what it has not
        taken yet: in the server, that close is made by the reactor, which
        would serve nobody meanwhile.  A zero timeout (Twisted's
        C{abortConnection}: a reset) is kept.
        """
        try:
            onOff, seconds = _LINGER.unpack(
                self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER.size)
            )
            if onOff and seconds:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER.pack(0, 0))
        except OSError:
            pass

    def info(self) -> TCPInfo | None:
        """
        The socket's L{TCPInfo}, or C{None} if it has none (not TCP, not
        Linux, or closed).
        """
        try:
            return tcpInfo(self.socket)
        except OSError:
            return None

    def consumed(self, attempts: int = 3) -> int:
        """
        The bytes received and already read off the socket (before a
        handover: a PROXY header), FINs left out: C{TCP_INFO}'s count less
        what is unread, taken when no byte arrived in between (0 if that
        cannot be had).
        """
        for _ in range(attempts):
            unread = self.unread()
            info = self.info()
            if info is None:
                return 0
            if self.unread() == unread:
                return max(transferred(info, reset=False)[0] - unread, 0)
        return 0

    def close(self) -> None:
        self.socket.close()
