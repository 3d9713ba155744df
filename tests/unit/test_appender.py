"""The file writer of pulls and spooled pushes: whatever the sizes written, the resume point
and where it is flushed, the file holds exactly the bytes given, with O_DIRECT or without,
its blocks written by the caller or by a worker (behind); after a write error it holds a
prefix of them."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.models import appender
from sluice.models.appender import ALIGN, Appender
from sluice.models.appender import BLOCK as BLOCK_SIZE

BLOCK = 4 * ALIGN  # small blocks, so that a few KB cross several of them
SIZES = st.integers(0, 3 * BLOCK + 17)
WRITES = st.lists(st.tuples(SIZES, st.booleans()), max_size=12)  # (size, flush after it)


def direct_works(directory: Path) -> bool:
    """Whether this file system takes O_DIRECT at all (tmpfs did not, before Linux 6.6)."""
    if not getattr(os, "O_DIRECT", 0):
        return False
    probe = directory / ".probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


def expected_after(
    path: Path, writes: list[tuple[int, bool]], use_direct: bool, start: int, behind: bool
) -> bytes:
    prefix = os.urandom(start)
    path.write_bytes(prefix)
    want = bytearray(prefix)
    with Appender(path, start, use_direct=use_direct, block=BLOCK, behind=behind) as out:
        for size, flush in writes:
            data = os.urandom(size)
            out.write(data)
            want += data
            if flush:
                out.flush()
                assert path.read_bytes() == want  # flushed: the file holds all given so far
        out.sync()
        assert path.read_bytes() == want
    return bytes(want)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    writes=WRITES,
    start=st.integers(0, 2 * ALIGN + 5),
    use_direct=st.booleans(),
    behind=st.booleans(),
)
def test_the_file_holds_exactly_what_was_given(
    tmp_path: Path, writes: list[tuple[int, bool]], start: int, use_direct: bool, behind: bool
) -> None:
    path = tmp_path / "pulled.part"
    want = expected_after(path, writes, use_direct, start, behind)
    assert path.read_bytes() == want


def test_blocks_go_direct_where_the_file_system_takes_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with Appender(path, 0, block=BLOCK) as out:
        assert out.direct == direct_works(tmp_path)
        out.write(os.urandom(3 * BLOCK + 1))
        assert out.direct == direct_works(tmp_path)  # no refusal along the way
    with Appender(path, 0, use_direct=False, block=BLOCK) as out:
        assert not out.direct


@pytest.mark.parametrize("behind", [False, True])
def test_a_file_system_that_refuses_direct_writes_gets_them_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behind: bool
) -> None:
    if not direct_works(tmp_path):
        pytest.skip("no O_DIRECT here: every write is buffered already")
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: memoryview, at: int) -> int:
        if os.get_blocking(fd) and fd == out._direct_fd:  # the O_DIRECT descriptor
            refused.append(at)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    path = tmp_path / "f"
    data = os.urandom(2 * BLOCK + 100)
    with Appender(path, 0, block=BLOCK, behind=behind) as out:
        out.write(data)
        out.flush()
        assert not out.direct  # stopped for good at the first refusal
    assert refused == [0]
    assert path.read_bytes() == data


def full_after_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, at: int) -> int:
        if at >= BLOCK:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("behind", [False, True])
def test_a_write_error_other_than_a_refusal_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behind: bool
) -> None:
    full_after_one_block(monkeypatch)
    out = Appender(tmp_path / "f", 0, block=BLOCK, behind=behind)
    data = os.urandom(3 * BLOCK)
    with pytest.raises(OSError) as raised:
        out.write(data)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    if behind:  # the error stays: nothing more is written
        with pytest.raises(OSError, match="No space"):
            out.write(b"more")
    out.close()
    # What reached the file is a prefix of what was given: the first block, then (written
    # by the caller) the buffered second one on close; a worker's failed block is not
    # followed by any other.
    kept = (tmp_path / "f").read_bytes()
    assert kept == data[: BLOCK if behind else 2 * BLOCK]


def test_a_workers_error_is_raised_by_close_when_nothing_else_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_after_one_block(monkeypatch)
    out = Appender(tmp_path / "f", 0, block=BLOCK, behind=True)
    data = os.urandom(2 * BLOCK + 5)
    out.write(data)  # the second block's write is in flight, failing
    with pytest.raises(OSError, match="No space"):
        out.close()
    out.close()  # closed once: a second close does nothing
    assert (tmp_path / "f").read_bytes() == data[:BLOCK]


def test_a_block_that_is_not_aligned_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        Appender(tmp_path / "f", 0, block=ALIGN + 1)


def test_a_reused_block_buffer_brings_none_of_its_old_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed appenders give their 8 MiB buffers to the next ones: a file written after
    holds only its own bytes, whatever sizes the earlier files had."""
    # An empty pool: buffers kept by earlier tests in this process (a push's 4 MiB blocks)
    # could fill SPARE_BYTES and leave no room for these.
    monkeypatch.setattr(appender, "_spare", {})
    first = os.urandom(2 * BLOCK_SIZE + 12345)
    with Appender(tmp_path / "a", 0, behind=True) as out:
        out.write(first)
    spare = list(appender._spare.get(BLOCK_SIZE, []))
    assert spare, "the closed appender's buffers were kept for the next"
    later = [os.urandom(n) for n in (1, ALIGN + 3, BLOCK_SIZE - 1, BLOCK_SIZE + 1)]
    for i, data in enumerate(later):
        with Appender(tmp_path / f"b{i}", 0, behind=True) as out:
            assert set(map(id, out._maps)) & set(map(id, spare))  # a reused buffer
            out.write(data)
        assert (tmp_path / f"b{i}").read_bytes() == data
    assert (tmp_path / "a").read_bytes() == first
    assert 0 < appender.spare_bytes() <= appender.SPARE_BYTES
