"""Importing a new base (ImportBase, `sluice keygen/sign-import/import`) over a real gateway.

The promise under test: only a base the global program signed (with an import key whose
private half lives outside the region) becomes a version; anything else is refused before
it commits, audited, and leaves nothing behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from safetensors.numpy import save_file

from sluice.clients.sdk import AdminClient, EgressClient, Identity, TrainerClient
from sluice.gateway.cli import main
from sluice.gateway.config import load_config
from sluice.gateway.core.tensorfile import (
    DTYPES,
    KEPT_BUFFERS,
)
from sluice.gateway.pki import init_pki
from sluice.gateway.server import StartupError
from sluice.gateway.services.auth import ROLE_TABLE
from sluice.models import registry
from sluice.models.import_statement import (
    STATEMENT_FORMAT,
    ImportStatement,
    SignedStatement,
    sign_statement,
)
from sluice.models.manifest import key_id
from sluice.models.schema import Schema
from sluice.v1 import admin_pb2, admin_pb2_grpc, tensors_pb2
from tests.conftest import TINY, Running, random_delta, start_gateway
from tests.integration.test_round import _publish_one, push, wait_for_round

Code = grpc.StatusCode
TRAINERS = ["shanghai-01", "beijing-01", "chengdu-01"]
IMPORT_BASE = "/sluice.v1.AdminService/ImportBase"
CREATED_MS = 1_700_000_000_000


@functools.cache
def schema() -> Schema:
    return registry.get(TINY).schema()


def kept(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in KEPT_BUFFERS


def global_weights(seed: int) -> dict[str, np.ndarray]:
    """What the global program sends: a real module's graph tensors (BatchNorm variances
    positive, so its releases pass parity), without the counters a release lacks."""
    state = registry.get(TINY).build(seed=seed).state_dict()
    return {n: t.numpy().copy() for n, t in state.items() if not kept(n)}


def expected_payload(arrays: Mapping[str, np.ndarray], previous: bytes) -> bytes:
    """The imported version's payload: the file's tensors, the counters of `previous`."""
    views = schema().views(previous)
    return schema().flatten({**{n: views[n] for n in views if kept(n)}, **arrays})


def safetensors_file(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    save_file(dict(arrays), str(path), metadata={"model": TINY})
    return path


def raw_safetensors(path: Path, header: Any, data: bytes, length: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def layout_of(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], bytes]:
    """A safetensors header and data for arrays, in the given order, written by hand."""
    names = {np.dtype(v).str: k for k, v in DTYPES.items() if v != "bfloat16"}
    header: dict[str, Any] = {}
    data = b""
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {
            "dtype": names[a.dtype.str],
            "shape": list(a.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return header, data


@dataclass(frozen=True)
class Snapshot:
    files: list[str]
    rows: dict[str, list[tuple[Any, ...]]]


def snapshot(running: Running) -> Snapshot:
    """Every file under blobs/ and state/ and every row an import could touch."""
    root = running.data_dir
    files = sorted(
        str(p.relative_to(root))
        for d in ("blobs", "state")
        for p in (root / d).rglob("*")
        if p.is_file()
    )
    store = running.gateway.store
    rows = {
        t: [tuple(r) for r in store._all(f"SELECT * FROM {t} ORDER BY rowid")]
        for t in ("versions", "rounds", "updates", "releases")
    }
    return Snapshot(files, rows)


def audit_kinds(running: Running, kind: str) -> list[dict[str, Any]]:
    return [dict(e.detail) for e in running.gateway.store.audit_entries(kind)]


# The global program's import key: its private half signs, the gateway holds the public.


@dataclass(frozen=True)
class GlobalKey:
    private: Ed25519PrivateKey
    public: Path  # PEM, as import_keys names it

    @property
    def key_id(self) -> str:
        return key_id(self.private.public_key())


def make_key(directory: Path, name: str = "global-import") -> GlobalKey:
    private = Ed25519PrivateKey.generate()
    path = directory / f"{name}.pub"
    pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    path.write_bytes(pem)
    return GlobalKey(private, path)


@pytest.fixture(scope="module")
def global_key(tmp_path_factory: pytest.TempPathFactory) -> GlobalKey:
    return make_key(tmp_path_factory.mktemp("global-program-key"))


@pytest.fixture
def gateway(tmp_path: Path, template_cache: Path, global_key: GlobalKey) -> Iterator[Running]:
    """A gateway that trusts the global program's import key (conftest's trusts none)."""
    running = start_gateway(tmp_path / "gw", template_cache, import_keys=(global_key.public,))
    yield running
    running.gateway.stop()


def statement_for(data: bytes, **fields: Any) -> ImportStatement:
    values: dict[str, Any] = {
        "model": TINY,
        "schema_hash": schema().hash,
        "sha256": hashlib.sha256(data).hexdigest(),
        "created_ms": CREATED_MS,
    }
    values.update(fields)
    return ImportStatement(**values)


def signed(data: bytes, key: GlobalKey, **fields: Any) -> SignedStatement:
    return sign_statement(statement_for(data, **fields), key.private)


def import_file(
    running: Running,
    path: Path,
    key: GlobalKey,
    identity: Identity | None = None,
    reason: str = "",
) -> admin_pb2.ImportBaseResponse:
    """Sign path with key (as `sluice sign-import` does) and import it."""
    statement = signed(path.read_bytes(), key)
    with AdminClient(running.endpoints.internal, identity=identity) as admin:
        return admin.import_base(TINY, path, statement, reason=reason)


def header_for(data: bytes, statement: SignedStatement, **fields: Any) -> admin_pb2.ImportHeader:
    values: dict[str, Any] = {
        "model": TINY,
        "format": admin_pb2.WEIGHTS_FORMAT_SAFETENSORS,
        "file_bytes": len(data),
        "statement_json": statement.statement_json,
        "signature": statement.signature,
    }
    values.update(fields)
    return admin_pb2.ImportHeader(**values)


def send(running: Running, header: admin_pb2.ImportHeader, data: bytes) -> tuple[Code, str]:
    """An ImportBase stream written by hand (2 MiB chunks): its status and message."""

    def messages() -> Iterator[admin_pb2.ImportBaseRequest]:
        yield admin_pb2.ImportBaseRequest(header=header)
        for offset in range(0, len(data), 2 << 20):
            chunk = tensors_pb2.Chunk(offset=offset, data=data[offset : offset + (2 << 20)])
            yield admin_pb2.ImportBaseRequest(chunk=chunk)

    with grpc.insecure_channel(running.endpoints.internal) as ch:
        try:
            admin_pb2_grpc.AdminServiceStub(ch).ImportBase(messages(), timeout=30)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return Code.OK, ""


# 1. The effect: a new version, the open round on it, the exact bytes, nothing out.


def test_signed_import_sets_the_base_the_next_round_trains_from_it_and_nothing_leaves(
    gateway: Running, global_key: GlobalKey, tmp_path: Path
) -> None:
    _publish_one(gateway, schema())  # release 1; round 2 opens on version 1, empty
    with EgressClient(gateway.endpoints.egress) as egress:
        releases_before = [r.SerializeToString() for r in egress.releases(TINY)]
    with TrainerClient(gateway.endpoints.internal) as trainer:
        v1 = trainer.pull_global(TINY, 1)
    arrays = global_weights(seed=11)
    path = safetensors_file(tmp_path / "global.safetensors", arrays)
    statement = signed(path.read_bytes(), global_key)

    with AdminClient(gateway.endpoints.internal) as admin:
        done = admin.import_base(TINY, path, statement, reason="global program v7")

    want = expected_payload(arrays, v1.data)
    assert (done.model, done.version, done.round) == (TINY, 2, 2)
    assert done.weights_sha256 == hashlib.sha256(want).hexdigest()
    assert done.signing_key_id == global_key.key_id
    assert sorted(done.kept_tensors) == sorted(t.name for t in schema().tensors if kept(t.name))
    with TrainerClient(gateway.endpoints.internal) as trainer:
        info = trainer.round(TINY)
        assert (info.round, info.base_version, info.accepted) == (2, 2, 0)
        assert trainer.pull_global(TINY, info.base_version).data == want
        assert trainer.pull_global(TINY).data == want  # the newest version too
    with AdminClient(gateway.endpoints.internal) as admin:
        (status,) = admin.status().models
    assert (status.latest_version, status.latest_release, status.base_version) == (2, 1, 2)
    with EgressClient(gateway.endpoints.egress) as egress:  # inbound only: nothing new out
        assert [r.SerializeToString() for r in egress.releases(TINY)] == releases_before
        with pytest.raises(grpc.RpcError) as err:
            egress.manifest(TINY, 2)
        assert err.value.code() == Code.NOT_FOUND
    (entry,) = gateway.gateway.store.audit_entries("base.imported")
    assert (entry.actor, entry.subject) == ("operator", f"{TINY}/version/2")
    assert entry.detail["source"] == {
        "format": "safetensors",
        "verified_by": "gateway",
        "signing_key_id": global_key.key_id,
        "statement_sha256": hashlib.sha256(statement.statement_json).hexdigest(),
        "statement_created_ms": CREATED_MS,
    }
    assert entry.detail["weights_sha256"] == done.weights_sha256
    assert entry.detail["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry.detail["reason"] == "global program v7"
    assert entry.detail["previous_version"] == 1

    # The next round trains from the imported version: its fold is imported + mean delta.
    deltas = [random_delta(schema(), seed=30 + i) for i in range(3)]
    with TrainerClient(gateway.endpoints.internal) as trainer:
        for i, name in enumerate(TRAINERS):
            push(trainer, schema(), deltas[i], name, 10, round_no=2, base=2)
        wait_for_round(trainer, 3)
        merged = trainer.pull_global(TINY)
    assert merged.version == 3
    name = "trunk.1.weight"
    mean = sum(schema().views(d)[name].astype(np.float64) for d in deltas) / 3
    np.testing.assert_allclose(
        schema().views(merged.data)[name], schema().views(want)[name] + mean, rtol=1e-5, atol=1e-6
    )
    with EgressClient(gateway.endpoints.egress) as egress:
        deadline = time.monotonic() + 30
        while len(egress.releases(TINY)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        manifest = json.loads(egress.manifest(TINY, 3).manifest_json)
    assert manifest["parent_version"] == 2 and manifest["num_trainers"] == 3


def test_a_statement_may_be_imported_again_for_its_own_bytes(
    gateway: Running, global_key: GlobalKey, tmp_path: Path
) -> None:
    """Replay gives only the bytes the statement signs, for its model (docs/IMPORT.md)."""
    path = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=4))
    first, again = (import_file(gateway, path, global_key) for _ in range(2))
    assert (first.version, again.version) == (1, 2)
    assert first.weights_sha256 == again.weights_sha256
    assert len(audit_kinds(gateway, "base.imported")) == 2


# 2. Trust: no key, no import; a statement is the global program's, for these bytes only.


def test_imports_are_off_without_import_keys(
    tmp_path: Path, template_cache: Path, global_key: GlobalKey
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache)  # no import_keys
    try:
        data = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=1)).read_bytes()
        before = snapshot(running)
        code, message = send(running, header_for(data, signed(data, global_key)), data)
        assert code == Code.FAILED_PRECONDITION
        assert message.startswith("imports are off: no import_keys configured; ")
        assert snapshot(running) == before
        (refused,) = audit_kinds(running, "base.import_refused")
        assert str(refused["reason"]).startswith("imports are off")
        (started,) = audit_kinds(running, "gateway.started")
        assert started["import_key_ids"] == []
    finally:
        running.gateway.stop()


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


# case -> (header fields and the bytes sent, from the file, another file, the trusted key
# and a stranger's), the status, and what the message says.
StatementCase = Callable[[bytes, bytes, GlobalKey, GlobalKey], tuple[dict[str, Any], bytes]]


def _fields(s: SignedStatement, **more: Any) -> dict[str, Any]:
    return {"statement_json": s.statement_json, "signature": s.signature, **more}


STATEMENT_CASES: dict[str, tuple[StatementCase, Code, str]] = {
    "untrusted key": (
        lambda d, o, k, x: (_fields(signed(d, x)), d),
        Code.PERMISSION_DENIED,
        "does not verify under any import key",
    ),
    "statement changed after signing": (
        lambda d, o, k, x: (
            _fields(signed(d, k), statement_json=signed(d, k, created_ms=1).statement_json),
            d,
        ),
        Code.PERMISSION_DENIED,
        "does not verify",
    ),
    "signature bit flipped": (
        lambda d, o, k, x: (_fields(signed(d, k), signature=flip(signed(d, k).signature, 9)), d),
        Code.PERMISSION_DENIED,
        "does not verify",
    ),
    "truncated signature": (
        lambda d, o, k, x: (_fields(signed(d, k), signature=signed(d, k).signature[:63]), d),
        Code.INVALID_ARGUMENT,
        "signature of 63 bytes",
    ),
    "no statement": (
        lambda d, o, k, x: (_fields(signed(d, k), statement_json=b""), d),
        Code.INVALID_ARGUMENT,
        "carries no statement",
    ),
    "oversized statement": (
        lambda d, o, k, x: (_fields(signed(d, k), statement_json=b" " * 4096), d),
        Code.INVALID_ARGUMENT,
        "statement_json of 4096 bytes",
    ),
    "malformed statement, signed": (
        lambda d, o, k, x: (
            {
                "statement_json": (raw := json.dumps({"format": STATEMENT_FORMAT}).encode()),
                "signature": k.private.sign(raw),
            },
            d,
        ),
        Code.INVALID_ARGUMENT,
        "statement fields",
    ),
    "statement not canonical, signed": (
        lambda d, o, k, x: (
            {
                "statement_json": (
                    raw := json.dumps(json.loads(signed(d, k).statement_json), indent=1).encode()
                ),
                "signature": k.private.sign(raw),
            },
            d,
        ),
        Code.INVALID_ARGUMENT,
        "canonical",
    ),
    "statement for another model": (
        lambda d, o, k, x: (_fields(signed(d, k, model="drivenet")), d),
        Code.FAILED_PRECONDITION,
        "is for model 'drivenet'",
    ),
    "statement for another schema": (
        lambda d, o, k, x: (_fields(signed(d, k, schema_hash="0" * 64)), d),
        Code.FAILED_PRECONDITION,
        "another structure",
    ),
    "bytes swapped after signing": (
        lambda d, o, k, x: (_fields(signed(d, k)), o),
        Code.FAILED_PRECONDITION,
        "not the bytes the global program signed",
    ),
}


def test_a_base_without_the_global_programs_signature_is_refused_and_changes_nothing(
    gateway: Running, global_key: GlobalKey, tmp_path: Path
) -> None:
    _publish_one(gateway, schema())  # a release out, round 2 open and empty
    stranger = make_key(tmp_path, "stranger")
    data = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=1)).read_bytes()
    other = safetensors_file(tmp_path / "o.safetensors", global_weights(seed=2)).read_bytes()
    assert len(other) == len(data)  # a file of the same size and layout: only bytes differ
    with EgressClient(gateway.endpoints.egress) as egress:
        releases_before = [r.SerializeToString() for r in egress.releases(TINY)]
    with TrainerClient(gateway.endpoints.internal) as trainer:
        round_before = trainer.round(TINY)
    before = snapshot(gateway)
    for case, (make, want, says) in STATEMENT_CASES.items():
        fields, sent = make(data, other, global_key, stranger)
        code, message = send(gateway, header_for(sent, signed(data, global_key), **fields), sent)
        assert (code, says in message) == (want, True), (case, message)
        assert len(message) < 1024, case
        assert snapshot(gateway) == before, case
    assert not list((gateway.data_dir / "blobs" / "tmp").iterdir())
    with TrainerClient(gateway.endpoints.internal) as trainer:
        assert trainer.round(TINY) == round_before
    with EgressClient(gateway.endpoints.egress) as egress:
        assert [r.SerializeToString() for r in egress.releases(TINY)] == releases_before
    refused = audit_kinds(gateway, "base.import_refused")
    assert len(refused) == len(STATEMENT_CASES)
    by_case = dict(zip(STATEMENT_CASES, refused, strict=True))
    for case, entry in by_case.items():
        assert STATEMENT_CASES[case][2] in str(entry["reason"]), case
        assert len(str(entry["statement_sha256"])) == 64, case
    # Who signed is recorded once the signature verified, and only then.
    assert "signing_key_id" not in by_case["untrusted key"]
    swapped = by_case["bytes swapped after signing"]
    assert swapped["signing_key_id"] == global_key.key_id
    assert swapped["signed_file_sha256"] == hashlib.sha256(data).hexdigest()
    assert swapped["received_bytes"] == len(other)
    assert not audit_kinds(gateway, "base.imported")


def test_the_signature_is_checked_before_any_chunk_is_read(
    gateway: Running, global_key: GlobalKey, tmp_path: Path
) -> None:
    """A stranger's header is refused at once, though its stream never sends a chunk."""
    stranger = make_key(tmp_path, "stranger")
    data = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=1)).read_bytes()
    hold = threading.Event()

    def messages() -> Iterator[admin_pb2.ImportBaseRequest]:
        yield admin_pb2.ImportBaseRequest(header=header_for(data, signed(data, stranger)))
        hold.wait(20)  # the chunks never come

    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            admin_pb2_grpc.AdminServiceStub(ch).ImportBase(messages(), timeout=15)
        hold.set()
    assert err.value.code() == Code.PERMISSION_DENIED
    assert time.monotonic() - started < 10
    (entry,) = audit_kinds(gateway, "base.import_refused")
    assert entry["received_bytes"] == 0


# 3. Hostile files, properly signed: every refusal names what is wrong, changes nothing.


def _bad_file(case: str, path: Path) -> Path:
    """A file that must be refused; the case names the defect."""
    arrays = global_weights(seed=2)
    if case == "shape":
        arrays["trunk.1.weight"] = arrays["trunk.1.weight"][:, :256].copy()
    elif case == "dtype":
        arrays["trunk.1.bias"] = arrays["trunk.1.bias"].astype(np.float64)
    elif case == "extra":
        arrays["trunk.2.weight"] = np.zeros((2, 2), dtype=np.float32)
    elif case == "missing":
        del arrays["control_head.weight"]
    elif case in ("nan", "inf", "huge"):
        value = {"nan": np.nan, "inf": np.inf, "huge": 1e7}[case]
        arrays["backbone.1.0.weight"].reshape(-1)[77] = value
    elif case == "counter-huge":
        arrays["backbone.0.1.num_batches_tracked"] = np.array(2**62, dtype=np.int64)
    elif case in ("gap", "overlap", "duplicate-key", "not-json", "length", "metadata"):
        header, data = layout_of(arrays)
        first = next(iter(header.values()))
        if case == "gap":
            for entry in header.values():
                entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
            data = bytes(4) + data
        elif case == "overlap":
            first["data_offsets"] = [0, first["data_offsets"][1]]
            second = list(header.values())[1]
            second["data_offsets"] = [o - 4 for o in second["data_offsets"]]
        elif case == "metadata":
            header["__metadata__"] = {"model": 7}
        text = json.dumps(header).encode()
        if case == "duplicate-key":
            name = next(iter(header))
            text = text[:-1] + b', "' + name.encode() + b'": ' + json.dumps(first).encode() + b"}"
        elif case == "not-json":
            text = text[:-2]
        length = (1 << 40) if case == "length" else None
        return raw_safetensors(path, text, data, length)
    else:
        raise AssertionError(case)
    return safetensors_file(path, arrays)


BAD = (
    "shape", "dtype", "extra", "missing", "nan", "inf", "huge", "counter-huge", "gap",
    "overlap", "duplicate-key", "not-json", "length", "metadata",
)  # fmt: skip


def test_hostile_files_are_refused_and_change_nothing(
    gateway: Running, global_key: GlobalKey, tmp_path: Path
) -> None:
    """The signature says who sent a file, not that it is sound: a signed file is still
    checked tensor by tensor."""
    before = snapshot(gateway)
    for case in BAD:
        data = _bad_file(case, tmp_path / f"{case}.safetensors").read_bytes()
        code, _ = send(gateway, header_for(data, signed(data, global_key)), data)
        assert code == Code.INVALID_ARGUMENT, case
        assert snapshot(gateway) == before, case
    refused = [str(r["reason"]) for r in audit_kinds(gateway, "base.import_refused")]
    assert len(refused) == len(BAD)
    assert "tensor 'backbone.1.0.weight': element 77 is nan" in refused[BAD.index("nan")]


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"model": "nope"}, Code.NOT_FOUND),
        ({"format": admin_pb2.WEIGHTS_FORMAT_UNSPECIFIED}, Code.INVALID_ARGUMENT),
        ({"file_bytes": 1 << 40}, Code.RESOURCE_EXHAUSTED),
        ({"reason": "x" * 513}, Code.INVALID_ARGUMENT),
        ({"file_bytes": "more"}, Code.INVALID_ARGUMENT),  # the stream ends short of it
    ],
)
def test_bad_headers_are_refused_before_anything_is_kept(
    gateway: Running,
    global_key: GlobalKey,
    tmp_path: Path,
    fields: dict[str, Any],
    want: Code,
) -> None:
    data = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=1)).read_bytes()
    if fields.get("file_bytes") == "more":
        fields = {"file_bytes": len(data) + 100}
    before = snapshot(gateway)
    assert send(gateway, header_for(data, signed(data, global_key), **fields), data)[0] == want
    assert snapshot(gateway) == before
    assert len(audit_kinds(gateway, "base.import_refused")) == 1


def test_stream_order_is_checked(gateway: Running, global_key: GlobalKey, tmp_path: Path) -> None:
    data = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=1)).read_bytes()
    header = header_for(data, signed(data, global_key))
    streams = {
        "no header": [admin_pb2.ImportBaseRequest(chunk=tensors_pb2.Chunk(offset=0, data=data))],
        "two headers": [admin_pb2.ImportBaseRequest(header=header)] * 2,
        "empty chunk": [
            admin_pb2.ImportBaseRequest(header=header),
            admin_pb2.ImportBaseRequest(chunk=tensors_pb2.Chunk(offset=0)),
        ],
        "wrong offset": [
            admin_pb2.ImportBaseRequest(header=header),
            admin_pb2.ImportBaseRequest(chunk=tensors_pb2.Chunk(offset=8, data=data)),
        ],
        "empty": [],
    }
    before = snapshot(gateway)
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        for what, messages in streams.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.ImportBase(iter(messages), timeout=30)
            assert err.value.code() == Code.INVALID_ARGUMENT, what
    assert snapshot(gateway) == before


def test_interrupted_import_leaves_nothing(
    gateway: Running, global_key: GlobalKey, tmp_path: Path
) -> None:
    data = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=1)).read_bytes()
    before = snapshot(gateway)
    resume = threading.Event()

    def messages() -> Iterator[admin_pb2.ImportBaseRequest]:
        yield admin_pb2.ImportBaseRequest(header=header_for(data, signed(data, global_key)))
        yield admin_pb2.ImportBaseRequest(chunk=tensors_pb2.Chunk(offset=0, data=data[:1000]))
        resume.wait(10)  # the operator's laptop went to sleep; the call is cancelled

    spool = gateway.data_dir / "blobs" / "tmp"
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        call = admin_pb2_grpc.AdminServiceStub(ch).ImportBase.future(messages(), timeout=30)
        deadline = time.monotonic() + 10
        while not list(spool.iterdir()):  # the gateway is spooling the file
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        call.cancel()
        resume.set()
        assert call.cancelled()
    ended = ("base.import_interrupted", "base.import_refused")
    while not any(audit_kinds(gateway, kind) for kind in ended):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert snapshot(gateway) == before
    assert not list(spool.iterdir())


# 4. The round: updates trained from the old base are never folded onto the new one.


def test_a_round_with_updates_refuses_the_import_until_it_closed(
    gateway: Running, global_key: GlobalKey, tmp_path: Path
) -> None:
    path = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=4))
    with TrainerClient(gateway.endpoints.internal) as trainer:
        push(trainer, schema(), random_delta(schema(), seed=1), TRAINERS[0], 10)
        before = snapshot(gateway)
        with pytest.raises(grpc.RpcError) as err:
            import_file(gateway, path, global_key)
        assert err.value.code() == Code.FAILED_PRECONDITION
        assert "close it first" in (err.value.details() or "")
        assert snapshot(gateway) == before
        for name in TRAINERS[1:]:
            push(trainer, schema(), random_delta(schema(), seed=2), name, 10)
        wait_for_round(trainer, 2)
        done = import_file(gateway, path, global_key)
        assert (done.version, done.round) == (2, 2)
        assert trainer.round(TINY).base_version == 2
        # A trainer still on version 1 is told to pull again.
        with pytest.raises(grpc.RpcError) as err:
            push(trainer, schema(), random_delta(schema(), seed=3), TRAINERS[0], 10, 2, 1)
        assert err.value.code() == Code.FAILED_PRECONDITION


def test_fedbuff_rebases_the_open_buffer_with_its_updates(
    tmp_path: Path, template_cache: Path, global_key: GlobalKey
) -> None:
    running = start_gateway(
        tmp_path / "gw", template_cache, fedbuff=True, import_keys=(global_key.public,)
    )
    try:
        with TrainerClient(running.endpoints.internal) as trainer:
            push(trainer, schema(), random_delta(schema(), seed=1), TRAINERS[0], 10)
            path = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=4))
            done = import_file(running, path, global_key)
            assert (done.version, done.round) == (1, 1)
            info = trainer.round(TINY)
            assert (info.base_version, info.accepted) == (1, 1)
            for name in TRAINERS[1:]:
                push(trainer, schema(), random_delta(schema(), seed=2), name, 10, base=1)
            wait_for_round(trainer, 2)
        (closed,) = running.gateway.store.audit_entries("round.closed")
        assert closed.detail["base_version"] == 1 and closed.detail["version"] == 2
    finally:
        running.gateway.stop()


def test_the_privacy_ledger_goes_on_across_an_import(
    tmp_path: Path, template_cache: Path, global_key: GlobalKey
) -> None:
    running = start_gateway(
        tmp_path / "gw",
        template_cache,
        dp_noise_multiplier=1.0,
        dp_clipping_norm=0.05,
        import_keys=(global_key.public,),
    )
    try:
        with TrainerClient(running.endpoints.internal) as trainer:
            for i, name in enumerate(TRAINERS):
                push(trainer, schema(), random_delta(schema(), seed=i), name, 10)
            wait_for_round(trainer, 2)
            path = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=4))
            assert import_file(running, path, global_key).version == 2
            for i, name in enumerate(TRAINERS):
                push(trainer, schema(), random_delta(schema(), seed=i), name, 10, 2, 2)
            wait_for_round(trainer, 3)
        state = running.data_dir / "state" / TINY
        assert (state / "2" / "dp_ledger.json").read_bytes() == (
            state / "1" / "dp_ledger.json"
        ).read_bytes()
        ledger = json.loads((state / "3" / "dp_ledger.json").read_text())
        assert len(ledger["rounds"]) == 2  # not 1: an import does not reset epsilon
    finally:
        running.gateway.stop()


# 5. Roles, over mTLS: only an operator imports, and only what the global program signed.


def test_only_an_operator_may_import(
    tmp_path: Path, template_cache: Path, global_key: GlobalKey
) -> None:
    layout = init_pki(
        tmp_path / "pki",
        trainers=[("shanghai-01", "shanghai")],
        readers=["global-team"],
        operators=["ops"],
    )
    running = start_gateway(
        tmp_path / "gw",
        template_cache,
        insecure_loopback=False,
        pki_dir=layout.directory,
        import_keys=(global_key.public,),
    )
    try:
        path = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=4))
        before = snapshot(running)
        for name in ("shanghai-01", "global-team"):
            with pytest.raises(grpc.RpcError) as err:
                who = Identity.from_pki(layout.directory, name)
                import_file(running, path, global_key, identity=who)
            assert err.value.code() == Code.PERMISSION_DENIED
        assert snapshot(running) == before
        denied = running.gateway.store.audit_entries("auth.denied")
        assert {(e.actor, e.subject) for e in denied} == {
            ("shanghai-01", IMPORT_BASE),
            ("global-team", IMPORT_BASE),
        }
        assert ROLE_TABLE[IMPORT_BASE] == frozenset({"operator"})
        ops = Identity.from_pki(layout.directory, "ops")
        # The operator's own key is not the global program's: refused, audited as ops.
        rogue = make_key(tmp_path, "rogue")
        with pytest.raises(grpc.RpcError) as err:
            import_file(running, path, rogue, identity=ops)
        assert err.value.code() == Code.PERMISSION_DENIED
        (refusal,) = running.gateway.store.audit_entries("base.import_refused")
        assert refusal.actor == "ops"
        assert snapshot(running) == before
        assert import_file(running, path, global_key, identity=ops).version == 1
        (entry,) = running.gateway.store.audit_entries("base.imported")
        assert entry.actor == "ops"
    finally:
        running.gateway.stop()


# 6. Configuration: keys from sluice.toml (relative to it), the environment, a bad key.


def test_import_keys_are_configured_and_checked_at_start(
    tmp_path: Path, template_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "etc" / "keys").mkdir(parents=True)
    old, new = (
        make_key(tmp_path / "etc" / "keys", "old"),
        make_key(tmp_path / "etc" / "keys", "new"),
    )
    toml = tmp_path / "etc" / "sluice.toml"
    toml.write_text('[gateway]\nimport_keys = ["keys/old.pub", "keys/new.pub"]\n')
    config = load_config(toml, environ={})
    assert config.import_keys == (old.public, new.public)
    env = load_config(None, environ={"SLUICE_IMPORT_KEYS": f"{old.public}, {new.public}"})
    assert env.import_keys == (old.public, new.public)
    # Two keys (a rotation): either one's statement is trusted, and the entry names which.
    running = start_gateway(tmp_path / "gw", template_cache, import_keys=config.import_keys)
    try:
        path = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=4))
        assert import_file(running, path, new).signing_key_id == new.key_id
        (started,) = audit_kinds(running, "gateway.started")
        assert started["import_key_ids"] == sorted([old.key_id, new.key_id])
    finally:
        running.gateway.stop()

    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    with pytest.raises(StartupError, match=r"import_keys: .*bad\.pub: not a PEM public key"):
        start_gateway(tmp_path / "gw2", template_cache, import_keys=(bad,))
    shutil.copytree(template_cache, tmp_path / "gw3" / "templates")
    code = main(["serve", "--data-dir", str(tmp_path / "gw3"), "--models", TINY,
                 "--insecure-loopback", "--import-key", str(tmp_path / "missing.pub")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sluice serve: import_keys: public key ") and "missing.pub" in err
