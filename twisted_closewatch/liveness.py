"""
Telling a dead or silent client from a slow one.

A client whose machine lost power sends no FIN and no RST.  TCP keepalive
and C{TCP_USER_TIMEOUT} make the kernel give up on it (the relay then sees
C{ETIMEDOUT}); an idle timeout gives up on a client that sends nothing; a
heartbeat makes a silent worker's connection carry data, so a dead client
shows up as a write error.

Twisted's C{TimeoutMixin} is not used: it resets on writes, so a server's
own heartbeats would keep a dead peer alive.
"""

from __future__ import annotations

import errno
import math
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall

from twisted_closewatch.config import Config

if TYPE_CHECKING:
    from twisted_closewatch.relay import WorkerRelay

#: macOS calls TCP_KEEPIDLE TCP_KEEPALIVE.
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))
_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPCNT = getattr(socket, "TCP_KEEPCNT", None)
#: Linux only; the constant is missing from older Pythons' socket module.
_USER_TIMEOUT = getattr(
    socket, "TCP_USER_TIMEOUT", 18 if sys.platform.startswith("linux") else None
)
_TCP_INFO = getattr(socket, "TCP_INFO", None)
#: state, ca_state, retransmits, probes, backoff, options, wscale, flags;
#: then rto, ato, snd_mss, rcv_mss, unacked (u32 each).
_TCP_INFO_HEAD = struct.Struct("8B5I")


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
                options.append((socket.IPPROTO_TCP, name, value))
    if config.userTimeout and _USER_TIMEOUT is not None:
        options.append((socket.IPPROTO_TCP, _USER_TIMEOUT, math.ceil(config.userTimeout * 1000)))
    return options


def platformWarnings(config: Config) -> list[str]:
    """
    What C{config} asks for that this platform cannot do.
    """
    warnings = []
    if config.keepalive and None in (_KEEPIDLE, _KEEPINTVL, _KEEPCNT):
        warnings.append("this platform cannot tune keepalive timers; kernel defaults apply")
    if config.userTimeout and _USER_TIMEOUT is None:
        warnings.append("--user-timeout needs Linux (TCP_USER_TIMEOUT); ignored")
    return warnings


def lossReason(probe: socket.socket | None, config: Config) -> str:
    """
    Why a connection died, read from its socket before it is closed.

    Twisted reports every socket error as a plain C{ConnectionLost}, and
    may have consumed the pending error already; the socket's TCP state
    still shows whether the kernel was probing (keepalive) or
    retransmitting (user timeout) when it gave up.
    """
    if probe is None:
        return "client-reset"
    try:
        pending = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        info = _tcpInfo(probe)
    except OSError:
        return "client-reset"
    if pending and pending != errno.ETIMEDOUT:
        return "client-reset"
    if info is None:
        return "keepalive" if pending == errno.ETIMEDOUT else "client-reset"
    retransmits, probes, backoff, unacked = info
    timedOut = pending == errno.ETIMEDOUT or probes or retransmits or backoff
    if not timedOut:
        return "client-reset"
    if config.userTimeout and (unacked or retransmits):
        return "user-timeout"
    return "keepalive"


def _tcpInfo(probe: socket.socket) -> tuple[int, int, int, int] | None:
    if _TCP_INFO is None or probe.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    raw = probe.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_HEAD.size)
    if len(raw) < _TCP_INFO_HEAD.size:
        return None
    fields = _TCP_INFO_HEAD.unpack(raw)
    return fields[2], fields[3], fields[4], fields[12]


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

    def configureSocket(self, sock: socket.socket) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        for level, name, value in socketOptions(self._config):
            try:
                sock.setsockopt(level, name, value)
            except OSError:
                pass

    def start(self) -> None:
        self._running = True
        self._lastRead = self._lastWrite = time.monotonic()
        if self._config.idleTimeout:
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
        if self._running and self._config.idleTimeout and self._idleCall is None:
            self._idleCall = self._reactor.callLater(self._config.idleTimeout, self._checkIdle)

    def _checkIdle(self) -> None:
        remaining = self._lastRead + self._config.idleTimeout - time.monotonic()
        if remaining > 0:
            self._idleCall = self._reactor.callLater(remaining, self._checkIdle)
            return
        self._idleCall = None
        self._relay.clientGone("idle-timeout")

    def _checkHeartbeat(self) -> None:
        remaining = self._lastWrite + self._config.heartbeat - time.monotonic()
        if remaining <= 0:
            self._relay.transport.write(self._config.heartbeatData)
            self._lastWrite = time.monotonic()
            remaining = self._config.heartbeat
        self._heartbeatCall = self._reactor.callLater(remaining, self._checkHeartbeat)
