"""The operator's upkeep of a data dir: gc (retention by hand), backup, restore."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sluice.gateway.cli.common import CliError, Exit, plural, size

DEFAULT_DATA_DIR = Path(".sluice")


def _data_dir_and_keep(args: argparse.Namespace) -> tuple[Path, int, int]:
    """The data dir and the retention settings: the flags, else the config's, else 0."""
    data_dir: Path = args.data_dir or DEFAULT_DATA_DIR
    keep_rounds, keep_versions = 0, 0
    if args.config is not None:
        from sluice.gateway.config import load_config

        config = load_config(args.config, {"data_dir": args.data_dir})
        data_dir, keep_rounds, keep_versions = (
            config.data_dir,
            config.keep_rounds,
            config.keep_versions,
        )
    if args.keep_rounds is not None:
        keep_rounds = args.keep_rounds
    if args.keep_versions is not None:
        keep_versions = args.keep_versions
    return data_dir, keep_rounds, keep_versions


def _gc(args: argparse.Namespace) -> int:
    from sluice.gateway.core.catalog import Catalog
    from sluice.gateway.core.ingest import Ingest
    from sluice.gateway.core.retention import Retention, RetentionPolicy
    from sluice.gateway.store.blobs import BlobStore
    from sluice.gateway.store.datadir import DataDirInUse, DataDirLock
    from sluice.gateway.store.sqlite import Store

    data_dir, keep_rounds, keep_versions = _data_dir_and_keep(args)
    if not (data_dir / "sluice.db").is_file():
        raise CliError(Exit.USAGE, f"{data_dir} holds no sluice.db: not a gateway's data dir")
    try:
        policy = RetentionPolicy(keep_rounds, keep_versions)
    except ValueError as exc:
        raise CliError(Exit.USAGE, str(exc)) from None
    try:
        lock = DataDirLock(data_dir)
    except DataDirInUse as exc:
        raise CliError(
            Exit.BUSY,
            f"{exc}. A running gateway applies its keep_rounds/keep_versions after every "
            "round; to change them, set them in sluice.toml and restart it",
        ) from None
    store = Store(data_dir / "sluice.db")
    try:
        blobs = BlobStore(data_dir / "blobs")
        if not policy.active:
            print(
                "keep_rounds and keep_versions are 0 (keep everything): nothing to remove; "
                "give --keep-rounds/--keep-versions or a --config that sets them"
            )
        removed = Retention(store, blobs, data_dir / "state").apply(
            policy, actor="operator", dry_run=args.dry_run
        )
        ingest = Ingest(store, blobs, Catalog(()))  # its crash clean-up, as a start runs it
        orphans = [] if args.dry_run else ingest.drop_crash_leftovers()
    finally:
        store.close()
        lock.release()
    if args.json:
        doc: dict[str, Any] = {
            "data_dir": str(data_dir),
            "dry_run": args.dry_run,
            "keep_rounds": keep_rounds,
            "keep_versions": keep_versions,
            "removed": [r.__dict__ for r in removed],
            "orphans_dropped": len(orphans),
            "bytes": sum(r.bytes for r in removed),
        }
        print(json.dumps(doc, indent=2))
        return Exit.OK
    verb = "would remove" if args.dry_run else "removed"
    for r in removed:
        print(f"{verb} {r.describe()}")
    total = sum(r.bytes for r in removed)
    print(
        f"{data_dir}: {verb} {plural(len(removed), 'item')}, {size(total)}"
        + (f"; dropped {plural(len(orphans), 'orphan file')}" if orphans else "")
    )
    return Exit.OK


def _backup(args: argparse.Namespace) -> int:
    from sluice.gateway.store.backup import BackupError, Misplaced, backup, record

    data_dir: Path = args.data_dir or DEFAULT_DATA_DIR
    try:
        done = backup(data_dir, args.dest, copy=args.copy)
    except Misplaced as exc:
        raise CliError(Exit.USAGE, str(exc)) from None
    except BackupError as exc:
        raise CliError(Exit.REFUSED, str(exc)) from None
    detail = {
        "files": done.files,
        "bytes": done.bytes,
        "linked": done.linked,
        "releases": len(done.releases),
        "audit_entries": done.audit_entries,
        "audit_head": done.audit_head,
    }
    if not record(data_dir, "backup.created", str(args.dest.resolve()), detail):
        print(f"sluice backup: warning: could not audit the backup in {data_dir}")
    how = f"{done.linked} linked, {done.copied} copied"
    print(
        f"{args.dest}: {plural(done.files, 'file')} ({size(done.bytes)}; {how}), "
        f"{plural(len(done.releases), 'release')}, {_audit_entries(done.audit_entries)} "
        f"in {done.seconds:.1f}s; restore with `sluice restore {args.dest} --data-dir DIR`"
    )
    return Exit.OK


def _restore(args: argparse.Namespace) -> int:
    from sluice.gateway.store.backup import BackupError, Misplaced, check, record, restore

    try:
        if args.check_only:
            done = check(args.backup)
        else:
            done = restore(args.backup, args.data_dir, copy=args.copy)
    except Misplaced as exc:
        raise CliError(Exit.USAGE, str(exc)) from None
    except BackupError as exc:
        raise CliError(Exit.REFUSED, str(exc)) from None
    facts = (
        f"{plural(len(done.releases), 'release')}, {plural(done.versions, 'version')}, "
        f"{_audit_entries(done.audit_entries)}, taken {_when(done.created_ms)}"
    )
    if args.check_only:
        print(f"{args.backup}: complete: {facts}")
        return Exit.OK
    detail = {"backup": str(args.backup.resolve()), "audit_head": done.audit_head}
    record(args.data_dir, "backup.restored", str(args.data_dir.resolve()), detail)
    serve = f"sluice serve --data-dir {args.data_dir}"
    print(f"{args.data_dir}: restored {facts}; serve it with `{serve}`")
    return Exit.OK


def _audit_entries(n: int) -> str:
    return f"{n} audit {'entry' if n == 1 else 'entries'}"


def _when(unix_ms: int) -> str:
    from sluice.gateway.cli.common import iso_ms

    return iso_ms(unix_ms)


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gc = sub.add_parser(
        "gc",
        help="(operator) apply retention to a stopped gateway's data dir: delete spooled "
        "updates of old rounds and weights of old versions (releases and audit are kept)",
    )
    gc.add_argument("--data-dir", type=Path, help="the data dir (default: the config's, .sluice)")
    gc.add_argument("--config", type=Path, help="TOML file whose keep_rounds/keep_versions apply")
    gc.add_argument(
        "--keep-rounds", type=int, help="ended rounds per model whose updates are kept (0: all)"
    )
    gc.add_argument(
        "--keep-versions", type=int, help="versions per model whose weights are kept (0: all)"
    )
    gc.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    gc.add_argument("--json", action="store_true", help="one JSON document")
    gc.set_defaults(run=_gc)

    backup = sub.add_parser(
        "backup",
        help="(operator) back up a data dir, live or stopped: a consistent SQLite snapshot "
        "and its files, hard-linked (copied across filesystems)",
    )
    backup.add_argument("dest", type=Path, help="a new (or empty) directory, outside any data dir")
    backup.add_argument("--data-dir", type=Path, help="the data dir (default: .sluice)")
    backup.add_argument("--copy", action="store_true", help="copy every file, link none")
    backup.set_defaults(run=_backup)

    restore = sub.add_parser(
        "restore",
        help="(operator) check a backup and place it as a new data dir",
    )
    restore.add_argument("backup", type=Path, help="a directory `sluice backup` wrote")
    restore.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="new data dir")
    restore.add_argument("--copy", action="store_true", help="copy every file, link none")
    restore.add_argument(
        "--check-only", action="store_true", help="prove the backup complete; place nothing"
    )
    restore.set_defaults(run=_restore)
