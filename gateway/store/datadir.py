"""The data dir's lock: one process (a gateway, or `sluice gc`) works on a data dir at once."""

from __future__ import annotations

import fcntl
import logging
import os
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "sluice.lock"  # flock'ed by the one process working on the data dir; holds its pid


class DataDirInUse(RuntimeError):
    """Another process holds the data dir (the message names its pid), or its lock file
    cannot be opened."""


def _in_use(root: Path, holder: str) -> DataDirInUse:
    return DataDirInUse(
        f"{root} is in use by another gateway (pid {holder or 'unknown'}); stop it first or "
        "serve another --data-dir: two gateways on one data dir would corrupt each other"
    )


class DataDirLock:
    """An exclusive flock on the data dir itself and on its lock file (which holds the
    pid), held until release() (or until the object is collected, or the process ends: the
    kernel drops them with the descriptors). The directory's lock holds even when someone
    deletes or replaces the lock file under a running gateway (a "stale" pid file)."""

    def __init__(self, root: Path) -> None:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            try:
                holder = (root / LOCK_FILE).read_text(errors="replace").strip()[:32]
            except OSError:
                holder = ""
            raise _in_use(root, holder) from None
        try:
            # Not through a link: the pid is written over what the path names.
            fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            os.close(dir_fd)
            raise DataDirInUse(
                f"{root / LOCK_FILE}: cannot open it ({exc.strerror}); it must be a regular "
                "file (or absent)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            os.close(dir_fd)
            raise _in_use(root, holder) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk: the lock holds, only the pid is missing
            log.warning("could not write the pid into %s: %s", root / LOCK_FILE, exc)
        self.release = weakref.finalize(self, _close_all, fd, dir_fd)


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
