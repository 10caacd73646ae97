"""
Machine-readable logs: C{twistd --logger twisted_closewatch.logs.jsonObserver
closewatch ...} writes every log event as one line of JSON (for journald, a
log shipper, C{jq}, or a test), where twistd would write its text log.

The schema of a line (stable: keys are added, never renamed or dropped):

  - C{time}: when, ISO 8601 in UTC with its offset
    (C{2026-12-01T14:05:02.123456+00:00});
  - C{level}: C{debug}, C{info}, C{warn}, C{error} or C{critical};
  - C{namespace}: the logger's, usually the module (C{twisted_closewatch.factory});
  - C{text}: the message as the text log shows it;
  - C{traceback}: only for an event that carries a failure;
  - then the event's own fields, as they were logged: for the end of a
    connection C{connection_id}, C{peer}, C{pid}, C{reason}, C{exit_code},
    C{exit_signal}, C{duration}, C{bytes_in}, C{bytes_out},
    C{kill_latency_ms}, C{stderr_dropped}; for a refusal C{peer},
    C{reason}, C{refused}; for a worker's stderr C{connection_id}, C{pid}.
    A value JSON has no type for is written as text (bytes decoded as
    UTF-8, anything else by C{str}); a field named like one of the keys
    above is written as C{field_NAME}.  Twisted's own C{log_*} keys and
    the legacy C{twisted.python.log} bookkeeping are left out.

twistd hands a C{--logger} factory nothing, and by itself would ignore
C{--logfile} and write nothing at all once daemonized.  So the destination
follows twistd's own rules (see C{UnixAppLogger._getLogObserver}), from the
twistd options that the plugin's C{makeService} records here (twistd calls
it before it starts logging): standard output with C{-n} and no
C{--logfile} or with C{--logfile -}, else C{--logfile} (default
C{twistd.log}), rotated by size and on C{SIGUSR1} as twistd rotates its own.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

#: The keys every line has (C{traceback} when there is one).
KEYS = ("time", "level", "namespace", "text", "traceback")

#: Keys of C{twisted.python.log} events that the schema's keys replace.
_LEGACY = frozenset({"message", "time", "system", "isError", "format", "why", "failure"})

#: Nesting kept in a field's value; deeper is written as text.
_DEPTH = 8

#: twistd's own options (C{logfile}, C{nodaemon}), as L{recordTwistdOptions}
#: was given them.
_twistdOptions: Mapping[str, Any] = {}


def recordTwistdOptions(options: Mapping[str, Any] | None) -> None:
    """
    Remember twistd's options for L{jsonObserver}, which twistd calls with
    no argument.
    """
    # twistd calls the observer factory with no argument: a module global
    # is the only way its options reach it.
    global _twistdOptions  # noqa: PLW0603
    _twistdOptions = options or {}


def eventAsRecord(event: LogEvent) -> dict[str, Any]:
    """
    The JSON object written for C{event}, as described in this module.
    """
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
            timespec="microseconds"
        ),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key in _LEGACY:
            continue
        record[f"field_{key}" if key in KEYS else key] = _safe(value, _DEPTH)
    return record


def eventAsJSONLine(event: LogEvent) -> str:
    """
    C{event} as one line of JSON, newline included.
    """
    return json.dumps(eventAsRecord(event), allow_nan=False, ensure_ascii=False) + "\n"


def jsonObserver() -> FileLogObserver:
    """
    A log observer writing one JSON object per line where twistd would
    write its log (see the module's description).
    """
    return FileLogObserver(_logFile(_twistdOptions), eventAsJSONLine)


def _logFile(options: Mapping[str, Any]) -> IO[Any]:
    """
    Where twistd with C{options} logs: its rules for stdout, C{--logfile}
    and the default C{twistd.log}, with its C{SIGUSR1} rotation.
    """
    path = options.get("logfile") or ""
    daemon = not options.get("nodaemon", True)
    if path == "-" or (not path and not daemon):
        if daemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    logFile = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            # From the reactor's thread, as twistd rotates its own log.
            threads: Any = reactor
            threads.callFromThread(logFile.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return logFile


def _safe(value: Any, depth: int) -> Any:
    """
    C{value} as JSON can hold it.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if depth > 0 and isinstance(value, (list, tuple, set, frozenset)):
        return [_safe(item, depth - 1) for item in value]
    if depth > 0 and isinstance(value, Mapping):
        return {str(k): _safe(v, depth - 1) for k, v in value.items()}
    return str(value)
