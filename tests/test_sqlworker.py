"""Tests for the per-connection SQLite worker, run as a real subprocess."""

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from twisted.trial import unittest

from twisted_closewatch.sqlqueue import WriterQueue
from twisted_closewatch.sqlworker import DEMO_ROWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = [sys.executable, "-m", "twisted_closewatch.sqlworker"]
TIMEOUT = 30.0
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c)"

# Runs the worker as its only child, so RUSAGE_CHILDREN gives the worker's peak RSS alone.
# The input is streamed after the spawn.  Linux charges a child with its parent's
# RSS at exec time, so the input must not be built in memory before the spawn.
MEMORY_PROBE = r"""
import json, resource, subprocess, sys
size = int(sys.argv[1])
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
proc.stdin.write(b"SELECT '")
chunk = b"x" * 65536
for start in range(0, size, len(chunk)):
    proc.stdin.write(chunk[: size - start])
proc.stdin.write(b"';\nSELECT 42;\n")
proc.stdin.close()
stdout, stderr = proc.stdout.read(), proc.stderr.read()
returncode = proc.wait(timeout=120)
print(json.dumps({
    "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "returncode": returncode,
    "stdout": stdout.decode("ascii"),
    "stderr": stderr.decode("utf-8", "replace"),
}))
"""

Reply = tuple[list[list[Any]], dict[str, Any]]


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_line(line: bytes) -> Any:
    """Parse one output line as strict JSON; NaN and Infinity are not JSON."""
    return json.loads(line.decode("ascii"), parse_constant=_reject_constant)


def parse_replies(output: bytes) -> list[Reply]:
    """Group the worker's output into replies: row arrays followed by one object line."""
    replies: list[Reply] = []
    rows: list[list[Any]] = []
    assert output == b"" or output.endswith(b"\n"), output[-200:]
    for line in output.splitlines():
        value = parse_line(line)
        if isinstance(value, list):
            rows.append(value)
        else:
            assert isinstance(value, dict), value
            replies.append((rows, value))
            rows = []
    assert rows == [], f"rows without a terminating object: {rows}"
    return replies


class LiveWorker:
    """A running worker that the test talks to line by line, with every read bounded."""

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self.proc = subprocess.Popen(
            WORKER,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        self.lines: "queue.Queue[bytes | None]" = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, sql: str) -> None:
        self.proc.stdin.write(sql.encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = TIMEOUT) -> Reply:
        """Return the next complete reply; raise queue.Empty if none arrives within timeout."""
        deadline = time.monotonic() + timeout
        rows: list[list[Any]] = []
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError("worker closed stdout in the middle of a reply")
            value = parse_line(line)
            if isinstance(value, dict):
                return rows, value
            rows.append(value)

    def request(self, sql: str) -> Reply:
        self.send(sql)
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        self.reader.join(timeout=TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except BrokenPipeError:
                pass


class WorkerTestCase(unittest.TestCase):
    """Gives each test its own database directory and helpers to run the worker."""

    def setUp(self) -> None:
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.database = os.path.join(self.workdir, "test.sqlite3")
        pythonpath = os.pathsep.join(
            p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
        )
        self.env = dict(
            os.environ, CLOSEWATCH_DATABASE=self.database, PYTHONPATH=pythonpath
        )
        self.env.pop("CLOSEWATCH_SQL_MAX_LINE", None)

    def run_worker(
        self, data: bytes, **extra_env: str
    ) -> "subprocess.CompletedProcess[bytes]":
        return subprocess.run(
            WORKER,
            input=data,
            capture_output=True,
            env=dict(self.env, **extra_env),
            cwd=self.workdir,
            timeout=TIMEOUT,
        )

    def query(self, *lines: str) -> list[Reply]:
        """Run a fresh worker on lines; check it exits cleanly and answers each line once."""
        result = self.run_worker("".join(line + "\n" for line in lines).encode())
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        replies = parse_replies(result.stdout)
        self.assertEqual(len(replies), len(lines))
        return replies

    def live_worker(self) -> LiveWorker:
        worker = LiveWorker(self.env, self.workdir)
        self.addCleanup(worker.close)
        return worker

    def assertOk(
        self,
        reply: Reply,
        rows: list[list[Any]] | None = None,
        count: int | None = None,
    ) -> None:
        """Check a success reply, its rows, and its row count (by default, the number of rows)."""
        got_rows, status = reply
        self.assertEqual(set(status), {"ok", "rows", "ms"})
        self.assertIs(status["ok"], True, status)
        self.assertIsInstance(status["ms"], float)
        self.assertGreaterEqual(status["ms"], 0.0)
        if rows is not None:
            self.assertEqual(got_rows, rows)
            self.assertEqual(status["rows"], len(rows) if count is None else count)

    def assertError(self, reply: Reply) -> str:
        rows, status = reply
        self.assertEqual(rows, [])
        self.assertEqual(set(status), {"ok", "error"})
        self.assertIs(status["ok"], False)
        self.assertIsInstance(status["error"], str)
        self.assertTrue(status["error"])
        return status["error"]


class QueryTests(WorkerTestCase):
    def test_select_rows_then_ok_line(self) -> None:
        first, second = self.query(
            "SELECT 1, 'two', 3.5, NULL;",
            "SELECT column1 FROM (VALUES (10), (20), (30))",
        )
        self.assertOk(first, [[1, "two", 3.5, None]])
        self.assertOk(second, [[10], [20], [30]])

    def test_demo_table_exists(self) -> None:
        columns, count = self.query(
            "SELECT name FROM pragma_table_info('demo') ORDER BY cid",
            "SELECT count(*) FROM demo",
        )
        self.assertOk(columns, [["id"], ["name"], ["value"]])
        self.assertOk(count)
        self.assertGreater(count[0][0][0], 0)

    def test_demo_rows_created_only_once(self) -> None:
        (first,) = self.query("SELECT count(*) FROM demo")
        (second,) = self.query("SELECT count(*) FROM demo")
        self.assertOk(first)
        self.assertOk(second, first[0])

    def test_dml_reports_rowcount(self) -> None:
        count, update, create = self.query(
            "SELECT count(*) FROM demo",
            "UPDATE demo SET value = value",
            "CREATE TABLE other (x)",
        )
        self.assertOk(count)
        self.assertOk(update, [], count=count[0][0][0])
        self.assertOk(create, [], count=0)

    def test_blob_nonfinite_and_undecodable_values_are_valid_json(self) -> None:
        (reply,) = self.query(
            "SELECT x'00ff10', 1e999, -1e999, CAST(x'ff' AS TEXT), 2.5"
        )
        self.assertOk(reply, [["00ff10", "Infinity", "-Infinity", "\ufffd", 2.5]])

    def test_empty_lines_get_an_ok_reply_each(self) -> None:
        result = self.run_worker(b"\n\r\n   \t\nSELECT 7")
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        replies = parse_replies(result.stdout)
        self.assertEqual(len(replies), 4)
        for reply in replies[:3]:
            self.assertEqual(reply, ([], {"ok": True, "rows": 0, "ms": 0.0}))
        self.assertOk(replies[3], [[7]])

    def test_bad_sql_then_next_line_served(self) -> None:
        bad, missing, good = self.query(
            "SELEC 1", "SELECT * FROM no_such_table", "SELECT 2"
        )
        self.assertIn("syntax error", self.assertError(bad))
        self.assertIn("no_such_table", self.assertError(missing))
        self.assertOk(good, [[2]])

    def test_invalid_utf8_and_binary_garbage_then_next_line_served(self) -> None:
        result = self.run_worker(
            b"\xff\xfe\xfd\n"
            b"SELECT '\xc3\x28'\n"
            b"\x00\x01\x02garbage\x7f\x80\n"
            b"SELECT 1\x00\n"
            b"SELECT 3\n"
        )
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        replies = parse_replies(result.stdout)
        self.assertEqual(len(replies), 5)
        for reply in replies[:4]:
            self.assertError(reply)
        self.assertIn("UTF-8", self.assertError(replies[0]))
        self.assertOk(replies[4], [[3]])

    def test_several_statements_on_one_line_rejected(self) -> None:
        several, insert_two, count, trailing = self.query(
            "SELECT 1; SELECT 2",
            "INSERT INTO demo (name) VALUES ('one'); INSERT INTO demo (name) VALUES ('two')",
            "SELECT count(*) FROM demo WHERE name IN ('one', 'two')",
            "SELECT 5;",
        )
        self.assertIn("one statement", self.assertError(several))
        self.assertError(insert_two)
        self.assertOk(count, [[0]])
        self.assertOk(trailing, [[5]])

    def test_line_length_limit_boundary(self) -> None:
        limit = 100
        fits = "SELECT '" + "x" * (limit - 9) + "'"
        self.assertEqual(len(fits), limit)
        too_long = fits + " "
        data = f"{fits}\n{too_long}\r\n{too_long}\nSELECT 1\n{fits}\r\n".encode()
        result = self.run_worker(data, CLOSEWATCH_SQL_MAX_LINE=str(limit))
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        replies = parse_replies(result.stdout)
        self.assertEqual(len(replies), 5)
        self.assertOk(replies[0], [["x" * (limit - 9)]])
        self.assertIn("longer than 100", self.assertError(replies[1]))
        self.assertIn("longer than 100", self.assertError(replies[2]))
        self.assertOk(replies[3], [[1]])
        self.assertIn("longer than 100", self.assertError(replies[4]))

    def test_invalid_max_line_setting_reported(self) -> None:
        result = self.run_worker(b"SELECT 1\n", CLOSEWATCH_SQL_MAX_LINE="lots")
        self.assertEqual((result.returncode, result.stderr), (1, b""))
        (reply,) = parse_replies(result.stdout)
        self.assertIn("CLOSEWATCH_SQL_MAX_LINE", self.assertError(reply))

    def _probe_memory(self, size: int) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(size), *WORKER],
            capture_output=True,
            env=self.env,
            cwd=self.workdir,
            timeout=TIMEOUT * 4,
        )
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        report = json.loads(result.stdout)
        self.assertEqual((report["returncode"], report["stderr"]), (0, ""))
        return report

    def test_ten_megabyte_line_rejected_with_bounded_memory(self) -> None:
        baseline = self._probe_memory(10)
        huge = self._probe_memory(10 * 1024 * 1024)
        self.assertEqual(len(parse_replies(baseline["stdout"].encode())), 2)
        rejected, after = parse_replies(huge["stdout"].encode())
        self.assertIn("longer than", self.assertError(rejected))
        self.assertOk(after, [[42]])
        # The worker keeps at most 1 MiB + 1 bytes of a line.  Reading the
        # whole line would add at least 10 MiB.
        growth_kb = huge["maxrss_kb"] - baseline["maxrss_kb"]
        self.assertLess(growth_kb, 5 * 1024, (baseline["maxrss_kb"], huge["maxrss_kb"]))


class DurabilityTests(WorkerTestCase):
    def test_acknowledged_insert_visible_to_next_worker(self) -> None:
        (insert,) = self.query("INSERT INTO demo (name, value) VALUES ('kept', 42.0)")
        self.assertOk(insert, [], count=1)
        (select,) = self.query("SELECT value FROM demo WHERE name = 'kept'")
        self.assertOk(select, [[42.0]])

    def test_explicit_transaction_committed(self) -> None:
        replies = self.query(
            "BEGIN;",
            "INSERT INTO demo (name) VALUES ('tx');",
            "INSERT INTO demo (name) VALUES ('tx');",
            "COMMIT;",
        )
        for reply in replies:
            self.assertOk(reply)
        (count,) = self.query("SELECT count(*) FROM demo WHERE name = 'tx'")
        self.assertOk(count, [[2]])

    def test_eof_inside_transaction_rolls_back(self) -> None:
        begin, insert = self.query("BEGIN;", "INSERT INTO demo (name) VALUES ('lost');")
        self.assertOk(begin)
        self.assertOk(insert)
        (count,) = self.query("SELECT count(*) FROM demo WHERE name = 'lost'")
        self.assertOk(count, [[0]])

    def test_worker_killed_inside_transaction_leaves_nothing(self) -> None:
        worker = self.live_worker()
        self.assertOk(worker.request("INSERT INTO demo (name) VALUES ('before');"))
        self.assertOk(worker.request("BEGIN;"))
        for _ in range(50):
            self.assertOk(worker.request("INSERT INTO demo (name) VALUES ('inside');"))
        self.assertOk(
            worker.request("SELECT count(*) FROM demo WHERE name = 'inside'"), [[50]]
        )
        worker.proc.send_signal(signal.SIGKILL)
        self.assertEqual(worker.proc.wait(timeout=TIMEOUT), -signal.SIGKILL)
        before, inside, integrity = self.query(
            "SELECT count(*) FROM demo WHERE name = 'before'",
            "SELECT count(*) FROM demo WHERE name = 'inside'",
            "PRAGMA integrity_check",
        )
        self.assertOk(before, [[1]])
        self.assertOk(inside, [[0]])
        self.assertOk(integrity, [["ok"]])


class ConcurrencyTests(WorkerTestCase):
    def test_simultaneous_first_starts_create_demo_rows_once(self) -> None:
        workers = [self.live_worker() for _ in range(8)]
        for worker in workers:
            worker.send("SELECT count(*) FROM demo")
        counts = [worker.reply() for worker in workers]
        for count in counts:
            self.assertOk(count, counts[0][0])
        (expected,) = self.query("SELECT count(*) FROM demo")
        self.assertOk(expected, counts[0][0])
        self.assertEqual(counts[0][0], [[len(DEMO_ROWS)]])

    def holding_writer(self, begin: str) -> LiveWorker:
        """A worker inside a transaction that has written the row 'a'."""
        self.query("SELECT 1")  # create the database before the race
        holder = self.live_worker()
        self.assertOk(holder.request(begin))
        self.assertOk(holder.request("INSERT INTO demo (name) VALUES ('a');"))
        return holder

    def test_concurrent_writer_waits_for_lock(self) -> None:
        holder = self.holding_writer("BEGIN IMMEDIATE;")
        waiter = self.live_worker()
        waiter.send("INSERT INTO demo (name) VALUES ('b');")
        self.assertRaises(queue.Empty, waiter.reply, 1.0)
        self.assertOk(holder.request("COMMIT;"))
        inserted = waiter.reply()
        self.assertOk(inserted, [], count=1)
        self.assertGreaterEqual(inserted[1]["ms"], 500.0)
        self.assertOk(
            waiter.request("SELECT name FROM demo WHERE name IN ('a', 'b') ORDER BY id"),
            [["a"], ["b"]],
        )

    def queued_writers(self) -> int:
        """
        How many workers wait in the kernel's queue for the database's
        C{flock} (C{/proc/locks} shows a waiter as C{->}).
        """
        inode = f":{os.stat(self.database).st_ino} "
        with open("/proc/locks") as locks:
            return sum("->" in line and "FLOCK" in line and inode in line for line in locks)

    def wait_queued(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.queued_writers() < count:
            self.assertLess(time.monotonic(), deadline, f"{count} writers never queued")
            time.sleep(0.01)

    def test_writers_served_in_their_order_of_arrival(self) -> None:
        """
        A writer that has waited long is not overtaken by writers that came
        after it.  SQLite's busy handler polls, at 100 ms once it has waited
        a while, and a newcomer polling at 1 ms took the lock first (so,
        under steady contention, a writer starved past the busy timeout);
        the workers' queue serves them in turn.

        Arrival is a place in the kernel's queue, so the test waits for
        each writer to take one: a C{flock} released wakes its first waiter
        but does not hand it the lock, and a writer that arrives before the
        woken one runs takes it (20 times in 20 here, a newcomer trying just
        after the release).  Without the waits, a worker slow to start under
        load could reach its C{flock} only in that window, after the
        holder's C{COMMIT}, and be served before the first: the likely cause
        of the one failure seen in a whole suite's run on a loaded machine.
        """
        holder = self.holding_writer("BEGIN;")
        first = self.live_worker()
        first.send("INSERT INTO demo (name) VALUES ('first');")
        self.wait_queued(1)
        self.assertRaises(queue.Empty, first.reply, 0.5)
        later = [self.live_worker() for _ in range(4)]
        for worker in later:
            worker.send("INSERT INTO demo (name) VALUES ('later');")
        self.wait_queued(5)
        self.assertRaises(queue.Empty, later[-1].reply, 0.3)
        self.assertOk(holder.request("COMMIT;"))
        for worker in [first, *later]:
            self.assertOk(worker.reply(), [], count=1)
        self.assertOk(
            holder.request(
                "SELECT name FROM demo WHERE name IN ('a', 'first', 'later')"
                " ORDER BY id LIMIT 2"
            ),
            [["a"], ["first"]],
        )

    def test_begin_immediate_takes_its_turn(self) -> None:
        """
        C{BEGIN IMMEDIATE} and C{BEGIN EXCLUSIVE} take SQLite's write lock at
        once, so they take their turn in the writers' queue too.  Else a
        writer that comes next gets the queue, then waits in SQLite for the
        lock, while the transaction's first write waits in the queue for
        that writer: each waits for the other until the busy timeout, and
        one is told "database is locked".
        """
        self.query("SELECT 1")
        for begin in ("BEGIN IMMEDIATE;", "/* c */ begin/**/exclusive transaction; -- c"):
            holder = self.live_worker()
            self.assertOk(holder.request(begin))
            waiter = self.live_worker()
            waiter.send("INSERT INTO demo (name) VALUES ('waiter');")
            self.assertRaises(queue.Empty, waiter.reply, 0.5)
            holder.send("INSERT INTO demo (name) VALUES ('holder');")
            self.assertOk(holder.reply(2.0), [], count=1)
            self.assertOk(holder.request("COMMIT;"))
            self.assertOk(waiter.reply(), [], count=1)
        self.assertOk(
            self.query("SELECT name FROM demo WHERE name IN ('holder', 'waiter') ORDER BY id")[0],
            [["holder"], ["waiter"], ["holder"], ["waiter"]],
        )

    def test_writer_queue_wait_is_bounded(self) -> None:
        """
        A writer waits in the queue at most its timeout, and then is told
        no; the lock is its as soon as the holder leaves.
        """
        self.query("SELECT 1")
        holder = WriterQueue(self.database, 10.0)
        self.addCleanup(holder.close)
        waiter = WriterQueue(self.database, 0.2)
        self.addCleanup(waiter.close)
        self.assertTrue(holder.enter())
        started = time.monotonic()
        self.assertFalse(waiter.enter())
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        self.assertFalse(waiter.held)
        holder.leave()
        self.assertTrue(waiter.enter())
        self.assertTrue(waiter.held)


class ClientGoneTests(WorkerTestCase):
    def test_endless_query_runs_until_killed(self) -> None:
        worker = self.live_worker()
        worker.send(f"{ENDLESS} SELECT count(*) FROM c;")
        self.assertRaises(queue.Empty, worker.reply, 1.0)
        self.assertIsNone(worker.proc.poll())
        worker.proc.terminate()
        self.assertEqual(worker.proc.wait(timeout=TIMEOUT), -signal.SIGTERM)

    def test_broken_pipe_exits_quietly(self) -> None:
        proc = subprocess.Popen(
            WORKER,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.workdir,
        )
        self.addCleanup(proc.stdin.close)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        proc.stdin.write(f"{ENDLESS} SELECT x FROM c;\n".encode())
        proc.stdin.flush()
        readable, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        self.assertEqual(readable, [proc.stdout])
        self.assertTrue(os.read(proc.stdout.fileno(), 4096).startswith(b"[1]\n"))
        proc.stdout.close()
        self.assertEqual(proc.wait(timeout=TIMEOUT), 1)
        self.assertEqual(proc.stderr.read(), b"")
