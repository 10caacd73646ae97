"""
The twistd plugin's module: C{Options} and C{makeService}.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.logger import Logger

from twisted_closewatch import logs, tcp
from twisted_closewatch.factory import CloseWatchFactory
from twisted_closewatch.listening import CannotListen
from twisted_closewatch.options import Options
from twisted_closewatch.service import CloseWatchService

__all__ = ["Options", "makeService"]

log = Logger()


def makeService(options: Options) -> IService:
    """
    A L{CloseWatchService} for the parsed C{options}, listening already.

    twistd calls this before it daemonizes: a port that cannot be bound is
    one line on the user's terminal and exit status 1, with or without
    C{-n} (see L{twisted_closewatch.listening}).
    """
    from twisted.internet import reactor

    logs.recordTwistdOptions(getattr(options, "parent", None))
    # Logged before twistd starts its log observers: Twisted buffers these
    # and emits them once logging begins.
    for warning in [
        *tcp.platformWarnings(
            options["config"],
            zip(options["listen"], options["endpoints"], strict=True),
            options["keepalive-given"],
        ),
        *options["warnings"],
    ]:
        log.warn("{warning}", warning=warning)
    # twisted.web, wsproto and prometheus_client are imported only for the
    # features that use them: about 4 MB of memory a server without them
    # would hold for nothing.
    serverMetrics = None
    if options["metrics-endpoint"] is not None:
        from twisted_closewatch import metrics

        serverMetrics = metrics.ServerMetrics()
    factory: CloseWatchFactory
    if options["web"] is None:
        factory = CloseWatchFactory(options["config"], reactor, serverMetrics)
    else:
        from twisted_closewatch.web import WebSocketFactory

        factory = WebSocketFactory(options["config"], options["web"], reactor, serverMetrics)
    service = CloseWatchService(
        factory, options["endpoints"], [f"--listen {d!r}" for d in options["listen"]]
    )
    if serverMetrics is not None:
        serverMetrics.service(
            options["metrics-endpoint"], f"--metrics {options['metrics']!r}"
        ).setServiceParent(service)
    try:
        service.bind()
    except CannotListen as e:
        raise SystemExit(f"closewatch: {e}") from None
    return service
