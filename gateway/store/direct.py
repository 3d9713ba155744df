"""Read a file from the disk without the page cache where the file system allows (O_DIRECT).

A close's readers of cold spool files (the scan of core/scan.py, FedAvg's fold) use it: a
push spools with O_DIRECT (models/appender.py), so a round's updates are not in the page
cache when it closes, and on the VM of bench/ filling new page-cache pages costs ~3 s of
CPU per GB read (1 GB cold: 3.35 s, 3.2 s of it system time) where an O_DIRECT read into
a buffer that is used again costs ~0.15 (2.2 s, the disk's own pace).

O_DIRECT wants the offset, the length and the memory aligned: a read of any byte range
reads the aligned pages around it into an aligned buffer and hands back a view of the
range. A range the page cache already holds is copied from it instead (a file someone just
read or wrote through it). Where the file system refuses O_DIRECT (tmpfs, at open or at
the first read) the same calls read through the page cache.
"""

from __future__ import annotations

import os
import stat
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from sluice.models.appender import ALIGN, NO_DIRECT, open_direct

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux 4.14+: a read that fails rather than wait


class NotARegularFile(OSError):
    """A file the gateway reads is something else (a FIFO, a device): the data dir was
    tampered with."""


def open_regular(path: Path) -> int:
    """A read-only descriptor of path, which must be a regular file. Opened without waiting
    and then checked: a FIFO planted at a blob's name (an insider with write access to the
    data dir) would otherwise hold the opener, and the locks it holds, until a writer came.
    Anything not a regular file is NotARegularFile (an OSError) naming it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{path.name} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_in(stack: ExitStack, path: Path) -> int:
    """open_regular, closed when `stack` closes."""
    fd = open_regular(path)
    stack.callback(os.close, fd)
    return fd


def aligned_buffer(nbytes: int) -> np.ndarray:
    """Zeroed-on-demand uint8 memory of `nbytes` starting at an ALIGN boundary (numpy's
    allocation: traced by tracemalloc, unlike an mmap)."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes]


def window_bytes(length: int) -> int:
    """The buffer a read of `length` bytes at any offset needs: the aligned pages around it."""
    return length + 2 * ALIGN


class DirectFile:
    """One file open for reads at any offset. Not for concurrent use of one buffer; any
    number of threads may read through one DirectFile, each with its own buffer."""

    def __init__(self, path: Path, *, use_direct: bool = True) -> None:
        """Raises what open raises (FileNotFoundError for a missing file)."""
        self.fd = open_regular(path)
        try:
            self._direct = open_direct(path, os.O_RDONLY) if use_direct else None
        except OSError:
            os.close(self.fd)
            raise
        self.size = os.fstat(self.fd).st_size
        self._nowait = _RWF_NOWAIT != 0

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def read(self, offset: int, length: int, buf: np.ndarray) -> np.ndarray:
        """Up to `length` bytes from `offset` (fewer only at the end of the file): a uint8
        view into `buf`, an aligned_buffer of at least window_bytes(length) bytes.

        Bytes the page cache already holds are copied from it (a read that may not wait
        for the disk, RWF_NOWAIT): O_DIRECT would read them from the disk again."""
        if self._nowait and self._direct is not None:
            cached = self._cached(offset, length, buf)
            if cached is not None:
                return cached
        direct = self._direct
        if direct is not None:
            lo = offset - offset % ALIGN
            hi = -(-(offset + length) // ALIGN) * ALIGN
            try:
                got = _pread_into(direct, buf[: hi - lo], lo, ALIGN)
            except OSError as exc:
                if exc.errno not in NO_DIRECT:
                    raise
                self._stop_direct()  # a file system that opens O_DIRECT but refuses it
            else:
                start = offset - lo
                return buf[start : max(start, min(got, start + length))]
        got = _pread_into(self.fd, buf[:length], offset, 1)
        return buf[:got]

    def _cached(self, offset: int, length: int, buf: np.ndarray) -> np.ndarray | None:
        """The range if the page cache holds all of it (as far as the file goes), else None."""
        want = max(0, min(length, self.size - offset))
        try:
            got = os.preadv(self.fd, [buf[:want].data], offset, _RWF_NOWAIT)
        except BlockingIOError:  # not (all) in the page cache
            return None
        except OSError as exc:
            if exc.errno not in NO_DIRECT:
                raise
            self._nowait = False  # a kernel or file system without it: O_DIRECT it is
            return None
        return buf[:got] if got == want else None

    def _stop_direct(self) -> None:
        if self._direct is not None:
            fd, self._direct = self._direct, None
            os.close(fd)

    def close(self) -> None:
        self._stop_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WindowReader:
    """Reads byte ranges of DirectFiles into arrays of any alignment through one aligned
    window (one copy; the page cache left out). One per thread."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._window = aligned_buffer(window_bytes(max_bytes))

    def read_into(self, file: DirectFile, dest: np.ndarray, offset: int) -> None:
        """dest (C-contiguous, at most max_bytes) filled from the file's bytes at offset."""
        if dest.nbytes > self._max:
            raise ValueError(f"a read of {dest.nbytes} bytes through a {self._max}-byte window")
        raw = file.read(offset, dest.nbytes, self._window)
        if raw.size != dest.nbytes:
            raise ValueError(f"short read at offset {offset}: {raw.size} of {dest.nbytes} bytes")
        dest.reshape(-1).view(np.uint8)[...] = raw


def _pread_into(fd: int, buf: np.ndarray, offset: int, unit: int) -> int:
    """Fill buf from offset until it is full or the file ends; bytes read. A short read is
    continued only at a multiple of `unit` (O_DIRECT's next read must start aligned; one
    that is not is the end of the file)."""
    view = buf.data
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
        if got % unit:
            break
    return got
