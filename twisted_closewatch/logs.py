"""
Machine-readable logs: C{twistd --logger twisted_closewatch.logs.jsonObserver}
writes every log event as one line of JSON on standard output (for journald,
a log shipper, or a test), with the structured fields of each event
(C{connection_id}, C{peer}, C{pid}, C{reason}, C{kill_latency_ms}, ...).
"""

from __future__ import annotations

import sys

from twisted.logger import FileLogObserver, eventAsJSON


def jsonObserver() -> FileLogObserver:
    """
    A log observer writing one JSON object per line to standard output.
    """
    return FileLogObserver(sys.stdout, lambda event: eventAsJSON(event) + "\n")
