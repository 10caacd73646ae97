"""
What bounds a worker: its own cgroup v2 (killed whole with C{cgroup.kill}),
resource limits, and the user it runs as.

The settings are checked and resolved here, once, at start-up; the spawner
(L{twisted_closewatch.spawnerprocess}) applies them in each worker's child
before the worker's own code runs.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import resource

import attr

#: The C{--rlimit} names and the limits they set.
RLIMITS = {
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "core": resource.RLIMIT_CORE,
}

#: The cgroup v2 interface files per-worker limits are written to, and the
#: controller each needs.
CONTROLLERS = {"memory.max": "memory", "pids.max": "pids"}

_AMOUNT = re.compile(r"^\s*(\d+)\s*([kmgt]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class ContainmentError(ValueError):
    """
    A containment setting that cannot work here; its text is one line.
    """


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Containment:
    """
    @ivar cgroup: C{"auto"}, C{"on"} or C{"off"}: whether each worker gets a
        cgroup of its own (see L{cgroupBase}).
    @ivar cgroupLimits: interface file name to value, written into each
        worker's cgroup (C{memory.max}, C{pids.max}).
    @ivar rlimits: C{(resource, limit)} pairs, set as soft and hard limits.
    @ivar uid: the user workers run as, if not the server's.
    @ivar gid: the group workers run as, if not the server's (supplementary
        groups are cleared whenever either is set).
    """

    cgroup: str = attr.ib(default="auto", validator=attr.validators.in_(("auto", "on", "off")))
    cgroupLimits: dict[str, str] = attr.ib(factory=dict)
    rlimits: tuple[tuple[int, int], ...] = ()
    uid: int | None = None
    gid: int | None = None


def cgroupBase(settings: Containment) -> tuple[str | None, str | None]:
    """
    Where the server's cgroup goes (the server's own cgroup v2 directory),
    if workers get cgroups here.

    @return: that directory or C{None}, and for C{auto} without cgroups the
        one line that says why.
    @raise ContainmentError: C{on}, C{--worker-memory} or C{--worker-pids}
        cannot work here, or a controller they need is missing.
    """
    if settings.cgroup == "off":
        if settings.cgroupLimits:
            raise ContainmentError("--worker-memory/--worker-pids need --cgroup on or auto")
        return None, None
    try:
        base = findCgroupBase()
    except ContainmentError as e:
        if settings.cgroup == "on" or settings.cgroupLimits:
            option = "--cgroup on" if settings.cgroup == "on" else "--worker-memory/--worker-pids"
            raise ContainmentError(f"{option}: {e}") from None
        return None, (
            f"--cgroup auto: workers get no cgroup ({e}); they are killed by "
            "process group, which a setsid daemon leaves"
        )
    checkControllers(base, settings.cgroupLimits)
    return base, None


def parseAmount(text: str) -> int:
    """
    A count or a size: C{64}, C{256k}, C{256m}, C{1g} (powers of 1024), or
    C{unlimited}.
    """
    if text.strip().lower() in ("unlimited", "infinity"):
        return resource.RLIM_INFINITY
    match = _AMOUNT.match(text)
    if match is None:
        raise ContainmentError(f"{text!r} is not an amount (examples: 64, 256k, 256m, unlimited)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parseRlimit(assignment: str) -> tuple[int, int]:
    """
    C{NAME=VALUE} for C{--rlimit}: the resource and its limit.
    """
    name, sep, value = assignment.partition("=")
    resourceNumber = RLIMITS.get(name.strip().lower())
    if not sep or resourceNumber is None:
        raise ContainmentError(
            f"--rlimit {assignment!r}: expected NAME=VALUE, NAME one of {', '.join(RLIMITS)}"
        )
    try:
        return resourceNumber, parseAmount(value)
    except ContainmentError as e:
        raise ContainmentError(f"--rlimit {assignment!r}: {e}") from None


def resolveUser(name: str) -> tuple[int, int]:
    """
    The uid and primary gid of the user C{name} (or a number).
    """
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise ContainmentError(f"--worker-user {name!r}: no such user") from None
    return entry.pw_uid, entry.pw_gid


def resolveGroup(name: str) -> int:
    """
    The gid of the group C{name} (or a number).
    """
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ContainmentError(f"--worker-group {name!r}: no such group") from None


def cgroup2Root(mountinfo: str) -> str | None:
    """
    Where the cgroup v2 hierarchy is mounted, from C{/proc/self/mountinfo}'s
    text: C{/sys/fs/cgroup} on unified hosts, C{/sys/fs/cgroup/unified} on
    hybrid ones, or nowhere.
    """
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        if rest.split(" ", 1)[0] == "cgroup2":
            return _unescapeMountPath(fields.split()[4])
    return None


def _unescapeMountPath(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def ownCgroup(procCgroup: str) -> str | None:
    """
    This process's cgroup v2 path, from C{/proc/self/cgroup}'s text.
    """
    for line in procCgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _kernelHasCgroupKill(release: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", release)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= (5, 14)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def findCgroupBase() -> str:
    """
    The directory of this process's cgroup v2, if workers can be given
    cgroups under it.

    @raise ContainmentError: they cannot, and why.
    """
    try:
        root = cgroup2Root(_read("/proc/self/mountinfo"))
        own = ownCgroup(_read("/proc/self/cgroup"))
    except OSError as e:
        raise ContainmentError(f"cannot read this process's cgroups: {e}") from None
    if root is None or own is None:
        raise ContainmentError("no cgroup v2 hierarchy is mounted")
    if not _kernelHasCgroupKill(os.uname().release):
        raise ContainmentError("cgroup.kill needs Linux 5.14 or later")
    base = os.path.join(root, own.lstrip("/"))
    if not os.access(base, os.W_OK):
        raise ContainmentError(f"cannot create cgroups in {base} (not root, nor delegated)")
    return base


def checkControllers(base: str, limits: dict[str, str]) -> None:
    """
    Make sure every controller C{limits} needs can be enabled below C{base}.

    @raise ContainmentError: one cannot.
    """
    try:
        available = _read(os.path.join(base, "cgroup.controllers")).split()
    except OSError as e:
        raise ContainmentError(f"cannot read {base}/cgroup.controllers: {e}") from None
    for file in limits:
        controller = CONTROLLERS[file]
        if controller not in available:
            option = "--worker-memory" if controller == "memory" else "--worker-pids"
            raise ContainmentError(
                f"{option}: the {controller} controller is not enabled in the cgroup v2 "
                f"hierarchy at {base}"
            )


def makeServerCgroup(base: str, name: str, limits: dict[str, str]) -> str:
    """
    Create the server's cgroup C{name} under C{base}, with the controllers
    C{limits} need enabled for its children (the workers' cgroups).

    @return: its path.
    @raise ContainmentError: it cannot be made.
    """
    _removeStale(base)
    path = os.path.join(base, name)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as e:
        raise ContainmentError(f"cannot create cgroup {path}: {e}") from None
    controllers = sorted({CONTROLLERS[file] for file in limits})
    if controllers:
        try:
            for control in (os.path.join(base, "cgroup.subtree_control"),
                            os.path.join(path, "cgroup.subtree_control")):
                with open(control, "w") as f:
                    f.write(" ".join("+" + c for c in controllers))
        except OSError as e:
            removeCgroup(path)
            why = "the server's cgroup has processes" if e.errno == errno.EBUSY else str(e)
            raise ContainmentError(
                f"cannot enable the {', '.join(controllers)} controller(s) for workers: {why}"
            ) from None
    if not os.path.exists(os.path.join(path, "cgroup.kill")):
        removeCgroup(path)
        raise ContainmentError("this kernel's cgroups have no cgroup.kill")
    return path


def _removeStale(base: str) -> None:
    """
    Remove the empty cgroups a server that is gone (killed while its spawner
    was stuck, say) left under C{base}.
    """
    for entry in os.scandir(base):
        prefix, _, pid = entry.name.partition("-")
        if prefix != "closewatch" or not pid.isdigit() or not entry.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        for child in os.scandir(entry.path):
            if child.is_dir():
                removeCgroup(child.path)
        removeCgroup(entry.path)


def removeCgroup(path: str) -> None:
    """
    Remove the (empty) cgroup at C{path}, if it is there.
    """
    try:
        os.rmdir(path)
    except OSError:
        pass
