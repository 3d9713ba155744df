"""Piece tags: the egress gate's proof that what it sends is what the guard read.

However a file is fed (any cut of its bytes), its tags match each of its pieces and no
changed one; checked against them, the same bytes pass and a changed byte anywhere, a
missing or an extra byte is named by the piece it lies in.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.gateway.export.pieces import PieceCheck, Pieces, PieceTags

FILES = {
    "data": st.binary(max_size=5000),
    "size": st.integers(1, 700),
    "cuts": st.lists(st.integers(0, 5000), max_size=6),
}


def _fed(target: PieceTags | PieceCheck, data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    for a, b in itertools.pairwise(bounds):
        target.feed(memoryview(data)[a:b])


def _tagged(data: bytes, size: int, cuts: list[int]) -> Pieces:
    tags = PieceTags(size)
    _fed(tags, data, cuts)
    return tags.finish()


@given(**FILES)
@settings(max_examples=200, deadline=None)
def test_tags_match_each_piece_however_the_bytes_are_fed(
    data: bytes, size: int, cuts: list[int]
) -> None:
    pieces = _tagged(data, size, cuts)
    assert len(pieces) == -(-len(data) // size)
    for i in range(len(pieces)):
        assert pieces.matches(i, data[i * size : (i + 1) * size])
    assert not pieces.matches(len(pieces), b"")
    assert not pieces.matches(-1, data[-size:])
    check = PieceCheck(pieces)
    _fed(check, data, cuts[::-1])
    assert check.whole()


@given(**FILES, where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
@settings(max_examples=200, deadline=None)
def test_a_changed_byte_anywhere_is_named_by_its_piece(
    data: bytes, size: int, cuts: list[int], where: float, flip: int
) -> None:
    if not data:
        data = b"\0"
    pieces = _tagged(data, size, cuts)
    at = int(where * len(data))
    changed = bytearray(data)
    changed[at] ^= flip
    index = at // size
    assert not pieces.matches(index, bytes(changed[index * size : (index + 1) * size]))
    check = PieceCheck(pieces)
    _fed(check, bytes(changed), cuts)
    assert not check.whole()
    assert check.first_bad == index


@given(**FILES, cut=st.integers(1, 800), extra=st.binary(min_size=1, max_size=800))
@settings(max_examples=200, deadline=None)
def test_a_shorter_or_longer_file_never_checks_whole(
    data: bytes, size: int, cuts: list[int], cut: int, extra: bytes
) -> None:
    pieces = _tagged(data, size, cuts)
    for other in (data[: max(0, len(data) - cut)], data + extra):
        if other == data:
            continue
        check = PieceCheck(pieces)
        _fed(check, other, cuts)
        assert not check.whole()
        assert check.first_bad is not None
        assert check.first_bad <= len(data) // size


def test_every_piece_has_its_own_key_and_no_two_files_share_one() -> None:
    data = os.urandom(10 * 1024)
    a, b = _tagged(data, 1024, []), _tagged(data, 1024, [])
    assert len(set(a.keys)) == len(a) == len(set(a.keys) | set(b.keys)) // 2 == 10
    assert not set(a.tags) & set(b.tags)  # the same bytes, other keys: other tags
    assert not a.matches(1, data[:1024])  # piece 0's bytes are not piece 1


def test_a_piece_holds_at_least_one_byte() -> None:
    with pytest.raises(ValueError, match="at least one byte"):
        PieceTags(0)


def test_the_keys_and_tags_never_show_in_a_repr() -> None:
    """A message or an audit row that quotes the pieces must not hand out their keys: with
    a key, changed bytes can be given a matching tag."""
    pieces = _tagged(os.urandom(5000), 1000, [])
    shown = repr(pieces) + str(pieces)
    for secret in (*pieces.keys, *pieces.tags):
        assert secret.hex() not in shown and repr(secret) not in shown


def test_the_cache_keeps_only_whole_files_and_the_most_recent() -> None:
    from sluice.gateway.export.pieces import PieceCache

    cache = PieceCache(entries=2)
    data = os.urandom(2500)
    pieces = _tagged(data, 1000, [])
    with pytest.raises(ValueError, match="3 tags for 4000 bytes"):
        cache.put("a" * 64, 4000, pieces)  # tags of part of a file prove nothing of the rest
    for name in "abc":
        cache.put(name * 64, len(data), pieces)
    assert cache.get("a" * 64, 1000) is None  # the oldest went
    assert cache.get("c" * 64, 1000) is pieces
    assert cache.get("c" * 64, 999) is None  # by piece size too
