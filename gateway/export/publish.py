"""Turn a new version into a release: refresh the template, check parity and the guard, sign."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sluice.gateway import heap
from sluice.gateway.core.catalog import ServedModel
from sluice.gateway.core.records import (
    CommittedUpdate,
    PublishOutcome,
    Release,
    ReleaseFile,
    Version,
)
from sluice.gateway.export.guard import (
    GuardPolicy,
    GuardRefused,
    ReleaseFacts,
    Verdicts,
    check_policy,
    check_release_dir,
    weight_specs,
)
from sluice.gateway.export.parity import max_output_diff
from sluice.gateway.export.pieces import PieceCache, PieceCheck, Pieces, PieceTags
from sluice.gateway.export.refresh import released_payload, write_atomic, write_release_files
from sluice.gateway.export.selftest import self_test as template_self_test
from sluice.gateway.export.signing import Signer
from sluice.gateway.export.template import (
    TWO_FILE_THRESHOLD,
    OnnxTemplate,
    build_template,
    load_template,
    save_template,
)
from sluice.gateway.metrics import Metrics
from sluice.gateway.store.blobs import fsync_dir
from sluice.gateway.store.chunks import SEND_CHUNK_BYTES
from sluice.gateway.store.direct import open_regular
from sluice.models.artifact import op_set
from sluice.models.declare import declaration_fingerprint, schema_fingerprint
from sluice.models.entry import ModelEntry
from sluice.models.manifest import (
    MANIFEST_FORMAT,
    MODEL_FILE,
    ManifestRefused,
    canonical_json,
    check_fields,
    parse,
)
from sluice.models.schema import Schema, numpy_to_tensor

if TYPE_CHECKING:  # imported where a release builds the module: a start does not need it
    import torch

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


def template_dir(served: ServedModel, root: Path, two_file_threshold: int) -> Path:
    """Where the model's template for this schema and layout is cached under root."""
    weights = sum(t.num_bytes for t in served.schema.tensors)  # an upper bound is enough
    layout = "two-file" if weights > two_file_threshold else "single-file"
    return root / served.name / f"{served.schema.hash}-{layout}"


CHECKED = "declaration.sha256"  # beside template.json: the declaration its export ran


def declaration_ran(served: ServedModel, root: Path, two_file_threshold: int) -> bool:
    """Whether this declaration's inputs and outputs already ran through the module: its
    template (same schema, the one check_entry built) was exported and self-tested with
    them. Then a start need not run them again (models.declare.check_entry's forward,
    ~1.5 s of torch imports). Reads files only: the user's code is not run here."""
    directory = template_dir(served, root, two_file_threshold)
    try:
        recorded = (directory / CHECKED).read_text().strip()
    except OSError:
        return False
    fingerprint = declaration_fingerprint(served.entry)
    return (directory / "template.json").exists() and recorded == fingerprint


def record_declaration(served: ServedModel, root: Path, two_file_threshold: int) -> None:
    """After a start checked the declaration in full and has its template: remember it,
    and the module's schema under what it was built from (cached_schema)."""
    directory = template_dir(served, root, two_file_threshold)
    _write_if_changed(directory / CHECKED, declaration_fingerprint(served.entry) + "\n")
    fingerprint = schema_fingerprint(served.entry)
    if fingerprint is not None:
        doc = {
            "fingerprint": fingerprint,
            "hash": served.schema.hash,
            "schema": served.schema.to_doc(),
        }
        _write_if_changed(directory / SCHEMA_CACHE, json.dumps(doc, sort_keys=True) + "\n")


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
    except OSError as exc:  # a full disk: the next start checks again, nothing worse
        log.warning("could not record %s: %s", path, exc)


SCHEMA_CACHE = "schema.json"  # beside template.json: the schema, and what it was built from
_MAX_SCHEMA_CACHE_BYTES = 64 << 20


def forget_schema(served: ServedModel, root: Path, two_file_threshold: int) -> None:
    """Drop the model's cached schema: the next start builds the module and checks it."""
    path = template_dir(served, root, two_file_threshold) / SCHEMA_CACHE
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def cached_schema(entry: ModelEntry, root: Path, two_file_threshold: int) -> Schema | None:
    """The schema a start recorded for this very declaration (models.declare's
    schema_fingerprint: declaration, factory source, torch version) beside a template
    built and self-tested from it, or None: then the start builds the module as always.

    A cache is taken only whole: its schema hashes as recorded, names its directory,
    and that directory holds the template and the declaration's record. Anything else
    (a file edited, a stray copy) is ignored with a warning and rebuilt by this start.
    """
    fingerprint = schema_fingerprint(entry)
    if fingerprint is None:
        return None
    for path in sorted((root / entry.name).glob(f"*/{SCHEMA_CACHE}")):
        try:
            if path.stat().st_size > _MAX_SCHEMA_CACHE_BYTES:
                raise ValueError("too large")
            doc = json.loads(path.read_bytes())
            if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
                continue  # another declaration's, or this one's before a change
            schema = Schema.from_doc(doc.get("schema"))
            if schema.hash != doc.get("hash"):
                raise ValueError(f"its schema hashes {schema.hash[:16]}, not as recorded")
            if template_dir(ServedModel(entry, schema), root, two_file_threshold) != path.parent:
                if path.parent.name.startswith(f"{schema.hash}-"):
                    continue  # the other layout's template (the threshold changed)
                raise ValueError("its schema does not name its directory")
            checked = (path.parent / CHECKED).read_text().strip()
            if checked != declaration_fingerprint(entry):
                raise ValueError(f"{CHECKED} is not this declaration's")
            if not (path.parent / "template.json").exists():
                raise ValueError("no template beside it")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("ignoring the cached schema %s (%s): building %s", path, exc, entry.name)
            continue
        return schema
    return None


def template_for(
    served: ServedModel, root: Path, two_file_threshold: int = TWO_FILE_THRESHOLD
) -> OnnxTemplate:
    """Load the model's template from root, or build, self-test and save it once.

    Cached per schema and layout: the threshold decides single-file or two-file.
    """
    directory = template_dir(served, root, two_file_threshold)
    layout = "two-file" if directory.name.endswith("-two-file") else "single-file"
    if (directory / "template.json").exists():
        return load_template(directory)
    log.info("exporting the %s ONNX template of %s (once per schema)", layout, served.name)
    started = time.perf_counter()
    t = build_template(served.entry, two_file_threshold=two_file_threshold)
    exported = time.perf_counter()
    log.info("exported %s in %.1f s; self-test in onnxruntime", served.name, exported - started)
    diff = template_self_test(t, served.entry)
    log.info(
        "template self-test of %s passed in %.1f s: max abs diff %.2e",
        served.name,
        time.perf_counter() - exported,
        diff,
    )
    save_template(t, directory)
    del t  # served from the saved file from now on (mapped, not held in the heap)
    heap.trim()
    return load_template(directory)


class _Stages:
    """Seconds per stage, for the log line that says where a release's time went."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._laps.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self._laps)

    def laps(self) -> tuple[tuple[str, float], ...]:
        """(stage, seconds) in order, to the millisecond: for the release.published entry."""
        return tuple((name, round(seconds, 3)) for name, seconds in self._laps)


_SYNCER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="release-fsync")
_TRIMMER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="release-trim")


def _sync_in_background(paths: Iterable[Path]) -> Future[None]:
    """fsync each file in a worker thread (fsync releases the GIL)."""
    files = list(paths)

    def sync() -> None:
        for path in files:
            fd = open_regular(path)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    return _SYNCER.submit(sync)


def payload_module(served: ServedModel, weights: Path) -> torch.nn.Module:
    """The served model holding a payload file's weights without reading them into the heap:
    built on the meta device, its tensors then map the file copy-on-write (page cache, given
    back when the module is dropped). Memory: none beyond the pages the forward pass reads."""
    import torch

    with torch.device("meta"):
        module = served.entry.factory()  # no initialisation: every tensor is replaced below
    payload = np.memmap(weights, dtype=np.uint8, mode="c")
    if payload.size != served.schema.payload_bytes:
        raise ValueError(
            f"{weights.name}: {payload.size} bytes, schema: {served.schema.payload_bytes}"
        )
    state = {name: numpy_to_tensor(a) for name, a in served.schema.views(payload).items()}
    for alias, name in served.schema.aliases:  # a tied tensor: the same pages, both names
        state[alias] = state[name]
    module.load_state_dict(state, assign=True)
    return module.eval()


def _epsilon(dp: Mapping[str, object] | None) -> float | None:
    value = None if dp is None else dp.get("epsilon")
    return float(value) if isinstance(value, int | float) else None


def _not_as_hashed(
    read: object,
    template: OnnxTemplate,
    schema: Schema,
    staging: Path,
    weights: Path,
    written: Sequence[tuple[str, int, str]],
    version: Version,
) -> str:
    """Why the weights in the release just written are not the bytes that hashed to the
    version's sha256 as its adoption recorded them (read_along's tags); "" if they are, or
    if there are no tags to tell (a caller that fed none). A data file listed with the
    version's sha256 (the version blob linked, or copied whole) is the guard's to check
    against the same tags; the weights copied into model.onnx (or a graph-layout data
    file) are checked here, tensor by tensor in payload order, so that a version file
    changed after the fold cannot have its bytes signed."""
    if not isinstance(read, PieceTags) or read.size != SEND_CHUNK_BYTES:
        return ""
    if any(sha == version.weights_sha256 for _, _, sha in written):
        return ""
    check = PieceCheck(read.finish())
    for data in released_payload(template, schema, staging, weights):
        check.feed(data)
    if check.whole():
        return ""
    return (
        f"the release's weights are not the bytes of version {version.version} as they "
        f"hashed to its sha256 (its piece {check.first_bad} differs): its file changed "
        "after the fold"
    )


def _version_tags(
    read: object, weights_sha256: str, expected: Mapping[str, tuple[int, str]]
) -> dict[str, Pieces]:
    """The adoption's tags of the version's bytes, for each release file listed with its
    sha256; none when there are no such tags (a caller that fed none)."""
    if not isinstance(read, PieceTags) or read.size != SEND_CHUNK_BYTES:
        return {}
    pieces = read.finish()
    return {name: pieces for name, (_, sha256) in expected.items() if sha256 == weights_sha256}


class ReleaseWriter:
    """Writes registry/<model>/<version>/: model.onnx (+ model.onnx.data for large models) and
    manifest.json; never a partial release.

    A release is published only after the egress guard accepted the staged files and the
    policy facts; its manifest is signed with the gateway's Ed25519 key.
    """

    def __init__(
        self,
        root: Path,
        templates: dict[str, OnnxTemplate],
        policy: GuardPolicy,
        signer: Signer,
        verdicts: Verdicts | None = None,
        *,
        metrics: Metrics | None = None,
        pieces: PieceCache | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.root = root
        self.verdicts = verdicts
        self.pieces = pieces  # tags of each release file's pieces, for the egress gate
        self.templates = templates
        self.policy = policy
        self.signer = signer

    def release_dir(self, model: str, version: int) -> Path:
        return self.root / model / str(version)

    def read_along(self) -> PieceTags:
        """Tags of the version's pieces, fed as its adoption hashes them (core/folding.py):
        the guard checks a release file listed with the version's sha256 (a data file that
        is the version blob, linked or copied whole) against them instead of hashing it
        again, and its pulls use them. The same proof as the gate's (export/pieces.py):
        tags recorded while those bytes hashed to that sha256 match only those bytes."""
        return PieceTags(SEND_CHUNK_BYTES)

    def discard(self, model: str, version: int) -> None:
        """Remove what publish() wrote for a version whose commit then failed."""
        final = self.release_dir(model, version)
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(final.with_name(f".{final.name}.staging"), ignore_errors=True)

    def drop_orphans(self, released: set[tuple[str, int]]) -> list[Path]:
        """At start-up: remove staging directories and release directories no release row
        names (a crash between the rename and the commit); returns what was removed."""
        dropped = []
        for model_dir in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not model_dir.is_dir():
                continue
            for entry in sorted(model_dir.iterdir()):
                name = entry.name
                staging = name.startswith(".") and name.endswith(".staging")
                orphan = name.isdigit() and (model_dir.name, int(name)) not in released
                if entry.is_dir() and (staging or orphan):
                    shutil.rmtree(entry, ignore_errors=True)
                    dropped.append(entry)
        return dropped

    def publish(
        self,
        served: ServedModel,
        version: Version,
        weights: Path,
        updates: Sequence[CommittedUpdate],
        dp: Mapping[str, object] | None = None,
        read: object = None,
    ) -> PublishOutcome:
        """`read`: what read_along() gave, fed every byte of `weights` as they hashed to
        version.weights_sha256 (anything else is ignored)."""
        policy = self.policy.for_model(served.entry)  # its parity tolerance and limits
        try:
            # Cheap facts first: no template work for a release policy refuses anyway.
            early = ReleaseFacts(
                version.num_trainers, parity_max_abs_diff=0.0, epsilon=_epsilon(dp)
            )
            check_policy(early, policy)
        except GuardRefused as exc:
            self.metrics.guard_refused("publish", exc.layers)
            return PublishOutcome(None, exc.reason)
        # Freed push buffers that glibc still holds go back before the parity check, the
        # gateway's largest allocation (onnxruntime holds the weights twice at load); the
        # trim runs in a worker while the release files are written (malloc_trim releases
        # the GIL), and "trim" is the wait for what is left of it.
        clock = _Stages()
        trimming = _TRIMMER.submit(heap.trim)
        template = self.templates[served.name]
        final = self.release_dir(served.name, version.version)
        staging = final.with_name(f".{final.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            # Written to the page cache only; the files reach the disk in the background
            # while parity and the guard run, and are synced before the release is renamed
            # into place (bench/: release; the fsync alone was ~40% of a 100M release).
            # The weights file is the version's blob (named by its sha256, fsynced when it
            # was adopted): a data file that is its bytes whole is a hard link to it.
            written = write_release_files(
                template,
                served.schema,
                weights,
                staging,
                durable=False,
                payload_sha256=(
                    version.weights_sha256 if weights.name == version.weights_sha256 else None
                ),
            )
            syncing = _sync_in_background(staging / name for name, _, _ in written)
            changed = _not_as_hashed(
                read, template, served.schema, staging, weights, written, version
            )
            if changed:
                return PublishOutcome(None, changed)
            clock.lap("write")
            trimming.result()
            clock.lap("trim")
            onnx_path = staging / MODEL_FILE
            try:
                # The module is a temporary: parity drops it before onnxruntime loads.
                diff = max_output_diff(onnx_path, served.entry, payload_module(served, weights))
            except ValueError as exc:
                return PublishOutcome(None, f"parity check failed: {exc}")
            clock.lap("parity")
            files = tuple(ReleaseFile(name, size, sha) for name, size, sha in written)
            manifest = canonical_json(
                {
                    "format": MANIFEST_FORMAT,
                    "model": served.name,
                    "version": version.version,
                    "parent_version": version.version - 1,
                    "rounds": [version.round],
                    "schema_hash": served.schema.hash,
                    "structure_hash": template.structure_hash,
                    "weights": weight_specs(template, served.schema),
                    "ops": sorted([d, o] for d, o in op_set(template.data)),
                    "files": [f.__dict__ for f in files],
                    "num_trainers": version.num_trainers,
                    "num_regions": version.num_regions,
                    "num_examples": version.num_examples,
                    "num_updates": len(updates),
                    "parity_max_abs_diff": diff,
                    "dp": dict(dp) if dp is not None else None,
                    "created_ms": version.created_ms,
                    "signing_key_id": self.signer.key_id,
                }
            )
            try:  # what readers (and the gate) will accept: else a release none could see
                check_fields(parse(manifest))
            except ManifestRefused as exc:
                return PublishOutcome(None, f"the manifest would not verify: {exc}")
            write_atomic(staging / MANIFEST_FILE, [manifest])
            try:
                check_policy(ReleaseFacts(version.num_trainers, diff, _epsilon(dp)), policy)
                expected = {f.name: (f.size, f.sha256) for f in files}
                # A file listed with the version's sha256 is checked against the tags of
                # the adoption's read (read_along); every other file's pieces are tagged as
                # the guard reads it. Its pulls check these tags instead of hashing it
                # whole, the first one too (gateway/export/pieces.py).
                known = _version_tags(read, version.weights_sha256, expected)
                tags = {name: PieceTags(SEND_CHUNK_BYTES) for name in expected if name not in known}
                check_release_dir(
                    staging,
                    template,
                    served.schema,
                    policy,
                    expected,
                    self.verdicts,
                    pieces=tags,
                    known=known,
                )
            except GuardRefused as exc:
                self.metrics.guard_refused("publish", exc.layers)
                return PublishOutcome(None, exc.reason)
            if self.pieces is not None:
                for name, (size, sha256) in expected.items():
                    self.pieces.put(
                        sha256, size, known[name] if name in known else tags[name].finish()
                    )
            clock.lap("guard")
            syncing.result()  # raises what fsync raised: no release without its bytes on disk
            fsync_dir(staging)
            shutil.rmtree(final, ignore_errors=True)  # a rerun after a crash writes it anew
            staging.rename(final)
            fsync_dir(final.parent)
            clock.lap("sync")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            heap.trim()
        log.info("release %d of %s: %s", version.version, served.name, clock)
        release = Release(
            model=served.name,
            version=version.version,
            round=version.round,
            created_ms=version.created_ms,
            num_trainers=version.num_trainers,
            files=files,
            manifest_json=manifest,
            signature=self.signer.sign(manifest),
        )
        return PublishOutcome(release, stages=clock.laps())
