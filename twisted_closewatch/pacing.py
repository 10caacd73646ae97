"""
Flow control between a client and its worker, both ways, with bounded
buffers.

A worker that stops reading its stdin pauses reading the client, once the
spool cannot take more (L{twisted_closewatch.spool}; the close watch then
takes over noticing the client's departure; the idle clock stops, the
silence being ours); a client that stops reading pauses reading the
worker's stdout.  One read from the client is at most a quarter of the
read-ahead, and the worker's input (L{twisted_closewatch.spool.SpooledInput})
holds one such piece in the stdin's writer, and what follows up to the
read-ahead, before it spools or pauses the client: at most the read-ahead
is ever held in memory for the worker.
"""

from __future__ import annotations

from twisted_closewatch.client import IClient
from twisted_closewatch.liveness import ConnectionLiveness
from twisted_closewatch.worker import IWorker


class Pacing:
    """
    The flow control of one relay: the client's reading, paused and resumed
    for the worker's input (L{twisted_closewatch.spool.SpooledInput} decides
    when), and the pacer of the worker's output.

    @ivar paused: whether the client is not being read now.
    """

    paused = False

    def __init__(self, client: IClient, worker: IWorker, liveness: ConnectionLiveness) -> None:
        self._client = client
        self._worker = worker
        self._liveness = liveness
        self._clientConnected = True
        client.registerProducer(worker.outputProducer)
        self._outputPaced = True

    def pauseClient(self) -> None:
        """
        Stop reading the client.  The close watch still sees it go.
        """
        if not self.paused and self._clientConnected:
            self.paused = True
            self._liveness.paused()
            self._client.pauseReading()

    def resumeClient(self) -> None:
        """
        Read the client again.
        """
        if self.paused and self._clientConnected:
            self.paused = False
            self._liveness.resumed()
            self._client.resumeReading()

    def detachWorkerOutput(self) -> None:
        """
        The worker's output is no longer paced by the client: unregister it
        (before the client starts closing: Twisted's TLS layer fails on an
        unregistration after that) and read the rest, so that the worker's
        end is seen; after the client is gone, the rest is dropped.
        """
        if self._outputPaced:
            self._outputPaced = False
            self._client.unregisterProducer()
            self._worker.drainOutput()

    def clientReadsItsClose(self) -> bool:
        """
        Whether the client is being read, and tells a clean close from a
        truncation itself (TLS).
        """
        return self._client.tellsCloseApart() and not self.paused

    def clientDisconnected(self) -> None:
        """
        The client's connection is closed: there is nothing left to pace.
        """
        self._clientConnected = False
