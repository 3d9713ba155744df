"""SQLite (WAL) store for rounds, committed updates, versions and releases."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sluice.gateway.core.errors import storage_fault
from sluice.gateway.core.records import (
    CommittedUpdate,
    Release,
    ReleaseFile,
    Round,
    RoundState,
    UpdateHeader,
    Version,
)
from sluice.gateway.store import audit

log = logging.getLogger(__name__)

_ROUNDS = """
CREATE TABLE IF NOT EXISTS {name} (
    model TEXT NOT NULL,
    round INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'aggregating', 'closed', 'failed')),
    opened_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    closed_ms INTEGER,
    version INTEGER,
    failure TEXT,
    PRIMARY KEY (model, round)
);
"""
_SCHEMA = (
    _ROUNDS.format(name="rounds")
    + """CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    round INTEGER NOT NULL,
    trainer TEXT NOT NULL,
    region TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics_json TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    payload_bytes INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    removed_ms INTEGER
);
CREATE INDEX IF NOT EXISTS updates_round ON updates (model, round);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    round INTEGER NOT NULL,
    weights_sha256 TEXT NOT NULL,
    num_trainers INTEGER NOT NULL,
    num_regions INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    removed_ms INTEGER,
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS revoked (
    serial_hex TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    reason TEXT NOT NULL,
    revoked_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    round INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    num_trainers INTEGER NOT NULL,
    files_json TEXT NOT NULL,
    manifest_json BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (model, version)
);
"""
)
_ROUND_COLUMNS = "model, round, base_version, state, opened_ms, deadline_ms, closed_ms, version"
# SQLite integers are signed 64-bit: a larger key names no row (and would raise OverflowError).
_SQL_INT = range(-(1 << 63), 1 << 63)


def _release_files(text: object) -> tuple[ReleaseFile, ...]:
    """A release row's file list; none when the column is not one (the row then disagrees
    with its signed manifest and is withheld)."""
    try:
        files = json.loads(text) if isinstance(text, str | bytes) else None
        if not isinstance(files, list):
            return ()
        return tuple(ReleaseFile(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in files)
    except (TypeError, ValueError, KeyError, RecursionError):
        return ()


def _blob(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else b""


MAX_DEFERRED = 1000  # audit entries a full disk refused, kept until a write succeeds again


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database written by an older Sluice up to this schema."""
    for table in ("updates", "versions"):
        # Retention (core/retention.py) marks what it removed; the rows stay.
        columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if "removed_ms" not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN removed_ms INTEGER")
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'rounds'")
    if "'failed'" not in row.fetchone()[0]:
        # Rounds can fail since (state 'failed', and why): SQLite cannot alter a CHECK
        # constraint, so the table is rebuilt, as its documentation describes.
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_ROUNDS.format(name="rounds_new"))
            db.execute(
                f"INSERT INTO rounds_new ({_ROUND_COLUMNS}) SELECT {_ROUND_COLUMNS} FROM rounds"
            )
            db.execute("DROP TABLE rounds")
            db.execute("ALTER TABLE rounds_new RENAME TO rounds")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


class Store:
    """One connection guarded by a lock: writes are short and SQLite serialises them anyway."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        _migrate(self._db)
        self._db.executescript(audit.SCHEMA)
        self._deferred: list[tuple[str, str, str, dict[str, object]]] = []
        self._deferred_dropped = 0
        # Called with every audit entry once its transaction has committed (logs, metrics).
        self._observers: list[Callable[[audit.AuditEntry], None]] = []

    def observe_audit(self, observer: Callable[[audit.AuditEntry], None]) -> None:
        """Call `observer` with each audit entry after it commits, however it was appended
        (record, record_soon, audit.append inside a transaction, a deferred entry), never
        for one rolled back; outside the store's lock, in the committing thread."""
        with self._lock:
            self._observers.append(observer)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # The write lock is held: entries past this one are this transaction's.
                last = self._last_seq() if self._observers else None
                deferred = self._write_deferred()
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # After some errors (a full disk, even at COMMIT) SQLite has rolled back
                # already, and ROLLBACK would fail; after others the transaction is open.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            del self._deferred[:deferred]
            if deferred:
                self._deferred_dropped = 0
            added = audit.entries_after(self._db, last) if last is not None else []
            observers = list(self._observers)
        for entry in added:
            for observer in observers:
                try:
                    observer(entry)
                except Exception:  # a log or metric must never fail a committed write
                    log.exception("audit observer failed on entry %d", entry.seq)

    def _last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return int(row[0]) if row else 0

    def holds_deferred(self) -> bool:
        """Whether audit entries the disk refused are still waiting (record_soon)."""
        with self._lock:
            return bool(self._deferred)

    def _write_deferred(self) -> int:
        """Append the audit entries a full disk refused, in the transaction that opened."""
        for kind, actor, subject, detail in self._deferred:
            audit.append(self._db, kind, actor, subject, detail)
        if self._deferred and self._deferred_dropped:
            detail = {"dropped": self._deferred_dropped, "reason": "the disk was full"}
            audit.append(self._db, "audit.deferred_dropped", "gateway", "audit", detail)
        return len(self._deferred)

    def _one(self, sql: str, *args: object) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
            return row

    def _all(self, sql: str, *args: object) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # rounds

    def _round(self, row: sqlite3.Row) -> Round:
        # Trainers, not updates: one trainer is never a quorum.
        accepted = self._one(
            "SELECT COUNT(DISTINCT trainer) AS n FROM updates WHERE model = ? AND round = ?",
            row["model"],
            row["round"],
        )
        return Round(
            model=row["model"],
            round=row["round"],
            base_version=row["base_version"],
            state=RoundState(row["state"]),
            opened_ms=row["opened_ms"],
            deadline_ms=row["deadline_ms"],
            accepted=accepted["n"] if accepted else 0,
            version=row["version"],
            failure=row["failure"] or "",
        )

    def get_round(self, model: str, round_no: int) -> Round | None:
        if round_no not in _SQL_INT:
            return None
        row = self._one("SELECT * FROM rounds WHERE model = ? AND round = ?", model, round_no)
        return self._round(row) if row else None

    def latest_round(self, model: str) -> Round | None:
        row = self._one("SELECT * FROM rounds WHERE model = ? ORDER BY round DESC LIMIT 1", model)
        return self._round(row) if row else None

    def latest_failed_round(self, model: str) -> Round | None:
        row = self._one(
            "SELECT * FROM rounds WHERE model = ? AND state = ? ORDER BY round DESC LIMIT 1",
            model,
            str(RoundState.FAILED),
        )
        return self._round(row) if row else None

    def round_counts(self) -> list[tuple[str, str, int]]:
        """(model, state, rounds in that state), for the metrics."""
        rows = self._all("SELECT model, state, COUNT(*) AS n FROM rounds GROUP BY model, state")
        return [(r["model"], r["state"], int(r["n"])) for r in rows]

    def newest(self, table: str) -> dict[str, int]:
        """model -> its newest version in `versions` or `releases`, for the metrics."""
        if table not in ("versions", "releases"):
            raise ValueError(f"no table {table!r} of versions")
        rows = self._all(f"SELECT model, MAX(version) AS v FROM {table} GROUP BY model")
        return {r["model"]: int(r["v"]) for r in rows}

    def rounds_in_state(self, state: RoundState) -> list[Round]:
        rows = self._all("SELECT * FROM rounds WHERE state = ? ORDER BY model, round", str(state))
        return [self._round(r) for r in rows]

    @staticmethod
    def insert_round(db: sqlite3.Connection, r: Round) -> None:
        db.execute(
            "INSERT INTO rounds (model, round, base_version, state, opened_ms, deadline_ms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (r.model, r.round, r.base_version, str(r.state), r.opened_ms, r.deadline_ms),
        )

    @staticmethod
    def set_round_state(
        db: sqlite3.Connection,
        model: str,
        round_no: int,
        state: RoundState,
        *,
        closed_ms: int | None = None,
        version: int | None = None,
        failure: str | None = None,
    ) -> None:
        db.execute(
            "UPDATE rounds SET state = ?, closed_ms = COALESCE(?, closed_ms),"
            " version = COALESCE(?, version), failure = COALESCE(?, failure)"
            " WHERE model = ? AND round = ?",
            (str(state), closed_ms, version, failure, model, round_no),
        )

    @staticmethod
    def rebase_round(
        db: sqlite3.Connection, model: str, round_no: int, base_version: int, deadline_ms: int
    ) -> None:
        """Move an open round onto another base version (an imported one), with a new deadline."""
        db.execute(
            "UPDATE rounds SET base_version = ?, deadline_ms = ?"
            " WHERE model = ? AND round = ? AND state = 'open'",
            (base_version, deadline_ms, model, round_no),
        )

    @staticmethod
    def extend_deadline(
        db: sqlite3.Connection, model: str, round_no: int, deadline_ms: int
    ) -> None:
        db.execute(
            "UPDATE rounds SET deadline_ms = ? WHERE model = ? AND round = ?",
            (deadline_ms, model, round_no),
        )

    # updates

    @staticmethod
    def _update(row: sqlite3.Row) -> CommittedUpdate:
        return CommittedUpdate(
            seq=row["seq"],
            update_id=row["update_id"],
            trainer=row["trainer"],
            region=row["region"],
            round=row["round"],
            num_examples=row["num_examples"],
            payload_sha256=row["payload_sha256"],
            metrics=json.loads(row["metrics_json"]),
            base_version=row["base_version"],
        )

    def find_update(self, update_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM updates WHERE update_id = ?", update_id)

    def trainer_update(self, model: str, round_no: int, trainer: str) -> str | None:
        """The id of the trainer's update in that round, if it has one."""
        row = self._one(
            "SELECT update_id FROM updates WHERE model = ? AND round = ? AND trainer = ?"
            " ORDER BY seq LIMIT 1",
            model,
            round_no,
            trainer,
        )
        return str(row["update_id"]) if row else None

    def round_updates(self, model: str, round_no: int) -> list[CommittedUpdate]:
        rows = self._all(
            "SELECT * FROM updates WHERE model = ? AND round = ? ORDER BY seq", model, round_no
        )
        return [self._update(r) for r in rows]

    @staticmethod
    def insert_update(db: sqlite3.Connection, h: UpdateHeader, received_ms: int) -> None:
        db.execute(
            "INSERT INTO updates (update_id, model, round, trainer, region, base_version,"
            " num_examples, metrics_json, payload_sha256, payload_bytes, received_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                h.update_id,
                h.model,
                h.round,
                h.trainer,
                h.region,
                h.base_version,
                h.num_examples,
                json.dumps(dict(h.metrics), sort_keys=True),
                h.payload_sha256,
                h.payload_bytes,
                received_ms,
            ),
        )

    # versions

    @staticmethod
    def _version(row: sqlite3.Row) -> Version:
        return Version(**{k: row[k] for k in row.keys()})  # noqa: SIM118 - Row has no __iter__ of keys

    def get_version(self, model: str, version: int) -> Version | None:
        if version not in _SQL_INT:
            return None
        row = self._one("SELECT * FROM versions WHERE model = ? AND version = ?", model, version)
        return self._version(row) if row else None

    def latest_version(self, model: str) -> Version | None:
        row = self._one(
            "SELECT * FROM versions WHERE model = ? ORDER BY version DESC LIMIT 1", model
        )
        return self._version(row) if row else None

    @staticmethod
    def insert_version(db: sqlite3.Connection, v: Version) -> None:
        db.execute(
            "INSERT OR REPLACE INTO versions (model, version, round, weights_sha256, num_trainers,"
            " num_regions, num_examples, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                v.model,
                v.version,
                v.round,
                v.weights_sha256,
                v.num_trainers,
                v.num_regions,
                v.num_examples,
                v.created_ms,
            ),
        )

    # releases

    @staticmethod
    def _release(row: sqlite3.Row) -> Release:
        """The row as it stands. A row edited behind the gateway's back (a file list that is
        not JSON, text where bytes belong) still parses, to what it holds or to nothing: the
        egress gate decides from the signed manifest and withholds a row that disagrees, so
        one bad row must not make every listing fail."""
        return Release(
            model=row["model"],
            version=row["version"],
            round=row["round"],
            created_ms=row["created_ms"],
            num_trainers=row["num_trainers"],
            files=_release_files(row["files_json"]),
            manifest_json=_blob(row["manifest_json"]),
            signature=_blob(row["signature"]),
        )

    def list_releases(self, model: str = "") -> list[Release]:
        if model:
            rows = self._all("SELECT * FROM releases WHERE model = ? ORDER BY version DESC", model)
        else:
            rows = self._all("SELECT * FROM releases ORDER BY model, version DESC")
        return [self._release(r) for r in rows]

    def get_release(self, model: str, version: int) -> Release | None:
        """The release of that version; 0: the newest."""
        if version not in _SQL_INT:
            return None
        if version == 0:
            row = self._one(
                "SELECT * FROM releases WHERE model = ? ORDER BY version DESC LIMIT 1", model
            )
        else:
            row = self._one(
                "SELECT * FROM releases WHERE model = ? AND version = ?", model, version
            )
        return self._release(row) if row else None

    @staticmethod
    def insert_release(db: sqlite3.Connection, r: Release) -> None:
        files = json.dumps([f.__dict__ for f in r.files], sort_keys=True)
        db.execute(
            "INSERT OR REPLACE INTO releases (model, version, round, created_ms, num_trainers,"
            " files_json, manifest_json, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.model,
                r.version,
                r.round,
                r.created_ms,
                r.num_trainers,
                files,
                r.manifest_json,
                r.signature,
            ),
        )

    def released_versions(self) -> set[tuple[str, int]]:
        return {
            (r["model"], r["version"]) for r in self._all("SELECT model, version FROM releases")
        }

    def referenced_blobs(self) -> set[str]:
        """Every blob a row still needs (retention's removed rows need none)."""
        rows = self._all(
            "SELECT payload_sha256 AS h FROM updates WHERE removed_ms IS NULL"
            " UNION SELECT weights_sha256 FROM versions WHERE removed_ms IS NULL"
        )
        return {r["h"] for r in rows}

    # retention (core/retention.py)

    def ended_rounds_with_updates(self, model: str) -> list[int]:
        """Closed or failed rounds of the model that still hold spooled updates, newest first."""
        rows = self._all(
            "SELECT r.round AS n FROM rounds r"
            " WHERE r.model = ? AND r.state IN ('closed', 'failed')"
            " AND EXISTS (SELECT 1 FROM updates u WHERE u.model = r.model AND u.round = r.round"
            " AND u.removed_ms IS NULL) ORDER BY r.round DESC",
            model,
        )
        return [int(r["n"]) for r in rows]

    def ended_rounds(self, model: str) -> list[int]:
        """Every closed or failed round of the model, newest first."""
        rows = self._all(
            "SELECT round FROM rounds WHERE model = ? AND state IN ('closed', 'failed')"
            " ORDER BY round DESC",
            model,
        )
        return [int(r["round"]) for r in rows]

    def kept_updates(self, model: str, round_no: int) -> list[tuple[str, str, int]]:
        """(update id, payload sha256, bytes) of the round's updates not yet removed."""
        rows = self._all(
            "SELECT update_id, payload_sha256, payload_bytes FROM updates"
            " WHERE model = ? AND round = ? AND removed_ms IS NULL ORDER BY seq",
            model,
            round_no,
        )
        return [(r["update_id"], r["payload_sha256"], int(r["payload_bytes"])) for r in rows]

    def versions(self, model: str) -> list[Version]:
        """Every version row of the model, newest first."""
        rows = self._all("SELECT * FROM versions WHERE model = ? ORDER BY version DESC", model)
        return [self._version(r) for r in rows]

    def models_with_versions(self) -> list[str]:
        return [r["model"] for r in self._all("SELECT DISTINCT model FROM versions ORDER BY model")]

    def bases_in_use(self, model: str) -> set[int]:
        """Base versions of the model's open and aggregating rounds: what a fold reads."""
        rows = self._all(
            "SELECT base_version FROM rounds WHERE model = ? AND state IN ('open', 'aggregating')",
            model,
        )
        return {int(r["base_version"]) for r in rows}

    def blob_users(
        self, excluding_updates: set[str], excluding_versions: set[tuple[str, int]]
    ) -> set[str]:
        """referenced_blobs() as it would be without those rows (a dry run's question)."""
        skip = excluding_updates
        rows = self._all(
            "SELECT update_id AS k, payload_sha256 AS h FROM updates WHERE removed_ms IS NULL"
        )
        shas = {r["h"] for r in rows if r["k"] not in skip}
        for r in self._all(
            "SELECT model, version, weights_sha256 FROM versions WHERE removed_ms IS NULL"
        ):
            if (r["model"], r["version"]) not in excluding_versions:
                shas.add(r["weights_sha256"])
        return shas

    @staticmethod
    def mark_updates_removed(db: sqlite3.Connection, update_ids: list[str], at_ms: int) -> None:
        db.executemany(
            "UPDATE updates SET removed_ms = ? WHERE update_id = ? AND removed_ms IS NULL",
            [(at_ms, u) for u in update_ids],
        )

    @staticmethod
    def mark_version_removed(db: sqlite3.Connection, model: str, version: int, at_ms: int) -> None:
        db.execute(
            "UPDATE versions SET removed_ms = ? WHERE model = ? AND version = ?"
            " AND removed_ms IS NULL",
            (at_ms, model, version),
        )

    # revocation

    def is_revoked(self, serial: int) -> bool:
        return self._one("SELECT 1 FROM revoked WHERE serial_hex = ?", f"{serial:x}") is not None

    @staticmethod
    def insert_revoked(
        db: sqlite3.Connection, serial_hex: str, principal: str, reason: str, at_ms: int
    ) -> None:
        db.execute(
            "INSERT OR IGNORE INTO revoked (serial_hex, principal, reason, revoked_ms)"
            " VALUES (?, ?, ?, ?)",
            (serial_hex, principal, reason, at_ms),
        )

    @staticmethod
    def delete_updates(db: sqlite3.Connection, update_ids: list[str]) -> None:
        db.executemany("DELETE FROM updates WHERE update_id = ?", [(u,) for u in update_ids])

    # audit

    def record(
        self, kind: str, actor: str, subject: str, detail: Mapping[str, object] | None = None
    ) -> audit.AuditEntry:
        """Append one audit entry in its own transaction."""
        with self.transaction() as db:
            return audit.append(db, kind, actor, subject, detail)

    def record_soon(
        self, kind: str, actor: str, subject: str, detail: Mapping[str, object]
    ) -> None:
        """Append an audit entry now, or, if the disk refuses it (full, failing), with the
        next transaction that commits: audited when possible, never in place of the error
        being recorded."""
        try:
            self.record(kind, actor, subject, detail)
        except Exception as exc:
            if storage_fault(exc) is None:
                raise
            with self._lock:
                if len(self._deferred) < MAX_DEFERRED:  # held bounded, as append stores it
                    at = {"deferred_from_ms": int(time.time() * 1000)}
                    kind, actor, subject = map(audit.bounded_field, (kind, actor, subject))
                    held = audit.bounded_detail({**detail, **at})
                    self._deferred.append((kind, actor, subject, held))
                else:
                    self._deferred_dropped += 1

    def last_audit_entry(self, kind: str, subject_prefix: str) -> audit.AuditEntry | None:
        """The newest entry of a kind whose subject starts with subject_prefix."""
        with self._lock:
            found = audit.entries(
                self._db, kind, subject_prefix=subject_prefix, newest_first=True, limit=1
            )
        return found[0] if found else None

    def audit_entries(self, kind: str = "") -> list[audit.AuditEntry]:
        with self._lock:
            return audit.entries(self._db, kind)

    def verify_audit(self) -> tuple[int, str | None]:
        with self._lock:
            return audit.verify_chain(self._db)
