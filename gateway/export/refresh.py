"""Write new weights into a model's ONNX template by copying bytes into its recorded ranges."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from sluice.gateway.store.writeback import WriteBehind
from sluice.models.manifest import MODEL_FILE
from sluice.models.schema import Schema

if TYPE_CHECKING:
    # Only for annotations: template.py imports this module for its self-test.
    from sluice.gateway.export.template import OnnxTemplate, WeightRange

_CHUNK_BYTES = 16 << 20  # bounds each write so a big tensor never needs a second copy


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="release-sha256")


def write_atomic(path: Path, chunks: Iterable[bytes | memoryview], durable: bool = True) -> str:
    """Write chunks to path via a temp file in the same directory, fsync, os.replace.

    Chunks must not change once yielded (bytes, or views of immutable bytes): each is
    hashed in a worker while it is written.

    Returns the hex sha256 of what was written. Readers see the old file or the whole
    new one, never a part; after a crash only a stray `.tmp` file can remain. With
    durable=False nothing is fsynced: the caller syncs the file (and the directory)
    before anything refers to it (publish overlaps that with its checks).
    """
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            behind = WriteBehind(fd)
            pending: Future[None] | None = None
            for chunk in chunks:
                # Hash this chunk in a worker while writing it (both release the GIL); the
                # previous chunk's hash is done first, so the order is kept.
                if pending is not None:
                    pending.result()
                pending = _HASHER.submit(digest.update, chunk)
                out.write(chunk)
                behind.wrote(len(chunk))
            if pending is not None:
                pending.result()
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if not durable:
        return digest.hexdigest()
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest.hexdigest()


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


def _range_chunks(payload: BinaryIO, r: WeightRange, start: int, end: int) -> Iterator[bytes]:
    """One range's payload bytes, read a chunk at a time."""
    # Plain reads, not a memory map: mapped pages would count towards the process's
    # resident memory until the whole payload was resident.
    payload.seek(start)
    for at in range(start, end, _CHUNK_BYTES):
        chunk = payload.read(min(_CHUNK_BYTES, end - at))
        if len(chunk) != min(_CHUNK_BYTES, end - at):
            raise ValueError(f"payload: ended at byte {at} while reading {r.name!r}")
        yield chunk


def _refreshed_chunks(
    t: OnnxTemplate, plan: list[tuple[WeightRange, int, int]], payload: BinaryIO
) -> Iterator[bytes | memoryview]:
    data = memoryview(t.data)
    pos = 0
    for r, start, end in plan:
        yield data[pos : r.start]
        yield from _range_chunks(payload, r, start, end)
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
    with payload_path.open("rb") as payload:
        return write_atomic(out_path, _refreshed_chunks(t, plan, payload), durable)


def _check_payload_size(payload_path: Path, schema: Schema) -> None:
    size = payload_path.stat().st_size
    if size != schema.payload_bytes:
        raise ValueError(f"payload: expected {schema.payload_bytes} bytes, got {size}")


def _data_file_chunks(
    payload_path: Path, plan: list[tuple[WeightRange, int, int]]
) -> Iterator[bytes]:
    """The two-file layout's data file: each range's payload bytes, read a chunk at a time."""
    with payload_path.open("rb") as payload:
        for r, start, end in plan:
            yield from _range_chunks(payload, r, start, end)


def write_release_files(
    t: OnnxTemplate, schema: Schema, payload_path: Path, out_dir: Path, durable: bool = True
) -> list[tuple[str, int, str]]:
    """Write the release files of a payload file into out_dir, each atomically.

    Returns (file name, size, sha256 hex) per file written: model.onnx for a
    single-file template (write_refreshed); for the two-file layout the data file (the
    graph weights end to end, in the template's range order) and then model.onnx, the
    template's bytes unchanged. Memory: the template plus one chunk. durable=False: as
    in write_atomic, the caller fsyncs the files and out_dir.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    if t.data_file is None:
        sha = write_refreshed(t, schema, payload_path, model_path, durable)
        return [(MODEL_FILE, model_path.stat().st_size, sha)]
    plan = _plan(t, schema)
    _check_payload_size(payload_path, schema)
    data_path = out_dir / t.data_file
    data_sha = write_atomic(data_path, _data_file_chunks(payload_path, plan), durable)
    if data_path.stat().st_size != t.data_file_bytes:
        # Only if the payload file shrank while it was being read.
        raise ValueError(
            f"{data_path}: wrote {data_path.stat().st_size} bytes, expected {t.data_file_bytes}"
        )
    model_sha = write_atomic(model_path, [t.data], durable)
    return [(MODEL_FILE, len(t.data), model_sha), (t.data_file, t.data_file_bytes, data_sha)]
