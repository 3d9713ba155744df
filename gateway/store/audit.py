"""Append-only, hash-chained audit log in SQLite: every entry carries the previous entry's hash."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sluice.gateway.core.errors import bounded

log = logging.getLogger(__name__)

GENESIS = "0" * 64
# Hard bounds on what one entry holds, whatever its writer passed: strings a caller chose
# (a model name, a file name, a reason quoting them) reach entries through many writers,
# and one that forgot to cut them must not cost a row (and an fsync) of megabytes. Writers
# cut to 64 characters themselves (errors.bounded); these are the last net, and are what
# is hashed, so the chain's format is unchanged.
MAX_FIELD_CHARS = 512  # of kind, actor and subject
MAX_DETAIL_CHARS = 4096  # of each string in the detail, its keys included
_CUT_SLACK = 32  # room for bounded's "...(N chars)": a string cut once is not cut again

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


def bounded_detail(detail: Mapping[str, object]) -> dict[str, object]:
    """`detail` with every string in it (keys, values, inside lists and mappings) cut to
    MAX_DETAIL_CHARS."""
    return {_bounded_key(key): _bounded_value(value) for key, value in detail.items()}


def _bounded_key(key: str) -> str:
    # A non-str key (an int: JSON writes it as text) is bounded already.
    return _cut(key, MAX_DETAIL_CHARS) if isinstance(key, str) else key


def _bounded_value(value: object) -> object:
    if isinstance(value, str):
        return _cut(value, MAX_DETAIL_CHARS)
    if isinstance(value, Mapping):
        return bounded_detail(value)
    if isinstance(value, list | tuple):
        return [_bounded_value(item) for item in value]
    return value


def bounded_field(text: str) -> str:
    """A kind, actor or subject cut to MAX_FIELD_CHARS, as append stores it."""
    return _cut(text, MAX_FIELD_CHARS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit + _CUT_SLACK else bounded(text, limit)


def append(
    db: sqlite3.Connection,
    kind: str,
    actor: str,
    subject: str,
    detail: Mapping[str, object] | None = None,
) -> AuditEntry:
    """Add an entry inside the caller's transaction (so it commits with the event it records).
    Strings over MAX_FIELD_CHARS / MAX_DETAIL_CHARS are cut (errors.bounded)."""
    last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    ts_ms = int(time.time() * 1000)
    kind, actor, subject = (bounded_field(s) for s in (kind, actor, subject))
    detail_json = json.dumps(bounded_detail(detail or {}), sort_keys=True, separators=(",", ":"))
    digest = entry_hash(seq, ts_ms, kind, actor, subject, detail_json, prev)
    db.execute(
        "INSERT INTO audit (seq, ts_ms, kind, actor, subject, detail_json, prev_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, ts_ms, kind, actor, subject, detail_json, prev, digest),
    )
    return AuditEntry(seq, ts_ms, kind, actor, subject, json.loads(detail_json), prev, digest)


def entries(
    db: sqlite3.Connection,
    kind: str = "",
    *,
    subject_prefix: str = "",
    newest_first: bool = False,
    limit: int = -1,
) -> list[AuditEntry]:
    """Entries in seq order (or newest first), of one kind, whose subject starts with
    subject_prefix, at most `limit` (-1: all)."""
    where: list[str] = []
    args: list[object] = []
    if kind:
        where.append("kind = ?")
        args.append(kind)
    if subject_prefix:
        where.append("substr(subject, 1, ?) = ?")
        args += [len(subject_prefix), subject_prefix]
    sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY seq" + (" DESC" if newest_first else "") + " LIMIT ?"
    return [_entry(r) for r in db.execute(sql, (*args, limit)).fetchall()]


def entries_after(db: sqlite3.Connection, seq: int) -> list[AuditEntry]:
    """Entries with a seq above `seq`, in order."""
    rows = db.execute("SELECT * FROM audit WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
    return [_entry(r) for r in rows]


def _entry(r: Sequence[Any]) -> AuditEntry:
    return AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else {}, r[6], r[7])


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


# The audit log, logged: every committed entry is also a line on logger "sluice.audit"
# (Store.observe_audit), a warning where something was refused, denied or went wrong.
entry_log = logging.getLogger("sluice.audit")
_WARNING_WORDS = (
    "denied", "limited", "rejected", "refused", "interrupted", "excluded", "discarded",
    "failed", "reopened", "skipped", "changed", "dropped", "removed",
)  # fmt: skip
# Detail fields lifted to the log record's own keys (JSON lines), and named in text lines.
_LIFTED = ("status", "outcome", "listener", "peer", "reason", "count")
_TEXT_CHARS = 300  # of one value in a text line (JSON lines carry the whole detail)
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


def _text(value: object) -> str:
    """A value for a text log line: control characters escaped (a caller's string cannot
    forge a line), cut to _TEXT_CHARS."""
    text = str(value).translate(_CONTROL)
    return text if len(text) <= _TEXT_CHARS else f"{text[:_TEXT_CHARS]}...({len(text)} chars)"


def log_entry(entry: AuditEntry) -> None:
    """Log one committed audit entry: kind, actor and subject, the detail's main fields,
    and (a coalesced row) how many events it stands for."""
    last = entry.kind.rsplit(".", 1)[-1]
    level = logging.WARNING if any(w in last for w in _WARNING_WORDS) else logging.INFO
    if not entry_log.isEnabledFor(level):
        return
    extra: dict[str, object] = {
        "event": entry.kind,
        "principal": entry.actor,
        "subject": entry.subject,
        "seq": entry.seq,
    }
    parts = entry.subject.split("/")
    if len(parts) >= 3 and parts[1] in ("round", "release") and entry.kind != "push.discarded":
        extra["model"] = parts[0]
        if parts[2].isdigit():
            extra["round" if parts[1] == "round" else "version"] = int(parts[2])
    named = []
    for key in _LIFTED:
        if key in entry.detail:
            extra[key] = entry.detail[key]
            named.append(f"{key}={_text(entry.detail[key])}")
    extra["detail"] = dict(entry.detail)
    message = f"{entry.kind} by {_text(entry.actor)} on {_text(entry.subject)}"
    entry_log.log(level, "%s%s", message, f" ({', '.join(named)})" if named else "", extra=extra)


Write = Callable[[str, str, str, Mapping[str, object]], object]


# The subject (and group) of the key that pools an actor's keys past its share.
OTHER_SUBJECTS = "(other subjects)"


@dataclass
class _Repeats:
    written: float  # when this key's last row was written (monotonic seconds)
    count: int  # refusals since then that no row carries yet
    detail: Mapping[str, object]  # the latest one's


class Coalescer:
    """Audit rows for repeated refusals, at most one per window per (kind, actor, subject,
    group), still counting every refusal.

    The first refusal of a key is written at once. Repeats within `window_s` of that key's
    last row are only counted; the next row of the key carries `count`: how many refusals
    it stands for since the previous row (itself included, if it is one). A background
    flusher writes the count of a window that ended with no later refusal; stop() writes
    what is left. So a flood costs one fsynced row per window, and the sum of `count`
    (1 where absent) over a key's rows is the number of refusals.

    Subjects and groups may be chosen by the caller (a model name, a round number, a
    reason that echoes them): each key and detail is cut as append cuts an entry before it
    is held, and an actor already holding `max_keys_per_actor` keys of one kind has every
    further new key counted under one key of its own, (kind, actor, OTHER_SUBJECTS,
    OTHER_SUBJECTS), whose detail names the latest subject. So a flood of distinct subjects
    from one actor still costs at most max_keys_per_actor + 1 rows per window. After
    stop(), a refusal is written at once: nothing is left uncounted.
    """

    def __init__(
        self,
        write: Write,
        window_s: float,
        *,
        max_keys: int = 4096,
        max_keys_per_actor: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.window_s = window_s
        self._max_keys = max_keys  # distinct keys held before everything is flushed
        # Of one kind, then pooled: at least every method x listener a denial can name.
        self._max_keys_per_actor = max(max_keys_per_actor, 1)
        self._per_actor: dict[tuple[str, str], int] = {}  # (kind, actor) -> keys held
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str, str, str], _Repeats] = {}
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None

    def record(
        self,
        kind: str,
        actor: str,
        subject: str,
        detail: Mapping[str, object],
        group: str = "",
    ) -> None:
        # Bounded as append bounds them, before anything is held: a key or detail of
        # megabytes would otherwise sit here for a window, up to max_keys of them.
        kind, actor, subject, group = (bounded_field(s) for s in (kind, actor, subject, group))
        detail = bounded_detail(detail)
        key = (kind, actor, subject, group)
        now = self._clock()
        if self._stop.is_set():  # stopped: no flusher, nothing may wait for one
            self._emit(key, detail)
            return
        with self._lock:
            held = self._keys.get(key)
            if held is None and self._per_actor.get((kind, actor), 0) >= self._max_keys_per_actor:
                # Subjects the actor chooses: past its share, all are counted as one key.
                key = (kind, actor, OTHER_SUBJECTS, OTHER_SUBJECTS)
                detail = {**detail, "subject": subject[:128]}
                held = self._keys.get(key)
            if held is not None and now - held.written < self.window_s:
                held.count += 1
                held.detail = detail
                return
            pending = held.count if held is not None else 0
            if held is None and len(self._keys) >= self._max_keys:
                overflow = self._take(lambda _: True, now)
                self._keys.clear()
                self._per_actor.clear()
            else:
                overflow = []
            if held is None:
                self._per_actor[(kind, actor)] = self._per_actor.get((kind, actor), 0) + 1
            self._keys[key] = _Repeats(now, 0, detail)
        for row in overflow:
            self._emit(*row)
        self._emit(key, {**detail, "count": pending + 1} if pending else detail)

    def flush(self, *, everything: bool = False) -> None:
        """Write the counts of windows that have ended (all of them with everything=True)."""
        now = self._clock()
        with self._lock:
            rows = self._take(lambda held: everything or now - held.written >= self.window_s, now)
        for row in rows:
            self._emit(*row)

    def start(self) -> None:
        self._flusher = threading.Thread(target=self._run, name="audit-coalescer", daemon=True)
        self._flusher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        self.flush(everything=True)

    def _run(self) -> None:
        while not self._stop.wait(timeout=self.window_s / 2):
            self.flush()

    def _take(
        self, due: Callable[[_Repeats], bool], now: float
    ) -> list[tuple[tuple[str, str, str, str], Mapping[str, object]]]:
        """Rows for the due keys' counts (under the lock); keys with nothing pending go."""
        rows: list[tuple[tuple[str, str, str, str], Mapping[str, object]]] = []
        for key, held in list(self._keys.items()):
            if not due(held):
                continue
            if held.count:
                rows.append((key, {**held.detail, "count": held.count}))
                held.count, held.written = 0, now
            else:
                del self._keys[key]
                left = self._per_actor.get(key[:2], 0) - 1
                if left > 0:
                    self._per_actor[key[:2]] = left
                else:
                    self._per_actor.pop(key[:2], None)
        return rows

    def _emit(self, key: tuple[str, str, str, str], detail: Mapping[str, object]) -> None:
        kind, actor, subject, _ = key
        try:
            self._write(kind, actor, subject, detail)
        except Exception:  # a full disk: the refusal itself must still be answered
            log.exception("could not audit %s of %s on %s", kind, actor, subject)
