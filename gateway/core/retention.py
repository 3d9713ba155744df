"""Retention: what months of rounds may delete, and the deleting.

Every round spools one file per update (16 trainers of a 400 MB model: 6.4 GB a round) and
every version keeps its weights file and any optimizer state. Once a round has ended its
updates are never read again (folded, released, audited), and only the versions that the
open rounds build on are. Two settings bound the disk:

- `keep_rounds` (N > 0): the spooled updates of the N newest ended (closed or failed)
  rounds of each model are kept; older rounds' update files are deleted.
- `keep_versions` (M > 0): the weights files and optimizer state of the M newest versions
  of each model are kept, and always those of every base an open round folds onto;
  older ones are deleted.

0 keeps everything (the default). Rows stay (metrics for `sluice report`, the history of
versions), marked `removed_ms`; releases and the audit chain are never touched. Each
round's and each version's removal is one audit entry (`retention.deleted`), written in
the transaction that marks the rows; the files go after it commits, so a crash in between
leaves only unreferenced files, which the next start (or `sluice gc`) drops.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sluice.gateway.store import audit
from sluice.gateway.store.blobs import BlobStore
from sluice.gateway.store.sqlite import Store

REMOVED = "retention.deleted"


@dataclass(frozen=True)
class RetentionPolicy:
    keep_rounds: int = 0  # ended rounds whose spooled updates are kept; 0: all
    keep_versions: int = 0  # versions whose weights and optimizer state are kept; 0: all

    def __post_init__(self) -> None:
        if self.keep_rounds < 0 or self.keep_versions < 0:
            raise ValueError("keep_rounds and keep_versions must be 0 (keep all) or more")

    @property
    def active(self) -> bool:
        return bool(self.keep_rounds or self.keep_versions)


@dataclass(frozen=True)
class Removal:
    """One round's spooled updates, or one version's weights and state, removed."""

    model: str
    what: str  # "round" or "version"
    number: int
    files: int  # blob files deleted (shared content counts once, where it is deleted)
    bytes: int  # bytes those files held
    updates: int = 0  # a round's: update rows marked removed

    def describe(self) -> str:
        if self.what == "round":
            return (
                f"{self.model}: round {self.number}'s {self.updates} spooled updates "
                f"({_size(self.bytes)})"
            )
        return f"{self.model}: version {self.number}'s weights and state ({_size(self.bytes)})"


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "KB"
    for bigger in ("MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


class Retention:
    """Applies a RetentionPolicy to one data dir. Callers serialise it with the folds (the
    gateway holds its close lock; `sluice gc` holds the data dir's lock)."""

    def __init__(self, store: Store, blobs: BlobStore, state_root: Path) -> None:
        self.store = store
        self.blobs = blobs
        self.state_root = state_root
        # A dry run's rows "removed" so far (update ids, versions): shared content counts
        # where a real run would delete it.
        self._dry: tuple[set[str], set[tuple[str, int]]] = (set(), set())

    def plan(self, model: str, policy: RetentionPolicy) -> tuple[list[int], list[int]]:
        """(rounds whose updates go, versions whose weights go), oldest first."""
        rounds: list[int] = []
        if policy.keep_rounds:
            kept = set(self.store.ended_rounds(model)[: policy.keep_rounds])
            rounds = sorted(set(self.store.ended_rounds_with_updates(model)) - kept)
        versions: list[int] = []
        if policy.keep_versions:
            rows = self.store.versions(model)
            kept = {v.version for v in rows[: policy.keep_versions]}
            kept |= self.store.bases_in_use(model)
            versions = sorted(
                v.version for v in rows if v.removed_ms is None and v.version not in kept
            )
        return rounds, versions

    def apply(
        self, policy: RetentionPolicy, *, actor: str = "gateway", dry_run: bool = False
    ) -> list[Removal]:
        """Remove what the policy lets go, for every model; returns what went (or, with
        dry_run, what would go, deleting nothing and writing no audit entry)."""
        done: list[Removal] = []
        self._dry = (set(), set())
        for model in self.store.models_with_versions():
            rounds, versions = self.plan(model, policy)
            for round_no in rounds:
                done.append(self._round(model, round_no, policy, actor, dry_run))
            for version in versions:
                done.append(self._version(model, version, policy, actor, dry_run))
            if not dry_run:
                self._sweep_state(model)
        return done

    def _round(
        self, model: str, round_no: int, policy: RetentionPolicy, actor: str, dry_run: bool
    ) -> Removal:
        updates = self.store.kept_updates(model, round_no)
        shas = {sha: size for _, sha, size in updates}
        if dry_run:
            self._dry[0].update(u for u, _, _ in updates)
            gone = self._unreferenced(shas)
            return Removal(model, "round", round_no, len(gone), sum(gone.values()), len(updates))
        detail: dict[str, object] = {
            "updates": [u for u, _, _ in updates],
            "keep_rounds": policy.keep_rounds,
        }
        with self.store.transaction() as db:
            self.store.mark_updates_removed(db, [u for u, _, _ in updates], _now_ms())
            audit.append(db, REMOVED, actor, f"{model}/round/{round_no}", detail)
        gone = self._unlink(shas)
        return Removal(model, "round", round_no, len(gone), sum(gone.values()), len(updates))

    def _version(
        self, model: str, version: int, policy: RetentionPolicy, actor: str, dry_run: bool
    ) -> Removal:
        row = self.store.get_version(model, version)
        assert row is not None  # planned from the rows; the caller's lock keeps them
        size = self._file_size(row.weights_sha256)
        shas = {row.weights_sha256: size}
        state = self.state_root / model / str(version)
        if dry_run:
            self._dry[1].add((model, version))
            gone = self._unreferenced(shas)
            return Removal(model, "version", version, len(gone), sum(gone.values()))
        detail: dict[str, object] = {
            "weights_sha256": row.weights_sha256,
            "optimizer_state": state.is_dir(),
            "keep_versions": policy.keep_versions,
        }
        with self.store.transaction() as db:
            self.store.mark_version_removed(db, model, version, _now_ms())
            audit.append(db, REMOVED, actor, f"{model}/version/{version}", detail)
        gone = self._unlink(shas)
        shutil.rmtree(state, ignore_errors=True)
        return Removal(model, "version", version, len(gone), sum(gone.values()))

    def _file_size(self, sha: str) -> int:
        try:
            return self.blobs.path(sha).stat().st_size
        except FileNotFoundError:
            return 0

    def _unlink(self, shas: dict[str, int]) -> dict[str, int]:
        """Delete the blobs no row needs any more (content is shared: an identical payload
        of a kept update keeps the file). Under the blob lock, as every such check is."""
        gone: dict[str, int] = {}
        with self.blobs.lock:
            referenced = self.store.referenced_blobs()
            for sha, size in shas.items():
                if sha in referenced:
                    continue
                path = self.blobs.path(sha)
                try:
                    links = path.stat().st_nlink
                except FileNotFoundError:
                    continue
                if not self.blobs.remove(path):
                    continue  # gone meanwhile, or pinned for a row being committed
                # A version blob that is also a release's data file (a hard link, see
                # export/refresh.py) loses a name, not its bytes: nothing freed.
                gone[sha] = size if links == 1 else 0
        return gone

    def _unreferenced(self, shas: dict[str, int]) -> dict[str, int]:
        """For a dry run: which of these blobs would go once the rows the run has
        "removed" so far were removed."""
        others = self.store.blob_users(*self._dry)
        gone: dict[str, int] = {}
        for sha, size in shas.items():
            if sha in others:
                continue
            try:
                links = self.blobs.path(sha).stat().st_nlink
            except FileNotFoundError:
                continue
            gone[sha] = size if links == 1 else 0  # as _unlink counts it
        return gone

    def _sweep_state(self, model: str) -> None:
        """Optimizer state of removed versions that a crash left behind."""
        model_dir = self.state_root / model
        if not model_dir.is_dir():
            return
        removed = {v.version for v in self.store.versions(model) if v.removed_ms is not None}
        for entry in model_dir.iterdir():
            if entry.name.isdigit() and int(entry.name) in removed:
                shutil.rmtree(entry, ignore_errors=True)


def _now_ms() -> int:
    return int(time.time() * 1000)
