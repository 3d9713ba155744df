"""Write new weights into a model's ONNX template by copying bytes into its recorded ranges."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sluice.gateway.store.blobs import fsync_dir
from sluice.gateway.store.direct import open_regular
from sluice.gateway.store.writeback import WriteBehind
from sluice.models.manifest import MODEL_FILE
from sluice.models.schema import Schema

if TYPE_CHECKING:
    # Only for annotations: template.py imports this module for its self-test.
    from sluice.gateway.export.template import OnnxTemplate, WeightRange

_CHUNK_BYTES = 16 << 20  # bounds each write, copy and mapped window


@dataclass(frozen=True)
class FileSpan:
    """Bytes [start, end) of an open file, for write_atomic to copy in the kernel
    (copy_file_range: no pass through this process's memory) and hash from what it wrote."""

    fd: int
    start: int
    end: int
    name: str  # what the bytes are, for messages


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="release-sha256")


def write_atomic(
    path: Path, chunks: Iterable[bytes | memoryview | FileSpan], durable: bool = True
) -> str:
    """Write chunks to path via a temp file in the same directory, fsync, os.replace.

    A chunk is bytes or a view that must not change once yielded (it is hashed in a worker
    while it is written), or a FileSpan, which is copied in the kernel and hashed in the
    worker from the page cache of the file written.

    Returns the hex sha256 of what was written. Readers see the old file or the whole
    new one, never a part; after a crash only a stray `.tmp` file can remain. With
    durable=False nothing is fsynced: the caller syncs the file (and the directory)
    before anything refers to it (publish overlaps that with its checks).
    """
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        try:
            _write_pieces(fd, chunks, digest)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)  # the rename itself is only durable once the entry is on disk
    return digest.hexdigest()


def _write_pieces(fd: int, chunks: Iterable[bytes | memoryview | FileSpan], digest: Any) -> None:
    """Append chunks to fd while a worker hashes each one behind the writer, in order (both
    release the GIL)."""
    behind = WriteBehind(fd)
    pending: Future[None] | None = None
    pos = 0
    try:
        for chunk in chunks:
            for piece in _windows(chunk):
                if isinstance(piece, FileSpan):
                    n = _copy(piece, fd)
                    job: Callable[[], None] = functools.partial(_hash_written, digest, fd, pos, n)
                else:
                    n = _write_all(fd, piece)
                    job = functools.partial(digest.update, piece)
                if pending is not None:
                    pending.result()  # the previous piece is hashed before this one starts
                pending = _HASHER.submit(job)
                pos += n
                behind.wrote(n)
    finally:
        if pending is not None:  # before the caller closes fd, also when a write failed
            pending.result()


def _windows(chunk: bytes | memoryview | FileSpan) -> Iterator[bytes | memoryview | FileSpan]:
    """A FileSpan in _CHUNK_BYTES parts, so copying and hashing overlap; buffers whole."""
    if not isinstance(chunk, FileSpan):
        yield chunk
        return
    for at in range(chunk.start, chunk.end, _CHUNK_BYTES):
        yield FileSpan(chunk.fd, at, min(at + _CHUNK_BYTES, chunk.end), chunk.name)


def _write_all(fd: int, data: bytes | memoryview) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


_COPY_UNSUPPORTED = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def _copy(span: FileSpan, fd: int) -> int:
    """Append span's bytes to fd; raises ValueError if its file ends first."""
    size, done = span.end - span.start, 0
    while done < size:
        n = 0
        if _copy_file_range is not None:
            try:
                n = _copy_file_range(span.fd, fd, size - done, span.start + done)
            except OSError as exc:
                if exc.errno not in _COPY_UNSUPPORTED:
                    raise
                n = _write_all(fd, os.pread(span.fd, size - done, span.start + done))
        else:  # no copy_file_range here: through this process, one window at a time
            n = _write_all(fd, os.pread(span.fd, size - done, span.start + done))
        if n == 0:
            raise ValueError(
                f"payload: ended at byte {span.start + done} while reading {span.name!r}"
            )
        done += n
    return done


_copy_file_range = getattr(os, "copy_file_range", None)  # Linux only


def _hash_written(digest: Any, fd: int, pos: int, size: int) -> None:
    """Feed digest the bytes [pos, pos + size) of fd, read from its page cache through a
    mapping (no copy): the hash is of what the file holds."""
    if size == 0:
        return
    start = pos - pos % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, pos + size - start, offset=start, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            digest.update(view[pos - start :])
        finally:
            view.release()


def _plan(t: OnnxTemplate, schema: Schema) -> list[tuple[WeightRange, int, int]]:
    """(template range, payload start, payload end) per range, in the ranges' order."""
    if schema.hash != t.schema_hash:
        raise ValueError(
            f"model {t.model!r}: template was built for schema {t.schema_hash[:16]}, "
            f"payload schema is {schema.hash[:16]}"
        )
    spans = {spec.name: (spec, start, end) for spec, start, end in schema.spans()}
    plan = []
    for r in t.ranges:
        if r.name not in spans:
            raise ValueError(f"tensor {r.name!r}: in the template but not in the schema")
        spec, start, end = spans[r.name]
        if r.end - r.start != spec.num_bytes:
            raise ValueError(
                f"tensor {r.name!r}: schema expects {spec.num_bytes} bytes, "
                f"template range holds {r.end - r.start}"
            )
        if t.payload_bytes is not None and (r.start, r.end) != (start, end):
            raise ValueError(
                f"tensor {r.name!r}: the template's range [{r.start}, {r.end}) is not where "
                f"the payload holds it, [{start}, {end})"
            )
        plan.append((r, start, end))
    return plan


def _as_bytes(payload: bytes | memoryview | np.ndarray, schema: Schema) -> np.ndarray:
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or not payload.flags.c_contiguous:
            raise ValueError(
                f"payload: expected a contiguous uint8 array, got {payload.dtype} "
                f"(contiguous={payload.flags.c_contiguous})"
            )
        raw = payload.reshape(-1)
    else:
        raw = np.frombuffer(payload, dtype=np.uint8)
    if raw.size != schema.payload_bytes:
        raise ValueError(f"payload: expected {schema.payload_bytes} bytes, got {raw.size}")
    return raw


def _single_file_only(t: OnnxTemplate) -> None:
    if t.data_file is not None:
        raise ValueError(
            f"model {t.model!r}: a two-file template ({MODEL_FILE} + {t.data_file}) has no "
            "single refreshed file; write it with write_release_files()"
        )


def refresh(t: OnnxTemplate, schema: Schema, payload: bytes | memoryview | np.ndarray) -> bytes:
    """The template with each weight range replaced by that tensor's bytes from a flat payload.

    The payload is the schema's tensors end to end (models/schema.py); tensors the graph
    does not hold (BatchNorm's num_batches_tracked) are skipped. Memory: two template copies.
    Single-file templates only.
    """
    _single_file_only(t)
    plan = _plan(t, schema)
    raw = _as_bytes(payload, schema)
    out = bytearray(t.data)
    for r, start, end in plan:
        out[r.start : r.end] = raw[start:end].data  # a bytearray takes buffers, not arrays
    return bytes(out)


def _refreshed_chunks(
    t: OnnxTemplate, plan: list[tuple[WeightRange, int, int]], payload: int
) -> Iterator[bytes | memoryview | FileSpan]:
    data = memoryview(t.data)
    pos = 0
    for r, start, end in plan:
        yield data[pos : r.start]
        yield FileSpan(payload, start, end, r.name)
        pos = r.end
    yield data[pos:]


def write_refreshed(
    t: OnnxTemplate, schema: Schema, payload_path: Path, out_path: Path, durable: bool = True
) -> str:
    """Stream a payload file into the template and write the result atomically to out_path.

    Returns the hex sha256 of the written file. Memory: one chunk, plus the template's
    bytes between its weight ranges. Single-file templates only.
    """
    _single_file_only(t)
    plan = _plan(t, schema)
    _check_payload_size(payload_path, schema)
    with os.fdopen(open_regular(payload_path), "rb") as payload:
        return write_atomic(out_path, _refreshed_chunks(t, plan, payload.fileno()), durable)


_READ_BYTES = 8 << 20  # released_payload's reads


def released_payload(
    t: OnnxTemplate, schema: Schema, release_dir: Path, payload_path: Path
) -> Iterator[bytes]:
    """The payload's bytes in payload order, each tensor's from where the release written
    into release_dir holds it (model.onnx, or the data file of the two-file layout); a
    tensor the graph leaves out (a BatchNorm counter) from the payload file. Checked
    against the version's piece tags, it proves the release carries the bytes that hashed
    to the version's name, not what its file held when the release was written."""
    held = release_dir / (t.data_file or MODEL_FILE)
    where = {r.name: r.start for r, _, _ in _plan(t, schema)}
    with (
        os.fdopen(open_regular(held), "rb") as release,
        os.fdopen(open_regular(payload_path), "rb") as payload,
    ):
        for spec, start, end in schema.spans():
            fd, at, size = (
                (release.fileno(), where[spec.name], end - start)
                if spec.name in where
                else (payload.fileno(), start, end - start)
            )
            while size > 0:
                data = os.pread(fd, min(size, _READ_BYTES), at)
                if not data:
                    raise ValueError(f"{held.name}: ends before the weights it should hold")
                yield data
                at, size = at + len(data), size - len(data)


def _check_payload_size(payload_path: Path, schema: Schema) -> None:
    size = payload_path.stat().st_size
    if size != schema.payload_bytes:
        raise ValueError(f"payload: expected {schema.payload_bytes} bytes, got {size}")


def _data_file_chunks(payload: int, plan: list[tuple[WeightRange, int, int]]) -> Iterator[FileSpan]:
    """The two-file layout's data file: each range's payload bytes."""
    for r, start, end in plan:
        yield FileSpan(payload, start, end, r.name)


def payload_is_data_file(t: OnnxTemplate, schema: Schema) -> bool:
    """Whether a two-file template's data file is the payload byte for byte: the payload
    layout, or a graph-layout template whose graph holds every schema tensor (no BatchNorm
    counter left out), so that its ranges are the payload's."""
    if t.data_file is None or t.data_file_bytes != schema.payload_bytes:
        return False
    plan = _plan(t, schema)
    if not all((r.start, r.end) == (start, end) for r, start, end in plan):
        return False
    return t.payload_bytes is not None or len(plan) == len(schema.tensors)


def _link_atomic(source: Path, path: Path) -> bool:
    """path becomes another name of source (an immutable, already durable file) via a temp
    name and os.replace; False where a hard link cannot be made (another file system, a
    link limit, a file system without links): the caller copies instead."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return True


def write_release_files(
    t: OnnxTemplate,
    schema: Schema,
    payload_path: Path,
    out_dir: Path,
    durable: bool = True,
    payload_sha256: str | None = None,
) -> list[tuple[str, int, str]]:
    """Write the release files of a payload file into out_dir, each atomically.

    Returns (file name, size, sha256 hex) per file written: model.onnx for a
    single-file template (write_refreshed); for the two-file layout the data file (the
    payload whole in the payload layout, BatchNorm counters and all; in the graph layout
    the graph's weights end to end) and then model.onnx, the template's bytes unchanged.
    Memory: the template plus one chunk. durable=False: as
    in write_atomic, the caller fsyncs the files and out_dir.

    Given payload_sha256 (the payload file's own, immutable and durable: a version blob),
    a data file that is the payload byte for byte (payload_is_data_file) is a hard link to
    it, no byte copied: its sha256 is payload_sha256, which the guard's read of the
    release then checks like any other.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    if t.data_file is None:
        sha = write_refreshed(t, schema, payload_path, model_path, durable)
        return [(MODEL_FILE, model_path.stat().st_size, sha)]
    plan = _plan(t, schema)
    _check_payload_size(payload_path, schema)
    data_path = out_dir / t.data_file
    if (
        payload_sha256 is not None
        and payload_is_data_file(t, schema)
        and _link_atomic(payload_path, data_path)
    ):
        data_sha = payload_sha256
        if durable:
            fsync_dir(out_dir)
    else:
        whole = payload_is_data_file(t, schema)  # copied whole where no link can be made
        with os.fdopen(open_regular(payload_path), "rb") as payload:
            chunks = (
                [FileSpan(payload.fileno(), 0, schema.payload_bytes, "payload")]
                if whole
                else _data_file_chunks(payload.fileno(), plan)
            )
            data_sha = write_atomic(data_path, chunks, durable)
    if data_path.stat().st_size != t.data_file_bytes:
        # Only if the payload file shrank while it was being read.
        raise ValueError(
            f"{data_path}: wrote {data_path.stat().st_size} bytes, expected {t.data_file_bytes}"
        )
    model_sha = write_atomic(model_path, [t.data], durable)
    return [(MODEL_FILE, len(t.data), model_sha), (t.data_file, t.data_file_bytes, data_sha)]
