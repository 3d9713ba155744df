"""Reading a file from an offset in chunks, for the server-streaming pulls."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sluice.gateway.core.errors import InvalidInput

# Every message the gateway sends (PullRelease, PullGlobal) carries at most this much data,
# so it fits the 4 MiB default receive limit of grpc-js, grpc-go, grpc-java and grpc-dotnet
# with room to spare: a client in any language pulls with its defaults.
SEND_CHUNK_BYTES = 2 << 20


def file_chunks(
    path: Path, offset: int, total: int, chunk_bytes: int = SEND_CHUNK_BYTES
) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pieces of path from offset to total bytes. A bad offset or a missing
    file raises now, before the caller sends anything; the file is opened now too, so a
    pull that has started reads its bytes to the end even if the name goes meanwhile
    (retention removing that version's blob)."""
    if offset > total:
        raise InvalidInput(f"offset {offset} is past the end ({total} bytes)")
    return _read_chunks(path.open("rb"), path, offset, total, chunk_bytes)


def _read_chunks(
    f: BinaryIO, path: Path, offset: int, total: int, chunk_bytes: int
) -> Iterator[tuple[int, bytes]]:
    with f:
        f.seek(offset)
        pos = offset
        while pos < total:
            data = f.read(min(chunk_bytes, total - pos))
            if not data:
                raise OSError(f"{path} ended at {pos} of {total} bytes")
            yield pos, data
            pos += len(data)
