"""The compliance officer's commands: audit verify, list and export.

All three open sluice.db read-only (SQLite's mode=ro): they work beside a running gateway
and can change nothing. list and export stream the rows they print, so memory stays flat
however long the log is.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sqlite3
import sys
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sluice.gateway.cli.common import CliError, Exit, iso_ms, one_line, parse_time

COLUMNS = ("seq", "ts_ms", "kind", "actor", "subject", "detail", "prev_hash", "hash")
LIST_DETAIL_CHARS = 160  # of an entry's detail JSON on a `list` line (export: all of it)


def _open(data_dir: Path) -> sqlite3.Connection:
    path = data_dir / "sluice.db"
    if not path.is_file():
        raise CliError(
            Exit.USAGE,
            f"{path} does not exist: pass the gateway's --data-dir (where `sluice serve` keeps "
            "sluice.db)",
        )
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        db.execute("SELECT 1 FROM audit LIMIT 1")
    except sqlite3.Error as exc:
        raise CliError(Exit.USAGE, f"{path}: cannot read its audit table: {exc}") from exc
    return db


def _audit_verify(args: argparse.Namespace) -> int:
    from sluice.gateway.config import load_config
    from sluice.gateway.export.release_audit import verify_published
    from sluice.gateway.store.audit import verify_chain

    db = _open(args.data_dir)
    try:
        count, broken = verify_chain(db)
    finally:
        db.close()
    if broken:
        print(f"sluice audit verify: BROKEN after {count} good entries: {broken}", file=sys.stderr)
        return 1
    print(f"audit chain intact: {count} entries")
    # Every published release against its signed manifest, as a pull would check it.
    try:
        statuses = verify_published(load_config(args.config, {"data_dir": args.data_dir}))
    except (ValueError, OSError, sqlite3.Error) as exc:  # ManifestRefused: no usable key
        print(f"sluice audit verify: releases not checked: {str(exc)[:300]}", file=sys.stderr)
        return 1
    withheld = [s for s in statuses if s.withheld]
    for s in withheld:
        print(f"WITHHELD {s.model} v{s.version}: {s.withheld}", file=sys.stderr)
    print(f"releases: {len(statuses) - len(withheld)} intact, {len(withheld)} withheld")
    return 1 if withheld else 0


@dataclass(frozen=True)
class Filters:
    since_ms: int | None = None
    until_ms: int | None = None
    kinds: tuple[str, ...] = ()  # a kind, or a prefix of kinds at a dot: "egress" or "egress."
    principal: str | None = None  # the entry's actor: a principal's name, or "gateway"
    subject: str | None = None  # entries whose subject starts with this

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        values: list[object] = []
        if self.since_ms is not None:
            clauses.append("ts_ms >= ?")
            values.append(self.since_ms)
        if self.until_ms is not None:
            clauses.append("ts_ms < ?")
            values.append(self.until_ms)
        if self.kinds:
            either = []
            for kind in self.kinds:
                stem = kind.rstrip(".*")
                either.append("(kind = ? OR substr(kind, 1, ?) = ?)")
                values += [stem, len(stem) + 1, stem + "."]
            clauses.append("(" + " OR ".join(either) + ")")
        if self.principal is not None:
            clauses.append("actor = ?")
            values.append(self.principal)
        if self.subject is not None:
            clauses.append("substr(subject, 1, ?) = ?")
            values += [len(self.subject), self.subject]
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), values


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(
        since_ms=args.since,
        until_ms=args.until,
        kinds=tuple(args.kind or ()),
        principal=args.principal,
        subject=args.subject,
    )


Row = tuple[int, int, str, str, str, str, str, str]


def entries(
    db: sqlite3.Connection, filters: Filters, limit: int | None, newest: bool
) -> Generator[Row, None, None]:
    """Matching rows in seq order, streamed from the cursor. With `newest` and a limit,
    the newest `limit` of them (still oldest first: at most `limit` rows are held)."""
    where, values = filters.where()
    columns = "seq, ts_ms, kind, actor, subject, detail_json, prev_hash, hash"
    if newest and limit is not None:
        sql = f"SELECT {columns} FROM audit{where} ORDER BY seq DESC LIMIT ?"
        rows = db.execute(sql, (*values, limit)).fetchall()
        yield from reversed(rows)
        return
    sql = f"SELECT {columns} FROM audit{where} ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        values.append(limit)
    yield from db.execute(sql, values)


def _doc(row: Row) -> dict[str, object]:
    seq, ts_ms, kind, actor, subject, detail_json, prev_hash, digest = row
    try:
        detail: object = json.loads(detail_json) if detail_json else {}
    except ValueError:  # an edited row: shown as it stands (`audit verify` names it)
        detail = detail_json
    return {
        "seq": seq,
        "ts": iso_ms(ts_ms),
        "ts_ms": ts_ms,
        "kind": kind,
        "actor": actor,
        "subject": subject,
        "detail": detail,
        "prev_hash": prev_hash,
        "hash": digest,
    }


def _audit_list(args: argparse.Namespace) -> int:
    db = _open(args.data_dir)
    shown = 0
    rows = entries(db, _filters(args), args.limit or None, newest=True)
    try:
        for row in rows:
            shown += 1
            if args.json:
                print(json.dumps(_doc(row), ensure_ascii=False))
                continue
            seq, ts_ms, kind, actor, subject, detail_json = row[:6]
            detail = one_line(detail_json, LIST_DETAIL_CHARS)
            print(f"{seq:>7} {iso_ms(ts_ms)} {kind:<22} {actor:<16} {subject}  {detail}")
    finally:
        rows.close()  # the cursor, before its connection
        db.close()
    if not shown and not args.json:
        print("no audit entry matches", file=sys.stderr)
    return 0


def _audit_export(args: argparse.Namespace) -> int:
    db = _open(args.data_dir)
    rows = entries(db, _filters(args), args.limit or None, newest=False)
    try:
        if args.out is None or str(args.out) == "-":
            count = _write(rows, sys.stdout, args.format)
        else:
            count = _write_file(rows, args.out, args.format)
    finally:
        rows.close()  # the cursor, before its connection
        db.close()
    if args.out is not None and str(args.out) != "-":
        print(f"{args.out}: {count} audit entries ({args.format})", file=sys.stderr)
    return 0


def _write_file(rows: Iterator[Row], out: Path, fmt: str) -> int:
    """Into a temporary file beside out, renamed over it when complete: an interrupted
    export leaves no half file under the name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            count = _write(rows, f, fmt)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return count


def _write(rows: Iterator[Row], f: TextIO, fmt: str) -> int:
    count = 0
    if fmt == "csv":
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(row)
            count += 1
        return count
    for row in rows:
        f.write(json.dumps(_doc(row), ensure_ascii=False) + "\n")
        count += 1
    return count


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", type=Path, default=Path(".sluice"), help="the gateway's, with sluice.db"
    )
    p.add_argument(
        "--since",
        type=parse_time,
        metavar="TIME",
        help="entries from this time: ISO 8601 (UTC unless it says) or a time ago (1h, 30m, "
        "2d; or --since=-1h)",
    )
    p.add_argument("--until", type=parse_time, metavar="TIME", help="entries before this time")
    p.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="this kind (push.accepted) or family (egress, egress.*); repeatable",
    )
    p.add_argument("--principal", help="entries whose actor is this principal (or gateway)")
    p.add_argument("--subject", help="entries whose subject starts with this (drivenet/round/3)")


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="(compliance) the hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    audit_verify = audit_sub.add_parser(
        "verify",
        help="recompute the chain and name a break; check every published release on disk "
        "against its signed manifest and name the withheld ones",
    )
    audit_verify.add_argument("--data-dir", type=Path, default=Path(".sluice"))
    audit_verify.add_argument("--config", type=Path, help="the gateway's TOML (its egress policy)")
    audit_verify.set_defaults(run=_audit_verify)

    audit_list = audit_sub.add_parser(
        "list", help="the newest entries that match, oldest first, one line each"
    )
    _add_filters(audit_list)
    audit_list.add_argument(
        "--limit", type=int, default=50, help="at most this many, the newest (0: all)"
    )
    audit_list.add_argument("--json", action="store_true", help="one JSON object per line")
    audit_list.set_defaults(run=_audit_list)

    audit_export = audit_sub.add_parser(
        "export", help="every entry that matches, with its hashes, as JSON lines or CSV"
    )
    _add_filters(audit_export)
    audit_export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    audit_export.add_argument(
        "--out", type=Path, help="file to write (replaced when complete); default: stdout"
    )
    audit_export.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    audit_export.set_defaults(run=_audit_export)
