"""Append-only, hash-chained audit log in SQLite: every entry carries the previous entry's hash."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass

GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
-- Append-only for everyone who goes through SQLite's front door; the chain catches the rest.
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts_ms: int
    kind: str  # e.g. "push.accepted", "release.published", "egress.pull"
    actor: str  # who: a trainer, "gateway", an egress peer
    subject: str  # what: "drivenet/round/3", "drivenet/release/2/model.onnx"
    detail: Mapping[str, object]
    prev_hash: str
    hash: str


def entry_hash(
    seq: int, ts_ms: int, kind: str, actor: str, subject: str, detail_json: str, prev_hash: str
) -> str:
    doc = [seq, ts_ms, kind, actor, subject, detail_json, prev_hash]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def append(
    db: sqlite3.Connection,
    kind: str,
    actor: str,
    subject: str,
    detail: Mapping[str, object] | None = None,
) -> AuditEntry:
    """Add an entry inside the caller's transaction (so it commits with the event it records)."""
    last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    ts_ms = int(time.time() * 1000)
    detail_json = json.dumps(dict(detail or {}), sort_keys=True, separators=(",", ":"))
    digest = entry_hash(seq, ts_ms, kind, actor, subject, detail_json, prev)
    db.execute(
        "INSERT INTO audit (seq, ts_ms, kind, actor, subject, detail_json, prev_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, ts_ms, kind, actor, subject, detail_json, prev, digest),
    )
    return AuditEntry(seq, ts_ms, kind, actor, subject, json.loads(detail_json), prev, digest)


def entries(db: sqlite3.Connection, kind: str = "") -> list[AuditEntry]:
    sql = "SELECT * FROM audit" + (" WHERE kind = ?" if kind else "") + " ORDER BY seq"
    rows = db.execute(sql, (kind,) if kind else ()).fetchall()
    return [
        AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else {}, r[6], r[7])
        for r in rows
    ]


def verify_chain(db: sqlite3.Connection) -> tuple[int, str | None]:
    """(entries checked, None) if intact, else (index, why) naming the first broken entry."""
    prev, expected_seq, count = GENESIS, 1, 0
    for row in db.execute(
        "SELECT seq, ts_ms, kind, actor, subject, detail_json, prev_hash, hash"
        " FROM audit ORDER BY seq"
    ):
        seq, ts_ms, kind, actor, subject, detail_json, prev_hash, digest = row
        if seq != expected_seq:
            return count, f"entry {expected_seq} is missing (next entry is {seq})"
        if prev_hash != prev:
            return count, f"entry {seq} ({kind}): previous-hash link broken"
        if entry_hash(seq, ts_ms, kind, actor, subject, detail_json, prev_hash) != digest:
            return count, f"entry {seq} ({kind}): contents do not match its hash"
        prev, expected_seq, count = digest, seq + 1, count + 1
    return count, None
