"""What a report shows, read from a gateway's data dir (read-only: a running gateway is fine).

Sources: the `rounds`, `updates` (trainers' metrics), `versions` and `releases` tables, and
the audit entries `round.closed` (screening norms and flags, DP facts, fold time),
`release.published` (file sizes, stage timings) and `release.refused` (the reason).
Everything here is bounded: the newest MAX_ROUNDS rounds, at most MAX_UPDATES update rows.
Strings (trainer names, metric names, reasons) are stored as they came: escape them.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

MAX_ROUNDS = 200  # the newest rounds read; older ones are only counted
MAX_UPDATES = 20_000  # update rows read, newest first
_AUDIT_KINDS = ("round.closed", "release.published", "release.refused")


class ReportError(Exception):
    """Nothing can be reported: say why in one line. exit_code: for the command."""

    exit_code = 1


class NoData(ReportError):
    """No data dir or database there, or a model it has never served: a usage mistake."""

    exit_code = 2


@dataclass(frozen=True)
class RoundRow:
    round: int
    base_version: int
    state: str  # open, aggregating, closed, failed
    opened_ms: int
    closed_ms: int | None
    version: int | None
    failure: str  # why the round failed; empty otherwise


@dataclass(frozen=True)
class UpdateRow:
    seq: int
    update_id: str
    round: int
    trainer: str
    region: str
    num_examples: int
    payload_bytes: int
    received_ms: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class VersionRow:
    version: int
    round: int
    num_trainers: int
    num_regions: int
    num_examples: int
    created_ms: int


@dataclass(frozen=True)
class CloseFacts:
    """A round.closed entry: what the fold did with the round's updates."""

    round: int
    version: int
    folded: tuple[str, ...]  # the update ids aggregated
    screened: tuple[str, ...]  # the update ids screened, in the order of norms and indices
    norms: tuple[float | None, ...]  # None: not finite
    flagged: frozenset[int]
    dropped: frozenset[int]
    reasons: Mapping[int, str]
    strategy: str
    epsilon: float | None  # None: DP off
    fold_s: float | None  # None: recorded before the gateway stored it


@dataclass(frozen=True)
class ReleaseFacts:
    version: int
    published: bool
    files: tuple[tuple[str, int], ...]  # (name, bytes)
    stages_s: Mapping[str, float]  # stage -> seconds, in order (empty: not recorded)
    refused: str  # why no release; empty when published


@dataclass(frozen=True)
class ReportData:
    model: str
    data_dir: Path
    generated_ms: int
    rounds: list[RoundRow]  # the newest MAX_ROUNDS, oldest first
    updates: list[UpdateRow]  # of those rounds, commit order
    versions: list[VersionRow]  # of those rounds
    closes: dict[int, CloseFacts]  # round -> its close
    releases: dict[int, ReleaseFacts]  # version -> its release or refusal
    totals: Mapping[str, int]  # counts over the whole database
    notes: list[str] = field(default_factory=list)  # what was left out, and why

    @property
    def ended_rounds(self) -> int:
        return self.totals.get("closed", 0) + self.totals.get("failed", 0)


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        yield db
    finally:
        db.close()


def load(data_dir: Path, model: str) -> ReportData:
    """Everything the report shows of `model`, from `data_dir` (raises ReportError)."""
    path = data_dir / "sluice.db"
    if not data_dir.is_dir():
        raise NoData(f"data dir {data_dir} does not exist")
    if not path.is_file():
        raise NoData(f"{data_dir} is not a gateway data dir: it has no sluice.db")
    try:
        with _read_only(path) as db:
            return _load(db, data_dir, model)
    except sqlite3.Error as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc


def _load(db: sqlite3.Connection, data_dir: Path, model: str) -> ReportData:
    states = dict(
        db.execute(
            "SELECT state, COUNT(*) FROM rounds WHERE model = ? GROUP BY state", (model,)
        ).fetchall()
    )
    if not states:
        known = [r[0] for r in db.execute("SELECT DISTINCT model FROM rounds LIMIT 21")]
        shown = ", ".join(repr(m) for m in known[:20]) + (", ..." if len(known) > 20 else "")
        raise NoData(f"no model {model!r} in {data_dir}; it has: {shown or 'no models'}")
    notes: list[str] = []
    newest = db.execute(
        "SELECT * FROM rounds WHERE model = ? ORDER BY round DESC LIMIT ?", (model, MAX_ROUNDS)
    ).fetchall()
    rounds = [_round(r) for r in reversed(newest)]
    first = rounds[0].round
    total_rounds = sum(states.values())
    if total_rounds > len(rounds):
        notes.append(
            f"Only the newest {len(rounds)} of {total_rounds} rounds are shown "
            f"(from round {first})."
        )
    rows = db.execute(
        "SELECT * FROM updates WHERE model = ? AND round >= ? ORDER BY seq DESC LIMIT ?",
        (model, first, MAX_UPDATES + 1),
    ).fetchall()
    if len(rows) > MAX_UPDATES:
        rows = rows[:MAX_UPDATES]
        notes.append(f"Only the newest {MAX_UPDATES} updates are shown.")
    updates = [_update(r) for r in reversed(rows)]
    versions = [
        VersionRow(
            r["version"],
            r["round"],
            r["num_trainers"],
            r["num_regions"],
            r["num_examples"],
            r["created_ms"],
        )
        for r in db.execute(
            "SELECT * FROM versions WHERE model = ? AND version > 0 AND round >= ?"
            " ORDER BY version",
            (model, first),
        )
    ]
    closes, releases = _audited(db, model, first, {v.version for v in versions})
    _merge_release_rows(db, model, releases)
    totals = {
        **states,
        "rounds": total_rounds,
        "versions": _count(
            db, "SELECT COUNT(*) FROM versions WHERE model = ? AND version > 0", model
        ),
        "releases": _count(db, "SELECT COUNT(*) FROM releases WHERE model = ?", model),
        "updates": _count(db, "SELECT COUNT(*) FROM updates WHERE model = ?", model),
        "trainers": _count(
            db, "SELECT COUNT(DISTINCT trainer) FROM updates WHERE model = ?", model
        ),
        "regions": _count(db, "SELECT COUNT(DISTINCT region) FROM updates WHERE model = ?", model),
    }
    return ReportData(
        model=model,
        data_dir=data_dir,
        generated_ms=int(time.time() * 1000),
        rounds=rounds,
        updates=updates,
        versions=versions,
        closes=closes,
        releases=releases,
        totals=totals,
        notes=notes,
    )


def _count(db: sqlite3.Connection, sql: str, model: str) -> int:
    return int(db.execute(sql, (model,)).fetchone()[0])


def _round(r: sqlite3.Row) -> RoundRow:
    keys = r.keys()
    return RoundRow(
        round=r["round"],
        base_version=r["base_version"],
        state=str(r["state"]),
        opened_ms=r["opened_ms"],
        closed_ms=r["closed_ms"],
        version=r["version"],
        failure=str(r["failure"] or "") if "failure" in keys else "",
    )


def _update(r: sqlite3.Row) -> UpdateRow:
    return UpdateRow(
        seq=r["seq"],
        update_id=str(r["update_id"]),
        round=r["round"],
        trainer=str(r["trainer"]),
        region=str(r["region"]),
        num_examples=r["num_examples"],
        payload_bytes=r["payload_bytes"],
        received_ms=r["received_ms"],
        metrics=_metrics(r["metrics_json"]),
    )


def _metrics(text: object) -> dict[str, float]:
    """The finite numeric metrics of a row (ingest allows only those; a row edited since
    may hold anything)."""
    try:
        doc = json.loads(text) if isinstance(text, str | bytes) else None
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k): float(v) for k, v in doc.items() if _finite(v)}


def _finite(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _number(v: object) -> float | None:
    return float(v) if _finite(v) else None


def _index(subject: str, model: str, what: str) -> int | None:
    """N of '<model>/<what>/<N>'."""
    prefix = f"{model}/{what}/"
    tail = subject[len(prefix) :] if subject.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def _audited(
    db: sqlite3.Connection, model: str, first_round: int, versions: set[int]
) -> tuple[dict[int, CloseFacts], dict[int, ReleaseFacts]]:
    closes: dict[int, CloseFacts] = {}
    releases: dict[int, ReleaseFacts] = {}
    marks = ", ".join("?" for _ in _AUDIT_KINDS)
    cursor = db.execute(
        f"SELECT kind, subject, detail_json FROM audit WHERE kind IN ({marks})"
        " AND substr(subject, 1, ?) = ? ORDER BY seq",
        (*_AUDIT_KINDS, len(model) + 1, f"{model}/"),
    )
    for kind, subject, detail_json in cursor:
        try:
            detail = json.loads(detail_json)
        except ValueError:
            continue
        if not isinstance(detail, dict):
            continue
        if kind == "round.closed":
            round_no = _index(subject, model, "round")
            if round_no is not None and round_no >= first_round:
                closes[round_no] = _close(round_no, detail)
            continue
        version = _index(subject, model, "release")
        if version is None or version not in versions:
            continue
        if kind == "release.published":
            releases[version] = ReleaseFacts(
                version, True, _files(detail.get("files")), _stages(detail.get("stages_s")), ""
            )
        else:
            releases[version] = ReleaseFacts(version, False, (), {}, str(detail.get("reason", "")))
    return closes, releases


def _close(round_no: int, d: Mapping[str, object]) -> CloseFacts:
    screening = d.get("screening")
    s = screening if isinstance(screening, dict) else {}
    dp = d.get("dp")
    norms = s.get("norms")
    reasons = s.get("reasons")
    version = d.get("version")
    return CloseFacts(
        round=round_no,
        version=version if isinstance(version, int) else -1,
        folded=_strings(d.get("updates")),
        screened=_strings(s.get("updates")),
        norms=tuple(_number(n) for n in norms) if isinstance(norms, list) else (),
        flagged=frozenset(_ints(s.get("flagged"))),
        dropped=frozenset(_ints(s.get("dropped"))),
        reasons={int(k): str(v) for k, v in reasons.items() if str(k).isdigit()}
        if isinstance(reasons, dict)
        else {},
        strategy=str(d.get("strategy", "")),
        epsilon=_number(dp.get("epsilon")) if isinstance(dp, dict) else None,
        fold_s=_number(d.get("fold_s")),
    )


def _strings(v: object) -> tuple[str, ...]:
    return tuple(str(x) for x in v) if isinstance(v, list) else ()


def _ints(v: object) -> list[int]:
    return [x for x in v if isinstance(x, int)] if isinstance(v, list) else []


def _files(v: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(v, list):
        return ()
    return tuple(
        (str(f.get("name", "")), int(f["size"]))
        for f in v
        if isinstance(f, dict) and isinstance(f.get("size"), int)
    )


def _stages(v: object) -> dict[str, float]:
    if not isinstance(v, dict):
        return {}
    return {str(k): float(s) for k, s in v.items() if _finite(s)}


def _merge_release_rows(
    db: sqlite3.Connection, model: str, releases: dict[int, ReleaseFacts]
) -> None:
    """File sizes from the releases table (what egress serves); the audit entry's list where
    a row does not parse."""
    for version, files_json in db.execute(
        "SELECT version, files_json FROM releases WHERE model = ?", (model,)
    ):
        known = releases.get(version)
        if known is None:  # outside the rounds shown
            continue
        try:
            files = _files(json.loads(files_json))
        except (ValueError, TypeError):
            files = ()
        releases[version] = ReleaseFacts(version, True, files or known.files, known.stages_s, "")
