"""
Pipe capacity: Linux lets a pipe grow from 64 KiB (C{F_SETPIPE_SZ}), which
cuts the wake-ups a relay or a guardian costs per byte.
"""

from __future__ import annotations

import fcntl

#: Linux pipe capacity we ask for (the kernel default is 64 KiB).
PIPE_SIZE = 1024 * 1024

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", None)


def resizePipe(fd: int, size: int) -> None:
    if _F_SETPIPE_SZ is None or size <= 0:
        return
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except OSError:
        # Over /proc/sys/fs/pipe-max-size or the per-user pipe budget: the
        # default capacity still works, only slower.
        pass
