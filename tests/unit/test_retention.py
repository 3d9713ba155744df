"""Retention over any history of rounds: what it keeps, what it deletes, what it audits."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluice.gateway.core.records import Round, RoundState, UpdateHeader, Version
from sluice.gateway.core.retention import REMOVED, Retention, RetentionPolicy
from sluice.gateway.store.blobs import BlobStore
from sluice.gateway.store.sqlite import Store

MODEL = "m"


@dataclass
class History:
    """What was written: rounds (ended, then one open), their updates, the versions."""

    ended: list[tuple[int, bool, list[bytes]]] = field(default_factory=list)  # round, closed?
    open_round: int = 0
    open_updates: list[bytes] = field(default_factory=list)
    versions: list[tuple[int, bytes]] = field(default_factory=list)  # version, weights
    base_of_open: int = 0


def _write(
    root: Path, outcomes: list[tuple[bool, list[int]]], open_payloads: list[int]
) -> tuple[Store, BlobStore, History]:
    """A data dir with these rounds: (closed or failed, payload ids of its updates); payloads
    come from a small pool so that some content is shared between rounds."""
    store, blobs, history = Store(root / "sluice.db"), BlobStore(root / "blobs"), History()

    def blob(data: bytes) -> str:
        return blobs.write([data])

    def push(db: object, round_no: int, base: int, payload: bytes, n: int) -> None:
        sha = blob(payload)
        header = UpdateHeader(
            f"u{round_no}-{n}", f"t{n}", "r", MODEL, round_no, base, 1, "h", sha, len(payload)
        )
        store.insert_update(db, header, 0)  # type: ignore[arg-type]

    weights = b"v0-weights"
    with store.transaction() as db:
        store.insert_version(db, Version(MODEL, 0, 0, blob(weights), 0, 0, 0, 0))
    history.versions.append((0, weights))
    version, round_no = 0, 0
    for closed, payload_ids in outcomes:
        round_no += 1
        payloads = [f"payload-{i}".encode() for i in payload_ids]
        with store.transaction() as db:
            store.insert_round(db, Round(MODEL, round_no, version, RoundState.OPEN, 0, 0))
            for n, payload in enumerate(payloads):
                push(db, round_no, version, payload, n)
            if closed:
                version += 1
                weights = f"weights-{version}".encode()
                store.insert_version(
                    db, Version(MODEL, version, round_no, blob(weights), 1, 1, 1, 0)
                )
                history.versions.append((version, weights))
                store.set_round_state(db, MODEL, round_no, RoundState.CLOSED, version=version)
            else:
                store.set_round_state(db, MODEL, round_no, RoundState.FAILED, failure="x")
        history.ended.append((round_no, closed, payloads))
    round_no += 1
    history.open_round, history.base_of_open = round_no, version
    history.open_updates = [f"payload-{i}".encode() for i in open_payloads]
    with store.transaction() as db:
        store.insert_round(db, Round(MODEL, round_no, version, RoundState.OPEN, 0, 0))
        for n, payload in enumerate(history.open_updates):
            push(db, round_no, version, payload, n)
    # The state a server optimizer keeps per version.
    for v, _ in history.versions:
        (root / "state" / MODEL / str(v)).mkdir(parents=True)
        (root / "state" / MODEL / str(v) / "m.bin").write_bytes(b"state")
    return store, blobs, history


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _on_disk(blobs: BlobStore) -> set[str]:
    return {p.name for p in blobs.root.glob("??/*")}


histories = st.tuples(
    st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 6), max_size=3)), max_size=9),
    st.lists(st.integers(0, 6), max_size=3),
    st.integers(0, 5),
    st.integers(0, 5),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories)
def test_retention_keeps_exactly_what_the_policy_and_the_open_round_need(
    case: tuple[list[tuple[bool, list[int]]], list[int], int, int],
) -> None:
    outcomes, open_payloads, keep_rounds, keep_versions = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store, blobs, history = _write(root, outcomes, open_payloads)
        try:
            policy = RetentionPolicy(keep_rounds, keep_versions)
            retention = Retention(store, blobs, root / "state")
            planned = retention.apply(policy, dry_run=True)
            assert _on_disk(blobs) == store.referenced_blobs()  # a dry run deletes nothing
            done = retention.apply(policy)
            assert [(r.what, r.number, r.bytes) for r in done] == [
                (r.what, r.number, r.bytes) for r in planned
            ]
            assert retention.apply(policy) == []  # applied again: nothing more goes

            # What must stay: the open round, the newest keep_rounds ended rounds, the
            # newest keep_versions versions and the open round's base.
            kept_rounds = history.ended[-keep_rounds:] if keep_rounds else history.ended
            needed = {_sha(p) for p in history.open_updates}
            needed |= {_sha(p) for _, _, payloads in kept_rounds for p in payloads}
            kept_versions = history.versions[-keep_versions:] if keep_versions else history.versions
            needed |= {_sha(w) for _, w in kept_versions}
            needed |= {_sha(w) for v, w in history.versions if v == history.base_of_open}
            on_disk = _on_disk(blobs)
            assert needed <= on_disk
            # ... and nothing else: every file left is one a row still needs.
            assert on_disk == store.referenced_blobs()

            # Each round's and each version's removal is one audit entry; the chain holds.
            entries = store.audit_entries(REMOVED)
            assert sorted(e.subject for e in entries) == sorted(
                f"{MODEL}/{r.what}/{r.number}" for r in done
            )
            assert store.verify_audit()[1] is None
            # Rows stay: the report's metrics and the version history.
            total = sum(len(p) for _, _, p in history.ended) + len(history.open_updates)
            assert store._all("SELECT COUNT(*) AS n FROM updates")[0]["n"] == total
            assert len(store.versions(MODEL)) == len(history.versions)
            # A removed version's optimizer state went with it.
            removed_versions = {r.number for r in done if r.what == "version"}
            for v, _ in history.versions:
                assert (root / "state" / MODEL / str(v)).exists() == (v not in removed_versions)
        finally:
            store.close()


def test_zero_keeps_everything_and_negative_is_refused(tmp_path: Path) -> None:
    store, blobs, _ = _write(tmp_path, [(True, [1, 2]), (False, [3]), (True, [4])], [5])
    try:
        before = _on_disk(blobs)
        assert Retention(store, blobs, tmp_path / "state").apply(RetentionPolicy(0, 0)) == []
        assert _on_disk(blobs) == before
    finally:
        store.close()
    with pytest.raises(ValueError, match="0 \\(keep all\\) or more"):
        RetentionPolicy(-1, 0)


def test_content_shared_with_a_kept_update_stays(tmp_path: Path) -> None:
    """Blobs are named by content: round 1's payload is also round 3's, which is kept."""
    store, blobs, _ = _write(tmp_path, [(True, [1, 2]), (True, [3]), (True, [1])], [])
    try:
        done = Retention(store, blobs, tmp_path / "state").apply(RetentionPolicy(1, 0))
        assert [(r.what, r.number) for r in done] == [("round", 1), ("round", 2)]
        assert blobs.exists(_sha(b"payload-1"))  # shared with round 3
        assert not blobs.exists(_sha(b"payload-2"))
        assert done[0].files == 1 and done[0].updates == 2
    finally:
        store.close()
