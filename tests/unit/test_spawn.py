"""
The worker process transport's kill-path helpers, on fake pipes.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_closewatch.spawn import WorkerProcess


class Pipe:
    def __init__(self, disconnecting: bool = False) -> None:
        self.disconnecting = disconnecting
        self.reading = self.writing = True

    def stopReading(self) -> None:
        self.reading = False

    def stopWriting(self) -> None:
        self.writing = False


class Muted:
    def __init__(self, pipes: dict[int, Pipe]) -> None:
        self.pipes = pipes


class MuteTests(SynchronousTestCase):
    """
    A worker sent C{SIGKILL} is not watched until its reap.
    """

    def test_pipesUnwatched(self) -> None:
        pipes = {0: Pipe(), 1: Pipe(), 2: Pipe()}
        WorkerProcess.mute(Muted(pipes))  # type: ignore[arg-type]
        self.assertEqual([(p.reading, p.writing) for p in pipes.values()], [(False, False)] * 3)

    def test_closingStdinStillWritten(self) -> None:
        """
        A stdin being closed (the client's FIN forwarded) ends only once it
        is written to: it keeps its write watch, or the worker's end would
        never be reported.
        """
        stdin = Pipe(disconnecting=True)
        WorkerProcess.mute(Muted({0: stdin}))  # type: ignore[arg-type]
        self.assertTrue(stdin.writing)
