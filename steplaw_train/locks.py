"""One kind of lock for the whole harness: an exclusive `flock` on a lock file.

Why flock: the kernel drops it when the holder dies (kill -9, OOM, a node reboot for NFS's lease),
so a killed run never blocks its own retry, and there is no stale-lock cleanup to get wrong.

Supported filesystems: local disks, NFSv4 (flock is mapped onto byte-range locks by the Linux
client), Lustre mounted with `-o flock`, GPFS/Spectrum Scale, BeeGFS. Where the filesystem cannot
lock (Lustre without `flock`/`localflock`, some FUSE mounts) flock fails with ENOLCK, EOPNOTSUPP or
ENOSYS; `LockUnsupported` then names the path and the fix instead of pretending to hold a lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockBusy(RuntimeError):
    """Another live process holds the lock."""


class LockUnsupported(RuntimeError):
    """The filesystem cannot flock (the lock would be a lie)."""


def _flock(fd: int, path: Path, blocking: bool) -> bool:
    """True once locked; False when busy and non-blocking."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in UNSUPPORTED:
            raise LockUnsupported(
                f"cannot lock {path}: the filesystem does not support flock "
                f"({errno.errorcode.get(e.errno, e.errno)}); put sweeps/runs on a local disk, "
                f"NFSv4, or Lustre mounted with -o flock"
            ) from None
        raise


@contextlib.contextmanager
def file_lock(
    path: Path, *, blocking: bool = True, timeout_s: float | None = None, what: str = ""
) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed) for the `with` block.

    blocking=True waits (for ever, or `timeout_s`, then LockBusy); blocking=False raises LockBusy
    at once. The holder's pid is written into the file for the error message of the next one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not _flock(fd, path, blocking and deadline is None):
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                raise LockBusy(_busy_message(path, what))
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def held_by_other(path: Path) -> bool:
    """Does a live process hold the exclusive lock on `path`? (False when there is no file.)

    A probe for readers (status): it asks for a *shared* lock without waiting and drops it at
    once, so it never blocks a holder; a trainer whose own non-blocking attempt lands in those
    microseconds retries (rundir.owned waits up to a second) instead of failing.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as e:
            # EAGAIN/EACCES: busy; anything else (no flock here): cannot tell, so the recorded
            # attempts decide
            return e.errno in (errno.EAGAIN, errno.EACCES)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def holder_pid(path: Path) -> int | None:
    """The pid the holder wrote into the lock file (None if none or unreadable)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _busy_message(path: Path, what: str) -> str:
    try:
        holder = path.read_text().strip()
    except OSError:
        holder = ""
    who = f" (pid {holder})" if holder else ""
    return f"{what or path} is locked by another process{who}: {path}"
