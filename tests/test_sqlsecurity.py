"""
The embedded SQL worker against a hostile client: each attack of issue 9
(and the ones an attacker would try next), run on a real worker process over
a real SQLite database, and through the real server where only a kill
mid-write or a second client can show the harm.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import sqlite3
import subprocess
import time
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import Server, wait
from tests.test_durability import Client
from tests.test_sqlworker import ENDLESS, WORKER, WorkerTestCase, parse_replies
from twisted_closewatch.sqlpolicy import DEFAULT_HEAP_LIMIT

MiB = 1024 * 1024


def count(n: int) -> str:
    return f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n})"


def peakKiB(pid: int) -> int:
    """
    The process's peak resident set (C{VmHWM}), in KiB.
    """
    with open(f"/proc/{pid}/status") as f:
        match = re.search(r"^VmHWM:\s+(\d+) kB$", f.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


class SecurityTestCase(WorkerTestCase):
    def session(self, *lines: str, **env: str) -> list[Any]:
        """
        Run lines through one fresh worker; it must answer each and exit 0.
        """
        result = self.run_worker("".join(f"{line}\n" for line in lines).encode(), **env)
        self.assertEqual((result.returncode, result.stderr), (0, b""), result.stdout[-500:])
        replies = parse_replies(result.stdout)
        self.assertEqual(len(replies), len(lines))
        return replies

    def assertRefused(self, reply: Any, *words: str) -> str:
        error = self.assertError(reply)
        for word in words:
            self.assertIn(word, error)
        return error

    def files(self) -> list[str]:
        return sorted(os.listdir(self.workdir))


class CodeExecutionTests(SecurityTestCase):
    def test_fts3TokenizerRead(self) -> None:
        """
        Reading a tokenizer's pointer (a library address) is refused.
        """
        leak, after = self.session("select hex(fts3_tokenizer('simple'))", "SELECT 1")
        self.assertRefused(leak, "fts3_tokenizer")
        self.assertOk(after, [[1]])

    def test_fts3TokenizerExploit(self) -> None:
        """
        The classic exploit (set a tokenizer pointer, then use it) gets two
        errors and the worker lives on: no SIGSEGV, no jump.
        """
        set_, use, after = self.session(
            "select fts3_tokenizer('simple', x'4141414141414141')",
            "create virtual table temp.f using fts3(tokenize=simple)",
            "SELECT 2",
        )
        self.assertRefused(set_, "fts3_tokenizer")
        self.assertRefused(use, "VIRTUAL TABLE")
        self.assertOk(after, [[2]])

    def test_functionsRefusedByNameWhateverTheirArguments(self) -> None:
        replies = self.session(
            "select FTS3_TOKENIZER('porter')",
            "select fts3_tokenizer(NULL, NULL)",
            "select load_extension('/nonexistent.so')",
            "select load_extension('/nonexistent.so', 'entry')",
            "select rtreenode(2, x'00')",
        )
        names = ("fts3_tokenizer", "fts3_tokenizer", "load_extension", "load_extension", "rtreenode")
        for reply, name in zip(replies, names):
            self.assertRefused(reply, "not authorized", name)

    def test_functionsSmuggledThroughATrigger(self) -> None:
        """
        A function in a trigger's body is checked when the trigger fires.
        """
        create, insert, count = self.session(
            "CREATE TEMP TRIGGER tr AFTER INSERT ON demo BEGIN"
            " SELECT hex(fts3_tokenizer('simple')); END",
            "INSERT INTO demo (name) VALUES ('smuggled')",
            "SELECT count(*) FROM demo WHERE name = 'smuggled'",
        )
        self.assertOk(create)
        self.assertRefused(insert, "fts3_tokenizer")
        self.assertOk(count, [[0]])

    def test_virtualTablesRefused(self) -> None:
        fts5, rtree, after = self.session(
            "CREATE VIRTUAL TABLE docs USING fts5(body)",
            "CREATE VIRTUAL TABLE box USING rtree(id, x0, x1)",
            "SELECT 3",
        )
        self.assertRefused(fts5, "VIRTUAL TABLE")
        self.assertRefused(rtree, "VIRTUAL TABLE")
        self.assertOk(after, [[3]])

    def test_pageLevelTablesRefused(self) -> None:
        (dbstat,) = self.session("SELECT * FROM dbstat")
        self.assertRefused(dbstat, "dbstat")


class FileTests(SecurityTestCase):
    def test_attachCreatesNoFile(self) -> None:
        target = os.path.join(self.workdir, "p.db")
        attach, create = self.session(
            f"ATTACH DATABASE '{target}' AS p", "CREATE TABLE p.t(x)"
        )
        self.assertRefused(attach, "ATTACH")
        self.assertError(create)
        self.assertFalse(os.path.exists(target))

    def test_vacuumIntoCreatesNoFile(self) -> None:
        target = os.path.join(self.workdir, "copy.db")
        into, plain, detach = self.session(
            f"VACUUM INTO '{target}'", "VACUUM", "DETACH DATABASE temp"
        )
        self.assertRefused(into, "VACUUM")
        self.assertRefused(plain, "VACUUM")
        self.assertError(detach)
        self.assertFalse(os.path.exists(target))

    def test_onlyTheDatabaseAndItsWalAndShmAreOpened(self) -> None:
        """
        Under strace: a session that builds a large temporary table, sorts,
        and tries every way to a file opens nothing but the database, its
        -wal and -shm (and its directory, to sync it).
        """
        strace = shutil.which("strace")
        if strace is None:
            raise SkipTest("strace is not installed")
        self.query("SELECT 1")  # the database exists before the trace
        log = os.path.join(self.workdir, "strace.log")
        script = "".join(
            f"{line}\n"
            for line in (
                f"CREATE TEMP TABLE big AS {count(60000)} SELECT x, randomblob(200) AS b FROM c",
                "SELECT count(*) FROM (SELECT b FROM big ORDER BY b)",
                f"PRAGMA temp_store_directory = '{self.workdir}'",
                "PRAGMA temp_store = FILE",
                f"ATTACH '{self.workdir}/a.db' AS a",
                f"VACUUM INTO '{self.workdir}/v.db'",
            )
        )
        result = subprocess.run(
            [strace, "-f", "-qq", "-e", "trace=open,openat,creat", "-o", log, *WORKER],
            input=script.encode(),
            capture_output=True,
            env=self.env,
            cwd=self.workdir,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertEqual(len(parse_replies(result.stdout)), 6)
        opened = []
        with open(log) as f:
            for call in f:
                match = re.search(r'"([^"]*)"', call)
                if match and "ENOENT" not in call:
                    opened.append((match.group(1), call))
        first = next(i for i, (path, _) in enumerate(opened) if path == self.database)
        allowed = {
            self.database,
            self.database + "-wal",
            self.database + "-shm",
            self.workdir,
            "/dev/urandom",
        }
        unexpected = [
            call.strip()
            for path, call in opened[first:]
            if path not in allowed
            and not ("O_RDONLY" in call and path.endswith((".py", ".pyc", ".so")))
        ]
        self.assertEqual(unexpected, [])


class DurabilityTests(SecurityTestCase):
    def test_durabilityAndLockingPragmasRefused(self) -> None:
        settings = [
            "PRAGMA journal_mode = OFF",
            "PRAGMA JOURNAL_MODE = delete",
            "PRAGMA main.journal_mode = memory",
            "PRAGMA synchronous = OFF",
            "PRAGMA locking_mode = EXCLUSIVE",
            "PRAGMA writable_schema = ON",
            "PRAGMA schema_version = 1",
            "PRAGMA mmap_size = 1000000000",
            "PRAGMA cache_size = -100000000",
            "PRAGMA temp_store_directory = '/tmp'",
            "PRAGMA temp_store = FILE",
            "PRAGMA query_only = ON",
            "PRAGMA trusted_schema = ON",
            "PRAGMA hard_heap_limit = 0",
            "PRAGMA wal_checkpoint(TRUNCATE)",
            "PRAGMA busy_timeout = 0",
            "PRAGMA ignore_check_constraints = ON",
            "PRAGMA database_list",
        ]
        replies = self.session(
            *settings,
            "PRAGMA journal_mode",
            "PRAGMA synchronous",
            "SELECT * FROM pragma_journal_mode",
        )
        for sql, reply in zip(settings, replies):
            self.assertRefused(reply, "not authorized", "PRAGMA")
        self.assertOk(replies[-3], [["wal"]])
        self.assertOk(replies[-2], [[2]])
        self.assertOk(replies[-1], [["wal"]])

    def test_describingPragmasAllowed(self) -> None:
        info, indexes, keys, integrity, own = self.session(
            "PRAGMA table_info(demo)",
            "SELECT count(*) FROM pragma_index_list('demo')",
            "PRAGMA foreign_key_list(demo)",
            "PRAGMA integrity_check",
            "PRAGMA foreign_keys = ON",
        )
        self.assertOk(info)
        self.assertEqual([row[1] for row in info[0]], ["id", "name", "value"])
        self.assertOk(indexes, [[0]])
        self.assertOk(keys, [])
        self.assertOk(integrity, [["ok"]])
        self.assertOk(own)


class MemoryTests(SecurityTestCase):
    def test_hugeBlobAnsweredThenNextLine(self) -> None:
        worker = self.live_worker()
        self.assertRefused(worker.request("select length(randomblob(999999999))"), "too big")
        self.assertOk(worker.request("SELECT 4"), [[4]])

    def test_outOfMemoryAnsweredAndPeakBounded(self) -> None:
        """
        Statements that need more than the heap limit, in SQLite (a sort of
        300 MB) and in Python (a row whose JSON is far larger than the
        limit), each get an error line; the real worker's peak RSS stays
        under twice the limit.
        """
        worker = self.live_worker()
        self.assertOk(worker.request("SELECT 0"))
        sort = worker.request(
            f"{count(300000)} SELECT count(*) FROM (SELECT DISTINCT randomblob(1000) FROM c)"
        )
        self.assertRefused(sort, "out of memory")
        blobs = ", ".join(["randomblob(15000000)"] * 12)
        rows, status = worker.request(f"SELECT {blobs}")
        self.assertEqual(rows, [])
        self.assertIs(status["ok"], False, status)
        self.assertIn("out of memory", status["error"])
        self.assertOk(worker.request("SELECT 5"), [[5]])
        peak = peakKiB(worker.proc.pid) * 1024
        self.assertLess(peak, 2 * DEFAULT_HEAP_LIMIT, f"VmHWM {peak / MiB:.0f} MiB")

    def test_amplificationBounded(self) -> None:
        """
        zeroblob, printf padding, replace and group_concat stop at the length
        limit instead of taking the heap.
        """
        replies = self.session(
            "select length(zeroblob(1000000000))",
            "select length(printf('%.*c', 1000000000, 'x'))",
            "select length(replace(hex(zeroblob(1000000)), '0', hex(zeroblob(1000))))",
            f"{count(2000)} SELECT length(group_concat(hex(zeroblob(100000)))) FROM c",
        )
        self.assertRefused(replies[0], "too big")
        self.assertIn(replies[1][0], ([[None]], []))
        self.assertRefused(replies[2], "too big")
        self.assertRefused(replies[3], "too big")


class DiskTests(SecurityTestCase):
    def test_endlessInsertStopsAtTheSizeLimit(self) -> None:
        """
        An INSERT from an endless recursive CTE (which wrote 1.9 GB of WAL in
        10 s, holding the write lock, before the size limit) fails with the
        limit named, and the files stay near it; the worker serves on.
        """
        replies = self.session(
            f"INSERT INTO demo (name) SELECT hex(randomblob(500)) FROM ({ENDLESS} SELECT x FROM c)",
            "SELECT count(*) FROM demo",
            CLOSEWATCH_SQL_MAX_SIZE="16M",
        )
        self.assertRefused(replies[0], "database or disk is full", str(16 * MiB))
        self.assertOk(replies[1], [[5]])
        sizes = {name: os.path.getsize(os.path.join(self.workdir, name)) for name in self.files()}
        self.assertLess(sum(sizes.values()), 64 * MiB, sizes)


class TimeTests(SecurityTestCase):
    def test_statementTimeout(self) -> None:
        self.env["CLOSEWATCH_SQL_TIMEOUT"] = "0.5"
        worker = self.live_worker()
        started = time.monotonic()
        endless = worker.request(f"{ENDLESS} SELECT count(*) FROM c")
        self.assertLess(time.monotonic() - started, 5)
        self.assertRefused(endless, "timeout")
        self.assertOk(worker.request("SELECT 6"), [[6]])

    def test_idleInTransactionRolledBackAndSessionEnded(self) -> None:
        """
        A client silent inside a write transaction gets one error line, its
        transaction is rolled back and its worker exits, so other writers go
        on.
        """
        self.query("SELECT 1")
        self.env["CLOSEWATCH_SQL_IDLE_IN_TRANSACTION_TIMEOUT"] = "1"
        holder = self.live_worker()
        self.assertOk(holder.request("BEGIN IMMEDIATE"))
        self.assertOk(holder.request("INSERT INTO demo (name) VALUES ('held')"))
        self.assertRefused(holder.reply(5), "idle in a transaction")
        self.assertEqual(holder.proc.wait(5), 1)
        writer = self.live_worker()
        self.assertOk(writer.request("INSERT INTO demo (name) VALUES ('next')"), [], count=1)
        self.assertOk(
            writer.request("SELECT name FROM demo WHERE name IN ('held', 'next')"), [["next"]]
        )

    def test_idleOutsideATransactionIsFine(self) -> None:
        self.env["CLOSEWATCH_SQL_IDLE_IN_TRANSACTION_TIMEOUT"] = "0.5"
        worker = self.live_worker()
        self.assertOk(worker.request("SELECT 1"))
        self.assertRaises(queue.Empty, worker.reply, 1.5)
        self.assertOk(worker.request("SELECT 7"), [[7]])


class ReadOnlyTests(SecurityTestCase):
    def test_writesRefused(self) -> None:
        self.query("SELECT 1")
        insert, create, select = self.session(
            "INSERT INTO demo (name) VALUES ('ro')",
            "CREATE TABLE t (x)",
            "SELECT count(*) FROM demo",
            CLOSEWATCH_SQL_READONLY="1",
        )
        self.assertRefused(insert, "readonly")
        self.assertRefused(create, "readonly")
        self.assertOk(select)

    def test_missingDatabaseNotCreated(self) -> None:
        result = self.run_worker(b"SELECT 1\n", CLOSEWATCH_SQL_READONLY="1")
        self.assertEqual(result.returncode, 1)
        (reply,) = parse_replies(result.stdout)
        self.assertIn("start-up failed", self.assertError(reply))
        self.assertEqual(self.files(), [])


class SettingsTests(SecurityTestCase):
    def test_badValuesAreOneLineOnStderr(self) -> None:
        for name, value in [
            ("CLOSEWATCH_SQL_HEAP_LIMIT", "lots"),
            ("CLOSEWATCH_SQL_HEAP_LIMIT", "1M"),
            ("CLOSEWATCH_SQL_HEAP_LIMIT", "-5"),
            ("CLOSEWATCH_SQL_TIMEOUT", "soon"),
            ("CLOSEWATCH_SQL_TIMEOUT", "-1"),
            ("CLOSEWATCH_SQL_TIMEOUT", "nan"),
            ("CLOSEWATCH_SQL_IDLE_IN_TRANSACTION_TIMEOUT", "inf"),
            ("CLOSEWATCH_SQL_READONLY", "yes"),
        ]:
            result = self.run_worker(b"SELECT 1\n", **{name: value})
            self.assertEqual(result.returncode, 1, (name, value))
            lines = result.stderr.decode().splitlines()
            self.assertEqual(len(lines), 1, (name, value, result.stderr))
            self.assertIn(name, lines[0])
            self.assertIn(repr(value), lines[0])
            self.assertNotIn("Traceback", lines[0])
            (reply,) = parse_replies(result.stdout)
            self.assertIn(name, self.assertError(reply))
        self.assertEqual(self.files(), [])

    def test_goodValuesServe(self) -> None:
        (reply,) = self.session(
            "SELECT 8",
            CLOSEWATCH_SQL_HEAP_LIMIT="64M",
            CLOSEWATCH_SQL_TIMEOUT="2.5",
            CLOSEWATCH_SQL_IDLE_IN_TRANSACTION_TIMEOUT="0",
            CLOSEWATCH_SQL_READONLY="0",
        )
        self.assertOk(reply, [[8]])


#: Rows of the table the corruption test rewrites: the issue's ~30,000, a
#: few megabytes, well past the page cache.
CORRUPTION_ROWS = 30000


class ThroughTheServerTests(TestCase):
    """
    The attacks whose harm only shows with a kill mid-write or a second
    client, through C{twistd -n closewatch} and its default SQL worker.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.database = os.path.join(directory, "shared.sqlite3")
        self.server = Server([], (), env={"CLOSEWATCH_DATABASE": self.database})
        self.addCleanup(self.server.cleanup)

    def client(self) -> Client:
        client = Client(self.server.port)
        self.addCleanup(client.sock.close)
        return client

    def test_journalModeOffThenKilledMidWrite(self) -> None:
        """
        C{journal_mode=OFF}, a big C{UPDATE} inside C{BEGIN}, and the client
        leaves while it runs (the worker is SIGKILLed mid-write): the
        database stays intact and in WAL mode.
        """
        setup = self.client()
        for sql in (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, pad TEXT)",
            f"INSERT INTO t (pad) {count(CORRUPTION_ROWS)} SELECT hex(randomblob(60)) FROM c",
        ):
            self.assertTrue(setup.request(sql)["ok"], sql)
        setup.leave("close")
        for attempt in range(3):
            ended = len(self.server.ends()) + 1
            attacker = self.client()
            attacker.request("PRAGMA journal_mode = OFF")
            self.assertTrue(attacker.request("BEGIN")["ok"])
            attacker.sock.sendall(b"UPDATE t SET pad = hex(randomblob(80))\n")
            time.sleep(0.05 + 0.05 * attempt)
            attacker.leave("reset")
            wait(lambda ended=ended: len(self.server.ends()) >= ended, 10)
        self.assertEqual(self.server.stop(), 0)
        db = sqlite3.connect(self.database)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("wal",))
        self.assertEqual(db.execute("SELECT count(*) FROM t").fetchone(), (CORRUPTION_ROWS,))

    def test_exclusiveLockingModeLocksNobodyOut(self) -> None:
        holder = self.client()
        for sql in ("PRAGMA locking_mode = EXCLUSIVE", "BEGIN EXCLUSIVE", "COMMIT"):
            holder.request(sql)
        other = self.client()
        other.sock.settimeout(3)
        started = time.monotonic()
        self.assertTrue(other.request("SELECT count(*) FROM demo")["ok"])
        self.assertTrue(other.request("INSERT INTO demo (name) VALUES ('other')")["ok"])
        self.assertLess(time.monotonic() - started, 3)
        self.assertTrue(holder.request("SELECT 1")["ok"])

