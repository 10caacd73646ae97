"""
What a client of the embedded SQL worker may do, and the limits it runs under.

The worker serves whoever can connect, so the SQL it runs is hostile until
proven otherwise.  This module owns every decision about that: the worker's
settings (read from the environment), the authorizer that refuses
statements which would open other files, load code, weaken durability or
locking, and the SQLite and process limits that bound one worker's memory and
time.  L{sqlworker} only runs the protocol loop around it.

Like the worker, this imports only the standard library (so no C{attrs}):
the worker starts once per connection and its start-up time is latency.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from twisted_closewatch.sqlqueue import WriterQueue

MiB = 1024 * 1024

DEFAULT_HEAP_LIMIT = 256 * MiB
#: The database's size at most: one statement can otherwise write gigabytes
#: (an INSERT from an endless recursive CTE) while it holds the write lock.
DEFAULT_MAX_SIZE = 1024 * MiB
#: Below this the interpreter and SQLite cannot even start inside the limit.
MIN_HEAP_LIMIT = 16 * MiB
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT = 60.0
BUSY_TIMEOUT_S = 10.0
#: VM instructions between two looks at the statement clock: cheap, and
#: frequent enough (well under a millisecond) for any sane timeout.
PROGRESS_STEPS = 10000

HEAP_LIMIT_VARIABLE = "CLOSEWATCH_SQL_HEAP_LIMIT"
TIMEOUT_VARIABLE = "CLOSEWATCH_SQL_TIMEOUT"
IDLE_VARIABLE = "CLOSEWATCH_SQL_IDLE_IN_TRANSACTION_TIMEOUT"
READONLY_VARIABLE = "CLOSEWATCH_SQL_READONLY"
MAX_SIZE_VARIABLE = "CLOSEWATCH_SQL_MAX_SIZE"

_SIZE_SUFFIXES = {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}

#: PRAGMAs that only describe the schema or the data: allowed with any
#: argument (a table or index name, or a row limit).
DESCRIBING_PRAGMAS = frozenset(
    {
        "collation_list",
        "compile_options",
        "foreign_key_check",
        "foreign_key_list",
        "function_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "module_list",
        "pragma_list",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
    }
)

#: Settings a client may read (the PRAGMA without a value) but never change:
#: they hold durability, locking, the file's format or the worker's limits.
#: Reading one of these has no side effect.
READABLE_PRAGMAS = frozenset(
    {
        "application_id",
        "auto_vacuum",
        "automatic_index",
        "busy_timeout",
        "cache_size",
        "cache_spill",
        "cell_size_check",
        "data_version",
        "encoding",
        "freelist_count",
        "hard_heap_limit",
        "journal_mode",
        "journal_size_limit",
        "locking_mode",
        "max_page_count",
        "mmap_size",
        "page_count",
        "page_size",
        "query_only",
        "schema_version",
        "secure_delete",
        "soft_heap_limit",
        "synchronous",
        "temp_store",
        "threads",
        "trusted_schema",
        "user_version",
        "wal_autocheckpoint",
    }
)

#: Settings of the client's own connection that it may also change: they
#: touch neither the file nor other clients.
SETTABLE_PRAGMAS = frozenset({"defer_foreign_keys", "foreign_keys", "recursive_triggers"})

#: SQL functions refused by name, whatever their arguments.
REFUSED_FUNCTIONS = frozenset(
    {
        # Reads or replaces a tokenizer's C function pointer: the classic
        # way from SQL to a jump to an address the client chose.
        "fts3_tokenizer",
        # Loads a shared library into the worker.
        "load_extension",
        # Decode client-supplied r-tree node blobs (a history of
        # out-of-bounds reads); debugging aids, of no use to a client.
        "rtreecheck",
        "rtreedepth",
        "rtreenode",
        # File access of the sqlite3 shell's fileio extension: absent from
        # Python's SQLite, refused should a build ever include them.
        "edit",
        "fsdir",
        "readfile",
        "writefile",
    }
)

#: Virtual tables refused as a source: they show the raw pages of the file.
REFUSED_TABLES = frozenset({"dbstat", "sqlite_dbpage"})

#: Statement kinds that would open another file (ATTACH; VACUUM attaches its
#: copy too) or create code-backed tables (virtual tables, whose modules may
#: open files, and whose shadow tables, written directly, feed crafted bytes
#: to C code: SQLite's DEFENSIVE flag guards those only from Python 3.12).
_REFUSED_ACTIONS: dict[int, str] = {
    sqlite3.SQLITE_ATTACH: "ATTACH and VACUUM are refused (they open or rewrite files)",
    sqlite3.SQLITE_DETACH: "DETACH is refused",
    sqlite3.SQLITE_CREATE_VTABLE: "CREATE VIRTUAL TABLE is refused",
}

#: Actions that write the database file: the statement waits for its turn
#: in the L{WriterQueue} while it is prepared, before SQLite's lock is asked.
_WRITE_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_ANALYZE,
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_VIEW,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_DROP_VIEW,
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_REINDEX,
        sqlite3.SQLITE_UPDATE,
    }
)

#: SQL comments, which may stand between any two words of a statement.
_COMMENTS = re.compile(r"--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$)", re.DOTALL)
#: A transaction that takes the write lock as it begins.  The authorizer
#: is told only "BEGIN", whatever its kind, so the kind is read from the
#: statement's own words.
_BEGIN_WRITE = re.compile(r"\s*BEGIN\s+(?:IMMEDIATE|EXCLUSIVE)\b", re.IGNORECASE)


def beginsWriting(sql: str) -> bool:
    """
    Whether C{sql} is a C{BEGIN IMMEDIATE} or C{BEGIN EXCLUSIVE}: the
    statements that take SQLite's write lock without writing anything.
    """
    return _BEGIN_WRITE.match(_COMMENTS.sub(" ", sql)) is not None


#: SQLite's own words for a lock not had within the busy timeout.
LOCKED = "database is locked"

#: How SQLite's messages for a statement the authorizer refused begin (for
#: a statement, a function, a column read, and inside VACUUM).
_AUTHORIZATION_ERRORS = ("not authorized", "access to ", "authorization denied")


class SettingError(ValueError):
    """
    An environment variable of the worker has a value it cannot use.
    """


@dataclass(frozen=True)
class Settings:
    """
    The worker's security settings, each with its safe default.

    @ivar heapLimit: bytes SQLite may allocate (C{PRAGMA hard_heap_limit});
        the whole process's data is held to 1.5 times this.
    @ivar statementTimeout: seconds one statement may run, or L{None}.
    @ivar idleInTransactionTimeout: seconds a client may stay silent inside a
        transaction before it is rolled back and the session ends, or L{None}.
    @ivar readOnly: open the database C{mode=ro}.
    @ivar maxSize: bytes the database file may grow to (C{PRAGMA
        max_page_count}); a write past it fails with "database or disk is
        full".
    """

    heapLimit: int = DEFAULT_HEAP_LIMIT
    statementTimeout: float | None = None
    idleInTransactionTimeout: float | None = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT
    readOnly: bool = False
    maxSize: int = DEFAULT_MAX_SIZE

    @classmethod
    def fromEnvironment(cls, environ: Mapping[str, str]) -> Settings:
        """
        Read the settings, or raise L{SettingError} naming the variable.
        """
        defaults = cls()
        return cls(
            heapLimit=_size(environ, HEAP_LIMIT_VARIABLE, defaults.heapLimit),
            statementTimeout=_seconds(
                environ, TIMEOUT_VARIABLE, defaults.statementTimeout
            ),
            idleInTransactionTimeout=_seconds(
                environ, IDLE_VARIABLE, defaults.idleInTransactionTimeout
            ),
            readOnly=_flag(environ, READONLY_VARIABLE, defaults.readOnly),
            maxSize=_size(environ, MAX_SIZE_VARIABLE, defaults.maxSize),
        )

    @property
    def lengthLimit(self) -> int:
        """
        The longest string or blob (C{SQLITE_LIMIT_LENGTH}).

        A value is copied several times on its way out (SQLite, a Python
        object, its hex, its JSON), so it gets a sixteenth of the heap.
        """
        return self.heapLimit // 16

    @property
    def dataLimit(self) -> int:
        """
        The process's data segment limit (C{RLIMIT_DATA}): SQLite's heap plus
        room for Python's copies of a result row.
        """
        return self.heapLimit + self.heapLimit // 2


def _size(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    number, suffix = raw, ""
    if raw[-1:].upper() in _SIZE_SUFFIXES:
        number, suffix = raw[:-1], raw[-1:].upper()
    try:
        value = int(number) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        value = -1
    if value < MIN_HEAP_LIMIT:
        raise SettingError(
            f"{name} must be a number of bytes (suffix K, M or G allowed) of at"
            f" least {MIN_HEAP_LIMIT // MiB}M, not {raw!r}"
        )
    return value


def _seconds(
    environ: Mapping[str, str], name: str, default: float | None
) -> float | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise SettingError(
            f"{name} must be a number of seconds (0 turns it off), not {raw!r}"
        )
    return value or None


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in ("0", "1"):
        raise SettingError(f"{name} must be 0 or 1, not {raw!r}")
    return raw == "1"


def classifyPragma(name: str, value: str | None) -> str | None:
    """
    Decide on one PRAGMA.

    @param name: the pragma's name, as written.
    @param value: its argument or assigned value, L{None} when there is none.
    @return: why it is refused, or L{None} when it is allowed.
    """
    name = name.lower()
    if name in DESCRIBING_PRAGMAS or name in SETTABLE_PRAGMAS:
        return None
    if name in READABLE_PRAGMAS:
        if value is None:
            return None
        return f"PRAGMA {name} may be read but not set"
    return f"PRAGMA {name} is refused"


def decide(action: int, arg1: str | None, arg2: str | None) -> str | None:
    """
    The authorizer's decision, apart from SQLite.

    @param action: the C{SQLITE_*} action code.
    @param arg1: its first argument (a table, pragma or file name).
    @param arg2: its second argument (a column, function name or value).
    @return: why the action is refused, or L{None} when it is allowed.
    """
    if action in _REFUSED_ACTIONS:
        return _REFUSED_ACTIONS[action]
    if action == sqlite3.SQLITE_PRAGMA:
        return classifyPragma(arg1 or "", arg2)
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in REFUSED_FUNCTIONS:
        return f"function {arg2}() is refused"
    if action == sqlite3.SQLITE_READ and (arg1 or "").lower() in REFUSED_TABLES:
        return f"table {arg1} is refused"
    return None


class Guard:
    """
    The policy installed on one connection: the authorizer, the limits and
    the statement clock, and the words for what they refused.

    Python's authorizer can only answer "not authorized"; the guard keeps
    the reason of the last refusal so that the client is told which rule it
    hit.
    """

    def __init__(
        self, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._refusal: str | None = None
        self._deadline = math.inf
        self._writers: WriterQueue | None = None
        self._statement = ""

    def limitProcess(self) -> None:
        """
        Hold the whole process's data to L{Settings.dataLimit}, so Python's
        own copies of results are bounded too: past it an allocation raises
        L{MemoryError}, which the worker answers like any other error.
        """
        limit = self.settings.dataLimit
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))

    def openDatabase(self, path: str) -> sqlite3.Connection:
        """
        Open path in autocommit mode (transactions are the client's), read-only
        if so configured, and with the file's own C{mode=ro} rather than a
        pragma the client could turn back; a writer also takes its place in
        the L{WriterQueue}.

        No statement is cached, so that the authorizer sees every one of them
        as it is prepared (a cached statement is run unprepared, and a write
        would skip the queue).
        """
        mode = "ro" if self.settings.readOnly else "rwc"
        path = os.path.abspath(path)
        conn = sqlite3.connect(
            f"file:{quote(path)}?mode={mode}",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            cached_statements=0,
        )
        if not self.settings.readOnly:
            try:
                self._writers = WriterQueue(path, BUSY_TIMEOUT_S)
            except OSError:
                conn.close()
                raise
        return conn

    def close(self) -> None:
        """
        Leave the writers' queue; after the connection is closed.
        """
        if self._writers is not None:
            self._writers.close()
            self._writers = None

    def install(self, conn: sqlite3.Connection, maxSqlLength: int) -> None:
        """
        Apply the policy, after the worker's own set-up statements and before
        the first statement of the client.
        """
        # SQLite starts with extension loading off; Pythons built without
        # --enable-loadable-sqlite-extensions cannot even turn it on.
        enableLoadExtension = getattr(conn, "enable_load_extension", None)
        if enableLoadExtension is not None:
            enableLoadExtension(False)
        setconfig = getattr(conn, "setconfig", None)
        if setconfig is not None:
            # Python 3.12+: SQLite's own guards, beside the authorizer.
            setconfig(sqlite3.SQLITE_DBCONFIG_DEFENSIVE, True)  # type: ignore[attr-defined]
            setconfig(sqlite3.SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, False)  # type: ignore[attr-defined]
            setconfig(sqlite3.SQLITE_DBCONFIG_TRUSTED_SCHEMA, False)  # type: ignore[attr-defined]
        for pragma in (
            f"hard_heap_limit = {self.settings.heapLimit}",
            # Temporary tables, sorts and statement journals stay in memory
            # (under the heap limit): no file beside the database's own.
            "temp_store = MEMORY",
            "mmap_size = 0",
            # Functions with side effects stay out of views and triggers.
            "trusted_schema = OFF",
        ):
            conn.execute(f"PRAGMA {pragma}")
        (pageSize,) = conn.execute("PRAGMA page_size").fetchone()
        conn.execute(f"PRAGMA max_page_count = {max(self.settings.maxSize // pageSize, 1)}")
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.settings.lengthLimit)
        conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, maxSqlLength)
        conn.set_authorizer(self.authorize)
        if self.settings.statementTimeout is not None:
            conn.set_progress_handler(self.progress, PROGRESS_STEPS)

    def authorize(
        self,
        action: int,
        arg1: str | None,
        arg2: str | None,
        database: str | None,
        trigger: str | None,
    ) -> int:
        """
        The C{set_authorizer} callback: L{decide}, remembering the reason.
        """
        refusal = decide(action, arg1, arg2)
        if (
            refusal is None
            and self._writes(action, arg1, database)
            and self._writers is not None
            and not self._writers.enter()
        ):
            refusal = LOCKED
        if refusal is None:
            return sqlite3.SQLITE_OK
        self._refusal = refusal
        return sqlite3.SQLITE_DENY

    def _writes(self, action: int, arg1: str | None, database: str | None) -> bool:
        """
        Whether the statement being prepared takes the database's write lock.
        """
        if action == sqlite3.SQLITE_TRANSACTION:
            return arg1 == "BEGIN" and beginsWriting(self._statement)
        return action in _WRITE_ACTIONS and database != "temp"

    def progress(self) -> int:
        """
        The progress handler: non-zero (interrupt) once the statement's time
        is up.
        """
        return int(self._clock() > self._deadline)

    def startStatement(self, sql: str) -> None:
        """
        A client statement begins: start its clock, forget old refusals,
        keep its text (a BEGIN's kind is read from it, if the authorizer
        meets one).
        """
        self._refusal = None
        self._statement = sql
        if self.settings.statementTimeout is not None:
            self._deadline = self._clock() + self.settings.statementTimeout

    def endStatement(self, inTransaction: bool) -> None:
        """
        A client statement is done: outside a transaction, nothing it wrote
        is still uncommitted, so the next writer may go.
        """
        if not inTransaction and self._writers is not None:
            self._writers.leave()

    def explain(self, error: BaseException) -> str:
        """
        The error line's text for error, naming the rule when one refused it.
        """
        text = str(error) or type(error).__name__
        if isinstance(error, MemoryError) or text == "out of memory":
            return (
                "out of memory: the statement needs more than the worker's"
                f" limit of {self.settings.heapLimit} bytes"
            )
        if text == "string or blob too big":
            return f"string or blob too big: the limit is {self.settings.lengthLimit} bytes"
        if text == "database or disk is full":
            return (
                "database or disk is full: the database may grow to"
                f" {self.settings.maxSize} bytes"
            )
        if text == "interrupted" and self.settings.statementTimeout is not None:
            return f"statement timeout of {self.settings.statementTimeout:g} s exceeded"
        if self._refusal is not None and text.startswith(_AUTHORIZATION_ERRORS):
            if self._refusal == LOCKED:
                return LOCKED
            return f"not authorized: {self._refusal}"
        return text

