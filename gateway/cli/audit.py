"""The compliance officer's commands: audit verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _audit_verify(args: argparse.Namespace) -> int:
    import sqlite3

    from sluice.gateway.config import load_config
    from sluice.gateway.export.release_audit import verify_published
    from sluice.gateway.store.audit import verify_chain

    path = args.data_dir / "sluice.db"
    if not path.exists():
        print(f"sluice audit verify: {path} does not exist", file=sys.stderr)
        return 1
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
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


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="(compliance) the hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser(
        "verify",
        help="recompute the chain and name a break; check every published release on disk "
        "against its signed manifest and name the withheld ones",
    )
    audit_verify.add_argument("--data-dir", type=Path, default=Path(".sluice"))
    audit_verify.add_argument("--config", type=Path, help="the gateway's TOML (its egress policy)")
    audit_verify.set_defaults(run=_audit_verify)
