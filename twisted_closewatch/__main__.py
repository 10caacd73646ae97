"""
The C{closewatch} command (and C{python -m twisted_closewatch}): the same
as C{twistd -n --pidfile= closewatch} with the same options, for users of
tcpserver, socat or websocketd, who expect a server in the foreground,
logging to standard output, that leaves no pid file behind.

For a daemon, a log file, JSON logs or twistd's other options, run
C{twistd closewatch}.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from twisted.python import usage

from twisted_closewatch.options import Options

SYNOPSIS = "Usage: closewatch [options] [-- COMMAND [ARG ...]]"


def main(argv: Sequence[str] | None = None) -> None:
    """
    Parse C{argv} (default: the command line) as closewatch's options and
    run the server under twistd's runner until it stops.
    """
    from twisted.scripts import twistd

    from twisted.plugins.closewatch import closewatch

    options = Options()
    options.synopsis = SYNOPSIS
    try:
        options.parseOptions(sys.argv[1:] if argv is None else list(argv))
    except usage.UsageError as e:
        print(options, file=sys.stderr)
        sys.exit(f"closewatch: {e}")
    config = twistd.ServerOptions()
    config.parseOptions(["--nodaemon", "--pidfile=", "--no_save"])
    config.subCommand = "closewatch"
    config.subOptions = options
    config.loadedPlugins = {"closewatch": closewatch}
    options.parent = config
    twistd.runApp(config)


if __name__ == "__main__":
    main()
