"""Whether any process still has a file open for writing: a kernel read lease.

`F_SETLEASE` with `F_RDLCK` succeeds only while no open file description of the
inode is open for writing (an upload in progress, a paused `curl`, an `sftp put`
writing its final name in place): the kernel's own answer, whichever way the file
was found (watcher event, periodic scan, start-up scan, scan after an overflow).
While the lease is held, a writer's `open()` waits for its release (Linux
`lease-break-time`) and the lease shows as breaking (`F_GETLEASE`): a writer that
came while we looked is seen too.

The kernel grants leases only to the file's owner (or a process with CAP_LEASE),
and only on local filesystems: elsewhere the answer is "cannot tell"
(`LeaseCheck.UNKNOWN`), which callers report once and live with (NFS/SMB writers on
other hosts are invisible to any local check: `stable` or `marker` readiness is the
way there).

The lease-break signal is SIGURG, whose default action is to ignore it: the default
SIGIO would end the process.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import stat
from enum import Enum

__all__ = ["LeaseCheck", "open_and_check", "still_idle", "writer_check_fd"]

log = logging.getLogger("filedock.writers")

# Linux values; Python's fcntl module does not name them all.
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
# Errors that say the kernel will not answer here (not the owner, a network or FUSE
# filesystem, leases switched off by `fs.leases-enable`), as against "a writer".
_CANNOT_TELL = frozenset({errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENOLCK, errno.ENOSYS})
_warned: set[int] = set()


class LeaseCheck(Enum):
    IDLE = "idle"  # no writer has the file open
    WRITING = "writing"  # a writer has it open (or is opening it)
    UNKNOWN = "unknown"  # the kernel cannot tell here (or it is not a regular file)


def writer_check_fd(fd: int) -> LeaseCheck:
    """Take a read lease on an open regular file. On IDLE the lease stays held until
    `fd` is closed: a writer's open waits for it, and `still_idle` turns False."""
    try:
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            return LeaseCheck.WRITING
        if e.errno in _CANNOT_TELL:
            _warn_once(e)
            return LeaseCheck.UNKNOWN
        raise
    return LeaseCheck.IDLE


def still_idle(fd: int) -> bool:
    """After an IDLE check on `fd`: no writer has tried to open the file since."""
    return bool(fcntl.fcntl(fd, _F_GETLEASE) == fcntl.F_RDLCK)


def open_and_check(path: bytes) -> tuple[int | None, LeaseCheck]:
    """Open the regular file at `path` and check it: `(fd, result)`. While IDLE (or
    UNKNOWN) `fd` is open, the lease held until the caller closes it (it renames the
    file meanwhile); WRITING gives no descriptor.

    Anything that is not a regular file is never opened (a device could act on an
    open) and gives `(None, UNKNOWN)`: it is vetted and set aside after its claim. A
    file that is gone gives `(None, UNKNOWN)` too, and its rename then says so.
    """
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, LeaseCheck.UNKNOWN
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None, LeaseCheck.UNKNOWN
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            os.close(fd)
            return None, LeaseCheck.UNKNOWN  # swapped between the look and the open
        result = writer_check_fd(fd)
    except BaseException:
        os.close(fd)
        raise
    if result is LeaseCheck.WRITING:
        os.close(fd)
        return None, result
    return fd, result


def _warn_once(e: OSError) -> None:
    code = e.errno or 0
    if code in _warned:
        return
    _warned.add(code)
    log.warning(
        "cannot tell whether files are still open for writing here; a file written in "
        "place under its final name may be claimed early: use readiness stable or marker",
        extra={
            "error": os.strerror(code),
            "hint": "the kernel grants read leases only to the file's owner (or CAP_LEASE), "
            "and only on local filesystems",
        },
    )
