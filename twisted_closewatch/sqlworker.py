"""SQLite worker: one process per client connection, talking over stdin/stdout.

Run as ``python -m twisted_closewatch.sqlworker``.  It imports only the
standard library, so it starts fast.

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
* If the database cannot be opened, the worker writes one error object and
  exits 1.  If the client goes away (broken pipe), the worker exits 1 quietly.

The database is ``CLOSEWATCH_DATABASE`` (default ``closewatch.sqlite3`` in the
working directory).  It uses WAL mode and ``synchronous=FULL``, and it is
created on first use with a small ``demo`` table.
"""

import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

DEFAULT_DATABASE = "closewatch.sqlite3"
DEFAULT_MAX_LINE = 1024 * 1024
BUSY_TIMEOUT_S = 10.0
_DISCARD_CHUNK = 64 * 1024
_FETCH_SIZE = 256

DEMO_ROWS = [
    ("alpha", 1.5),
    ("beta", 2.25),
    ("gamma", 3.0),
    ("delta", -4.75),
    ("epsilon", 0.0),
]


def open_database(path: str) -> sqlite3.Connection:
    """Open the shared database in autocommit mode, so transactions stay under the client's control.

    Concurrent writers wait up to BUSY_TIMEOUT_S for the lock rather than
    failing at once.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.text_factory = _decode_text
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        _ensure_demo_table(conn)
    except BaseException:
        conn.close()
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


def read_lines(stream: BinaryIO, max_length: int) -> Iterator[bytes | None]:
    """Yield each line with its terminator removed, or None for a line longer than max_length.

    At most max_length + 1 bytes of a line are held at once.  The rest of an
    over-long line is read in chunks and dropped, so a huge line cannot
    exhaust memory.
    """
    while True:
        line = stream.readline(max_length + 1)
        if not line:
            return
        if line.endswith(b"\n") or len(line) <= max_length:
            yield line.rstrip(b"\r\n")
        else:
            _discard_rest_of_line(stream)
            yield None


def _discard_rest_of_line(stream: BinaryIO) -> None:
    while True:
        chunk = stream.readline(_DISCARD_CHUNK)
        if not chunk or chunk.endswith(b"\n"):
            return


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
    """Stream rows to the client as they are produced, so a big result is never held in memory."""
    count = 0
    while rows := cursor.fetchmany(_FETCH_SIZE):
        out.write(b"".join(_encode_row(row) for row in rows))
        count += len(rows)
    return count


def execute_line(
    conn: sqlite3.Connection, line: bytes, out: BinaryIO
) -> dict[str, Any]:
    """Run one statement, stream its rows to out, and return the object that ends the reply.

    Failures become an error object instead of ending the worker, so one bad
    line does not end the client's session.
    """
    started = time.perf_counter()
    try:
        sql = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"ok": False, "error": f"statement is not valid UTF-8: {exc}"}
    if not sql.strip():
        return {"ok": True, "rows": 0, "ms": 0.0}
    try:
        cursor = conn.execute(sql)
        if cursor.description is None:
            count = max(cursor.rowcount, 0)
        else:
            count = _write_rows(cursor, out)
    except (sqlite3.Error, sqlite3.Warning, ValueError) as exc:
        return {"ok": False, "error": str(exc) or type(exc).__name__}
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    return {"ok": True, "rows": count, "ms": round(elapsed_ms, 3)}


def serve(
    conn: sqlite3.Connection, stdin: BinaryIO, stdout: BinaryIO, max_length: int
) -> None:
    """Answer every input line until end of input, then roll back any transaction left open."""
    for line in read_lines(stdin, max_length):
        if line is None:
            reply: dict[str, Any] = {
                "ok": False,
                "error": f"line longer than {max_length} bytes",
            }
        else:
            reply = execute_line(conn, line, stdout)
        _write_json(stdout, reply)
        stdout.flush()
    if conn.in_transaction:
        conn.rollback()


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


def main() -> int:
    stdout = sys.stdout.buffer
    try:
        try:
            max_length = max_line_length(os.environ)
            conn = open_database(
                os.environ.get("CLOSEWATCH_DATABASE", DEFAULT_DATABASE)
            )
        except (ValueError, sqlite3.Error) as exc:
            _write_json(stdout, {"ok": False, "error": f"worker start-up failed: {exc}"})
            stdout.flush()
            return 1
        try:
            serve(conn, sys.stdin.buffer, stdout, max_length)
        finally:
            conn.close()
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
