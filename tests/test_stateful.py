"""
A Hypothesis state machine of clients against a real server: clients send,
half-close, close, reset, stop reading and resume, on connections whose
workers echo, ignore their input, flood, exit with a code, fork a child or
close their stdout early.  After every step:

  - a client gone (or a connection the server ended) means its worker's
    whole process group is gone within a bounded time;
  - a live client's live worker is never killed, nor its connection closed;
  - what arrives is what the worker wrote, in order; under C{forward}, a
    half-closed client gets everything the worker wrote before it exited;
  - the server's memory stays bounded.

At the end of every run: every connection ended and was reported, nothing
is left in any worker's process group, no zombie, the server's descriptors
are back where they were.

The C{forward} server runs with a heartbeat (a NUL byte after 0.3 s of
silence): under C{forward} a FIN is a half-close, so a client that closed
for good is only seen gone when something is written to it.  Payloads there
contain no NUL, and NULs are dropped from what clients receive.

CI-sized by default; C{CLOSEWATCH_STATEFUL_EXAMPLES} and
C{CLOSEWATCH_STATEFUL_STEPS} make a larger run (see C{bench/stateful.py}).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.trial.unittest import TestCase

from tests import reliability
from tests.reliability import fdCount, groupMembers, waitGroupsGone, zombieChildren
from tests.support import Server, alive, reset, rssKiB, wait, workers

EXAMPLES = int(os.environ.get("CLOSEWATCH_STATEFUL_EXAMPLES", 12))
STEPS = int(os.environ.get("CLOSEWATCH_STATEFUL_STEPS", 14))
#: Seconds within which a gone client's worker group must be gone.
GONE_WITHIN = 5.0
#: Connections open at once at most.
MAX_OPEN = 4
#: Server memory growth allowed over its baseline.
RSS_LIMIT_KIB = 64 * 1024

WORKER = """\
echo $$
read -r mode arg || exit 0
case "$mode" in
  echo) exec cat ;;
  ignore) exec sleep 100000 ;;
  flood) exec yes ;;
  exit) echo "bye $arg"; exit "$arg" ;;
  fork) sleep 100000 </dev/null >/dev/null 2>&1 & echo "child $!"; exec cat ;;
  closeout) exec cat >/dev/null ;;
esac
echo "unknown mode $mode" >&2
exit 99
"""

BEHAVIOURS = ("echo", "ignore", "flood", "exit", "fork", "closeout")
#: Workers that stop by themselves once their stdin ends.
ENDS_ON_EOF = ("echo", "fork", "closeout")
FLOOD = b"y\n" * 32768


class Connection:
    """
    One client, and what the model expects of it.
    """

    def __init__(self, number: int, behaviour: str, code: int, sock: socket.socket) -> None:
        self.number = number
        self.behaviour = behaviour
        self.code = code
        self.sock = sock
        self.pid = 0
        self.child: int | None = None
        self.sent = bytearray()
        self.received = bytearray()
        self.floodPhase = 0
        self.floodBytes = 0
        self.reading = True
        self.writeOpen = True
        self.open = True
        #: A FIN went out (half-close or close; not a reset).
        self.finSent = False
        self.eof = False
        self.resetSeen = False
        self.clientGone = False
        self.groupChecked = False

    def __repr__(self) -> str:
        return f"<conn {self.number} {self.behaviour}{' ' + str(self.code) if self.behaviour == 'exit' else ''}>"

    def serverEnded(self) -> bool:
        return self.eof or self.resetSeen


class ClientMachine(RuleBasedStateMachine):
    """
    Set by the test: C{server}, C{policy}, C{testCase}, C{baselineFDs},
    C{baselineRSS}, C{opened} (a counter shared by the runs).
    """

    server: Server
    policy: str
    testCase: TestCase
    baselineFDs: int
    baselineRSS: int
    opened: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.conns: list[Connection] = []

    # Helpers.

    def readLine(self, sock: socket.socket) -> bytes:
        """
        One line, byte by byte, heartbeats (NUL) dropped.
        """
        sock.settimeout(15)
        line = b""
        while not line.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte:
                raise AssertionError(f"connection closed after {line!r}")
            if byte != b"\0":
                line += byte
            if len(line) > 200:
                raise AssertionError(f"line too long: {line!r}")
        return line

    def live(self, conn: Connection) -> bool:
        """
        Whether the client is there in the server's eyes: not closed or
        reset, and not half-closed under C{kill}.
        """
        return conn.open and (conn.writeOpen or self.policy == "forward")

    def endsByItself(self, conn: Connection) -> bool:
        return conn.behaviour == "exit" or (
            self.policy == "forward" and not conn.writeOpen and conn.behaviour in ENDS_ON_EOF
        )

    def withOpen(self) -> list[Connection]:
        return [c for c in self.conns if c.open]

    def writable(self) -> list[Connection]:
        # Only what the clients did decides which rules apply: Hypothesis
        # needs the same choices to draw the same steps on a replay.
        return [c for c in self.conns if c.open and c.writeOpen]

    def pick(self, data: Any, conns: list[Connection]) -> Connection:
        return data.draw(st.sampled_from(conns), label="connection")

    # Rules.

    @precondition(lambda self: len([c for c in self.conns if c.open]) < MAX_OPEN)
    @rule(behaviour=st.sampled_from(BEHAVIOURS), code=st.integers(0, 255))
    def connect(self, behaviour: str, code: int) -> None:
        sock = reliability.connect(self.server.port, 15)
        self.opened[0] += 1
        conn = Connection(self.opened[0], behaviour, code, sock)
        self.conns.append(conn)
        conn.pid = int(self.readLine(sock))
        sock.sendall(f"{behaviour} {code}\n".encode())
        if behaviour == "fork":
            word, child = self.readLine(sock).split()
            assert word == b"child", word
            conn.child = int(child)

    @precondition(lambda self: self.writable())
    @rule(data=st.data(), payload=st.binary(min_size=1, max_size=4096))
    def send(self, data: Any, payload: bytes) -> None:
        conn = self.pick(data, self.writable())
        if self.policy == "forward":
            payload = payload.replace(b"\0", b"\1")
        conn.sock.settimeout(10)
        try:
            conn.sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            assert not self.live(conn) or self.endsByItself(conn), f"{conn}: send failed"
            conn.resetSeen = True
            return
        conn.sent += payload

    @precondition(lambda self: self.writable())
    @rule(data=st.data())
    def halfClose(self, data: Any) -> None:
        conn = self.pick(data, self.writable())
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            # The server reset the connection already (a worker's exit, or
            # a send after it): only acceptable if nothing should have.
            assert not self.live(conn) or self.endsByItself(conn), f"{conn}: shutdown failed"
            conn.resetSeen = True
        conn.writeOpen = False
        conn.finSent = True
        if self.policy == "kill":
            conn.clientGone = True

    @precondition(lambda self: self.withOpen())
    @rule(data=st.data())
    def close(self, data: Any) -> None:
        conn = self.pick(data, self.withOpen())
        conn.sock.close()
        conn.open = False
        conn.finSent = True
        conn.clientGone = True

    @precondition(lambda self: self.withOpen())
    @rule(data=st.data())
    def reset(self, data: Any) -> None:
        conn = self.pick(data, self.withOpen())
        reset(conn.sock)
        conn.open = False
        conn.clientGone = True

    @precondition(lambda self: [c for c in self.withOpen() if c.reading])
    @rule(data=st.data())
    def stopReading(self, data: Any) -> None:
        conn = self.pick(data, [c for c in self.withOpen() if c.reading])
        conn.reading = False

    @precondition(lambda self: [c for c in self.withOpen() if not c.reading])
    @rule(data=st.data())
    def resumeReading(self, data: Any) -> None:
        conn = self.pick(data, [c for c in self.withOpen() if not c.reading])
        conn.reading = True

    @rule(seconds=st.sampled_from((0.05, 0.2, 0.5)))
    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    # What must hold.

    def drain(self, conn: Connection) -> None:
        """
        Take what has arrived, 1 MiB at most, without waiting.
        """
        conn.sock.setblocking(False)
        try:
            for _ in range(16):
                try:
                    chunk = conn.sock.recv(65536)
                except BlockingIOError:
                    return
                except ConnectionResetError:
                    conn.resetSeen = True
                    return
                if not chunk:
                    conn.eof = True
                    return
                self.arrived(conn, chunk)
        finally:
            conn.sock.settimeout(10)

    def arrived(self, conn: Connection, chunk: bytes) -> None:
        if self.policy == "forward":
            chunk = chunk.replace(b"\0", b"")
        if conn.behaviour == "flood":
            start = conn.floodPhase
            expected = FLOOD[start : start + len(chunk)]
            while len(expected) < len(chunk):
                expected += FLOOD[: len(chunk) - len(expected)]
            assert chunk == expected, f"{conn}: flood output garbled"
            conn.floodPhase = (start + len(chunk)) % 2
            conn.floodBytes += len(chunk)
            return
        conn.received += chunk
        if conn.behaviour in ("echo", "fork"):
            assert conn.sent.startswith(conn.received), f"{conn}: echo is no prefix of input"
        elif conn.behaviour == "exit":
            assert f"bye {conn.code}\n".encode().startswith(conn.received), conn.received
        else:
            assert conn.received == b"", f"{conn}: silent worker said {conn.received[:40]!r}"

    @invariant()
    def check(self) -> None:
        for conn in self.conns:
            if conn.open and conn.reading and not conn.serverEnded():
                self.drain(conn)
        for conn in self.conns:
            if self.live(conn) and not self.endsByItself(conn):
                assert not conn.serverEnded(), (
                    f"{conn}: the server ended a live client's connection "
                    f"(eof={conn.eof}, reset={conn.resetSeen})"
                )
                assert alive(conn.pid), f"{conn}: a live client's worker {conn.pid} was killed"
                if conn.child is not None:
                    assert alive(conn.child), f"{conn}: a live client's worker's child died"
            # Under kill, a half-close is the client leaving: its worker may
            # be killed before it says bye (arrived() still checks whatever
            # came is a prefix of it).
            if conn.eof and conn.behaviour == "exit" and not conn.clientGone:
                assert conn.received == f"bye {conn.code}\n".encode(), conn.received
            if (
                conn.eof
                and self.policy == "forward"
                and not conn.writeOpen
                and conn.behaviour in ("echo", "fork")
            ):
                assert conn.received == conn.sent, (
                    f"{conn}: forward lost output: {len(conn.received)} of {len(conn.sent)} bytes"
                )
            if (conn.clientGone or conn.serverEnded()) and not conn.groupChecked:
                waitGroupsGone([conn.pid], GONE_WITHIN)
                if conn.child is not None:
                    assert not alive(conn.child), f"{conn}: the worker's child survived"
                conn.groupChecked = True
        grown = rssKiB(self.server.pid) - self.baselineRSS
        assert grown < RSS_LIMIT_KIB, f"server memory grew by {grown} KiB"

    def teardown(self) -> None:
        for conn in self.conns:
            if conn.open:
                reset(conn.sock)
                conn.open = False
        server = self.server
        pids = [c.pid for c in self.conns if c.pid]
        if pids:
            waitGroupsGone(pids, GONE_WITHIN)
        wait(lambda: len(server.ends()) >= self.opened[0] and not workers(server.pid), 15)
        ends = {e["pid"]: e for e in server.ends() if e["pid"] in set(pids)}
        for conn in self.conns:
            if not conn.pid:
                continue
            end = ends.get(conn.pid)
            assert end is not None, f"{conn}: no end reported"
            # What the worker's exit status may be if it ended by itself
            # (possibly just before its client went).
            if conn.behaviour == "exit":
                ownCode = conn.code
            elif self.policy == "forward" and conn.finSent and conn.behaviour in ENDS_ON_EOF:
                # Under forward a FIN, even a close's, is the worker's EOF.
                ownCode = 0
            else:
                ownCode = None
            if end["reason"] == "worker-exited":
                assert ownCode is not None and end["exit_code"] == ownCode, (conn, end)
            else:
                assert end["exit_signal"] == 9 or (
                    ownCode is not None and end["exit_code"] == ownCode
                ), (conn, end)
        assert groupMembers(pids) == [], groupMembers(pids)
        assert zombieChildren(server.pid) == []
        wait(lambda: fdCount(server.pid) == self.baselineFDs, 10)


class StatefulTests(TestCase):
    """
    The machine against a server per policy.
    """

    def setUp(self) -> None:
        orphans = reliability.Orphans()
        orphans.start()
        self.addCleanup(orphans.stop)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.worker = os.path.join(self.directory, "worker.sh")
        with open(self.worker, "w") as f:
            f.write("#!/bin/sh\n" + WORKER)
        os.chmod(self.worker, 0o755)

    def runMachine(self, policy: str, args: list[str]) -> None:
        server = Server(["--half-close", policy, *args], [self.worker])
        self.addCleanup(server.cleanup)
        # One connection first: the server creates its close watch once.
        sock = server.connect()
        self.assertTrue(sock.recv(1))
        reset(sock)
        wait(lambda: len(server.ends()) == 1, 10)
        machine = type(
            f"{policy.title()}Machine",
            (ClientMachine,),
            {
                "server": server,
                "policy": policy,
                "testCase": self,
                "baselineFDs": fdCount(server.pid),
                "baselineRSS": rssKiB(server.pid),
                "opened": [1],
            },
        )
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            ),
        )
        self.assertEqual(server.stop(), 0)

    def test_kill(self) -> None:
        self.runMachine("kill", [])

    def test_forward(self) -> None:
        self.runMachine("forward", ["--heartbeat", "0.3", "--heartbeat-data", "\\x00"])
