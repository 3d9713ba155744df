"""Live backup and restore of a data dir: SQLite's online backup plus hard-linked files.

Everything a gateway writes besides `sluice.db` is immutable once named (content-addressed
blobs, release directories, per-version optimizer state, templates, keys): a file is
written under a temporary name, fsynced and renamed, never changed in place. So a backup
of a running gateway is

1. every such file linked (or copied, across filesystems or with `copy`) into a fresh
   directory;
2. a snapshot of `sluice.db` through SQLite's online backup API (a consistent read, while
   the gateway keeps writing in WAL mode);
3. the files the snapshot needs that appeared between 1 and 2 linked too, and what the
   snapshot does not need (files of later commits, crash leftovers) left out, so the
   backup is exactly one consistent state: what `sluice serve --data-dir BACKUP` serves.

`backup.json` records what was taken, with every file of each version's strategy state
(`state/<model>/<version>`: optimizer moments, the DP privacy ledger; the database does not
name them); `check` proves a backup complete (the database's integrity, the audit chain,
every referenced file present at its size, every state directory of a kept version
recorded and present, every release file at its signed sha256) before `restore` places it
as a new data dir.

A backup and a data dir never nest: a gateway's start and `sluice gc` delete what they do
not know in their data dir, so neither `backup` nor `restore` writes inside a directory
holding a `sluice.db` (or around the one it reads).

A hard link shares the file with the data dir: it survives deletion (retention, a
mistaken `rm`), not a failing disk or an insider editing bytes in place (the restored
gateway's egress check would withhold such a release). Back up to another filesystem
(files are then copied) for a disk's sake.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sluice.gateway.store import audit
from sluice.gateway.store.blobs import fsync_dir

log = logging.getLogger(__name__)

MANIFEST = "backup.json"
DATABASE = "sluice.db"
FORMAT = 2  # 1: before backup.json recorded the versions' state directories
# What a data dir holds that a gateway needs; logs, the lock, the disk reserve, endpoints
# and the blobs' temp files are not part of its state.
TREES = ("blobs", "registry", "state", "templates", "keys", "pki")
FILES = ("trusted-ca.sha256",)


class BackupError(Exception):
    """A backup or restore that cannot be made; the message says why and what to do."""


class Misplaced(BackupError):
    """A destination inside a data dir (or around the source): the command line is wrong."""


@dataclass
class Summary:
    """What a backup holds (backup.json), and how it was made."""

    created_ms: int = 0
    source: str = ""
    files: int = 0
    bytes: int = 0
    linked: int = 0
    copied: int = 0
    releases: list[list[object]] = field(default_factory=list)  # [model, version]
    # state/<model>/<version> of every kept version -> its files' paths in it -> bytes
    state_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    versions: int = 0
    updates: int = 0
    audit_entries: int = 0
    audit_head: str = ""
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2, sort_keys=True) + "\n"


def _skipped(rel: Path) -> bool:
    """Temp files and staging directories: never part of a consistent state."""
    if rel.parts[:2] == ("blobs", "tmp"):
        return True
    return any(p.startswith(".") or p.endswith((".part", ".staging")) for p in rel.parts)


class _Placer:
    """Links (or copies) files from one tree into another, counting what it did."""

    def __init__(self, copy: bool) -> None:
        self.copy = copy
        self._linked: dict[Path, bool] = {}  # placed file -> linked (else copied)

    @property
    def linked(self) -> int:
        return sum(self._linked.values())

    @property
    def copied(self) -> int:
        return len(self._linked) - self.linked

    def place(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not self.copy:
            try:
                os.link(src, dst, follow_symlinks=False)
                self._linked[dst] = True
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                self.copy = True  # another filesystem: copy from here on
        shutil.copy2(src, dst, follow_symlinks=False)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
        self._linked[dst] = False

    def drop(self, dst: Path) -> None:
        """Unlink a placed file the backup turned out not to need: counted no more."""
        dst.unlink()
        self._linked.pop(dst, None)


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under root, as paths relative to root's parent's data dir."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _dirs_modes(src_root: Path, dst_root: Path) -> None:
    """Directories keep their modes (keys/ and pki/ are 0700)."""
    for dirpath, _, _ in os.walk(dst_root):
        rel = Path(dirpath).relative_to(dst_root)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(dirpath, (src_root / rel).stat().st_mode & 0o7777)


def _fresh(dest: Path) -> Path:
    """A partial directory next to dest, renamed to dest when complete."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty directory: choose a new one")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _drop_stale_partials(dest.parent)
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)
    return partial


# What a partial directory can hold; one holding anything else is not ours to remove.
_PARTIAL_NAMES = frozenset({*TREES, *FILES, DATABASE, f"{DATABASE}-journal", MANIFEST})


def _drop_stale_partials(parent: Path) -> None:
    """Remove the partial directories that a backup or restore killed here left (their
    process is gone): they hold links to files the data dir may since have deleted."""
    for partial in parent.glob(".*.partial-*"):
        pid = partial.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) <= 0 or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if partial.is_symlink() or not partial.is_dir():
            continue
        with contextlib.suppress(OSError):
            if {p.name for p in partial.iterdir()} <= _PARTIAL_NAMES:
                shutil.rmtree(partial)


def _alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's: alive
    return True


def _apart(source: Path, target: Path, what: str) -> None:
    """Misplaced unless target (a new backup or data dir) lies outside every data dir, and
    source (the data dir or backup read) outside target."""
    src, dst = source.resolve(), target.resolve()
    if dst.is_relative_to(src):
        raise Misplaced(
            f"{target} is inside {source}, which it is made from: choose a {what} outside it"
        )
    if src.is_relative_to(dst):
        raise Misplaced(f"{source} is inside {target}: choose a {what} outside it")
    for parent in dst.parents:
        if os.path.exists(parent / DATABASE):  # False where it cannot look
            raise Misplaced(
                f"{target} is inside {parent}, a data dir or backup (it holds {DATABASE}): a "
                f"gateway's start or `sluice gc` there deletes files it does not know; choose "
                f"a {what} outside it"
            )


@contextlib.contextmanager
def _building(dest: Path) -> Iterator[Path]:
    """A partial directory beside dest to fill; when the block ends, every directory in it
    is fsynced and it is renamed to dest. Removed if the block raises: never half of one."""
    partial = _fresh(dest)
    try:
        yield partial
        for dirpath, _, _ in os.walk(partial):
            fsync_dir(Path(dirpath))
        with contextlib.suppress(OSError):
            dest.rmdir()  # the empty directory the caller may have made
        os.replace(partial, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@dataclass(frozen=True)
class _Needs:
    """What a snapshot of sluice.db refers to."""

    blobs: dict[str, int | None]  # sha256 -> size when known
    release_files: dict[Path, tuple[int, str]]  # relative path -> (size, sha256)
    releases: list[list[object]]
    state_dirs: set[Path]
    versions: int
    updates: int


def _needs(db: sqlite3.Connection) -> _Needs:
    blobs: dict[str, int | None] = {}
    updates = 0
    for sha, size in db.execute(
        "SELECT payload_sha256, payload_bytes FROM updates WHERE removed_ms IS NULL"
    ):
        blobs[sha] = int(size)
        updates += 1
    versions = 0
    state_dirs: set[Path] = set()
    for model, version, sha in db.execute(
        "SELECT model, version, weights_sha256 FROM versions WHERE removed_ms IS NULL"
    ):
        blobs.setdefault(sha, None)
        state_dirs.add(Path("state", model, str(version)))
        versions += 1
    files: dict[Path, tuple[int, str]] = {}
    releases: list[list[object]] = []
    for model, version, files_json in db.execute(
        "SELECT model, version, files_json FROM releases ORDER BY model, version"
    ):
        releases.append([model, version])
        try:
            for f in json.loads(files_json):
                rel = Path("registry", model, str(version), str(f["name"]))
                files[rel] = (int(f["size"]), str(f["sha256"]))
        except (TypeError, ValueError, KeyError):
            continue  # a row the egress gate withholds anyway; its files are kept as found
    return _Needs(blobs, files, releases, state_dirs, versions, updates)


def _has_removed_columns(db: sqlite3.Connection) -> bool:
    return all(
        "removed_ms" in {r[1] for r in db.execute(f"PRAGMA table_info({t})")}
        for t in ("updates", "versions")
    )


def _snapshot(source_db: Path, target: Path) -> None:
    """SQLite's online backup: one consistent copy while the gateway writes."""
    src = sqlite3.connect(source_db, timeout=30)  # reads only; WAL lets the gateway write on
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            # One file, no -wal/-shm beside it that a reader (check) would create and a
            # restore could carry off: the gateway turns WAL back on when it opens it.
            dst.execute("PRAGMA journal_mode=DELETE")
            if not _has_removed_columns(dst):
                _add_removed_columns(dst)
            ok = dst.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                raise BackupError(f"{source_db}: SQLite's integrity check says {ok!r}")
        finally:
            dst.close()
    finally:
        src.close()
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def _add_removed_columns(db: sqlite3.Connection) -> None:
    """A database from before retention: the columns the queries here read."""
    for table in ("updates", "versions"):
        if "removed_ms" not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN removed_ms INTEGER")


def backup(data_dir: Path, dest: Path, *, copy: bool = False) -> Summary:
    """Back up a data dir, live or stopped, into dest (new or empty). Raises BackupError."""
    started = time.monotonic()
    if not (data_dir / DATABASE).is_file():
        raise BackupError(f"{data_dir} holds no {DATABASE}: not a gateway's data dir")
    _apart(data_dir, dest, "backup directory")
    placer = _Placer(copy)
    with _building(dest) as partial:
        for tree in TREES:  # 1: every immutable file there is now
            if (data_dir / tree).is_dir():
                for path in _walk(data_dir / tree):
                    rel = path.relative_to(data_dir)
                    if not _skipped(rel):
                        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                            placer.place(path, partial / rel)
        for name in FILES:
            if (data_dir / name).is_file():
                placer.place(data_dir / name, partial / name)
        _snapshot(data_dir / DATABASE, partial / DATABASE)  # 2: the state
        db = sqlite3.connect(partial / DATABASE)
        try:
            needs = _needs(db)
            entries, broken = audit.verify_chain(db)
            head = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        finally:
            db.close()
        if broken is not None:
            raise BackupError(
                f"the audit chain of {data_dir} is broken ({broken}); `sluice audit verify` "
                "says more. Backing it up would hide that: copy the directory by hand"
            )
        state = _complete(data_dir, partial, needs, placer)  # 3: exactly what it needs
        for tree in TREES:
            if (data_dir / tree).is_dir() and (partial / tree).is_dir():
                _dirs_modes(data_dir / tree, partial / tree)
        files = list(_walk(partial))
        summary = Summary(
            created_ms=int(time.time() * 1000),
            source=str(data_dir.resolve()),
            files=len(files),
            bytes=sum(p.stat().st_size for p in files),
            linked=placer.linked,
            copied=placer.copied,
            releases=needs.releases,
            state_dirs=state,
            versions=needs.versions,
            updates=needs.updates,
            audit_entries=entries,
            audit_head=head[0] if head else audit.GENESIS,
            seconds=round(time.monotonic() - started, 3),
        )
        with open(partial / MANIFEST, "w") as f:  # _building fsyncs the directory
            f.write(summary.to_json())
            f.flush()
            os.fsync(f.fileno())
    return summary


def _complete(
    data_dir: Path, partial: Path, needs: _Needs, placer: _Placer
) -> dict[str, dict[str, int]]:
    """Link what the snapshot needs that the first pass missed; drop what it does not.
    Returns the files of each kept version's state directory (backup.json's state_dirs)."""
    wanted: set[Path] = set()
    for sha in needs.blobs:
        rel = Path("blobs", sha[:2], sha)
        wanted.add(rel)
        if not (partial / rel).is_file():
            if not (data_dir / rel).is_file():
                raise BackupError(
                    f"{data_dir / rel} is missing, and the database refers to it: the data "
                    "dir is damaged (or retention ran during the backup: back up again)"
                )
            placer.place(data_dir / rel, partial / rel)
    for rel in needs.release_files:
        wanted.add(rel)
        if not (partial / rel).is_file() and (data_dir / rel).is_file():
            placer.place(data_dir / rel, partial / rel)
    release_dirs = {rel.parent for rel in needs.release_files}
    for rel_dir in release_dirs:  # manifest.json and what else the release holds
        for path in _walk(data_dir / rel_dir) if (data_dir / rel_dir).is_dir() else []:
            rel = path.relative_to(data_dir)
            wanted.add(rel)
            if not (partial / rel).is_file():
                placer.place(path, partial / rel)
    _complete_state(data_dir, partial, needs, placer)
    for path in list(_walk(partial)):
        rel = path.relative_to(partial)
        top = rel.parts[0]
        if top == "blobs" and rel not in wanted:
            placer.drop(path)  # a later commit's file, or a crash's leftover
        elif top == "registry" and rel.parent not in release_dirs:
            placer.drop(path)  # a release committed after the snapshot
        elif top == "state" and Path(*rel.parts[:3]) not in needs.state_dirs:
            placer.drop(path)  # a later version's, or a removed one's
    _prune_empty(partial)
    return {
        rel_dir.as_posix(): {
            path.relative_to(partial / rel_dir).as_posix(): path.stat().st_size
            for path in (_walk(partial / rel_dir) if (partial / rel_dir).is_dir() else [])
        }
        for rel_dir in sorted(needs.state_dirs)
    }


def _complete_state(data_dir: Path, partial: Path, needs: _Needs, placer: _Placer) -> None:
    """Every kept version's state directory, whole. A fold renames it into place before
    it commits the version, so one the first pass walked too early is there now; one that
    is not was never written (version 0, an import without state), or retention removed
    the version after the snapshot (its row says so: back up again)."""
    unsure = []  # linked only now, or not found: whole unless retention removed it
    for rel_dir in sorted(needs.state_dirs):
        if not (data_dir / rel_dir).is_dir():
            if not (partial / rel_dir).is_dir():
                unsure.append(rel_dir)
            continue
        for path in _walk(data_dir / rel_dir):
            rel = path.relative_to(data_dir)
            if not (partial / rel).is_file():
                if rel_dir not in unsure:
                    unsure.append(rel_dir)
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile: below
                    placer.place(path, partial / rel)
    removed = _removed_since(data_dir, unsure)
    if removed:
        raise BackupError(
            f"retention removed {removed[0]} while the backup ran (the snapshot still keeps "
            "that version): back up again"
        )


def _removed_since(data_dir: Path, state_dirs: list[Path]) -> list[Path]:
    """Which of these state/<model>/<version> the data dir's database now marks removed."""
    if not state_dirs:
        return []
    db = sqlite3.connect(f"file:{data_dir / DATABASE}?mode=ro", uri=True, timeout=30)
    try:
        if not _has_removed_columns(db):
            return []
        return [
            rel_dir
            for rel_dir in state_dirs
            if db.execute(
                "SELECT 1 FROM versions WHERE model = ? AND version = ? AND removed_ms IS NOT NULL",
                ("/".join(rel_dir.parts[1:-1]), int(rel_dir.parts[-1])),
            ).fetchone()
        ]
    finally:
        db.close()


def _prune_empty(root: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        path = Path(dirpath)
        if path != root and not any(path.iterdir()):
            path.rmdir()


def check(backup_dir: Path, *, hashes: bool = True) -> Summary:
    """Prove a backup complete; returns its summary. Raises BackupError naming the first
    problem. hashes: also re-hash every release file against its signed sha256 (blobs are
    checked by size: a fold re-checks their hashes anyway)."""
    manifest = backup_dir / MANIFEST
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{manifest}: not a Sluice backup ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") not in (1, FORMAT):
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise BackupError(f"{manifest}: format {str(found)[:40]!r}, expected {FORMAT}")
    # Format 1 (before 2026-11-29) recorded no state directories: what it holds of them is
    # restored as it is, unproven. The only backup that lacks one is one taken while a
    # round closed; the source data dir may be gone, so it is not refused.
    legacy = doc["format"] == 1
    if legacy:
        log.warning(
            "%s: format 1 records no state directories: a version's optimizer state or DP "
            "ledger is restored as found, unchecked (one taken while a round closed may lack "
            "the newest); take a new backup of the restored gateway",
            manifest,
        )
    summary = _summary(doc, manifest)
    if not (backup_dir / DATABASE).is_file():
        raise BackupError(f"{backup_dir} holds no {DATABASE}")
    db = sqlite3.connect(f"file:{backup_dir / DATABASE}?mode=ro", uri=True)
    try:
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            raise BackupError(f"{backup_dir / DATABASE}: SQLite's integrity check says {ok!r}")
        entries, broken = audit.verify_chain(db)
        needs = _needs(db)
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{backup_dir / DATABASE}: {exc}") from None
    finally:
        db.close()
    if broken is not None:
        raise BackupError(f"the backup's audit chain is broken: {broken}")
    if entries != summary.audit_entries:
        raise BackupError(
            f"the backup's audit log has {entries} entries; backup.json says "
            f"{summary.audit_entries}"
        )
    for sha, size in needs.blobs.items():
        path = backup_dir / "blobs" / sha[:2] / sha
        if not path.is_file():
            raise BackupError(f"{path} is missing")
        if size is not None and path.stat().st_size != size:
            raise BackupError(f"{path} is {path.stat().st_size} bytes, expected {size}")
    if not legacy:
        _check_state(backup_dir, needs, summary)
    for rel, (size, sha) in needs.release_files.items():
        path = backup_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            raise BackupError(f"{path} is missing or not {size} bytes")
        if hashes and _sha256(path) != sha:
            raise BackupError(f"{path}: its sha256 is not the release's")
    return summary


def _check_state(backup_dir: Path, needs: _Needs, summary: Summary) -> None:
    """Every kept version's state directory recorded in backup.json, and each of its files
    there at its size: the database names none of them, so only the record proves them."""
    for rel_dir in sorted(needs.state_dirs):
        files = summary.state_dirs.get(rel_dir.as_posix())
        if files is None:
            raise BackupError(
                f"backup.json records nothing of {rel_dir}, which a version the backup keeps "
                "may hold (optimizer state, the DP ledger): the backup is incomplete"
            )
        for name, size in files.items():
            inner = Path(name)
            if inner.is_absolute() or ".." in inner.parts or not inner.parts:
                raise BackupError(f"{MANIFEST}: {name[:80]!r} in {rel_dir} is not a file name")
            path = backup_dir / rel_dir / inner
            if not path.is_file() or path.stat().st_size != size:
                raise BackupError(f"{path} is missing or not {size} bytes")


def _summary(doc: Mapping[str, object], manifest: Path) -> Summary:
    """backup.json's fields, each of its type; BackupError naming the first that is not."""
    values: dict[str, object] = {}
    for name, default in asdict(Summary()).items():
        value = doc.get(name, default)
        kind = type(default)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and kind is list:
            ok = all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                for r in value  # type: ignore[attr-defined]
            )
        if ok and kind is dict:
            ok = all(
                isinstance(files, dict)
                and all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0
                    for n in files.values()
                )
                for files in value.values()  # type: ignore[attr-defined]
            )
        if not ok:
            raise BackupError(f"{manifest}: {name!r} is not a {kind.__name__}: not a Sluice backup")
        values[name] = value
    return Summary(**values)  # type: ignore[arg-type]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            digest.update(data)
    return digest.hexdigest()


def record(data_dir: Path, kind: str, subject: str, detail: Mapping[str, object]) -> bool:
    """Append an audit entry to a data dir's log from outside its gateway (SQLite
    serialises the writers); False when it could not be written (logged by the caller)."""
    try:
        db = sqlite3.connect(data_dir / DATABASE, timeout=10, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        db.execute("BEGIN IMMEDIATE")
        audit.append(db, kind, "operator", subject, detail)
        db.execute("COMMIT")
        return True
    except sqlite3.Error:
        return False
    finally:
        db.close()


def restore(backup_dir: Path, data_dir: Path, *, copy: bool = False) -> Summary:
    """Check a backup, then place it as a new data dir (new or empty): the database copied,
    the other files linked (or copied). Raises BackupError."""
    _apart(backup_dir, data_dir, "data dir to restore into")
    summary = check(backup_dir)
    placer = _Placer(copy)
    with _building(data_dir) as partial:
        # The database copied: written in place from now on. Only it and the trees: not
        # backup.json, nor a -wal or -shm a reader of the backup left (linked, the new
        # gateway would write into the backup's).
        shutil.copy2(backup_dir / DATABASE, partial / DATABASE)
        with open(partial / DATABASE, "rb") as f:
            os.fsync(f.fileno())
        for tree in TREES:
            for path in _walk(backup_dir / tree) if (backup_dir / tree).is_dir() else []:
                placer.place(path, partial / path.relative_to(backup_dir))
        for name in FILES:
            if (backup_dir / name).is_file():
                placer.place(backup_dir / name, partial / name)
        for tree in TREES:
            if (backup_dir / tree).is_dir():
                _dirs_modes(backup_dir / tree, partial / tree)
    return summary
