#!/usr/bin/env python3
"""
The least a Python server can do to kill each worker when its client
leaves: the achievable floor for a burst of closes, as C{kill_floor.py}
is the kernel's.

One C{epoll} for everything.  A connection's worker is a session leader
(C{posix_spawn}, C{setsid}) whose stdout is a pipe relayed to the client
(the PID line), stdin and stderr C{/dev/null}.  When the client's socket
reports anything (FIN, RST, half-close: C{EPOLLRDHUP}, C{EPOLLHUP},
C{EPOLLERR}) the server calls C{killpg} and stops watching that
connection; nothing else.  Every other piece of an end (closing the
socket and the pipe, reaping) waits until the server has had nothing to do
for 20 ms: no log line, no metrics, no reason read, no flow control, no
cgroup.  Whatever closewatch does beyond this is its own cost.

    python bench/ideal_server.py PORT WORKER [ARG...]
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys

GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


def main() -> None:
    port, argv = int(sys.argv[1]), sys.argv[2:]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    #: socket fd -> (socket, worker pid, stdout fd)
    clients: dict[int, tuple[socket.socket, int, int]] = {}
    #: stdout fd -> socket
    outputs: dict[int, socket.socket] = {}
    killed: list[tuple[socket.socket, int, int]] = []
    while True:
        events = ep.poll(0.02 if killed else -1, 1024)
        if not events:
            for sock, pid, out in killed:
                if outputs.pop(out, None) is not None:
                    ep.unregister(out)
                os.close(out)
                sock.close()
                os.waitpid(pid, 0)
            killed.clear()
            continue
        for fd, mask in events:
            if fd == listener.fileno():
                accept(listener, argv, devnull, ep, clients, outputs)
            elif fd in clients:
                if mask & GONE:
                    sock, pid, out = clients.pop(fd)
                    os.killpg(pid, signal.SIGKILL)
                    ep.unregister(fd)
                    killed.append((sock, pid, out))
            elif fd in outputs:
                data = os.read(fd, 65536)
                if data:
                    outputs[fd].send(data)
                else:
                    ep.unregister(fd)
                    del outputs[fd]


def accept(
    listener: socket.socket, argv: list[str], devnull: int, ep: select.epoll,
    clients: dict[int, tuple[socket.socket, int, int]], outputs: dict[int, socket.socket],
) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        read, write = os.pipe2(os.O_CLOEXEC)
        pid = os.posix_spawn(
            argv[0], argv, os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, write, 1),
                          (os.POSIX_SPAWN_DUP2, devnull, 2)],
            setsid=True,
        )
        os.close(write)
        sock.setblocking(False)
        clients[sock.fileno()] = (sock, pid, read)
        outputs[read] = sock
        ep.register(sock.fileno(), select.EPOLLRDHUP)
        ep.register(read, select.EPOLLIN)


if __name__ == "__main__":
    main()
