"""The pull's file writer: whatever the sizes written, the resume point and where it is
flushed, the file holds exactly the bytes given, with O_DIRECT or without."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.clients.appender import ALIGN, Appender

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
    path: Path, writes: list[tuple[int, bool]], use_direct: bool, start: int
) -> bytes:
    prefix = os.urandom(start)
    path.write_bytes(prefix)
    want = bytearray(prefix)
    with Appender(path, start, use_direct=use_direct, block=BLOCK) as out:
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
@given(writes=WRITES, start=st.integers(0, 2 * ALIGN + 5), use_direct=st.booleans())
def test_the_file_holds_exactly_what_was_given(
    tmp_path: Path, writes: list[tuple[int, bool]], start: int, use_direct: bool
) -> None:
    path = tmp_path / "pulled.part"
    want = expected_after(path, writes, use_direct, start)
    assert path.read_bytes() == want


def test_blocks_go_direct_where_the_file_system_takes_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with Appender(path, 0, block=BLOCK) as out:
        assert out.direct == direct_works(tmp_path)
        out.write(os.urandom(3 * BLOCK + 1))
        assert out.direct == direct_works(tmp_path)  # no refusal along the way
    with Appender(path, 0, use_direct=False, block=BLOCK) as out:
        assert not out.direct


def test_a_file_system_that_refuses_direct_writes_gets_them_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
    with Appender(path, 0, block=BLOCK) as out:
        out.write(data)
        assert not out.direct  # stopped for good at the first refusal
    assert refused == [0]
    assert path.read_bytes() == data


def test_a_write_error_other_than_a_refusal_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, at: int) -> int:
        if at >= BLOCK:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = Appender(tmp_path / "f", 0, block=BLOCK)
    with pytest.raises(OSError) as raised:
        out.write(os.urandom(3 * BLOCK))
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    out.close()
    # What reached the file is a prefix of what was given: the first block, then the
    # buffered second one on close.
    assert len((tmp_path / "f").read_bytes()) == 2 * BLOCK


def test_a_block_that_is_not_aligned_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        Appender(tmp_path / "f", 0, block=ALIGN + 1)
