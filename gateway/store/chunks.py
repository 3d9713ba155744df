"""Reading a file from an offset in chunks, for the server-streaming pulls."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sluice.gateway.core.errors import InvalidInput

# Every message the gateway sends (PullRelease, PullGlobal) carries at most this much data,
# so it fits the 4 MiB default receive limit of grpc-js, grpc-go, grpc-java and grpc-dotnet
# with room to spare: a client in any language pulls with its defaults.
SEND_CHUNK_BYTES = 2 << 20


def file_chunks(
    path: Path, offset: int, total: int, chunk_bytes: int = SEND_CHUNK_BYTES
) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pieces of path from offset to total bytes; a bad offset raises now,
    before the caller sends anything."""
    if offset > total:
        raise InvalidInput(f"offset {offset} is past the end ({total} bytes)")
    return _read_chunks(path, offset, total, chunk_bytes)


def _read_chunks(
    path: Path, offset: int, total: int, chunk_bytes: int
) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        f.seek(offset)
        pos = offset
        while pos < total:
            data = f.read(min(chunk_bytes, total - pos))
            if not data:
                raise OSError(f"{path} ended at {pos} of {total} bytes")
            yield pos, data
            pos += len(data)
