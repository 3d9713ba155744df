"""The structure hash's remembered zero runs give the hash that hashing the zeros gives."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.models.artifact import structure_hash
from sluice.models.zero_runs import MIN_RUN, ZeroRuns

# Runs around the size the cache starts at, and prefixes that repeat (so entries are hit).
RUNS = st.sampled_from([0, 1, MIN_RUN - 1, MIN_RUN, MIN_RUN + 1, (1 << 20) + 3, 3 * MIN_RUN])
PREFIXES = st.sampled_from([b"", b"a", b"b" * 63, b"b" * 64, bytes(5), b"\x00" * 130])
STEPS = st.lists(st.tuples(PREFIXES, RUNS), min_size=1, max_size=5)


def plain(steps: list[tuple[bytes, int]]) -> str:
    digest = hashlib.sha256()
    for prefix, run in steps:
        digest.update(prefix + bytes(run))
    return digest.hexdigest()


def remembered(zeros: ZeroRuns, steps: list[tuple[bytes, int]]) -> str:
    digest = hashlib.sha256()
    for prefix, run in steps:
        digest.update(prefix)
        digest = zeros.feed(digest, run)
    return digest.hexdigest()


@settings(max_examples=60, deadline=None)
@given(st.lists(STEPS, min_size=1, max_size=4), st.integers(1, 8))
def test_any_sequence_hashes_as_the_plain_bytes_whatever_is_remembered(
    sequences: list[list[tuple[bytes, int]]], capacity: int
) -> None:
    zeros = ZeroRuns(max_entries=capacity)
    for steps in sequences * 2:  # the second pass finds what the first left
        assert remembered(zeros, steps) == plain(steps)
    assert len(zeros) <= capacity


def test_a_remembered_state_is_not_shared_with_the_caller() -> None:
    zeros = ZeroRuns()
    first = zeros.feed(hashlib.sha256(b"x"), MIN_RUN)
    first.update(b"changed after")  # must not reach the remembered state
    again = zeros.feed(hashlib.sha256(b"x"), MIN_RUN)
    assert again.hexdigest() == hashlib.sha256(b"x" + bytes(MIN_RUN)).hexdigest()


def test_the_same_run_after_other_bytes_is_not_a_hit() -> None:
    zeros = ZeroRuns()
    zeros.feed(hashlib.sha256(b"x"), MIN_RUN)
    other = zeros.feed(hashlib.sha256(b"y"), MIN_RUN)
    assert other.hexdigest() == hashlib.sha256(b"y" + bytes(MIN_RUN)).hexdigest()
    assert len(zeros) == 2


def test_structure_hash_is_the_same_twice_and_ignores_values() -> None:
    class R:
        def __init__(self, start: int, end: int) -> None:
            self.start, self.end = start, end

    data = bytearray(b"head" + bytes(3 * MIN_RUN) + b"mid" + bytes(MIN_RUN) + b"tail")
    ranges = [R(4, 4 + 3 * MIN_RUN), R(7 + 3 * MIN_RUN, 7 + 4 * MIN_RUN)]
    want = hashlib.sha256(bytes(data)).hexdigest()  # the ranges hold zeros already
    assert structure_hash(memoryview(data), ranges) == want
    data[5] = data[8 + 3 * MIN_RUN] = 7  # values inside the ranges
    assert structure_hash(memoryview(data), ranges) == want  # the second call is served remembered
    data[1] = 0  # outside a range
    assert structure_hash(memoryview(data), ranges) != want
