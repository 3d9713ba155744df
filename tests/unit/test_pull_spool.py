"""The pull's spool: received chunks written by one worker and hashed by another, each in
order. Whatever the chunk sizes and queue depth, the file and the sha256 are the stream's;
a write that fails is raised, and the file holds exactly the chunks before it."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.clients.sdk import _Spool
from sluice.models.appender import Appender

CHUNKS = st.lists(st.binary(min_size=1, max_size=3000), max_size=30)


@given(chunks=CHUNKS, depth=st.integers(1, 10))
@settings(max_examples=60, deadline=None)
def test_the_file_and_the_sha256_are_the_streams(
    tmp_path_factory: pytest.TempPathFactory, chunks: list[bytes], depth: int
) -> None:
    path = tmp_path_factory.mktemp("spool") / "pulled"
    digest = hashlib.sha256()
    with Appender(path, 0) as out, _Spool(out, digest, depth) as spool:
        for chunk in chunks:
            spool.put(memoryview(chunk))
        spool.finish()
        out.sync()
    assert path.read_bytes() == b"".join(chunks)
    assert digest.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


class _FailingAt:
    """A writer whose k-th write fails (the disk filled up), slowly enough that later
    chunks are queued behind it."""

    def __init__(self, k: int) -> None:
        self.k, self.calls, self.written = k, 0, bytearray()
        self.threads: set[str] = set()

    def write(self, data: bytes | memoryview) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls += 1
        if self.calls == self.k:
            time.sleep(0.01)
            raise OSError(28, "No space left on device")
        self.written += data


@given(chunks=st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=20),
       at=st.floats(0, 1, exclude_max=True), depth=st.integers(1, 10))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_a_failed_write_is_raised_and_the_file_is_the_chunks_before_it(
    chunks: list[bytes], at: float, depth: int
) -> None:
    k = int(at * len(chunks)) + 1
    out = _FailingAt(k)
    spool = _Spool(out, hashlib.sha256(), depth)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="No space left"), spool:
        for chunk in chunks:
            spool.put(chunk)
        spool.finish()
    assert bytes(out.written) == b"".join(chunks[: k - 1])
    assert out.calls == k  # nothing is written after the failure
    assert out.threads == {next(iter(out.threads))}  # one writer thread: in order


def test_leaving_waits_for_every_chunk_handed_over(tmp_path: Path) -> None:
    """An interrupted pull (the caller raises mid-stream) keeps all it received."""
    path = tmp_path / "pulled"
    chunks = [bytes([i]) * 4096 for i in range(20)]
    with (
        pytest.raises(KeyboardInterrupt),
        Appender(path, 0) as out,
        _Spool(out, hashlib.sha256(), 4) as spool,
    ):
        for chunk in chunks:
            spool.put(chunk)
        raise KeyboardInterrupt
    assert path.read_bytes() == b"".join(chunks)
