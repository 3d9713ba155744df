"""An insider who can write registry/ and sluice.db, but holds no signing key, gets nothing
out: every pull, listing and manifest is decided from the verified signed manifest."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.gateway.cli import main
from sluice.gateway.export.gate import Caller
from sluice.gateway.export.guard import VALUES
from sluice.models.manifest import canonical_json
from sluice.models.schema import Schema
from sluice.v1 import egress_pb2
from tests.conftest import TINY, Running, random_delta
from tests.integration.test_egress_gate import public_key_path
from tests.integration.test_round import _publish_one, push, wait_for_round

Code = grpc.StatusCode
READER = Caller("test-reader", "in-process")


def release_dir(running: Running, version: int = 1) -> Path:
    return running.data_dir / "registry" / TINY / str(version)


def sql(running: Running, statement: str, *params: object) -> None:
    """What an insider with write access to sluice.db does, behind the gateway's back."""
    db = sqlite3.connect(running.data_dir / "sluice.db")
    try:
        db.execute(statement, params)
        db.commit()
    finally:
        db.close()


def first_weight_range(running: Running) -> tuple[int, int]:
    template = running.gateway.releases.templates[TINY]
    r = max(template.ranges, key=lambda r: r.end - r.start)
    return r.start, r.end


def frame_bytes(size: int) -> bytes:
    """A stand-in for a video frame: bytes no aggregate would hold."""
    return bytes(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8))


def pull_all(running: Running, version: int = 0, file: str = "") -> bytes:
    """Everything PullRelease sends, or the RpcError it ends with (no byte may come first)."""
    with EgressClient(running.endpoints.egress) as egress:
        msgs = list(egress.pull_stream(TINY, version=version, file=file))
    return b"".join(m.chunk.data for m in msgs[1:])


def refused_before_any_byte(running: Running, version: int = 0, file: str = "") -> grpc.RpcError:
    received: list[object] = []
    with EgressClient(running.endpoints.egress) as egress, pytest.raises(grpc.RpcError) as err:
        for msg in egress.pull_stream(TINY, version=version, file=file):
            received.append(msg)
    assert received == [], "a message left before the refusal"
    return err.value


def publish_two(running: Running, schema: Schema) -> None:
    _publish_one(running, schema)
    with TrainerClient(running.endpoints.internal) as client:
        for i, name in enumerate(["shanghai-01", "beijing-01", "chengdu-01"]):
            push(client, schema, random_delta(schema, seed=20 + i), name, 10, round_no=2, base=1)
        wait_for_round(client, 3)
    with EgressClient(running.endpoints.egress) as egress:
        assert [r.version for r in egress.releases(TINY)] == [2, 1]


# --- 1. a pull is decided by signed facts only ------------------------------------------


def test_the_frame_in_the_weights_with_a_rewritten_row_never_leaves(
    gateway: Running, tiny_schema: Schema
) -> None:
    _publish_one(gateway, tiny_schema)
    path = release_dir(gateway) / "model.onnx"
    start, end = first_weight_range(gateway)
    data = bytearray(path.read_bytes())
    data[start:end] = frame_bytes(end - start)  # same size, same place
    path.write_bytes(bytes(data))
    sha = hashlib.sha256(data).hexdigest()
    files = json.dumps([{"name": "model.onnx", "sha256": sha, "size": len(data)}])
    sql(gateway, "UPDATE releases SET files_json = ? WHERE version = 1", files)

    err = refused_before_any_byte(gateway)
    assert err.code() == Code.DATA_LOSS and "withheld" in (err.details() or "")
    store = gateway.gateway.store
    assert store.audit_entries("egress.pull") == []
    (refused,) = store.audit_entries("egress.refused")
    assert refused.subject == f"{TINY}/release/1/model.onnx"
    assert "disagrees with the signed manifest" in str(refused.detail["reason"])
    # The listing does not advertise the row's facts either.
    with EgressClient(gateway.endpoints.egress) as egress:
        (listed,) = egress.releases(TINY)
    assert listed.files[0].sha256 != sha


def test_the_frame_with_the_on_disk_manifest_edited_never_leaves(
    gateway: Running, tiny_schema: Schema
) -> None:
    _publish_one(gateway, tiny_schema)
    directory = release_dir(gateway)
    start, end = first_weight_range(gateway)
    data = bytearray((directory / "model.onnx").read_bytes())
    data[start:end] = frame_bytes(end - start)
    (directory / "model.onnx").write_bytes(bytes(data))
    doc = json.loads((directory / "manifest.json").read_bytes())
    doc["files"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / "manifest.json").write_bytes(canonical_json(doc))
    assert refused_before_any_byte(gateway).code() == Code.DATA_LOSS
    # Only the manifest.json on disk edited, the model intact: still withheld (files).
    (directory / "model.onnx").write_bytes(pull_original(gateway, tiny_schema))
    err = refused_before_any_byte(gateway)
    assert err.code() == Code.DATA_LOSS
    reasons = [str(e.detail["reason"]) for e in gateway.gateway.store.audit_entries()
               if e.kind == "egress.refused"]  # fmt: skip
    assert any("differs from the signed manifest" in r for r in reasons)


def pull_original(running: Running, schema: Schema) -> bytes:
    """The genuine release bytes, rebuilt by refreshing the template with version 1."""
    from sluice.gateway.export.refresh import refresh

    version = running.gateway.store.get_version(TINY, 1)
    assert version is not None
    payload = running.gateway.blobs.path(version.weights_sha256).read_bytes()
    return refresh(running.gateway.releases.templates[TINY], schema, payload)


@pytest.mark.parametrize(
    "tamper",
    ["manifest column edited", "signature column swapped", "manifest and signature swapped"],
)
def test_a_row_that_does_not_verify_withholds_the_release(
    gateway: Running, tiny_schema: Schema, tamper: str
) -> None:
    publish_two(gateway, tiny_schema)
    if tamper == "manifest column edited":
        db = sqlite3.connect(gateway.data_dir / "sluice.db")
        (manifest,) = db.execute("SELECT manifest_json FROM releases WHERE version = 2").fetchone()
        db.close()
        doc = json.loads(manifest)
        doc["num_trainers"] = 30  # a fact edited without the key
        sql(gateway, "UPDATE releases SET manifest_json = ? WHERE version = 2", canonical_json(doc))
    elif tamper == "signature column swapped":
        sql(gateway, "UPDATE releases SET signature = "
            "(SELECT signature FROM releases WHERE version = 1) WHERE version = 2")  # fmt: skip
    else:
        # v1's genuine manifest and signature under v2's row: a replay, not v2.
        for column in ("manifest_json", "signature"):
            sql(gateway, f"UPDATE releases SET {column} = "
                f"(SELECT {column} FROM releases WHERE version = 1) WHERE version = 2")  # fmt: skip
    err = refused_before_any_byte(gateway, version=2)
    assert err.code() == Code.DATA_LOSS
    with EgressClient(gateway.endpoints.egress) as egress:
        with pytest.raises(grpc.RpcError) as manifest_err:
            egress.manifest(TINY, 2)
        assert manifest_err.value.code() == Code.DATA_LOSS
        # A row that does not verify is not a release: not listed, not "newest".
        assert [r.version for r in egress.releases(TINY)] == [1]
        assert json.loads(egress.manifest(TINY).manifest_json)["version"] == 1
    assert len(pull_all(gateway)) == (release_dir(gateway, 1) / "model.onnx").stat().st_size
    skipped = gateway.gateway.store.audit_entries("egress.skipped")
    assert skipped and skipped[0].subject == f"{TINY}/release/2"


def test_non_finite_weights_are_withheld_even_when_signed(
    gateway: Running, tiny_schema: Schema
) -> None:
    """A signed release with a NaN or Inf weight (a publish bug, a leaked key) never leaves:
    the bit patterns of non-finite values are a channel."""
    _publish_one(gateway, tiny_schema)
    directory = release_dir(gateway)
    start, _ = first_weight_range(gateway)
    key_pem = (gateway.data_dir / "keys" / "release-signing.key").read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    for value in (np.nan, np.inf, -np.inf):
        data = bytearray((directory / "model.onnx").read_bytes())
        data[start + 8 : start + 12] = np.array([value], dtype="<f4").tobytes()
        (directory / "model.onnx").write_bytes(bytes(data))
        sha = hashlib.sha256(data).hexdigest()
        doc = json.loads((directory / "manifest.json").read_bytes())
        doc["files"][0]["sha256"] = sha
        manifest = canonical_json(doc)
        (directory / "manifest.json").write_bytes(manifest)
        files = json.dumps([{"name": "model.onnx", "sha256": sha, "size": len(data)}])
        sql(gateway, "UPDATE releases SET manifest_json = ?, signature = ?, files_json = ? "
            "WHERE version = 1", manifest, key.sign(manifest), files)  # fmt: skip
        err = refused_before_any_byte(gateway, version=1)
        assert err.code() == Code.DATA_LOSS and f"({VALUES})" in (err.details() or "")


# --- 2. refusals never crash, never leak descriptors ------------------------------------


def open_fds(under: Path) -> int:
    """Descriptors this process holds on files under `under` (sockets come and go)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(under))
    return count


def test_a_malformed_file_is_refused_with_a_reason_and_no_descriptor_leaks(
    gateway: Running, tiny_schema: Schema
) -> None:
    import onnx

    _publish_one(gateway, tiny_schema)
    # A Constant with an unknown data_type, written over the release (no key: withheld).
    path = release_dir(gateway) / "model.onnx"
    model = onnx.load_from_string(path.read_bytes())
    constant = onnx.helper.make_node("Constant", [], ["c"], value=onnx.helper.make_tensor(
        "c", onnx.TensorProto.FLOAT, [1], [1.0]))  # fmt: skip
    constant.attribute[0].t.data_type = 99
    model.graph.node.insert(0, constant)
    path.write_bytes(model.SerializeToString())
    registry = gateway.data_dir / "registry"
    before = open_fds(registry)
    for _ in range(4):
        err = refused_before_any_byte(gateway)
        assert err.code() == Code.DATA_LOSS
    assert open_fds(registry) == before
    assert all(e.detail["reason"] for e in gateway.gateway.store.audit_entries("egress.refused"))


# --- 4. every egress call is audited with who, what and the outcome ---------------------


def test_every_egress_call_is_audited_with_principal_and_outcome(
    gateway: Running, tiny_schema: Schema
) -> None:
    _publish_one(gateway, tiny_schema)
    store = gateway.gateway.store
    gateway.gateway.audit.flush(everything=True)  # _publish_one's listings, coalesced
    before = len(store.audit_entries())
    with EgressClient(gateway.endpoints.egress) as egress:
        egress.releases(TINY)
        egress.manifest(TINY, 1)
        for file in ("../sluice.db", "x" * 5000, "manifest.json"):
            with pytest.raises(grpc.RpcError) as err:
                list(egress.pull_stream(TINY, file=file))
            assert err.value.code() == Code.NOT_FOUND
            assert len(err.value.details() or "") < 400
        with pytest.raises(grpc.RpcError):
            egress.manifest("no-such-model", 0)
        list(egress.pull_stream(TINY))
    entries = store.audit_entries()[before:]
    kinds = [e.kind for e in entries]
    assert kinds == ["egress.list", "egress.manifest", *["egress.refused"] * 4, "egress.pull"]
    for e in entries:
        assert e.actor == "anonymous" and str(e.detail["peer"]).startswith("ipv4:127.0.0.1")
        assert e.detail["outcome"]
        assert len(json.dumps(e.detail)) < 1000  # hostile names are cut short
    assert entries[2].detail["file"] == "../sluice.db"
    assert entries[2].detail["outcome"] == "not found"


def test_a_pull_withheld_mid_stream_is_audited(gateway: Running, tiny_schema: Schema) -> None:
    _publish_one(gateway, tiny_schema)
    path = release_dir(gateway) / "model.onnx"
    pull = gateway.gateway.gate.open_pull(READER, TINY, 1, "", 0)
    with path.open("r+b") as f:
        f.seek(10)
        f.write(b"FRAME")
    with pytest.raises(Exception, match="changed during the pull"):
        list(pull.chunks)
    (refused,) = gateway.gateway.store.audit_entries("egress.refused")
    assert refused.actor == "test-reader" and refused.detail["outcome"] == "withheld mid-stream"


def test_the_reader_is_never_told_what_an_insider_wrote(
    gateway: Running, tiny_schema: Schema
) -> None:
    """The refusal's reason can quote names an insider chose; the reader gets the layer."""
    _publish_one(gateway, tiny_schema)
    secret = "FRAME-0x" + "ab" * 40
    (release_dir(gateway) / secret).write_bytes(b"")
    err = refused_before_any_byte(gateway)
    assert err.code() == Code.DATA_LOSS
    assert "FRAME" not in (err.details() or "") and "(files)" in (err.details() or "")
    (refused,) = gateway.gateway.store.audit_entries("egress.refused")
    assert "FRAME-0x" in str(refused.detail["reason"])


# --- 5. integrity of what is published ---------------------------------------------------


def test_a_changed_release_is_listed_withheld_named_offline_and_newest_falls_back(
    gateway: Running, tiny_schema: Schema, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_two(gateway, tiny_schema)
    data_dir = gateway.data_dir
    assert main(["audit", "verify", "--data-dir", str(data_dir)]) == 0
    assert "releases: 2 intact, 0 withheld" in capsys.readouterr().out
    path = release_dir(gateway, 2) / "model.onnx"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))

    with EgressClient(gateway.endpoints.egress) as egress:
        listed = {r.version: r.withheld for r in egress.releases(TINY)}
        assert listed == {2: True, 1: False}
        assert json.loads(egress.manifest(TINY).manifest_json)["version"] == 1
        header = next(iter(egress.pull_stream(TINY))).header
        assert header.version == 1
        out = data_dir.parent / "pulled"
        key = public_key_path(gateway)
        from sluice.models.manifest import load_public_key

        assert egress.pull_release(TINY, out, load_public_key(key))["version"] == 1
    skipped = gateway.gateway.store.audit_entries("egress.skipped")
    assert skipped and all(e.subject == f"{TINY}/release/2" for e in skipped)

    capsys.readouterr()
    assert main(["audit", "verify", "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert "audit chain intact" in captured.out
    assert (
        f"WITHHELD {TINY} v2" in captured.err and "releases: 1 intact, 1 withheld" in captured.out
    )


# --- 3. a pinned structure refuses a changed graph ---------------------------------------


def test_a_pinned_structure_is_required_of_every_later_pull(
    gateway: Running, tiny_schema: Schema, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_one(gateway, tiny_schema)
    key = str(public_key_path(gateway))
    pins = tmp_path / "pins.json"
    pull: Callable[..., int] = lambda *extra: main(  # noqa: E731
        ["pull", "--egress", gateway.endpoints.egress, "--model", TINY, "--public-key", key,
         "--out", str(tmp_path / "out"), "--insecure", *extra])  # fmt: skip
    assert pull("--pin-file", str(pins)) == 0
    pinned = json.loads(pins.read_text())["structure_hashes"][TINY]
    assert pinned == gateway.gateway.releases.templates[TINY].structure_hash
    assert pull("--pin-file", str(pins)) == 0
    capsys.readouterr()
    other = "0" * 64
    pins.write_text(json.dumps({"structure_hashes": {TINY: other}}))
    out_before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert pull("--pin-file", str(pins)) == 1
    assert "is not the pinned" in capsys.readouterr().err
    assert pull("--structure-hash", other) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == out_before
    verify = ["verify", str(tmp_path / "out" / "model.onnx"),
              str(tmp_path / "out" / "manifest.json"), "--public-key", key]  # fmt: skip
    assert main([*verify, "--structure-hash", pinned]) == 0
    assert main([*verify, "--structure-hash", other]) == 1


# --- 7. refusals read as refusals --------------------------------------------------------


def test_sluice_pull_prints_one_line_and_leaves_out_untouched(
    gateway: Running, tiny_schema: Schema, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = str(public_key_path(gateway))
    out = tmp_path / "out"
    args = ["pull", "--egress", gateway.endpoints.egress, "--model", TINY,
            "--public-key", key, "--out", str(out), "--insecure"]  # fmt: skip
    assert main(args) == 1  # nothing published yet
    err = capsys.readouterr().err
    assert err.startswith("refused: NOT_FOUND: ") and "Traceback" not in err
    assert "has no published release" in err and err.count("\n") == 1
    assert not out.exists()
    _publish_one(gateway, tiny_schema)
    path = release_dir(gateway) / "model.onnx"
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0x01
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err  # the in-process gateway logs here too: the last line
    assert err.splitlines()[-1].startswith("refused: DATA_LOSS: ") and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_reader_in_a_loop_costs_one_audit_row_per_window_with_counts(
    gateway: Running, tiny_schema: Schema
) -> None:
    _publish_one(gateway, tiny_schema)
    store = gateway.gateway.store
    with EgressClient(gateway.endpoints.egress) as egress:
        for _ in range(40):
            egress.releases(TINY)
            with pytest.raises(grpc.RpcError):
                egress.manifest(TINY, 77)
        list(egress.pull_stream(TINY))
        list(egress.pull_stream(TINY))
    assert len(store.audit_entries("egress.pull")) == 2  # bytes that left: a row each
    gateway.gateway.audit.flush(everything=True)
    for kind, calls in (("egress.list", 40), ("egress.refused", 40)):
        rows = [e for e in store.audit_entries(kind) if e.subject.startswith(TINY)]
        assert len(rows) <= 3
        assert sum(int(str(e.detail.get("count", 1))) for e in rows) >= calls


def test_a_pull_abandoned_before_its_first_chunk_gives_its_descriptor_back(
    gateway: Running, tiny_schema: Schema
) -> None:
    _publish_one(gateway, tiny_schema)
    registry = gateway.data_dir / "registry"
    before = open_fds(registry)
    for _ in range(5):
        pull = gateway.gateway.gate.open_pull(READER, TINY, 1, "", 0)
        assert open_fds(registry) == before + 1
        pull.close()  # what the servicer does when the client left after the header
        pull.close()  # idempotent
    assert open_fds(registry) == before
    # Over gRPC: cancelled after the header, many times; nothing stays open.
    with EgressClient(gateway.endpoints.egress) as egress:
        for _ in range(5):
            stream = egress._stub.PullRelease(
                egress_pb2.PullReleaseRequest(model=TINY, version=1), timeout=10
            )
            next(stream)
            stream.cancel()
    deadline = time.monotonic() + 5
    while open_fds(registry) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(registry) == before
