"""Append a stream of bytes to a file and make it durable, without the page cache where the
file system allows: whole aligned blocks go to the disk with O_DIRECT, the rest (a resumed
file's unaligned start, the last partial block) through the page cache.

Measured on the 2-core VM of bench/ (404 MB, then fsync): buffered writes cost ~1.1-1.2 s
of CPU per GB (copying into new page-cache pages), O_DIRECT writes of 8 MiB blocks ~0.2-0.3,
and finished sooner. A pull is CPU-bound on such a machine, so this is its largest saving.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

ALIGN = 4096  # file offsets, lengths and memory of O_DIRECT writes: a multiple of this
BLOCK = 8 << 20  # bytes per O_DIRECT write
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every write is buffered
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# What a file system answers when it does not take O_DIRECT (tmpfs at open; some at write).
_NO_DIRECT = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


class Appender:
    """Writes what it is given at the end of the file, `start` bytes in, in order.

    The file holds exactly the bytes given so far once flush() or sync() returns (and
    after close()); bytes still in the block buffer are not in it before. Not thread-safe:
    one writer. `direct` says whether O_DIRECT writes are in use (they stop, for good, at
    the first refusal: the bytes go through the page cache instead, the same file).
    """

    def __init__(
        self, path: Path, start: int, *, use_direct: bool = True, block: int = BLOCK
    ) -> None:
        if block <= 0 or block % ALIGN:
            raise ValueError(f"block of {block} bytes: a positive multiple of {ALIGN}")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | _CLOEXEC, 0o600)
        self._direct_fd: int | None = None
        if use_direct and _O_DIRECT:
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | _O_DIRECT | _CLOEXEC)
            except OSError as exc:
                if exc.errno not in _NO_DIRECT:
                    os.close(self._fd)
                    raise
        self._pos = start  # where the buffer's first byte goes
        self._block = block
        self._map = mmap.mmap(-1, block)  # page-aligned memory, as O_DIRECT needs
        self._buf = memoryview(self._map)
        self._filled = 0
        # A resumed file's start may be anywhere: bytes up to the next aligned offset go
        # through the page cache, so that every O_DIRECT write starts aligned.
        self._head = -start % ALIGN

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._head:
            head, view = view[: self._head], view[self._head :]
            self._pwrite(self._fd, head, self._pos)
            self._pos += len(head)
            self._head -= len(head)
        while view:
            take = min(len(view), self._block - self._filled)
            self._buf[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self._block:
                self._write_block()

    def _write_block(self) -> None:
        """The full buffer to the disk at an aligned offset."""
        if self._direct_fd is not None:
            try:
                self._pwrite(self._direct_fd, self._buf, self._pos)
            except OSError as exc:
                if exc.errno not in _NO_DIRECT:
                    raise
                self._stop_direct()  # a file system that opens O_DIRECT but refuses it
                self._pwrite(self._fd, self._buf, self._pos)
        else:
            self._pwrite(self._fd, self._buf, self._pos)
        self._pos += self._block
        self._filled = 0

    def flush(self) -> None:
        """What the buffer holds, written through the page cache; later writes continue
        after it (buffered up to the next aligned offset)."""
        if self._filled:
            self._pwrite(self._fd, self._buf[: self._filled], self._pos)
            self._pos += self._filled
            self._filled = 0
            self._head = -self._pos % ALIGN

    def sync(self) -> None:
        """Every byte given so far on the disk (fsync covers what O_DIRECT wrote: the
        file's size and the device's cache)."""
        self.flush()
        os.fsync(self._fd)

    def close(self) -> None:
        """Flush and close; the bytes given are in the file (not necessarily durable)."""
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            self._stop_direct()
            os.close(self._fd)
            self._fd = -1
            self._buf.release()
            with contextlib.suppress(BufferError):  # a traceback may still hold a view
                self._map.close()  # else unmapped when the last view goes

    def _stop_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    @staticmethod
    def _pwrite(fd: int, data: memoryview, at: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], at + done)

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
