"""
The private Twisted APIs closewatch relies on, in one place.

Each was checked against Twisted 26.10.0; a Twisted upgrade should start by
reading this module against the new release.  Nothing else in the package
touches a private name of Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import process
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST

__all__ = [
    "CONNECTION_DONE",
    "CONNECTION_LOST",
    "BaseProcess",
    "Process",
    "ProcessReader",
    "ProcessWriter",
    "clearExitSignal",
    "endpointPort",
    "forgetListening",
    "handlesSignals",
    "listening",
    "raiseListenErrors",
    "setExitSignal",
    "unixSocketMode",
    "unixSocketPath",
    "unregisterReapHandler",
    "wrappedEndpoint",
    "writerIdle",
]

#: L{twisted.internet.process.Process}: the POSIX process transport, which
#: L{twisted_closewatch.spawn.WorkerProcess} subclasses for its pipe handling.
#: It overrides C{_trySpawnInsteadOfFork} (Twisted 26.10.0: called from
#: C{_BaseProcess._fork} with C{(path, uid, gid, executable, args,
#: environment, kwargs)}, C{kwargs["fdmap"]} mapping child to parent fds; it
#: must set C{self.pid} and return C{True}) and calls C{reapProcess} and
#: C{processEnded(status)} itself.
Process = process.Process
#: L{twisted.internet.process._BaseProcess}: the process transport's base,
#: whose C{__init__(proto)} L{twisted_closewatch.spawner.SpawnedWorker} calls
#: in place of L{Process}'s (which would fork): it makes the pipes itself
#: and gets the worker from the spawner.
BaseProcess = process._BaseProcess
#: L{twisted.internet.process.ProcessWriter}: a child's input pipe,
#: C{ProcessWriter(reactor, proc, name, fd, forceReadHack=True)} as
#: L{Process} makes it.
ProcessWriter = process.ProcessWriter
#: L{twisted.internet.process.ProcessReader}: a child's output pipe; its
#: C{doRead} returns C{CONNECTION_DONE}/C{CONNECTION_LOST} to end the pipe.
ProcessReader = process.ProcessReader


def writerIdle(writer: Any) -> bool:
    """
    Whether a descriptor Twisted writes (a L{ProcessWriter}, a TCP
    transport) is open and holds nothing not yet written to it (Twisted
    26.10.0: C{FileDescriptor.dataBuffer} from C{offset} on, then
    C{_tempDataBuffer}, C{_tempDataLen} bytes), so that bytes put into the
    pipe or socket another way now come after all it was given.
    """
    return bool(
        writer.connected
        and not writer.disconnecting
        and not writer._tempDataLen
        and writer.offset == len(writer.dataBuffer)
    )


def unregisterReapHandler(pid: int, proc: Any) -> None:
    """
    Take C{proc} out of Twisted's C{SIGCHLD} reaping
    (C{twisted.internet.process.unregisterReapProcessHandler} and the
    C{reapProcessHandlers} dict it checks), if it is in it: a pidfd reaps it
    instead.
    """
    if process.reapProcessHandlers.get(pid) is proc:
        process.unregisterReapProcessHandler(pid, proc)


def raiseListenErrors(listener: StreamServerEndpointService) -> None:
    """
    Make C{listener}'s C{startService} raise when its port cannot be bound
    (C{_raiseSynchronously}, Twisted 26.10.0), instead of logging it: a
    port that cannot be bound is a start-up error.
    """
    listener._raiseSynchronously = True


def clearExitSignal(reactor: Any, signals: tuple[int, ...]) -> None:
    """
    Forget that the reactor was stopped by one of C{signals}
    (C{ReactorBase._exitSignal}, Twisted 26.10.0), so that twistd exits 0
    instead of re-raising the signal.
    """
    if getattr(reactor, "_exitSignal", None) in signals:
        reactor._exitSignal = None


def setExitSignal(reactor: Any, number: int) -> None:
    """
    Record that the reactor was stopped by signal C{number}, as
    C{ReactorBase.sigTerm} does (C{_exitSignal}, Twisted 26.10.0): twistd
    re-raises it once the reactor has stopped, unless L{clearExitSignal}
    has cleared it.
    """
    reactor._exitSignal = number


def handlesSignals(reactor: Any) -> bool:
    """
    Whether C{reactor} installs signal handlers when it runs
    (C{ReactorBase._installSignalHandlers}, Twisted 26.10.0; C{False} under
    C{twistd --nodaemon} with signal handling off, or in tests).
    """
    return bool(getattr(reactor, "_installSignalHandlers", False))


def wrappedEndpoint(endpoint: Any) -> Any:
    """
    The endpoint a wrapping endpoint listens with, or C{None}: Twisted's
    C{_WrapperServerEndpoint} (C{haproxy:}, Twisted 26.10.0) keeps it as
    C{_wrappedEndpoint}, and closewatch's front doors follow suit.
    """
    return getattr(endpoint, "_wrappedEndpoint", None)


def endpointPort(endpoint: Any) -> int | None:
    """
    The port a TCP server endpoint will bind (C{TCP4ServerEndpoint._port},
    Twisted 26.10.0), or C{None} for another endpoint.
    """
    port = getattr(endpoint, "_port", None)
    return port if isinstance(port, int) else None


def unixSocketPath(endpoint: Any) -> str | bytes | None:
    """
    The path a unix server endpoint will bind (C{UNIXServerEndpoint._address},
    Twisted 26.10.0), or C{None} for another endpoint.
    """
    address = getattr(endpoint, "_address", None)
    return address if isinstance(address, str | bytes) else None


def unixSocketMode(endpoint: Any) -> int | None:
    """
    The mode a unix server endpoint gives its socket
    (C{UNIXServerEndpoint._mode}, Twisted 26.10.0), or C{None}.
    """
    mode = getattr(endpoint, "_mode", None)
    return mode if isinstance(mode, int) else None


def listening(service: StreamServerEndpointService) -> bool:
    """
    Whether C{service} has asked its endpoint to listen already
    (C{_waitingForPort}, Twisted 26.10.0).
    """
    return service._waitingForPort is not None


def forgetListening(service: StreamServerEndpointService) -> None:
    """
    Forget a listen that failed, so that C{service} may try again.
    """
    service._waitingForPort = None
