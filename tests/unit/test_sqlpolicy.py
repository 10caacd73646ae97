"""
The SQL worker's policy as plain logic: the authorizer's decisions, the
PRAGMA classes, the settings read from the environment, the guard's
explanations and statement clock, and the bounded line reader.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from twisted_closewatch.sqlpolicy import (
    DEFAULT_HEAP_LIMIT,
    DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    DESCRIBING_PRAGMAS,
    READABLE_PRAGMAS,
    SETTABLE_PRAGMAS,
    Guard,
    SettingError,
    Settings,
    beginsWriting,
    classifyPragma,
    decide,
)
from twisted_closewatch.sqlworker import TOO_LONG, IdleTimeout, LineReader

MiB = 1024 * 1024


class DecideTests(SynchronousTestCase):
    def test_filesAndCodeRefused(self) -> None:
        for action, arg1, arg2 in [
            (sqlite3.SQLITE_ATTACH, "/tmp/x.db", None),
            (sqlite3.SQLITE_ATTACH, "", None),  # VACUUM's own copy
            (sqlite3.SQLITE_DETACH, "p", None),
            (sqlite3.SQLITE_CREATE_VTABLE, "f", "fts3"),
            (sqlite3.SQLITE_FUNCTION, None, "fts3_tokenizer"),
            (sqlite3.SQLITE_FUNCTION, None, "FTS3_Tokenizer"),
            (sqlite3.SQLITE_FUNCTION, None, "load_extension"),
            (sqlite3.SQLITE_FUNCTION, None, "rtreenode"),
            (sqlite3.SQLITE_READ, "dbstat", "name"),
            (sqlite3.SQLITE_READ, "SQLITE_DBPAGE", "data"),
            (sqlite3.SQLITE_PRAGMA, "journal_mode", "off"),
        ]:
            self.assertIsNotNone(decide(action, arg1, arg2), (action, arg1, arg2))

    def test_ordinaryWorkAllowed(self) -> None:
        for action, arg1, arg2 in [
            (sqlite3.SQLITE_SELECT, None, None),
            (sqlite3.SQLITE_READ, "demo", "name"),
            (sqlite3.SQLITE_INSERT, "demo", None),
            (sqlite3.SQLITE_CREATE_TABLE, "t", None),
            (sqlite3.SQLITE_CREATE_TEMP_TABLE, "t", None),
            (sqlite3.SQLITE_DROP_TABLE, "t", None),
            (sqlite3.SQLITE_TRANSACTION, "BEGIN", None),
            (sqlite3.SQLITE_FUNCTION, None, "randomblob"),
            (sqlite3.SQLITE_FUNCTION, None, "json_extract"),
            (sqlite3.SQLITE_PRAGMA, "table_info", "demo"),
        ]:
            self.assertIsNone(decide(action, arg1, arg2), (action, arg1, arg2))

    def test_reasonNamesTheRule(self) -> None:
        self.assertIn("fts3_tokenizer", decide(sqlite3.SQLITE_FUNCTION, None, "fts3_tokenizer") or "")
        self.assertIn("VACUUM", decide(sqlite3.SQLITE_ATTACH, "", None) or "")


class BeginsWritingTests(SynchronousTestCase):
    """
    The transactions that take the write lock as they begin are told apart
    from the others by their words, comments and case notwithstanding.
    """

    def test_immediateAndExclusive(self) -> None:
        for sql in [
            "BEGIN IMMEDIATE",
            "begin exclusive transaction;",
            "  /* a */ Begin/**/Immediate -- b",
            "-- only a comment line\nBEGIN\tEXCLUSIVE",
        ]:
            self.assertTrue(beginsWriting(sql), sql)

    def test_othersNot(self) -> None:
        for sql in [
            "BEGIN",
            "BEGIN DEFERRED",
            "BEGIN TRANSACTION",
            "BEGIN IMMEDIATELY",
            "-- BEGIN IMMEDIATE",
            "/* BEGIN IMMEDIATE */ BEGIN",
            "SELECT 'BEGIN IMMEDIATE'",
            "COMMIT",
        ]:
            self.assertFalse(beginsWriting(sql), sql)


class ClassifyPragmaTests(SynchronousTestCase):
    def test_describingAllowedWithAnyArgument(self) -> None:
        for name in DESCRIBING_PRAGMAS:
            self.assertIsNone(classifyPragma(name, None))
            self.assertIsNone(classifyPragma(name, "demo"))

    def test_readableOnlyRead(self) -> None:
        for name in READABLE_PRAGMAS:
            self.assertIsNone(classifyPragma(name, None))
            self.assertIn("may be read but not set", classifyPragma(name, "0") or "")

    def test_durabilityLockingAndFileHeldReadOnly(self) -> None:
        for name in (
            "journal_mode",
            "synchronous",
            "locking_mode",
            "mmap_size",
            "temp_store",
            "schema_version",
            "query_only",
            "trusted_schema",
            "hard_heap_limit",
            "cache_size",
        ):
            self.assertIn(name, READABLE_PRAGMAS)
            self.assertIsNotNone(classifyPragma(name.upper(), "1"))

    def test_unknownAndDangerousRefusedEvenToRead(self) -> None:
        for name in (
            "writable_schema",
            "temp_store_directory",
            "data_store_directory",
            "database_list",
            "wal_checkpoint",
            "optimize",
            "shrink_memory",
            "incremental_vacuum",
            "ignore_check_constraints",
            "no_such_pragma",
        ):
            self.assertEqual(classifyPragma(name, None), f"PRAGMA {name} is refused")

    def test_ownConnectionSettingsSettable(self) -> None:
        for name in SETTABLE_PRAGMAS:
            self.assertIsNone(classifyPragma(name, "ON"))

    def test_classesDisjoint(self) -> None:
        self.assertEqual(DESCRIBING_PRAGMAS & READABLE_PRAGMAS, frozenset())
        self.assertEqual(SETTABLE_PRAGMAS & READABLE_PRAGMAS, frozenset())


class SettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        settings = Settings.fromEnvironment({})
        self.assertEqual(settings.heapLimit, DEFAULT_HEAP_LIMIT)
        self.assertEqual(settings.heapLimit, 256 * MiB)
        self.assertIsNone(settings.statementTimeout)
        self.assertEqual(settings.idleInTransactionTimeout, DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT)
        self.assertFalse(settings.readOnly)
        self.assertEqual(settings.lengthLimit, 16 * MiB)
        self.assertEqual(settings.dataLimit, 384 * MiB)
        self.assertEqual(settings.maxSize, 1024 * MiB)

    def test_values(self) -> None:
        settings = Settings.fromEnvironment(
            {
                "CLOSEWATCH_SQL_HEAP_LIMIT": "64m",
                "CLOSEWATCH_SQL_TIMEOUT": "2.5",
                "CLOSEWATCH_SQL_IDLE_IN_TRANSACTION_TIMEOUT": "0",
                "CLOSEWATCH_SQL_READONLY": "1",
                "CLOSEWATCH_SQL_MAX_SIZE": "2G",
            }
        )
        self.assertEqual(
            settings,
            Settings(
                heapLimit=64 * MiB,
                statementTimeout=2.5,
                idleInTransactionTimeout=None,
                readOnly=True,
                maxSize=2048 * MiB,
            ),
        )
        self.assertEqual(Settings.fromEnvironment({"CLOSEWATCH_SQL_HEAP_LIMIT": "1G"}).heapLimit, 1024 * MiB)
        self.assertEqual(
            Settings.fromEnvironment({"CLOSEWATCH_SQL_HEAP_LIMIT": str(20 * MiB)}).heapLimit, 20 * MiB
        )
        self.assertEqual(Settings.fromEnvironment({"CLOSEWATCH_SQL_TIMEOUT": ""}).statementTimeout, None)

    def test_badValuesNameTheVariable(self) -> None:
        for name, value in [
            ("CLOSEWATCH_SQL_HEAP_LIMIT", "lots"),
            ("CLOSEWATCH_SQL_HEAP_LIMIT", "15M"),
            ("CLOSEWATCH_SQL_HEAP_LIMIT", "0"),
            ("CLOSEWATCH_SQL_HEAP_LIMIT", "1.5G"),
            ("CLOSEWATCH_SQL_HEAP_LIMIT", "M"),
            ("CLOSEWATCH_SQL_TIMEOUT", "-0.1"),
            ("CLOSEWATCH_SQL_TIMEOUT", "inf"),
            ("CLOSEWATCH_SQL_TIMEOUT", "nan"),
            ("CLOSEWATCH_SQL_IDLE_IN_TRANSACTION_TIMEOUT", "1 minute"),
            ("CLOSEWATCH_SQL_READONLY", "true"),
            ("CLOSEWATCH_SQL_READONLY", "2"),
            ("CLOSEWATCH_SQL_MAX_SIZE", "1M"),
        ]:
            error = self.assertRaises(SettingError, Settings.fromEnvironment, {name: value})
            self.assertIn(name, str(error))
            self.assertIn(repr(value), str(error))
            self.assertNotIn("\n", str(error))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class GuardTests(SynchronousTestCase):
    def test_statementClock(self) -> None:
        clock = FakeClock()
        guard = Guard(Settings(statementTimeout=2.0), clock)
        guard.startStatement("SELECT 1")
        self.assertEqual(guard.progress(), 0)
        clock.now += 1.9
        self.assertEqual(guard.progress(), 0)
        clock.now += 0.2
        self.assertEqual(guard.progress(), 1)
        guard.startStatement("SELECT 1")
        self.assertEqual(guard.progress(), 0)

    def test_noTimeoutNeverInterrupts(self) -> None:
        clock = FakeClock()
        guard = Guard(Settings(), clock)
        guard.startStatement("SELECT 1")
        clock.now += 1e9
        self.assertEqual(guard.progress(), 0)

    def test_authorizeRemembersTheReason(self) -> None:
        guard = Guard(Settings())
        self.assertEqual(
            guard.authorize(sqlite3.SQLITE_FUNCTION, None, "fts3_tokenizer", None, None),
            sqlite3.SQLITE_DENY,
        )
        self.assertEqual(
            guard.explain(sqlite3.DatabaseError("not authorized to use function: fts3_tokenizer")),
            "not authorized: function fts3_tokenizer() is refused",
        )
        guard.startStatement("SELECT 1")
        self.assertEqual(guard.explain(sqlite3.DatabaseError("not authorized")), "not authorized")
        self.assertEqual(
            guard.authorize(sqlite3.SQLITE_READ, "demo", "name", "main", None), sqlite3.SQLITE_OK
        )

    def test_databaseSizeBounded(self) -> None:
        """
        One statement cannot grow the shared database past the size limit
        (an endless recursive INSERT would otherwise fill the disk while it
        holds the write lock); it fails, and the rule is named.
        """
        guard = Guard(Settings(maxSize=16 * MiB))
        conn = sqlite3.connect(":memory:", isolation_level=None)
        self.addCleanup(conn.close)
        conn.execute("CREATE TABLE t (x)")
        guard.install(conn, 1024)
        guard.startStatement("SELECT 1")
        error = self.assertRaises(
            sqlite3.OperationalError,
            conn.execute,
            "INSERT INTO t SELECT zeroblob(4000) FROM"
            " (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 8000)"
            " SELECT n FROM c)",
        )
        self.assertEqual(
            guard.explain(error),
            f"database or disk is full: the database may grow to {16 * MiB} bytes",
        )
        conn.execute("INSERT INTO t VALUES (1)")

    def test_explain(self) -> None:
        guard = Guard(Settings(heapLimit=32 * MiB, statementTimeout=1.5))
        self.assertIn(str(32 * MiB), guard.explain(MemoryError()))
        self.assertIn("out of memory", guard.explain(sqlite3.OperationalError("out of memory")))
        self.assertEqual(
            guard.explain(sqlite3.OperationalError("interrupted")),
            "statement timeout of 1.5 s exceeded",
        )
        self.assertIn(str(2 * MiB), guard.explain(sqlite3.DataError("string or blob too big")))
        self.assertEqual(guard.explain(sqlite3.OperationalError("no such table: x")), "no such table: x")


class LineReaderTests(SynchronousTestCase):
    def reader(self, data: bytes, maxLength: int = 10) -> LineReader:
        """
        A reader of a file that holds data (a pipe would hold only 64 KiB).
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        return LineReader(fd, maxLength)

    def readAll(self, reader: LineReader) -> list[bytes | None]:
        lines: list[bytes | None] = []
        while (line := reader.readLine()) is not None:
            lines.append(line)
        return lines

    def test_linesAndTerminators(self) -> None:
        reader = self.reader(b"one\r\ntwo\n\nlast")
        self.assertEqual(self.readAll(reader), [b"one", b"two", b"", b"last"])

    def test_lengthBoundary(self) -> None:
        reader = self.reader(b"0123456789\n0123456789x\n012345678\r\nok\n0123456789\r\n")
        self.assertEqual(
            self.readAll(reader), [b"0123456789", TOO_LONG, b"012345678", b"ok", TOO_LONG]
        )

    def test_longLineDroppedAcrossReads(self) -> None:
        reader = self.reader(b"x" * 300000 + b"\nafter\n" + b"y" * 300000, maxLength=100)
        self.assertEqual(self.readAll(reader), [TOO_LONG, b"after", TOO_LONG])
        self.assertLessEqual(len(reader._buffer), 100 + 64 * 1024)

    def test_timeoutWithoutACompleteLine(self) -> None:
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        self.addCleanup(os.close, writeEnd)
        os.write(writeEnd, b"half a li")
        reader = LineReader(readEnd, 100)
        self.assertRaises(IdleTimeout, reader.readLine, 0)
        os.write(writeEnd, b"ne\n")
        self.assertEqual(reader.readLine(0), b"half a line")
