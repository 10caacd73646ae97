"""
The settings of one closewatch server, as plain data.

L{twisted_closewatch.options.Options} builds a L{Config} from the command
line; a library user builds one directly.
"""

from __future__ import annotations

import ipaddress
import sys

import attr

#: The longest C{TCP_USER_TIMEOUT} Linux takes: milliseconds in a C int.
MAX_USER_TIMEOUT = 2**31 // 1000


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
    @ivar halfClose: C{"kill"} or C{"forward"}: what a client's FIN means.
    @ivar readAhead: client bytes held in memory per connection beyond the
        worker's stdin pipe before the client is paused.
    @ivar pipeSize: capacity asked for the worker's pipes (Linux).
    @ivar keepalive: turn on C{SO_KEEPALIVE} on client sockets.
    @ivar keepaliveIdle: seconds of silence before the first probe.
    @ivar keepaliveInterval: seconds between probes.
    @ivar keepaliveCount: unanswered probes before the peer is dead.
    @ivar userTimeout: seconds sent data may stay unacknowledged (Linux
        C{TCP_USER_TIMEOUT}); 0 leaves the kernel default.  By default
        C{keepaliveIdle + keepaliveInterval * keepaliveCount}: Linux ignores
        the keepalive count while a user timeout is set, so the two must
        agree for the keepalive settings to act as given.
    @ivar heartbeat: seconds without output to the client after which
        C{heartbeatData} is written; 0 is off.
    @ivar idleTimeout: seconds without input from the client after which it
        is taken for gone; 0 is off.
    @ivar maxWorkers: live workers at most; further clients get
        C{busyMessage} and are closed.
    @ivar maxPerPeer: live workers per client address at most; 0 is off.
    @ivar maxLifetime: seconds a worker may live; 0 is off.
    @ivar grace: seconds between SIGTERM and SIGKILL; 0 kills at once.
    @ivar handshakeTimeout: seconds a connection may take over its TLS
        handshake or its PROXY header.
    @ivar maxHandshakes: connections in a TLS handshake or before their
        PROXY header at most; more are closed at once.  0 is off.
    @ivar allow: the networks clients may connect from; empty allows all
        but C{deny}.
    @ivar deny: the networks clients may not connect from (over C{allow}).
    @ivar maxRatePerPeer: new connections per second per client IP (per
        /64 for IPv6) at most; 0 is off.
    """

    argv: tuple[str, ...] = attr.ib(factory=defaultCommand, converter=tuple)
    env: dict[str, str] = attr.ib(factory=dict)
    halfClose: str = attr.ib(
        default="kill", validator=attr.validators.in_(("kill", "forward"))
    )
    readAhead: int = 256 * 1024
    pipeSize: int = 1024 * 1024
    keepalive: bool = True
    keepaliveIdle: int = 60
    keepaliveInterval: int = 10
    keepaliveCount: int = 6
    userTimeout: float = attr.ib()
    heartbeat: float = 0
    heartbeatData: bytes = b"\n"
    idleTimeout: float = 0
    maxWorkers: int = 1000
    maxPerPeer: int = 0
    maxLifetime: float = 0
    grace: float = 0
    busyMessage: bytes = b""
    handshakeTimeout: float = 10
    maxHandshakes: int = 1000
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = attr.ib(
        default=(), converter=tuple
    )
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = attr.ib(
        default=(), converter=tuple
    )
    maxRatePerPeer: int = 0

    @userTimeout.default
    def _keepaliveAgrees(self) -> float:
        return min(
            self.keepaliveIdle + self.keepaliveInterval * self.keepaliveCount, MAX_USER_TIMEOUT
        )
