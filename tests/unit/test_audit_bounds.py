"""The audit layer bounds what one entry, and one coalesced key, can hold, whatever its
writer passed: a caller's string of megabytes is cut, the chain still verifies, and what
was within the bounds is stored exactly."""

from __future__ import annotations

import gc
import json
import sqlite3
import tracemalloc
from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.gateway.store import audit
from sluice.gateway.store.audit import MAX_DETAIL_CHARS, MAX_FIELD_CHARS, Coalescer

# What errors.bounded adds to a cut string: "...(N chars)".
SUFFIX_CHARS = 32


def _db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.executescript(audit.SCHEMA)
    return db


def _repeated(piece: str, times: int) -> str:
    return piece * times


# Any characters, at any length up to well past the bounds (a short text repeated).
TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(_repeated, st.text(min_size=1, max_size=8), st.integers(1, 20_000)),
)
DETAIL = st.recursive(
    st.one_of(TEXT, st.integers(), st.booleans(), st.none()),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def strings(value: object) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*strings(k), *strings(v))]
    if isinstance(value, list | tuple):
        return [s for item in value for s in strings(item)]
    return []


def within(text: str, limit: int) -> bool:
    return len(text) <= limit + SUFFIX_CHARS


@settings(max_examples=60, deadline=None, database=None)
@given(
    kind=TEXT,
    actor=TEXT,
    subject=TEXT,
    detail=st.dictionaries(TEXT, DETAIL, max_size=5),
)
def test_an_entry_holds_bounded_strings_and_still_chains(
    kind: str, actor: str, subject: str, detail: dict[str, Any]
) -> None:
    db = _db()
    audit.append(db, "first", "gateway", "gateway", {})
    entry = audit.append(db, kind, actor, subject, detail)
    row = db.execute("SELECT kind, actor, subject, detail_json FROM audit WHERE seq = 2").fetchone()
    assert row[:3] == (entry.kind, entry.actor, entry.subject)  # the entry is what is stored
    assert json.loads(row[3]) == entry.detail
    for given_text, stored in zip((kind, actor, subject), row[:3], strict=True):
        assert within(stored, MAX_FIELD_CHARS)
        if len(given_text) <= MAX_FIELD_CHARS:
            assert stored == given_text  # nothing within the bound is changed
    assert all(within(s, MAX_DETAIL_CHARS) for s in strings(json.loads(row[3])))
    if all(len(s) <= MAX_DETAIL_CHARS for s in strings(detail)):
        assert json.loads(row[3]) == json.loads(json.dumps(detail))
    audit.append(db, "last", "gateway", "gateway", {})
    assert audit.verify_chain(db) == (3, None)


def test_a_cut_string_says_how_long_it_was() -> None:
    db = _db()
    entry = audit.append(db, "k", "a", "s" * 10**6, {"model": "m" * 10**6})
    assert entry.subject.startswith("s" * 64) and entry.subject.endswith("(1000000 chars)")
    assert str(entry.detail["model"]).endswith("(1000000 chars)")
    # Cut once (by a writer, or the coalescer), never again: the length stays the first one.
    again = audit.append(db, "k", "a", entry.subject, dict(entry.detail))
    assert (again.subject, again.detail) == (entry.subject, entry.detail)


def test_a_coalescer_holds_bounded_keys_and_details_only() -> None:
    """Distinct actors each flooding with a megabyte subject, group and detail: what the
    coalescer holds for the window, and what it writes, stays small."""
    written: list[tuple[str, str, str, Mapping[str, object]]] = []
    coalescer = Coalescer(lambda *row: written.append(row), window_s=3600)
    huge = 1 << 20
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(64):
            big = f"{i}" + "x" * huge
            coalescer.record("egress.list", f"reader-{i}", big, {"asked": {"model": big}}, big)
            coalescer.record("egress.list", f"reader-{i}", big, {"reason": big}, big)  # counted
            del big
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 << 20, f"the coalescer holds {held} bytes for 64 keys"
    coalescer.flush(everything=True)
    assert len(written) == 128  # one at once and one count per key: nothing lost
    for _, _, subject, detail in written:
        assert within(subject, MAX_FIELD_CHARS)
        assert all(within(s, MAX_DETAIL_CHARS) for s in strings(detail))
