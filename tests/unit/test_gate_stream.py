"""The egress gate's stream of a checked file: whatever the file, piece size and offset,
and wherever a byte changes after the check, it sends exactly the file from the offset,
or a prefix of it that ends before the first changed piece it reads, and then withholds
the rest (reported once); a file that shrinks or grows after the check is caught alike."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.gateway.core.errors import IntegrityError
from sluice.gateway.export import gate
from sluice.gateway.export.pieces import PieceTags

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _stream(path: Path, genuine: bytes, piece: int, offset: int) -> tuple[bytes, list[str], bool]:
    """(bytes sent from offset, reasons reported, whether it ended withheld)."""
    tags = PieceTags(piece)
    tags.feed(genuine)
    pieces = tags.finish()
    reasons: list[str] = []
    fd = os.open(path, os.O_RDONLY)
    chunks = gate._verified_chunks(
        gate._Descriptor(fd), offset, len(genuine), pieces, reasons.append
    )
    sent, at = bytearray(), offset
    try:
        for chunk_offset, data in chunks:
            assert chunk_offset == at  # in order, from the offset, nothing skipped
            sent += data
            at += len(data)
    except IntegrityError:
        return bytes(sent), reasons, True
    return bytes(sent), reasons, False


@SETTINGS
@given(
    size=st.integers(1, 3000),
    piece=st.integers(1, 700),
    at_offset=st.floats(0, 1),
    change=st.one_of(
        st.none(),
        st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
        st.tuples(st.just("shrink"), st.floats(0, 1, exclude_max=True), st.just(0)),
        st.tuples(st.just("grow"), st.just(0.0), st.integers(1, 500)),
    ),
)
def test_only_checked_bytes_leave_from_any_offset(
    tmp_path: Path,
    size: int,
    piece: int,
    at_offset: float,
    change: tuple[str, float, int] | None,
) -> None:
    genuine = os.urandom(size)
    offset = int(at_offset * size)
    path = tmp_path / "model.onnx"
    now = bytearray(genuine)
    if change is not None:
        kind, where, amount = change
        if kind == "flip":
            now[int(where * size)] ^= amount
        elif kind == "shrink":
            del now[int(where * size) :]
        else:  # grown past the checked size: the checked bytes are all still there
            now += os.urandom(amount)
    path.write_bytes(bytes(now))
    sent, reasons, withheld = _stream(path, genuine, piece, offset)
    # The model: pieces are read from the offset's on, and each leaves only if it is as
    # checked; the first that is not ends the stream.
    start = offset - offset % piece
    intact = [  # only the checked size is read: bytes grown past it never leave
        now[i : min(i + piece, size)] == genuine[i : i + piece] for i in range(start, size, piece)
    ]
    if all(intact):
        assert (sent, reasons, withheld) == (genuine[offset:], [], False)
        return
    end = start + intact.index(False) * piece  # the first changed piece's start
    assert withheld and len(reasons) == 1 and "withheld" in reasons[0]
    assert sent == genuine[offset : max(offset, end)]  # every piece before it, none after


def test_a_descriptor_is_closed_once_by_the_stream_or_its_caller(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(5000))
    tags = PieceTags(1000)
    tags.feed(path.read_bytes())
    descriptor = gate._Descriptor(os.open(path, os.O_RDONLY))
    fd = descriptor.fd
    chunks = gate._verified_chunks(descriptor, 0, 5000, tags.finish(), lambda _: None)
    next(chunks)  # one piece sent, the next read ahead
    descriptor.close()  # the caller gives up: waits for the read in flight, then closes
    assert descriptor.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(IntegrityError, match="closed during the pull"):
        list(chunks)  # nothing more is read from a closed descriptor
