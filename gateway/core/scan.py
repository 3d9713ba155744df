"""One read of each spooled update before its round is aggregated: the norm of its float
tensors (screening, DP clipping: core/dp.py) and the spool check (its size and sha256
against what was acknowledged: closing.CorruptUpdates).

A push spools with O_DIRECT (store/blobs.py), so at a close the updates are cold; the scan
reads each file front to back with O_DIRECT (store/direct.py) into two buffers it reuses,
the next window read while the last is hashed and squared: the disk's pace at ~0.15 s of
CPU per GB for the read, where a read through the page cache cost ~3 s per GB on this VM.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import queue
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sluice.gateway.core.aggregation import DEFAULT_BLOCK_BYTES, one_blas_thread, squares
from sluice.gateway.store.blobs import NOT_AS_HASHED, Proof
from sluice.gateway.store.direct import DirectFile, aligned_buffer, window_bytes
from sluice.models.schema import Schema

# Updates scanned at once: each keeps a read in flight while it hashes, so two keep the
# disk busy and both cores hashing.
SCAN_WORKERS = 2
# Where each scan's next window is read while the scan hashes the last (one read in flight
# per scan; more threads than one scan needs, so concurrent closes do not queue).
_AHEAD = ThreadPoolExecutor(max_workers=4, thread_name_prefix="scan-read")


# What identifies a file's content short of reading it: a write to it moves its mtime and
# ctime, a replacement its inode.
Stamp = tuple[int, int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Scan:
    norm: float  # L2 norm of the float tensors as spooled; NaN when the file has a problem
    problem: str = ""  # why the file is not what was acknowledged; "" if it is
    stamp: Stamp | None = None  # the file's stamp when its scan began


def changed_since(scanned: Mapping[str, tuple[Path, Stamp]]) -> dict[str, str]:
    """sha256 -> what happened to its file, for files that are no longer as they were when
    scanned (the strategy reads them again after the scan: a file written in between would
    fold bytes no one checked)."""
    problems = {}
    for sha, (path, stamp) in scanned.items():
        try:
            now = stamp_of(os.stat(path))
        except FileNotFoundError:
            problems[sha] = "its spool file is missing"
            continue
        if now != stamp:
            problems[sha] = "its spool file changed while its round was aggregated"
    return problems


@dataclass(frozen=True)
class _Window:
    """One read: bytes [first, first + nbytes) of the payload, and the float runs in it
    as (offset in the window, bytes, dtype)."""

    first: int
    nbytes: int
    floats: tuple[tuple[int, int, np.dtype[Any]], ...]


def _windows(schema: Schema, window: int) -> list[_Window]:
    """Consecutive windows covering the payload, each at most `window` bytes (or one
    element), a float run never split inside an element."""
    out: list[_Window] = []
    first, nbytes = 0, 0
    floats: list[tuple[int, int, np.dtype[Any]]] = []
    for spec, start, end in schema.spans():
        itemsize = spec.np_dtype.itemsize
        step = max(window // itemsize, 1) * itemsize
        for piece in range(start, end, step):
            size = min(step, end - piece)
            if nbytes and nbytes + size > window:
                out.append(_Window(first, nbytes, tuple(floats)))
                first, nbytes, floats = piece, 0, []
            if spec.is_float:
                floats.append((nbytes, size, spec.np_dtype))
            nbytes += size
    if nbytes:
        out.append(_Window(first, nbytes, tuple(floats)))
    return out


class _Buffers:
    """One scan's memory: two read windows and the float64 copy the squares are taken of."""

    def __init__(self, window: int, step: int) -> None:
        self.reads = (aligned_buffer(window_bytes(window)), aligned_buffer(window_bytes(window)))
        self.wide = np.empty(step, dtype=np.float64)


def scan_updates(
    schema: Schema,
    paths: Sequence[Path],
    expect: Sequence[str] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int = SCAN_WORKERS,
    proofs: Sequence[Proof | None] | None = None,
) -> list[Scan]:
    """Scan each file: its norm, and (with `expect`, the sha256 each was acknowledged
    under) whether it is still exactly that payload.

    A missing, short, long, changed or unreadable (EIO) file is a problem of that file when
    `expect` is given, an error otherwise. Any other OSError is raised: the storage's fault.
    Integer tensors are hashed but left out of the norm (FedAvg rounds their mean and no
    scale reaches them). Squares accumulate in float64 in file order: the same file gives
    the same norm.

    Memory: per worker two windows of `block_bytes` (and a page either side) and one
    float64 block, whatever the number of updates or the size of the model.
    """
    if expect is not None and len(expect) != len(paths):
        raise ValueError(f"{len(paths)} files, {len(expect)} sha256s")
    if proofs is not None and (expect is None or len(proofs) != len(paths)):
        raise ValueError(f"{len(paths)} files, {len(proofs)} proofs (and sha256s to check)")
    window = max(block_bytes, 8)
    windows = _windows(schema, window)
    biggest = max((w.nbytes for w in windows), default=0)
    step = max(block_bytes // 8, 1)
    workers = max(1, min(workers, len(paths)))
    spare: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()
    for _ in range(workers):
        spare.put(_Buffers(max(window, biggest), step))

    def run(i: int) -> Scan:
        buffers = spare.get()
        try:
            sha = None if expect is None else expect[i]
            proof = None if proofs is None else proofs[i]
            return _scan(schema, windows, paths[i], sha, buffers, proof)
        finally:
            spare.put(buffers)

    with one_blas_thread(), ThreadPoolExecutor(workers, thread_name_prefix="scan") as pool:
        return list(pool.map(run, range(len(paths))))


def _scan(
    schema: Schema,
    windows: Sequence[_Window],
    path: Path,
    expect: str | None,
    buf: _Buffers,
    proof: Proof | None = None,
) -> Scan:
    size = schema.payload_bytes
    try:
        file = DirectFile(path)
    except FileNotFoundError:
        if expect is None:
            raise
        return Scan(math.nan, "its spool file is missing")
    with file:
        stamp = stamp_of(os.fstat(file.fd))
        if file.size != size:
            if expect is not None:
                return Scan(math.nan, f"its spool file is {file.size} bytes, expected {size}")
            if file.size < size:
                raise ValueError(f"{path.name}: {file.size} bytes, the payload is {size}")
        digest = hashlib.sha256()
        try:
            total = _read(file, windows, digest.update if proof is None else proof.feed, buf)
        except OSError as exc:
            if expect is None or exc.errno != errno.EIO:
                raise
            return Scan(math.nan, "its spool file cannot be read (I/O error)")
        except _Short:
            if expect is None:
                raise ValueError(f"{path.name}: shorter than the payload's {size} bytes") from None
            return Scan(math.nan, f"its spool file became shorter than {size} bytes")
    if proof is not None and not proof.whole():
        return Scan(math.nan, NOT_AS_HASHED)
    if proof is None and expect is not None and digest.hexdigest() != expect:
        return Scan(math.nan, f"its spool file's sha256 is {digest.hexdigest()}, not its name")
    return Scan(math.sqrt(total), stamp=stamp)


class _Short(Exception):
    """A read ended before its window did (the file shrank while it was scanned)."""


def _read(
    file: DirectFile,
    windows: Sequence[_Window],
    feed: Callable[[memoryview], object],
    buf: _Buffers,
) -> float:
    """Feed every window to `feed` (a sha256's update, or a proof's) and return the sum of
    the float squares."""
    total = 0.0
    # Closed on the way out, also by an exception: its read ahead is waited for before the
    # buffers go to the next file (a traceback would keep a bare generator open).
    with contextlib.closing(_ahead(file, windows, buf)) as reads:
        for w, data in reads:
            if data.size != w.nbytes:
                raise _Short
            feed(data.data)  # sha256 releases the GIL: the next read, another scan run on
            total += _squares(data, w.floats, buf.wide)
    return total


def _ahead(
    file: DirectFile, windows: Sequence[_Window], buf: _Buffers
) -> Generator[tuple[_Window, np.ndarray], None, None]:
    """Each window with its bytes, the next one's read already under way; no read is in
    flight into either buffer once the iteration ends, however it ends."""
    if not windows:
        return
    pending = _AHEAD.submit(file.read, windows[0].first, windows[0].nbytes, buf.reads[0])
    try:
        for k, w in enumerate(windows):
            data = pending.result()
            if k + 1 < len(windows):
                nxt = windows[k + 1]
                pending = _AHEAD.submit(file.read, nxt.first, nxt.nbytes, buf.reads[(k + 1) % 2])
            yield w, data
    finally:
        wait_for([pending])


def _squares(
    data: np.ndarray, floats: Sequence[tuple[int, int, np.dtype[Any]]], wide: np.ndarray
) -> float:
    total = 0.0
    for offset, nbytes, dtype in floats:
        total += squares(data[offset : offset + nbytes].view(dtype), wide)
    return total
