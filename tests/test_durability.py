"""
The embedded SQL worker's data under kill, through the real server: 200
clients leave in the middle of a write (inside a transaction, inside a long
multi-row INSERT, inside a line, inside a COMMIT), closing or resetting;
200 others commit writes and read the acknowledgement, half of them
resetting right after it.  Then the database is intact, every acknowledged
write is there, and nothing unacknowledged is there in part.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import socket
import sqlite3
import time
from typing import Any

from twisted.trial.unittest import TestCase

from tests.support import Server, reset, wait, workers

#: Rows of one long INSERT: long enough (tens of milliseconds) for a client
#: to leave while it runs.
LONG_ROWS = 30000
CLIENTS = 200
CONCURRENCY = 24


class Client:
    """
    One connection to the SQL worker, reading replies line by line.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.settimeout(60)
        self.local = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.buffer = b""

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed, {self.buffer[:100]!r} pending")
            self.buffer += chunk
            if len(self.buffer) > 1024 * 1024:
                raise AssertionError("a reply line longer than 1 MiB")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def request(self, sql: str) -> dict[str, Any]:
        """
        Send one statement; its final status object (rows are skipped).
        """
        self.sock.sendall(sql.encode() + b"\n")
        while True:
            value = json.loads(self.line())
            if isinstance(value, dict):
                return value

    def leave(self, how: str) -> None:
        if how == "reset":
            reset(self.sock)
        else:
            self.sock.close()


class Outcome:
    def __init__(self, tag: str, kind: str, peer: str) -> None:
        self.tag = tag
        self.kind = kind
        self.peer = peer
        #: Rows acknowledged as committed.
        self.acknowledged = 0
        #: Rows the statement cut short would have written, if any.
        self.wouldBe = 0


def insert(tag: str, n: int) -> str:
    return f"INSERT INTO t (tag, n, pad) VALUES ('{tag}', {n}, hex(randomblob(64)))"


def longInsert(tag: str) -> str:
    return (
        f"INSERT INTO t (tag, n, pad) WITH RECURSIVE c(x) AS "
        f"(SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {LONG_ROWS}) "
        f"SELECT '{tag}', x, hex(randomblob(16)) FROM c"
    )


def literalInsert(tag: str, rows: int) -> str:
    values = ", ".join(f"('{tag}', {i}, '{'p' * 40}')" for i in range(rows))
    return f"INSERT INTO t (tag, n, pad) VALUES {values}"


class DurabilityTests(TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.database = os.path.join(self.directory, "durability.sqlite3")
        self.server = Server([], (), env={"CLOSEWATCH_DATABASE": self.database})
        self.addCleanup(self.server.cleanup)
        setup = Client(self.server.port)
        for sql in (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, tag TEXT NOT NULL, n INTEGER NOT NULL, pad TEXT)",
            "CREATE INDEX t_tag ON t (tag)",
        ):
            self.assertTrue(setup.request(sql)["ok"], sql)
        setup.leave("close")

    # The clients that leave midway.

    def abandon(self, i: int, rng: random.Random) -> Outcome:
        how = ("close", "reset")[i % 2]
        variant = (
            "transaction", "long-insert", "partial-line", "partial-commit", "commit-in-flight"
        )[(i // 2) % 5]
        tag = f"abort-{i}"
        client = Client(self.server.port)
        outcome = Outcome(tag, f"{variant} then {how}", client.local)
        if variant == "transaction":
            # Every statement inside the transaction acknowledged, no COMMIT.
            self.assertTrue(client.request("BEGIN")["ok"])
            for n in range(rng.randrange(1, 5)):
                status = client.request(insert(tag, n))
                self.assertTrue(status["ok"], status)
            if rng.random() < 0.5:
                # Leave while a long statement of the transaction runs.
                client.sock.sendall(longInsert(tag).encode() + b"\n")
                time.sleep(rng.random() * 0.02)
        elif variant == "long-insert":
            # Outside a transaction: committed whole or not at all.
            outcome.wouldBe = LONG_ROWS
            client.sock.sendall(longInsert(tag).encode() + b"\n")
            time.sleep(rng.random() * rng.choice((0.02, 0.5)))
        elif variant == "partial-line":
            text = literalInsert(tag, 500)
            client.sock.sendall(text[: rng.randrange(1, len(text))].encode())
            time.sleep(rng.random() * 0.01)
        elif variant == "partial-commit":
            self.assertTrue(client.request("BEGIN")["ok"])
            status = client.request(literalInsert(tag, 50))
            self.assertTrue(status["ok"], status)
            client.sock.sendall(b"COMM")
            time.sleep(rng.random() * 0.01)
        else:
            # A big transaction whose COMMIT is under way when the client
            # leaves: all of it or none of it.
            self.assertTrue(client.request("BEGIN")["ok"])
            status = client.request(longInsert(tag))
            self.assertTrue(status["ok"], status)
            outcome.wouldBe = LONG_ROWS
            client.sock.sendall(b"COMMIT\n")
            time.sleep(rng.random() * 0.01)
        client.leave(how)
        return outcome

    # The clients that commit.

    def commit(self, i: int, rng: random.Random) -> Outcome:
        tag = f"commit-{i}"
        client = Client(self.server.port)
        outcome = Outcome(tag, "", client.local)
        if i % 2:
            outcome.kind = "autocommit"
            for n in range(rng.randrange(1, 4)):
                self.acknowledge(client, insert(tag, n))
                outcome.acknowledged += 1
        else:
            outcome.kind = "transaction"
            rows = rng.randrange(1, 6)
            for attempt in range(5):
                statuses = [client.request("BEGIN")]
                statuses += [client.request(insert(tag, n)) for n in range(rows)]
                statuses.append(client.request("COMMIT"))
                if all(s["ok"] for s in statuses):
                    outcome.acknowledged = rows
                    break
                # Busy past the worker's timeout: undo, try again.
                client.request("ROLLBACK")
            else:
                self.fail(f"{tag}: no commit after 5 attempts: {statuses}")
        # Half leave with a reset at once: the worker is killed right after
        # its acknowledgement, which must not undo anything.
        how = ("close", "reset")[(i // 2) % 2]
        outcome.kind += f" then {how}"
        client.leave(how)
        return outcome

    def acknowledge(self, client: Client, sql: str) -> None:
        for attempt in range(5):
            status = client.request(sql)
            if status["ok"]:
                return
            self.assertIn("locked", status["error"], status)
        self.fail(f"{sql}: never acknowledged")

    def test_killedMidWrite(self) -> None:
        seed = random.randrange(1 << 30)
        rng = random.Random(seed)
        tasks = [(self.abandon, i) for i in range(CLIENTS)] + [
            (self.commit, i) for i in range(CLIENTS)
        ]
        rng.shuffle(tasks)
        seeds = [rng.randrange(1 << 30) for _ in tasks]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            outcomes = list(
                pool.map(lambda t: t[0][0](t[0][1], random.Random(t[1])), zip(tasks, seeds))
            )
        elapsed = time.monotonic() - started
        wait(lambda: len(self.server.ends()) >= 2 * CLIENTS + 1 and not workers(self.server.pid), 60)
        # By the client's address: a port reused within the run makes its
        # ends ambiguous, and those are not looked at.
        byPeer: dict[str, list[dict]] = {}
        for e in self.server.ends():
            byPeer.setdefault(e["peer"], []).append(e)
        ends = {peer: e[0] for peer, e in byPeer.items() if len(e) == 1}
        self.assertEqual(self.server.stop(), 0)

        db = sqlite3.connect(self.database)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        counts = dict(db.execute("SELECT tag, count(*) FROM t GROUP BY tag"))
        figures: dict[str, int] = {}
        problems = []
        for outcome in outcomes:
            present = counts.pop(outcome.tag, 0)
            if outcome.peer not in byPeer:
                problems.append(f"{outcome.tag}: no end reported for {outcome.peer}")
            end = ends.get(outcome.peer, {"exit_signal": "?", "reason": "?"})
            if outcome.tag.startswith("commit-"):
                if present != outcome.acknowledged:
                    problems.append(
                        f"{outcome.tag} ({outcome.kind}): {outcome.acknowledged} rows "
                        f"acknowledged, {present} present"
                    )
                key = f"committed, {outcome.kind}"
            elif outcome.wouldBe:
                if present not in (0, outcome.wouldBe):
                    problems.append(f"{outcome.tag}: half-applied, {present} of {outcome.wouldBe} rows")
                killed = end["exit_signal"] == 9
                key = f"{outcome.kind}: " + (
                    "killed before it completed, nothing applied" if not present and killed
                    else "done before the kill, applied whole" if present
                    else "not applied"
                )
            else:
                if present:
                    problems.append(f"{outcome.tag} ({outcome.kind}): {present} uncommitted rows present")
                if (
                    outcome.kind.startswith(("transaction", "partial-commit"))
                    and end["exit_signal"] not in (9, "?")
                ):
                    problems.append(f"{outcome.tag} ({outcome.kind}): worker not killed: {end['reason']}")
                key = f"{outcome.kind}: rolled back"
            figures[key] = figures.get(key, 0) + 1
        if counts:
            problems.append(f"rows of no client: {counts}")
        rows = db.execute("SELECT count(*) FROM t").fetchone()[0]
        print(f"\ndurability (seed {seed}): {2 * CLIENTS} clients, {CONCURRENCY} at a time, "
              f"{elapsed:.1f} s, {rows} rows, integrity_check ok")
        for key in sorted(figures):
            print(f"  {figures[key]:4d}  {key}")
        self.assertEqual(problems, [], f"seed {seed}")
        # The test saw what it is about: transactions killed midway, and
        # committed writes whose workers were killed right after the
        # acknowledgement.
        self.assertGreaterEqual(
            sum(v for k, v in figures.items() if k.startswith("transaction then")), CLIENTS // 8
        )
        self.assertGreaterEqual(
            sum(v for k, v in figures.items() if k.startswith("committed") and k.endswith("reset")),
            CLIENTS // 4,
        )
