"""The egress gate: what the cross-border side may list and pull, each pull guarded and audited."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.core.catalog import Catalog
from gateway.core.errors import IntegrityError, NotFound
from gateway.core.records import Release, ReleaseFile
from gateway.export.guard import (
    GuardPolicy,
    GuardRefused,
    ReleaseFacts,
    check_policy,
    check_release_dir,
)
from gateway.export.template import OnnxTemplate
from gateway.store.chunks import file_chunks
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
    ) -> None:
        self.store = store
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
        path = self.registry_root / r.model / str(r.version) / entry.name
        chunks = file_chunks(path, offset, entry.size)  # a bad offset fails before the guard
        subject = f"{r.model}/release/{r.version}/{entry.name}"
        try:
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
            )
        except (GuardRefused, ValueError) as exc:
            reason = exc.reason if isinstance(exc, GuardRefused) else str(exc)
            self.store.record("egress.refused", peer, subject, {"reason": reason})
            raise IntegrityError(
                f"release {r.version} of {r.model!r} is withheld: the egress guard refused it "
                f"({reason})"
            ) from exc
        self.store.record("egress.pull", peer, subject, {"offset": offset, "sha256": entry.sha256})
        return Pull(r, entry, chunks)
