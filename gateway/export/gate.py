"""The egress gate: what the cross-border side may list and pull, each pull guarded and audited."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.core.catalog import Catalog
from gateway.core.errors import IntegrityError, InvalidInput, NotFound
from gateway.core.ingest import MAX_CHUNK_BYTES
from gateway.core.records import Release, ReleaseFile
from gateway.export.guard import (
    GuardPolicy,
    GuardRefused,
    ReleaseFacts,
    Verdicts,
    check_policy,
    check_release_dir,
)
from gateway.export.template import OnnxTemplate
from gateway.store.sqlite import Store
from models.manifest import MODEL_FILE, parse


@dataclass(frozen=True)
class Pull:
    release: Release
    file: ReleaseFile
    chunks: Iterator[tuple[int, bytes]]  # (offset, data) from the requested offset


class EgressGate:
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        templates: dict[str, OnnxTemplate],
        registry_root: Path,
        policy: GuardPolicy,
        verdicts: Verdicts | None = None,
    ) -> None:
        self.store = store
        self.verdicts = verdicts
        self.catalog = catalog
        self.templates = templates
        self.registry_root = registry_root
        self.policy = policy

    def releases(self, model: str = "") -> list[Release]:
        return self.store.list_releases(model)

    def release(self, model: str, version: int) -> Release:
        r = self.store.get_release(model, version)
        if r is None:
            which = f"version {version}" if version else "any release"
            raise NotFound(f"model {model!r} has no published {which}")
        return r

    def open_pull(self, model: str, version: int, file: str, offset: int, peer: str) -> Pull:
        """Run the guard on the whole release again, audit the pull, then stream the file."""
        r = self.release(model, version)
        name = file or MODEL_FILE
        entry = next((f for f in r.files if f.name == name), None)
        if entry is None:
            listed = ", ".join(f.name for f in r.files)
            raise NotFound(f"release {r.version} of {r.model!r} has no file {name!r}: {listed}")
        if offset > entry.size:
            raise InvalidInput(f"offset {offset} is past the end ({entry.size} bytes)")
        path = self.registry_root / r.model / str(r.version) / entry.name
        subject = f"{r.model}/release/{r.version}/{entry.name}"
        fd = -1
        try:
            # Open the file before the guard reads it, and stream from this descriptor:
            # the bytes that leave are the inode the guard checked, whatever happens to
            # the name afterwards (a swap, a symlink).
            fd = _open_no_follow(path)
            opened = os.fstat(fd)
            manifest = parse(r.manifest_json)
            check_policy(
                ReleaseFacts(
                    r.num_trainers,
                    manifest.get("parity_max_abs_diff"),
                    (manifest.get("dp") or {}).get("epsilon"),
                ),
                self.policy,
            )
            # Names and paths come from the database row, never from the request.
            directory = self.registry_root / r.model / str(r.version)
            check_release_dir(
                directory,
                self.templates[r.model],
                self.catalog.get(r.model).schema,
                self.policy,
                {f.name: (f.size, f.sha256) for f in r.files},
                self.verdicts,
            )
            _same_file(path, opened, os.fstat(fd))
        except (GuardRefused, ValueError, OSError) as exc:
            if fd >= 0:
                os.close(fd)
            reason = exc.reason if isinstance(exc, GuardRefused) else str(exc)
            self.store.record("egress.refused", peer, subject, {"reason": reason})
            raise IntegrityError(
                f"release {r.version} of {r.model!r} is withheld: the egress guard refused it "
                f"({reason})"
            ) from exc
        self.store.record("egress.pull", peer, subject, {"offset": offset, "sha256": entry.sha256})
        return Pull(r, entry, _verified_chunks(fd, offset, entry.size, entry.sha256))


def _open_no_follow(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValueError(f"{path.name}: cannot be opened as a regular file ({exc})") from exc


def _same_file(path: Path, opened: os.stat_result, now: os.stat_result) -> None:
    """The name still points at the unchanged inode the descriptor holds."""
    named = os.stat(path, follow_symlinks=False)
    key = (opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns)
    if (named.st_dev, named.st_ino, named.st_size, named.st_mtime_ns) != key or (
        now.st_size,
        now.st_mtime_ns,
    ) != (opened.st_size, opened.st_mtime_ns):
        raise ValueError(f"{path.name} changed while the guard was checking it")


def _verified_chunks(fd: int, offset: int, total: int, sha256: str) -> Iterator[tuple[int, bytes]]:
    """Chunks read from the guarded descriptor, re-hashed as they go; the last chunk is held
    back until the whole file matched its manifest, so a file changed in place mid-pull
    never completes (the reader's own sha256 check refuses it too)."""
    digest = hashlib.sha256()
    try:
        pos = 0
        while pos < offset:  # a resumed pull still hashes the prefix it does not send
            data = os.pread(fd, min(MAX_CHUNK_BYTES, offset - pos), pos)
            if not data:
                raise IntegrityError(f"release file ended at {pos} of {total} bytes")
            digest.update(data)
            pos += len(data)
        held: tuple[int, bytes] | None = None
        while pos < total:
            data = os.pread(fd, min(MAX_CHUNK_BYTES, total - pos), pos)
            if not data:
                raise IntegrityError(f"release file ended at {pos} of {total} bytes")
            digest.update(data)
            if held is not None:
                yield held
            held = (pos, data)
            pos += len(data)
        if digest.hexdigest() != sha256:
            raise IntegrityError("release file changed during the pull; it is withheld")
        if held is not None:
            yield held
    finally:
        os.close(fd)
