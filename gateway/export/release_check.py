"""Is a published release intact? Decided from its signed manifest, never from a database row.

Someone who can write `registry/` and `sluice.db` but does not hold the signing key can
change any file and any column. Every fact the egress side sends or decides from (file
names, sizes, sha256, structure and schema hash, weight list, trainer count, parity, DP
epsilon) is therefore taken from the manifest after its Ed25519 signature verified with
the gateway's public key; the row only says where to look, and a row that disagrees with
its manifest withholds the release.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sluice.gateway.core.catalog import Catalog
from sluice.gateway.core.errors import NotFound
from sluice.gateway.core.records import Release, ReleaseFile
from sluice.gateway.export.guard import (
    MANIFEST_FILE,
    SIGNATURE,
    GuardPolicy,
    GuardRefused,
    ReleaseFacts,
    Verdicts,
    check_policy,
    check_release_dir,
    weight_specs,
)
from sluice.gateway.export.pieces import Pieces, PieceTags
from sluice.gateway.export.template import OnnxTemplate
from sluice.models.manifest import ManifestRefused, key_id, verify_signature


@dataclass(frozen=True)
class SignedRelease:
    """A release as its verified manifest describes it."""

    release: Release  # every field from the signed manifest (the row only located it)
    manifest: Mapping[str, Any]
    row: Release  # as the database has it: `check` refuses a row that disagrees

    @property
    def files(self) -> dict[str, ReleaseFile]:
        return {f.name: f for f in self.release.files}


def _refuse(reason: str) -> GuardRefused:
    return GuardRefused(reason, (SIGNATURE,))


def _facts(doc: Mapping[str, Any], row: Release) -> Release:
    """The release from the manifest's own fields; malformed fields refuse it."""
    try:
        files = tuple(
            ReleaseFile(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in doc["files"]
        )
        rounds = doc["rounds"]
        release = Release(
            model=str(doc["model"]),
            version=int(doc["version"]),
            round=int(rounds[-1]) if rounds else 0,
            created_ms=int(doc["created_ms"]),
            num_trainers=int(doc["num_trainers"]),
            files=files,
            manifest_json=row.manifest_json,
            signature=row.signature,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _refuse(f"the signed manifest lacks a usable field: {exc!r}"[:200]) from exc
    if len({f.name for f in files}) != len(files):
        raise _refuse("the signed manifest lists a file twice")
    return release


class ReleaseChecker:
    """Checks a release row against its signed manifest, and the files against both.

    `signed` is cheap (a signature and a few comparisons); `check` reads every file (sizes,
    sha256, the guard's byte and parse checks, finite values) and the policy. Releases that
    passed `check` are remembered with their files' inode, size, mtime and ctime, so a
    listing can tell cheaply whether they may have changed since (a pull checks anyway).
    Refusals are remembered the same way: a withheld release whose row and files have not
    changed since is refused again without reading it, so readers asking in a loop cannot
    make the gateway hash it on every call (refusing without a read is never a leak; any
    change, a repair included, changes a stat key and the next call checks it anew).
    """

    def __init__(
        self,
        catalog: Catalog,
        templates: Mapping[str, OnnxTemplate],
        registry_root: Path,
        policy: GuardPolicy,
        public_key: Ed25519PublicKey,
        verdicts: Verdicts | None = None,
    ) -> None:
        self.catalog = catalog
        self.templates = templates
        self.registry_root = registry_root
        self.policy = policy
        self.public_key = public_key
        self.key_id = key_id(public_key)
        self.verdicts = verdicts
        # (model, version) -> (signed row as checked, its files' stat keys then)
        self._intact: dict[tuple[str, int], tuple[Release, tuple[tuple[int, ...], ...]]] = {}
        # (model, version) -> (row, stat keys, the refusal) of releases that failed `check`
        self._refused: dict[
            tuple[str, int], tuple[Release, tuple[tuple[int, ...], ...], GuardRefused]
        ] = {}

    def directory(self, r: Release) -> Path:
        return self.registry_root / r.model / str(r.version)

    def signed(self, row: Release) -> SignedRelease:
        """The row's release as its verified manifest states it; GuardRefused (signature)
        when the manifest is not the gateway's, describes another release, or does not
        describe the served model."""
        try:
            doc = verify_signature(row.manifest_json, row.signature, self.public_key)
        except ManifestRefused as exc:
            raise _refuse(f"stored manifest: {exc}") from exc
        release = _facts(doc, row)
        if (release.model, release.version) != (row.model, row.version):
            raise _refuse(
                f"the signed manifest is of {release.model[:64]!r} v{release.version}, "
                f"not of this release"
            )
        if doc.get("signing_key_id") != self.key_id:
            raise _refuse("the signed manifest names another signing key")
        try:
            served = self.catalog.get(row.model)
        except NotFound as exc:
            raise _refuse(f"model {row.model[:64]!r} is not served here") from exc
        template = self.templates[row.model]
        expected = {
            "schema_hash": served.schema.hash,
            "structure_hash": template.structure_hash,
            "weights": weight_specs(template, served.schema),
        }
        for field, value in expected.items():
            if doc.get(field) != value:
                raise _refuse(f"the signed manifest's {field} is not the served model's")
        return SignedRelease(release, doc, row)

    def check(
        self,
        signed: SignedRelease,
        pieces: Mapping[str, PieceTags] | None = None,
        tagged: Mapping[str, Pieces] | None = None,
    ) -> None:
        """Policy and every file of the release against the signed manifest; GuardRefused
        names what failed. Given pieces, they are filled from the bytes checked (a pull sends
        only bytes that still match them). Given tagged, the named files are checked against
        the tags of an earlier check of the same signed sha256 instead of hashed whole."""
        r, row = signed.release, signed.row
        key = (r.model, r.version)
        try:  # taken before the read: a change while it reads changes them for next time
            keys: tuple[tuple[int, ...], ...] | None = _stat_keys(self.directory(r), signed)
        except OSError:
            keys = None  # a file is missing: the check refuses it without a read anyway
        known = self._refused.get(key)
        if known is not None and keys is not None and known[:2] == (row, keys):
            raise GuardRefused(known[2].reason, known[2].layers)
        try:
            self._check(signed, pieces, tagged)
        except GuardRefused as exc:
            if keys is not None:
                self._refused[key] = (row, keys, exc)
            raise
        self._refused.pop(key, None)
        if keys is not None:
            self._intact[key] = (row, keys)

    def _check(
        self,
        signed: SignedRelease,
        pieces: Mapping[str, PieceTags] | None,
        tagged: Mapping[str, Pieces] | None,
    ) -> None:
        r, doc, row = signed.release, signed.manifest, signed.row
        facts = (r.round, r.created_ms, r.num_trainers, sorted(r.files, key=_name))
        if facts != (row.round, row.created_ms, row.num_trainers, sorted(row.files, key=_name)):
            raise _refuse("the database row disagrees with the signed manifest")
        dp = doc.get("dp")
        epsilon = dp.get("epsilon") if isinstance(dp, Mapping) else None
        parity = doc.get("parity_max_abs_diff")
        served = self.catalog.get(r.model)
        policy = self.policy.for_model(served.entry)
        check_policy(
            ReleaseFacts(
                r.num_trainers,
                parity if isinstance(parity, int | float) else None,
                epsilon if isinstance(epsilon, int | float) else None,
            ),
            policy,
        )
        directory = self.directory(r)
        check_release_dir(
            directory,
            self.templates[r.model],
            served.schema,
            policy,
            {f.name: (f.size, f.sha256) for f in r.files},
            self.verdicts,
            manifest_json=r.manifest_json,
            pieces=pieces,
            known=tagged,
        )

    def unchanged_since_checked(self, signed: SignedRelease) -> bool:
        """True when the release passed `check` and none of its files changed since."""
        r = signed.release
        known = self._intact.get((r.model, r.version))
        if known is None or known[0] != signed.row:
            return False
        try:
            return known[1] == _stat_keys(self.directory(r), signed)
        except OSError:
            return False


def _name(f: ReleaseFile) -> str:
    return f.name


def _stat_keys(directory: Path, signed: SignedRelease) -> tuple[tuple[int, ...], ...]:
    """(inode, size, mtime, ctime) of each file: a write, a rename or a utime changes one."""
    st = os.stat(directory, follow_symlinks=False)  # an entry added or removed changes it
    keys = [(st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)]
    for name in sorted([*signed.files, MANIFEST_FILE]):
        st = os.stat(directory / name, follow_symlinks=False)
        keys.append((st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(keys)
