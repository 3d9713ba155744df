"""The guard's streamed file check: hashed in a worker, two buffers, any buffer size.

Whatever the buffer size and wherever a changed byte or a non-finite value lies, the
check accepts exactly the file the manifest names, refuses anything else, and hands the
egress gate tags of exactly the pieces it read. Checked against those tags instead of the
sha256 (a later pull), it accepts the same bytes and refuses a changed one anywhere.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.gateway.core.finite import FiniteCheck
from sluice.gateway.export import guard
from sluice.gateway.export.guard import FILES, VALUES, GuardRefused
from sluice.gateway.export.pieces import Pieces, PieceTags
from sluice.models.schema import Schema, TensorSpec

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _check(
    directory: Path,
    data: bytes,
    sha256: str,
    values: FiniteCheck | None = None,
    pieces: PieceTags | None = None,
    known: Pieces | None = None,
) -> None:
    (directory / "model.onnx.data").write_bytes(data)
    fd = os.open(directory, os.O_RDONLY)
    try:
        guard._read_checked(fd, "model.onnx.data", len(data), sha256, values, pieces, known)
    finally:
        os.close(fd)


def _whole(
    directory: Path,
    data: bytes,
    sha256: str,
    pieces: PieceTags | None = None,
    known: Pieces | None = None,
) -> memoryview:
    (directory / "model.onnx").write_bytes(data)
    fd = os.open(directory, os.O_RDONLY)
    try:
        return guard._read_whole(fd, "model.onnx", len(data), sha256, pieces, known)
    finally:
        os.close(fd)


def _floats(count: int) -> Schema:
    return Schema((TensorSpec("w", (count,), "<f4"),))


@SETTINGS
@given(
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=400),
    read_bytes=st.integers(1, 300),
    piece=st.integers(1, 500),
)
def test_the_named_file_passes_with_the_pieces_a_plain_read_gives(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    values: list[float],
    read_bytes: int,
    piece: int,
) -> None:
    monkeypatch.setattr(guard, "_READ_BYTES", read_bytes)
    data = np.asarray(values, "<f4").tobytes()
    pieces = PieceTags(piece)
    _check(
        tmp_path, data, hashlib.sha256(data).hexdigest(), FiniteCheck(_floats(len(values))), pieces
    )
    _assert_tags_of(pieces.finish(), data)


def _assert_tags_of(pieces: Pieces, data: bytes) -> None:
    """pieces are the tags of exactly data's pieces."""
    size = pieces.size
    assert len(pieces) == -(-len(data) // size)
    for i in range(len(pieces)):
        assert pieces.matches(i, data[i * size : (i + 1) * size])


# A file of `size` bytes read `read_bytes` at a time, one byte (at `where`) xor `flip`.
CHANGED_BYTE = {
    "size": st.integers(1, 2000),
    "read_bytes": st.integers(1, 300),
    "where": st.floats(0, 1, exclude_max=True),
    "flip": st.integers(1, 255),
}


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "read whole"])
@SETTINGS
@given(**CHANGED_BYTE)
def test_a_changed_byte_anywhere_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    whole: bool,
    size: int,
    read_bytes: int,
    where: float,
    flip: int,
) -> None:
    """A data file streamed through two buffers, or a single-file model.onnx read whole
    into a private buffer: a changed byte anywhere, at any part size, is refused as a
    changed file (before any check of a model.onnx looks at its bytes)."""
    monkeypatch.setattr(guard, "_READ_BYTES", read_bytes)
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    changed = bytearray(data)
    changed[int(where * size)] ^= flip
    read = _whole if whole else _check
    with pytest.raises(GuardRefused) as refused:
        read(tmp_path, bytes(changed), hashlib.sha256(data).hexdigest())
    assert refused.value.layers == (FILES,)
    assert "sha256" in str(refused.value)


@SETTINGS
@given(
    count=st.integers(1, 300),
    read_bytes=st.integers(1, 300),
    where=st.floats(0, 1, exclude_max=True),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
def test_a_non_finite_value_in_any_buffer_is_refused_by_name(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
    read_bytes: int,
    where: float,
    bad: float,
) -> None:
    monkeypatch.setattr(guard, "_READ_BYTES", read_bytes)
    weights = np.ones(count, "<f4")
    weights[int(where * count)] = bad
    data = weights.tobytes()
    with pytest.raises(GuardRefused) as refused:
        _check(tmp_path, data, hashlib.sha256(data).hexdigest(), FiniteCheck(_floats(count)))
    assert refused.value.layers == (VALUES,)
    assert f"tensor 'w': element {int(where * count)} is" in str(refused.value)


def test_a_file_of_another_size_is_refused_before_it_is_read(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.data").write_bytes(b"x" * 10)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(GuardRefused, match="10 bytes, the manifest says 11"):
            guard._read_checked(fd, "model.onnx.data", 11, "0" * 64)
    finally:
        os.close(fd)


@SETTINGS
@given(size=st.integers(1, 2000), read_bytes=st.integers(1, 300), piece=st.integers(1, 500))
def test_a_single_file_read_whole_is_exactly_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, read_bytes: int, piece: int
) -> None:
    """model.onnx of a single-file release, read into a private buffer and hashed as read:
    whatever the part size, the checks get exactly the bytes that hashed to the manifest's
    sha256, and the gate the piece digests a plain read gives."""
    monkeypatch.setattr(guard, "_READ_BYTES", read_bytes)
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    pieces = PieceTags(piece)
    assert bytes(_whole(tmp_path, data, hashlib.sha256(data).hexdigest(), pieces)) == data
    _assert_tags_of(pieces.finish(), data)


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "read whole"])
@SETTINGS
@given(**CHANGED_BYTE, piece=st.integers(1, 500), tagged_with=st.integers(1, 300))
def test_checked_against_earlier_tags_the_same_bytes_pass_and_a_changed_one_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    whole: bool,
    size: int,
    read_bytes: int,
    where: float,
    flip: int,
    piece: int,
    tagged_with: int,
) -> None:
    """A later pull checks a file against the tags its first check recorded, not its
    sha256 (the gate passes them as `known`): at any part size, however the first check
    read it, the same bytes pass and a changed byte anywhere is refused as a changed
    file, by the piece it lies in. The sha256 given is wrong on purpose: it is not read."""
    data = os.urandom(size)
    monkeypatch.setattr(guard, "_READ_BYTES", tagged_with)
    tags = PieceTags(piece)
    read = _whole if whole else _check
    read(tmp_path, data, hashlib.sha256(data).hexdigest(), pieces=tags)
    known = tags.finish()
    monkeypatch.setattr(guard, "_READ_BYTES", read_bytes)
    got = read(tmp_path, data, "0" * 64, known=known)
    if whole:
        assert got is not None and bytes(got) == data
    changed = bytearray(data)
    changed[int(where * size)] ^= flip
    with pytest.raises(GuardRefused) as refused:
        read(tmp_path, bytes(changed), hashlib.sha256(changed).hexdigest(), known=known)
    assert refused.value.layers == (FILES,)
    assert f"piece {int(where * size) // piece} differs" in str(refused.value)


def test_tags_of_another_file_size_are_refused(tmp_path: Path) -> None:
    """Tags of a longer or shorter file than the one read never pass (the size check
    comes first in a release; this is the check's own guarantee)."""
    data = os.urandom(3000)
    tags = PieceTags(1000)
    tags.feed(data)
    known = tags.finish()
    for other in (data[:2500], data[:2000], data + b"x"):
        with pytest.raises(GuardRefused, match="differs"):
            _check(tmp_path, other, "0" * 64, known=known)
