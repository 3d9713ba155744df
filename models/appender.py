"""Append a stream of bytes to a file and make it durable, without the page cache where the
file system allows: whole aligned blocks go to the disk with O_DIRECT, the rest (a resumed
file's unaligned start, the last partial block) through the page cache.

Used by both sides: the SDK's pulls (clients/sdk.py) and the gateway's spooled pushes
(gateway/store/blobs.py TempBlob).

Measured on the 2-core VM of bench/ (404 MB, then fsync): buffered writes cost ~1.1-4 s
of CPU per GB (new page-cache pages are dear on this VM), O_DIRECT writes of 8 MiB blocks
~0.2-0.3, and finished sooner. A pull or a push is CPU-bound on such a machine, so this is
its largest saving.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from pathlib import Path

ALIGN = 4096  # file offsets, lengths and memory of O_DIRECT writes: a multiple of this
BLOCK = 8 << 20  # bytes per O_DIRECT write
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every write is buffered
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# What a file system answers when it does not take O_DIRECT (tmpfs at open; some at write).
NO_DIRECT = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})
# Where an Appender(behind=True) writes its full blocks while its caller fills the next one.
# Each appender has at most one block in flight, so its blocks reach the file in order;
# several workers, so that concurrent appenders (pushes) do not queue behind each other.
_WRITERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="block-write")
# Block buffers given back by closed appenders, for the next ones: a fresh mapping's pages
# are dear on a VM (each first touch faults; 16 MiB per push of 128 MB was ~0.3 s of CPU per
# GB pushed, bench/README: ingest). At most this many bytes of them are kept.
SPARE_BYTES = 64 << 20
_spare: dict[int, list[mmap.mmap]] = {}  # by size
_spare_lock = threading.Lock()


def open_direct(path: Path, flags: int) -> int | None:
    """A descriptor of path opened with O_DIRECT (and `flags`), or None where the file
    system (or the platform) does not take O_DIRECT; other errors are raised."""
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, flags | _O_DIRECT | _CLOEXEC)
    except OSError as exc:
        if exc.errno not in NO_DIRECT:
            raise
        return None


def _take_buffer(size: int) -> mmap.mmap:
    with _spare_lock:
        kept = _spare.get(size)
        if kept:
            return kept.pop()
    return mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs


def _give_back(buffer: mmap.mmap) -> None:
    with _spare_lock:
        if sum(len(b) for kept in _spare.values() for b in kept) + len(buffer) <= SPARE_BYTES:
            _spare.setdefault(len(buffer), []).append(buffer)
            return
    with contextlib.suppress(BufferError):  # a traceback may still hold a view
        buffer.close()  # else unmapped when the last view goes


def spare_bytes() -> int:
    """Bytes of block buffers kept for the next appenders."""
    with _spare_lock:
        return sum(len(b) for kept in _spare.values() for b in kept)


class Appender:
    """Writes what it is given at the end of the file, `start` bytes in, in order.

    The file holds exactly the bytes given so far once flush() or sync() returns (and
    after close()); bytes still in the block buffer are not in it before. Not thread-safe:
    one writer. `direct` says whether O_DIRECT writes are in use (they stop, for good, at
    the first refusal: the bytes go through the page cache instead, the same file).

    `behind`: a full block is written by a worker while the caller fills a second buffer
    (an O_DIRECT write waits for the disk; a push's handler keeps receiving meanwhile). A
    worker's error (a full disk) is raised by the next write, flush, sync or close.
    """

    def __init__(
        self,
        path: Path,
        start: int,
        *,
        use_direct: bool = True,
        block: int = BLOCK,
        exclusive: bool = False,
        behind: bool = False,
    ) -> None:
        """`exclusive`: the file must not exist yet (FileExistsError otherwise)."""
        if block <= 0 or block % ALIGN:
            raise ValueError(f"block of {block} bytes: a positive multiple of {ALIGN}")
        create = os.O_CREAT | (os.O_EXCL if exclusive else 0)
        self._fd = os.open(path, os.O_WRONLY | create | _CLOEXEC, 0o600)
        try:
            self._direct_fd = open_direct(path, os.O_WRONLY) if use_direct else None
        except OSError:
            os.close(self._fd)
            raise
        self._pos = start  # where the buffer's first byte goes
        self._block = block
        # Page-aligned memory, as O_DIRECT needs; two buffers when a worker writes one.
        self._maps = [_take_buffer(block) for _ in range(2 if behind else 1)]
        self._views = [memoryview(m) for m in self._maps]
        self._buf = self._views[0]
        self._writing: Future[None] | None = None  # the other buffer's write, if behind
        self._failed: BaseException | None = None  # what a worker's write raised
        self._filled = 0
        # A resumed file's start may be anywhere: bytes up to the next aligned offset go
        # through the page cache, so that every O_DIRECT write starts aligned.
        self._head = -start % ALIGN

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    def write(self, data: bytes | memoryview) -> None:
        if self._failed is not None:
            raise self._failed
        view = memoryview(data).cast("B")
        if self._head:
            head, view = view[: self._head], view[self._head :]
            self._wait()
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
        """The full buffer to the disk at an aligned offset (by a worker, if behind)."""
        if len(self._views) == 2:
            self._wait()  # the other buffer is free again
            self._writing = _WRITERS.submit(self._put, self._buf, self._pos)
            self._buf = self._views[1] if self._buf is self._views[0] else self._views[0]
        else:
            self._put(self._buf, self._pos)
        self._pos += self._block
        self._filled = 0

    def _put(self, block: memoryview, at: int) -> None:
        if self._direct_fd is not None:
            try:
                self._pwrite(self._direct_fd, block, at)
                return
            except OSError as exc:
                if exc.errno not in NO_DIRECT:
                    raise
                self._stop_direct()  # a file system that opens O_DIRECT but refuses it
        self._pwrite(self._fd, block, at)

    def _wait(self) -> None:
        """The block in flight is written, or its error raised; after an error nothing more
        is written (the file holds a prefix of what was given) and every call raises it."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            try:
                writing.result()
            except BaseException as exc:
                self._failed = exc
                raise
        if self._failed is not None:
            raise self._failed

    def flush(self) -> None:
        """What the buffer holds, written through the page cache; later writes continue
        after it (buffered up to the next aligned offset)."""
        self._wait()
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
            if self._failed is None:  # else raised already; nothing more is written
                self.flush()
        finally:
            if self._writing is not None:  # flush raised before waiting for it: wait now
                wait_for([self._writing])
                self._writing = None
            self._stop_direct()
            os.close(self._fd)
            self._fd = -1
            for view in self._views:
                view.release()
            for buffer in self._maps:
                _give_back(buffer)
            self._maps = []

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
