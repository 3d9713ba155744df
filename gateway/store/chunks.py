"""Reading a file from an offset in chunks, for the server-streaming pulls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from sluice.gateway.core.errors import InvalidInput

# Every message the gateway sends (PullRelease, PullGlobal) carries at most this much data,
# so it fits the 4 MiB default receive limit of grpc-js, grpc-go, grpc-java and grpc-dotnet
# with room to spare: a client in any language pulls with its defaults.
SEND_CHUNK_BYTES = 2 << 20


def check_offset(offset: int, total: int) -> None:
    """A pull's offset, checked before the caller sends anything."""
    if offset > total:
        raise InvalidInput(f"offset {offset} is past the end ({total} bytes)")


def read_chunks(
    f: BinaryIO, offset: int, total: int, chunk_bytes: int = SEND_CHUNK_BYTES
) -> Iterator[tuple[int, bytes]]:
    """(offset, data) pieces of the open file f from offset to total bytes. The caller owns
    f: opened before its pull answers anything, the bytes stay readable to the end even if
    the file's name goes meanwhile (retention removing that version's blob)."""
    f.seek(offset)
    pos = offset
    while pos < total:
        data = f.read(min(chunk_bytes, total - pos))
        if not data:
            raise OSError(f"{getattr(f, 'name', 'the file')} ended at {pos} of {total} bytes")
        yield pos, data
        pos += len(data)
