"""SQLite worker: one process per client connection, talking over stdin/stdout.

Run as ``python -m twisted_closewatch.sqlworker`` (cold: a new interpreter
per connection), or warm, as closewatch's default service does: the spawner
imports this module once and calls :func:`main` in a child forked per
connection (``--python-worker twisted_closewatch.sqlworker:main``).  Either
way the database is opened, and every setting read, in the worker itself,
after the fork: nothing but imported code is shared between connections.
It imports only the standard library, so it starts fast.

Protocol (bytes, UTF-8):

* Each input line is one SQL statement.  The ``\\n`` terminator and any
  ``\\r`` before it are dropped.  A single trailing ``;`` is optional.
* Every line gets exactly one reply: zero or more result rows, each a JSON
  array on its own line, then one JSON object line,
  ``{"ok": true, "rows": N, "ms": T}`` or ``{"ok": false, "error": "..."}``.
  N is the number of rows a query returned, or the number of rows DML
  changed (0 for anything else).  T is the elapsed time in milliseconds.
  Stdout is flushed after each reply.
* Blobs are sent as lowercase hex strings.  Infinite and NaN floats are sent
  as the strings ``"Infinity"``, ``"-Infinity"`` and ``"NaN"``.  Stored text
  that is not valid UTF-8 is decoded with U+FFFD replacement characters.
  This keeps every line valid JSON.
* An empty or blank line is a no-op.  Its reply is
  ``{"ok": true, "rows": 0, "ms": 0.0}``.
* Any failure gets an error object, and the worker goes on to the next line.
  This covers bad SQL, invalid UTF-8, several statements on one line, and a
  line longer than ``CLOSEWATCH_SQL_MAX_LINE`` bytes (default 1 MiB, not
  counting the ``\\n``).  An over-long line is thrown away while it is being
  read, so memory stays bounded.
* Outside an explicit transaction, each statement is committed before its
  reply is written.  A ``BEGIN`` ... ``COMMIT`` that spans several lines is
  honoured.  If input ends inside a transaction, it is rolled back and the
  worker exits 0.
* A client that stays silent inside a transaction for longer than
  ``CLOSEWATCH_SQL_IDLE_IN_TRANSACTION_TIMEOUT`` seconds (default 60) holds
  locks others wait for: its transaction is rolled back, it gets one error
  object it did not ask for, and the worker exits 1 (PostgreSQL's
  ``idle_in_transaction_session_timeout``).
* If the database cannot be opened, the worker writes one error object and
  exits 1; a bad security setting is also written, as one line, to stderr
  (which the server logs).  If the client goes away (broken pipe), the
  worker exits 1 quietly.

The database is ``CLOSEWATCH_DATABASE`` (default ``closewatch.sqlite3`` in the
working directory).  It uses WAL mode and ``synchronous=FULL``, and it is
created on first use with a small ``demo`` table.  What a client may do there,
and the limits it runs under, are L{twisted_closewatch.sqlpolicy}'s.
"""

import json
import math
import os
import select
import sqlite3
import sys
import time
from collections.abc import Mapping
from typing import Any, BinaryIO, Final

from twisted_closewatch.sqlpolicy import BUSY_TIMEOUT_S, Guard, SettingError, Settings

DEFAULT_DATABASE = "closewatch.sqlite3"
DEFAULT_MAX_LINE = 1024 * 1024
_READ_CHUNK = 64 * 1024

DEMO_ROWS = [
    ("alpha", 1.5),
    ("beta", 2.25),
    ("gamma", 3.0),
    ("delta", -4.75),
    ("epsilon", 0.0),
]


def open_database(path: str, guard: Guard, max_length: int) -> sqlite3.Connection:
    """Open the shared database in autocommit mode, so transactions stay under the client's control.

    Concurrent writers wait up to BUSY_TIMEOUT_S for the lock rather than
    failing at once.  The worker's own set-up runs before the guard is
    installed; every statement after it is the client's, under the guard.
    """
    conn = guard.openDatabase(path)
    try:
        conn.text_factory = _decode_text
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not guard.settings.readOnly:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        if not guard.settings.readOnly:
            _ensure_demo_table(conn)
        guard.install(conn, max_length)
    except BaseException:
        conn.close()
        guard.close()
        raise
    return conn


def _decode_text(raw: bytes) -> str:
    """Decode stored text leniently: one bad value should not spoil a whole result."""
    return raw.decode("utf-8", "replace")


def _has_demo_table(conn: sqlite3.Connection) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'demo'"
        ).fetchone()
        is not None
    )


def _ensure_demo_table(conn: sqlite3.Connection) -> None:
    """Create and fill the demo table once, even if several workers start at the same time.

    The first check takes no lock.  Once the table exists, a worker can start
    even while another connection holds a long write transaction.  The second
    check runs under the write lock, so only the worker that actually creates
    the table inserts the demo rows.
    """
    if _has_demo_table(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not _has_demo_table(conn):
            conn.execute(
                "CREATE TABLE demo (id INTEGER PRIMARY KEY, name TEXT, value REAL)"
            )
            conn.executemany(
                "INSERT INTO demo (name, value) VALUES (?, ?)", DEMO_ROWS
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise



class IdleTimeout(Exception):
    """No complete line arrived within the time allowed."""


#: What L{LineReader.readLine} returns for a line longer than the limit.
TOO_LONG: Final = b"\n"


class LineReader:
    """Split the client's bytes into lines, holding at most one line's limit of them.

    It reads the file descriptor itself, so that waiting for a line can have
    a deadline: a client idle inside a transaction is not waited for forever.
    """

    def __init__(self, fd: int, max_length: int) -> None:
        self._fd = fd
        self.max_length = max_length
        self._buffer = bytearray()
        self._discarding = False
        self._eof = False

    def readLine(self, timeout: float | None = None) -> bytes | None:
        """Return the next line without its terminator, L{TOO_LONG}, or None at end of input.

        A line's length counts any ``\\r`` before its ``\\n``.  The rest of an
        over-long line is dropped as it arrives.  Raise L{IdleTimeout} if no
        line is complete within timeout seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return self._finish(line)
            if self._discarding or len(self._buffer) > self.max_length:
                self._discarding = True
                self._buffer.clear()
            if self._eof:
                if self._discarding:
                    self._discarding = False
                    return TOO_LONG
                if not self._buffer:
                    return None
                line = bytes(self._buffer)
                self._buffer.clear()
                return self._finish(line)
            self._fill(deadline)

    def _finish(self, line: bytes) -> bytes:
        if self._discarding or len(line) > self.max_length:
            self._discarding = False
            return TOO_LONG
        return line.rstrip(b"\r")

    def _fill(self, deadline: float | None) -> None:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self._fd], [], [], max(remaining, 0.0))
            if not readable:
                raise IdleTimeout()
        chunk = os.read(self._fd, _READ_CHUNK)
        if chunk:
            self._buffer += chunk
        else:
            self._eof = True

def _json_value(value: Any) -> Any:
    """Map the SQLite values that JSON cannot represent to strings."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _encode_row(row: tuple[Any, ...]) -> bytes:
    """Encode one row as a JSON line.  Rows are usually plain, so that case is tried first."""
    try:
        text = json.dumps(row, allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps([_json_value(value) for value in row], allow_nan=False)
    return text.encode("ascii") + b"\n"


def _write_json(out: BinaryIO, obj: Mapping[str, Any]) -> None:
    out.write(json.dumps(obj).encode("ascii") + b"\n")


def _write_rows(cursor: sqlite3.Cursor, out: BinaryIO) -> int:
    """Stream rows to the client one by one, so a big result is never held in memory."""
    count = 0
    for row in cursor:
        out.write(_encode_row(row))
        count += 1
    return count

def execute_line(
    conn: sqlite3.Connection, guard: Guard, line: bytes, out: BinaryIO
) -> dict[str, Any]:
    """Run one statement, stream its rows to out, and return the object that ends the reply.

    Failures, refusals by the guard and running out of memory become an
    error object instead of ending the worker, so one bad line does not end
    the client's session.  The cursor is closed on every path, so the memory
    of a statement that failed midway is given back before the next line.
    """
    started = time.perf_counter()
    try:
        sql = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"ok": False, "error": f"statement is not valid UTF-8: {exc}"}
    if not sql.strip():
        return {"ok": True, "rows": 0, "ms": 0.0}
    guard.startStatement(sql)
    cursor = conn.cursor()
    try:
        cursor.execute(sql)
        if cursor.description is None:
            count = max(cursor.rowcount, 0)
        else:
            count = _write_rows(cursor, out)
    except (sqlite3.Error, sqlite3.Warning, ValueError, MemoryError) as exc:
        return {"ok": False, "error": guard.explain(exc)}
    finally:
        cursor.close()
        guard.endStatement(conn.in_transaction)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    return {"ok": True, "rows": count, "ms": round(elapsed_ms, 3)}


def serve(
    conn: sqlite3.Connection, guard: Guard, reader: LineReader, stdout: BinaryIO
) -> int:
    """Answer every input line until end of input, then roll back any transaction left open.

    Return the worker's exit status: 1 when the session was ended for
    idling inside a transaction, else 0.
    """
    idle = guard.settings.idleInTransactionTimeout
    while True:
        try:
            line = reader.readLine(idle if conn.in_transaction else None)
        except IdleTimeout:
            conn.rollback()
            _write_json(
                stdout,
                {
                    "ok": False,
                    "error": f"idle in a transaction for {idle:g} s:"
                    " rolled back, session closed",
                },
            )
            stdout.flush()
            return 1
        if line is None:
            break
        if line == TOO_LONG:
            reply: dict[str, Any] = {
                "ok": False,
                "error": f"line longer than {reader.max_length} bytes",
            }
        else:
            reply = execute_line(conn, guard, line, stdout)
        _write_json(stdout, reply)
        stdout.flush()
    if conn.in_transaction:
        conn.rollback()
    return 0

def max_line_length(environ: Mapping[str, str]) -> int:
    """Read CLOSEWATCH_SQL_MAX_LINE, rejecting values that would make every line too long."""
    raw = environ.get("CLOSEWATCH_SQL_MAX_LINE")
    if raw is None:
        return DEFAULT_MAX_LINE
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"CLOSEWATCH_SQL_MAX_LINE must be a positive integer, not {raw!r}"
        )
    return value


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise on a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _refuse_start(stdout: BinaryIO, exc: Exception) -> int:
    _write_json(stdout, {"ok": False, "error": f"worker start-up failed: {exc}"})
    stdout.flush()
    return 1


def main() -> int:
    """The worker: serve stdin and stdout until end of input; return the exit status.

    The entry point of both ways to run it (see the module's docstring).
    """
    stdout = sys.stdout.buffer
    try:
        try:
            max_length = max_line_length(os.environ)
            settings = Settings.fromEnvironment(os.environ)
        except SettingError as exc:
            sys.stderr.write(f"closewatch sqlworker: {exc}\n")
            sys.stderr.flush()
            return _refuse_start(stdout, exc)
        except ValueError as exc:
            return _refuse_start(stdout, exc)
        guard = Guard(settings)
        guard.limitProcess()
        try:
            conn = open_database(
                os.environ.get("CLOSEWATCH_DATABASE", DEFAULT_DATABASE),
                guard,
                max_length,
            )
        except sqlite3.Error as exc:
            return _refuse_start(stdout, exc)
        try:
            return serve(conn, guard, LineReader(sys.stdin.fileno(), max_length), stdout)
        finally:
            conn.close()
            guard.close()
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
