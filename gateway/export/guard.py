"""The egress guard: a release leaves only if policy, its files and its bytes all check out."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import mmap
import os
import stat
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sluice.gateway.core.errors import InvalidInput, PolicyRefused
from sluice.gateway.core.finite import FiniteCheck
from sluice.gateway.export.pieces import PieceCheck, Pieces, PieceTags
from sluice.gateway.export.template import OnnxTemplate
from sluice.models import artifact
from sluice.models.artifact import ArtifactRefused, StructureLimits, inspect_onnx
from sluice.models.entry import ModelEntry
from sluice.models.manifest import MAX_MANIFEST_BYTES, MODEL_FILE
from sluice.models.schema import Schema, TensorSpec

MANIFEST_FILE = "manifest.json"

# Layers that can refuse, named in GuardRefused.layers so callers and tests can tell.
POLICY = "policy"
FILES = "files"
TEMPLATE = "template"
PARSE = "parse"
VALUES = "values"  # a weight that is NaN or Inf: its bit pattern is a channel
SIGNATURE = "signature"  # the stored manifest or its signature (gateway.export.release_check)

_READ_BYTES = 16 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Op sets of templates, by structure hash (which pins every byte but the weights).
_template_ops: dict[str, frozenset[tuple[str, str]]] = {}


class GuardRefused(PolicyRefused):
    """The egress guard refused a release; `reason` says what was found, for the audit log."""

    def __init__(self, reason: str, layers: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.layers = layers  # which checks failed: POLICY, FILES, TEMPLATE, PARSE


@dataclass(frozen=True)
class GuardPolicy:
    min_trainers: int = 3  # distinct trainers a release must aggregate (k)
    parity_tolerance: float = 1e-4  # max abs diff onnxruntime vs torch
    max_epsilon: float | None = None  # DP budget a release may spend; None: not enforced
    max_constant_bytes: int = 64  # largest Constant node value in the graph
    limits: StructureLimits = field(default_factory=StructureLimits)  # totals, per file

    def for_model(self, entry: ModelEntry) -> GuardPolicy:
        """This policy with what the model's declaration sets: its parity tolerance (a
        float16 graph differs more from torch than a float32 one) and structure limits
        (a bigger graph holds more names and nodes). Everything else is the gateway's."""
        return dataclasses.replace(
            self, parity_tolerance=entry.parity_tolerance, limits=entry.limits
        )


class Verdicts:
    """model.onnx contents the guard accepted: by sha256, with the template, schema and
    policy they were checked against.

    A file whose sha256 (computed on every call, from the bytes read) equals an accepted
    one holds the very bytes that were checked, so the parse and template layers need not
    run again on it; listing, links, sizes and hashes are still checked on every call.
    Shared by publish and the egress gate: the first pull of a release is already cheap.
    """

    def __init__(self) -> None:
        self._accepted: set[tuple[str, str, str, GuardPolicy]] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _key(
        sha256: str, t: OnnxTemplate, schema: Schema, policy: GuardPolicy
    ) -> tuple[str, str, str, GuardPolicy]:
        return (sha256, t.structure_hash, schema.hash, policy)

    def accepted(self, sha256: str, t: OnnxTemplate, schema: Schema, policy: GuardPolicy) -> bool:
        with self._lock:
            return self._key(sha256, t, schema, policy) in self._accepted

    def accept(self, sha256: str, t: OnnxTemplate, schema: Schema, policy: GuardPolicy) -> None:
        with self._lock:
            self._accepted.add(self._key(sha256, t, schema, policy))


@dataclass(frozen=True)
class ReleaseFacts:
    num_trainers: int  # distinct trainers aggregated into the version
    parity_max_abs_diff: float | None  # None: the parity check did not run
    epsilon: float | None = None  # DP epsilon spent; None: no DP figure


def check_policy(facts: ReleaseFacts, policy: GuardPolicy) -> None:
    """Refuse a release that aggregates too few trainers, failed parity or overspent DP."""
    if facts.num_trainers < policy.min_trainers:
        raise GuardRefused(
            f"aggregates {facts.num_trainers} distinct trainers; a release needs at least "
            f"{policy.min_trainers}",
            (POLICY,),
        )
    diff = facts.parity_max_abs_diff
    if diff is None or not diff <= policy.parity_tolerance:  # `not <=` also refuses NaN
        found = "no parity result" if diff is None else f"parity max abs diff {diff:.3g}"
        raise GuardRefused(
            f"{found}; onnxruntime must match torch within {policy.parity_tolerance:g}",
            (POLICY,),
        )
    if policy.max_epsilon is not None:
        eps = facts.epsilon
        if eps is None or not (math.isfinite(eps) and 0 <= eps <= policy.max_epsilon):
            found = "no DP epsilon" if eps is None else f"DP epsilon {eps:g}"
            raise GuardRefused(
                f"{found}; the policy allows at most epsilon {policy.max_epsilon:g}", (POLICY,)
            )


def graph_weights(template: OnnxTemplate, schema: Schema) -> list[TensorSpec]:
    """The schema tensors the graph holds (not num_batches_tracked), in schema order."""
    names = {r.name for r in template.ranges}
    return [spec for spec in schema.tensors if spec.name in names]


def data_file_weights(template: OnnxTemplate, schema: Schema) -> list[TensorSpec]:
    """The tensors a release lists, in schema order: in the payload layout every schema
    tensor (the data file is the payload), else the graph's."""
    if template.data_file is not None and template.payload_bytes is not None:
        return list(schema.tensors)
    return graph_weights(template, schema)


def outside_graph(template: OnnxTemplate, schema: Schema) -> frozenset[str]:
    """Listed tensors the graph does not read (the payload layout's BatchNorm counters)."""
    names = {r.name for r in template.ranges}
    return frozenset(t.name for t in data_file_weights(template, schema) if t.name not in names)


def weight_specs(template: OnnxTemplate, schema: Schema) -> list[dict[str, object]]:
    """The release's tensors in schema order: what the global team checks a file against
    (and, in the two-file layout, the order of the tensors in model.onnx.data, end to end).
    A tensor the graph does not read is marked `"in_graph": false`."""
    outside = outside_graph(template, schema)
    return [
        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
        | ({"in_graph": False} if t.name in outside else {})
        for t in data_file_weights(template, schema)
    ]


def _allowed_ops(template: OnnxTemplate) -> frozenset[tuple[str, str]]:
    ops = _template_ops.get(template.structure_hash)
    if ops is None:
        ops = _template_ops[template.structure_hash] = artifact.op_set(template.data)
    return ops


def _template_findings(data: bytes | memoryview, t: OnnxTemplate, schema: Schema) -> list[str]:
    """Differences from the template outside the weight ranges, and wrong range sizes."""
    specs = {spec.name: spec for spec in schema.tensors}
    for r in t.ranges:
        spec = specs.get(r.name)
        if spec is None or r.end - r.start != spec.num_bytes:
            size = "no such tensor" if spec is None else f"{spec.num_bytes} bytes"
            # The template itself is wrong for this schema: nothing can pass it.
            return [f"template range {r.name!r} holds {r.end - r.start} bytes, schema: {size}"]
    got = np.frombuffer(data, dtype=np.uint8)
    want = np.frombuffer(t.data, dtype=np.uint8)
    findings = []
    if got.size != want.size:
        findings.append(f"{got.size} bytes where the template of {t.model!r} has {want.size}")
    # A two-file template's ranges lie in the data file: its model.onnx must match whole.
    ranges = t.ranges if t.data_file is None else ()
    # The structure between the ranges, compared up to where the shorter file ends.
    stop = min(got.size, want.size)
    starts = [r.start for r in ranges] + [want.size]
    ends = [0] + [r.end for r in ranges]
    for begin, end in zip(ends, starts, strict=True):
        a, b = got[min(begin, stop) : min(end, stop)], want[min(begin, stop) : min(end, stop)]
        if not np.array_equal(a, b):
            first = begin + int(np.argmax(a != b))
            findings.append(f"differs from the template at byte {first}, outside the weights")
            break
    return findings


def _value_findings(data: bytes | memoryview, t: OnnxTemplate, schema: Schema) -> list[str]:
    """Non-finite weights in a single-file model.onnx (a two-file layout's values lie in its
    data file, checked as it is read)."""
    if t.data_file is not None:
        return []
    specs = {spec.name: spec for spec in schema.tensors}
    view = memoryview(data)
    for r in t.ranges:
        spec = specs.get(r.name)
        if spec is None or not spec.is_float or r.end > len(view):
            continue  # reported by the template layer
        try:
            FiniteCheck(Schema((spec,))).feed(view[r.start : r.end])
        except InvalidInput as exc:
            return [str(exc)]
    return []


def _parse_findings(
    data: bytes | memoryview, t: OnnxTemplate, schema: Schema, policy: GuardPolicy
) -> list[str]:
    """What the template-free check of models.artifact finds, with the template's op set."""
    try:
        report = inspect_onnx(
            data,
            data_file_weights(t, schema),
            allowed_ops=_allowed_ops(t),
            max_constant_bytes=policy.max_constant_bytes,
            external_data_file=t.data_file,
            limits=policy.limits,
            outside_graph=outside_graph(t, schema),
        )
    except ArtifactRefused as exc:
        return [str(exc)]
    findings = []
    if report.structure_hash != t.structure_hash:
        findings.append(
            f"structure hash {report.structure_hash[:16]} is not the template's "
            f"{t.structure_hash[:16]}"
        )
    if t.data_file is None:
        if [(s.name, s.start, s.end) for s in report.ranges] != [
            (r.name, r.start, r.end) for r in t.ranges
        ]:
            findings.append("weight ranges differ from the template's")
    elif report.external_data_bytes != t.data_file_bytes:
        findings.append(
            f"the graph reads {report.external_data_bytes} bytes of {t.data_file}, "
            f"the template {t.data_file_bytes}"
        )
    return findings


def check_model_bytes(
    data: bytes | memoryview, template: OnnxTemplate, schema: Schema, policy: GuardPolicy
) -> None:
    """Refuse a model.onnx unless both independent checks accept it.

    (1) Template: outside its weight ranges it is byte-identical to the template, with
    the same length and each range exactly the schema tensor's size (a two-file
    template's model.onnx holds no weights and must match whole); (2) parse: the
    template-free check of models.artifact accepts it with the template's op set and
    finds the template's structure hash; (3) values: every float weight is finite (NaN and
    Inf payloads are bit patterns a reader could decode). The reason names every failing
    layer, the parse finding first: it says what is wrong (an extra initializer), not merely where.
    Memory: two copies of data for the parse; the template comparison copies nothing.
    """
    if schema.hash != template.schema_hash:
        raise GuardRefused(
            f"template of {template.model!r} is for schema {template.schema_hash[:16]}, "
            f"not {schema.hash[:16]}",
            (TEMPLATE,),
        )
    findings = [(PARSE, f) for f in _parse_findings(data, template, schema, policy)]
    findings += [(TEMPLATE, f) for f in _template_findings(data, template, schema)]
    if not findings:  # the ranges hold the weights only when the structure is the template's
        findings = [(VALUES, f) for f in _value_findings(data, template, schema)]
    if findings:
        layers = tuple(dict.fromkeys(layer for layer, _ in findings))
        raise GuardRefused(
            f"{MODEL_FILE} refused: " + "; ".join(f"{layer}: {f}" for layer, f in findings),
            layers,
        )


def _refuse_files(reason: str) -> GuardRefused:
    return GuardRefused(reason, (FILES,))


def _open_regular(dir_fd: int, name: str) -> int:
    """An fd for a regular file in the directory; a symlink or anything else is refused."""
    try:
        # O_NONBLOCK: a FIFO is refused below instead of holding the open for a writer.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise _refuse_files(f"{name}: cannot be opened without following links: {exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse_files(f"{name}: not a regular file")
    os.set_blocking(fd, True)
    return fd


def _read_checked(
    dir_fd: int,
    name: str,
    size: int,
    sha256: str,
    values: FiniteCheck | None = None,
    pieces: PieceTags | None = None,
    known: Pieces | None = None,
) -> None:
    """Check one file's size and sha256 (and, given `values`, that the weights it holds are
    finite) as it is streamed through two small buffers: a worker hashes one (and feeds
    `pieces`) while this thread reads the next and checks its values (all release the GIL).
    Given `known`, the tags of an earlier read of bytes that hashed to this sha256, every
    piece is checked against them instead (the same bytes, for a quarter of the CPU)."""
    fd = _open_regular(dir_fd, name)
    digest = _identity(sha256, known)
    hashed: Future[None] | None = None
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise _refuse_files(f"{name}: {actual} bytes, the manifest says {size}")
        buffers = [memoryview(bytearray(min(size, _READ_BYTES))) for _ in range(2)]
        pos, turn = 0, 0
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            while pos < size:
                # This buffer's last hash job finished before the other buffer's was queued.
                buf = buffers[turn % 2]
                n = f.readinto(buf[: min(size - pos, len(buf))])
                if not n:
                    raise _refuse_files(f"{name}: ended {size - pos} bytes early while read")
                if values is not None:
                    try:
                        values.feed(buf[:n])
                    except InvalidInput as exc:
                        raise GuardRefused(f"{name}: {exc}", (VALUES,)) from exc
                if hashed is not None:
                    hashed.result()  # pieces are hashed in order
                hashed = _STREAM_HASHERS.submit(_digest_piece, digest, pieces, buf[:n])
                pos += n
                turn += 1
            if f.read(1):
                raise _refuse_files(f"{name}: grew while being read")
    finally:
        if hashed is not None:
            hashed.result()  # before the buffers can be reused or dropped
        os.close(fd)
    refusal = digest.refusal(name)
    if refusal is not None:
        raise _refuse_files(refusal)


class _Sha256:
    """A file is the one the manifest lists if it hashes to the listed sha256."""

    def __init__(self, sha256: str) -> None:
        self.expected = sha256
        self._hash = hashlib.sha256()

    def update(self, data: memoryview) -> None:
        self._hash.update(data)

    def refusal(self, name: str) -> str | None:
        got = self._hash.hexdigest()
        if got == self.expected:
            return None
        return f"{name}: sha256 {got[:16]}..., the manifest says {self.expected[:16]}..."


class _Tagged:
    """Or if every piece has the tag it had when an earlier read hashed to that sha256."""

    def __init__(self, known: Pieces) -> None:
        self._check = PieceCheck(known)

    def update(self, data: memoryview) -> None:
        self._check.feed(data)

    def refusal(self, name: str) -> str | None:
        if self._check.whole():
            return None
        return (
            f"{name}: piece {self._check.first_bad} differs from the bytes that hashed to the "
            f"manifest's sha256 when checked before"
        )


def _identity(sha256: str, known: Pieces | None) -> _Sha256 | _Tagged:
    return _Sha256(sha256) if known is None else _Tagged(known)


def _digest_piece(digest: _Sha256 | _Tagged, pieces: PieceTags | None, data: memoryview) -> None:
    """digest, and pieces beside it in a second worker: the sha256 releases the GIL while
    the tags (which hold it) are computed, so tagging adds CPU but hardly any time."""
    tagged = _TAGGERS.submit(pieces.feed, data) if pieces is not None else None
    try:
        digest.update(data)
    finally:
        if tagged is not None:
            tagged.result()  # before the buffer can be reused


# Files hashed as they are read (_read_checked, _read_whole), one job in flight per file:
# pulls that run at once do not queue behind one thread.
_STREAM_HASHERS = ThreadPoolExecutor(
    max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="guard-stream-sha256"
)
_TAGGERS = ThreadPoolExecutor(
    max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="guard-stream-tags"
)


def _read_whole(
    dir_fd: int,
    name: str,
    size: int,
    sha256: str,
    pieces: PieceTags | None = None,
    known: Pieces | None = None,
) -> memoryview:
    """A file's bytes, exactly `size` of them, into one private buffer, refused unless they
    hash to sha256 (or match `known`, as in _read_checked): the checks that follow see the
    bytes that were hashed, whatever happens to the file. A worker hashes each part read
    (and feeds `pieces`) while this thread reads the next (both release the GIL)."""
    fd = _open_regular(dir_fd, name)
    digest = _identity(sha256, known)
    hashed: Future[None] | None = None
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise _refuse_files(f"{name}: {actual} bytes, the manifest says {size}")
        buf = _private_buffer(size)
        pos = 0
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            while pos < size:
                n = f.readinto(buf[pos : min(size, pos + _READ_BYTES)])
                if not n:
                    raise _refuse_files(f"{name}: ended {size - pos} bytes early while read")
                if hashed is not None:
                    hashed.result()  # parts are hashed in order
                hashed = _STREAM_HASHERS.submit(_digest_piece, digest, pieces, buf[pos : pos + n])
                pos += n
            if f.read(1):
                raise _refuse_files(f"{name}: grew while being read")
    finally:
        if hashed is not None:
            hashed.result()
        os.close(fd)
    refusal = digest.refusal(name)
    if refusal is not None:
        raise _refuse_files(refusal)
    return buf


def _private_buffer(size: int) -> memoryview:
    """size writable bytes of anonymous memory, its pages faulted in by the kernel in one
    call (MAP_POPULATE): half the cost of a bytearray's page by page (bench/: release),
    and unmapped, not kept by the allocator, when the last view of it goes."""
    if size == 0:
        return memoryview(bytearray())
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, size, flags=flags))


def _check_manifest_file(dir_fd: int, manifest_json: bytes | None) -> None:
    """manifest.json is a regular file; given the signed bytes, it holds exactly them."""
    fd = _open_regular(dir_fd, MANIFEST_FILE)
    try:
        if manifest_json is None:
            return  # its signature is checked by the caller
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            on_disk = f.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    if on_disk != manifest_json:
        raise _refuse_files(f"{MANIFEST_FILE}: differs from the signed manifest")


def check_release_dir(
    directory: Path,
    template: OnnxTemplate,
    schema: Schema,
    policy: GuardPolicy,
    expected: Mapping[str, tuple[int, str]],
    verdicts: Verdicts | None = None,
    manifest_json: bytes | None = None,
    pieces: Mapping[str, PieceTags] | None = None,
    known: Mapping[str, Pieces] | None = None,
) -> None:
    """Refuse a release directory unless it is exactly what the manifest lists.

    expected maps each file name to its (size, sha256 hex): model.onnx, plus the data
    file when the template has the two-file layout. The directory must hold those files
    and manifest.json and nothing else (no side file, subdirectory or symlink); each is
    read without following links and must match; the data file must be exactly as long
    as the graph's weights; then model.onnx must pass check_model_bytes, unless verdicts
    holds its sha256 (which the read just confirmed) as accepted for this template, schema
    and policy. Given manifest_json (the signed bytes), manifest.json must hold exactly them.
    The data file's weights must be finite (skipped for a data file the verdicts accepted,
    its sha256 still checked). Given pieces, each named file's piece tags are filled from
    the very bytes checked (see gateway.export.pieces). Given known, each named file is
    checked against the tags an earlier read of bytes with the listed sha256 recorded
    instead of hashed whole: it matches them only if it holds those very bytes. Memory:
    model.onnx twice while it is parsed; nothing when the verdict is known.
    """
    pieces, known = pieces or {}, known or {}
    layout = {MODEL_FILE} if template.data_file is None else {MODEL_FILE, template.data_file}
    if set(expected) != layout:
        raise _refuse_files(
            f"the template of {template.model!r} makes releases of {sorted(layout)}; "
            f"the manifest lists {sorted(expected)}"
        )
    if template.data_file is not None and expected[template.data_file][0] != (
        template.data_file_bytes
    ):
        raise _refuse_files(
            f"{template.data_file}: the manifest says {expected[template.data_file][0]} bytes, "
            f"the release's tensors are {template.data_file_bytes}"
        )
    try:
        dir_fd = os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        raise _refuse_files(f"{directory}: not a directory we can open: {exc}") from exc
    try:
        present = set(os.listdir(dir_fd))
        wanted = {*expected, MANIFEST_FILE}
        if present != wanted:
            extra, missing = sorted(present - wanted), sorted(wanted - present)
            shown = [name[:64] for name in extra[:5]] + ["..."] * (len(extra) > 5)
            raise _refuse_files(
                f"{directory.name}: unexpected entries {shown}, missing {missing}; "
                f"a release holds exactly {sorted(wanted)}"
            )
        for name in sorted(present):
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise _refuse_files(f"{name}: is a symlink")
            if not stat.S_ISREG(mode):
                raise _refuse_files(f"{name}: not a regular file")
        _check_manifest_file(dir_fd, manifest_json)
        for name in sorted(expected):
            if name != MODEL_FILE:
                # Streamed: the data file of a large model is never held in memory.
                size, sha256 = expected[name]
                key = f"{sha256}:{name}"  # a data file's verdict, apart from model.onnx's
                accepted = verdicts is not None and verdicts.accepted(key, template, schema, policy)
                values = (
                    None
                    if accepted
                    else FiniteCheck(Schema(tuple(data_file_weights(template, schema))))
                )
                _read_checked(dir_fd, name, size, sha256, values, pieces.get(name), known.get(name))
                if verdicts is not None:
                    verdicts.accept(key, template, schema, policy)
        size, sha256 = expected[MODEL_FILE]
        if verdicts is not None and verdicts.accepted(sha256, template, schema, policy):
            # Hashed as read: these are the very bytes that passed before.
            _read_checked(
                dir_fd,
                MODEL_FILE,
                size,
                sha256,
                None,
                pieces.get(MODEL_FILE),
                known.get(MODEL_FILE),
            )
            return
        # Hashed as read: a changed file is refused as such, before its bytes are judged.
        model = _read_whole(
            dir_fd, MODEL_FILE, size, sha256, pieces.get(MODEL_FILE), known.get(MODEL_FILE)
        )
    finally:
        os.close(dir_fd)
    check_model_bytes(model, template, schema, policy)
    if verdicts is not None:
        verdicts.accept(sha256, template, schema, policy)
