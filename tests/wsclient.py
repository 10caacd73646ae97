"""
A blocking WebSocket client over a plain socket (wsproto), for tests and
benchmarks that must control exactly what goes on the wire and when: a
close frame without a FIN, a FIN without a close frame, a reset, a client
that never answers a ping, a message of a given size.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class Rejected(Exception):
    """
    The server answered the upgrade with an HTTP status instead of 101.
    """

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


class RawWebSocket:
    """
    One WebSocket connection; every read is bounded in time.  Pings are
    answered as they are read (a client that reads nothing answers none).

    @ivar closeCode: the code of the server's close frame, once received.
    """

    closeCode: int | None = None

    def __init__(
        self,
        port: int,
        target: str = "/",
        headers: list[tuple[str, str]] | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        prelude: bytes = b"",
        timeout: float = 10.0,
    ) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if prelude:
            sock.sendall(prelude)
        self.sock: socket.socket = (
            tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        )
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list[Event] = []
        self.sock.sendall(
            self.ws.send(
                Request(
                    host=f"{host}:{port}", target=target, extra_headers=headers or []
                )
            )
        )
        answer = self._next((AcceptConnection, RejectConnection), timeout)
        if isinstance(answer, RejectConnection):
            body = b""
            if answer.has_body:
                while True:
                    data = self._next((RejectData,), timeout)
                    assert isinstance(data, RejectData)
                    body += data.data
                    if data.body_finished:
                        break
            raise Rejected(answer.status_code, body)

    def _next(self, kinds: tuple[type, ...], timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            while self._events:
                event = self._events.pop(0)
                if isinstance(event, Ping):
                    self.sock.sendall(self.ws.send(event.response()))
                if isinstance(event, CloseConnection):
                    self.closeCode = int(event.code)
                if isinstance(event, kinds):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kinds} within {timeout} s")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())

    def send(self, message: str | bytes) -> None:
        event = (
            TextMessage(message) if isinstance(message, str) else BytesMessage(message)
        )
        self.sock.sendall(self.ws.send(event))

    def receive(self, timeout: float = 10.0) -> str | bytes:
        """
        The next message (whole: pieces are joined).
        """
        parts: list[Any] = []
        while True:
            event = self._next((TextMessage, BytesMessage), timeout)
            assert isinstance(event, (TextMessage, BytesMessage))
            parts.append(event.data)
            if event.message_finished:
                return (
                    "".join(parts)
                    if isinstance(event, TextMessage)
                    else b"".join(parts)
                )

    def messagesUntilClose(self, timeout: float = 10.0) -> list[str | bytes]:
        """
        Every message until the server's close frame (whose code is then
        L{closeCode}).
        """
        found: list[str | bytes] = []
        deadline = time.monotonic() + timeout
        while self.closeCode is None:
            try:
                event = self._next(
                    (TextMessage, BytesMessage, CloseConnection),
                    deadline - time.monotonic(),
                )
            except EOFError:
                break
            if isinstance(event, (TextMessage, BytesMessage)):
                found.append(event.data)
        return found

    def sendClose(self, code: int = 1000) -> None:
        """
        A close frame, and nothing else: the TCP connection stays open.
        """
        self.sock.sendall(self.ws.send(CloseConnection(code)))

    def close(self) -> None:
        self.sock.close()
