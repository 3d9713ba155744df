"""The egress promise: signed manifests, guarded pulls, an audit chain that notices edits."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.gateway.cli import main
from sluice.gateway.export.gate import Caller
from sluice.models.manifest import ManifestRefused, load_public_key
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta, start_gateway
from tests.integration.test_round import _publish_one, push

TEST_CALLER = Caller("test-reader", "in-process")


def public_key_path(running: Running) -> Path:
    return running.data_dir / "keys" / "release-signing.pub"


def test_signing_key_is_private_to_its_owner(gateway: Running) -> None:
    mode = (gateway.data_dir / "keys" / "release-signing.key").stat().st_mode
    assert stat.S_IMODE(mode) & 0o077 == 0


def test_pulled_release_verifies_offline_and_tampering_fails(
    gateway: Running, tiny_schema: Schema, tmp_path: Path
) -> None:
    _publish_one(gateway, tiny_schema)
    out = tmp_path / "global"
    key = public_key_path(gateway)
    assert main(["pull", "--egress", gateway.endpoints.egress, "--model", TINY,
                 "--public-key", str(key), "--out", str(out), "--insecure"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "manifest.sig", "model.onnx"]
    model, manifest = out / "model.onnx", out / "manifest.json"
    verify = ["verify", str(model), str(manifest), "--public-key", str(key)]
    assert main(verify) == 0
    doc = json.loads(manifest.read_bytes())
    assert doc["num_trainers"] == 3 and doc["signing_key_id"]

    # A manifest signed by another key.
    other = Ed25519PrivateKey.generate()
    (tmp_path / "other.sig").write_bytes(other.sign(manifest.read_bytes()))
    assert main([*verify, "--signature", str(tmp_path / "other.sig")]) == 1
    other_pub = tmp_path / "other.pub"
    other_pub.write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert main(["verify", str(model), str(manifest), "--public-key", str(other_pub)]) == 1

    # A file that does not match its manifest (one byte).
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    model.write_bytes(bytes(raw))
    assert main(verify) == 1


def test_pull_with_the_wrong_key_writes_nothing(
    gateway: Running, tiny_schema: Schema, tmp_path: Path
) -> None:
    _publish_one(gateway, tiny_schema)
    other = Ed25519PrivateKey.generate().public_key()
    out = tmp_path / "global"
    with EgressClient(gateway.endpoints.egress) as egress, pytest.raises(ManifestRefused):
        egress.pull_release(TINY, out, other)
    assert not out.exists() or not list(out.iterdir())
    with EgressClient(gateway.endpoints.egress) as egress:
        doc = egress.pull_release(TINY, out, load_public_key(public_key_path(gateway)))
    assert doc["version"] == 1


def test_release_altered_on_disk_is_refused_at_pull_and_audited(
    gateway: Running, tiny_schema: Schema, tmp_path: Path
) -> None:
    _publish_one(gateway, tiny_schema)
    path = gateway.data_dir / "registry" / TINY / "1" / "model.onnx"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01
    path.write_bytes(bytes(raw))
    with EgressClient(gateway.endpoints.egress) as egress, pytest.raises(grpc.RpcError) as err:
        list(egress.pull_stream(TINY))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "withheld" in (err.value.details() or "")
    refused = gateway.gateway.store.audit_entries("egress.refused")
    assert len(refused) == 1 and refused[0].subject == f"{TINY}/release/1/model.onnx"
    assert gateway.gateway.store.audit_entries("egress.pull") == []


def test_every_pull_push_and_release_is_audited(gateway: Running, tiny_schema: Schema) -> None:
    _publish_one(gateway, tiny_schema)
    with TrainerClient(gateway.endpoints.internal) as client, pytest.raises(grpc.RpcError):
        client.push_update(model=TINY, round_no=2, base_version=0,
                           schema_hash=tiny_schema.hash, trainer="harbin-01",
                           region="harbin", num_examples=1,
                           payload=random_delta(tiny_schema, 9))  # fmt: skip
    with EgressClient(gateway.endpoints.egress) as egress:
        list(egress.pull_stream(TINY))
    store = gateway.gateway.store
    kinds = [e.kind for e in store.audit_entries()]
    assert kinds[0] == "gateway.started"
    assert kinds.count("push.accepted") == 3
    assert kinds.index("round.closed") < kinds.index("release.published")
    (rejected,) = store.audit_entries("push.rejected")
    assert rejected.actor == "harbin-01" and "stale base version" in str(rejected.detail)
    (pulled,) = store.audit_entries("egress.pull")
    assert pulled.actor == "anonymous" and pulled.subject.endswith("/1/model.onnx")
    assert str(pulled.detail["peer"]).startswith("ipv4:127.0.0.1")
    assert store.verify_audit() == (len(kinds), None)


def test_editing_any_audit_row_is_named_by_audit_verify(
    gateway: Running, tiny_schema: Schema, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_one(gateway, tiny_schema)
    data_dir = gateway.data_dir
    count = len(gateway.gateway.store.audit_entries())
    gateway.gateway.stop()
    assert main(["audit", "verify", "--data-dir", str(data_dir)]) == 0
    db = sqlite3.connect(data_dir / "sluice.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET actor = 'nobody' WHERE seq = 2")
    # Someone with write access to the file gets past the trigger; the chain still tells.
    db.execute("DROP TRIGGER audit_no_update")
    for seq in (count, 3):  # the last row, then one in the middle: the first break is named
        db.execute("UPDATE audit SET detail_json = '{}' WHERE seq = ?", (seq,))
        db.commit()
        capsys.readouterr()
        assert main(["audit", "verify", "--data-dir", str(data_dir)]) == 1
        assert f"entry {seq} " in capsys.readouterr().err
    db.close()
    gateway.gateway = type(gateway.gateway)(gateway.config)  # let the fixture's stop() work
    gateway.gateway.start()


def test_operator_closing_a_round_below_k_is_told_why_nothing_was_released(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    from sluice.clients.sdk import AdminClient

    running = start_gateway(tmp_path / "gw", template_cache, quorum=5, min_trainers=3)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            push(client, tiny_schema, random_delta(tiny_schema, 1), "shanghai-01", 5)
            push(client, tiny_schema, random_delta(tiny_schema, 2), "beijing-01", 5)
        with AdminClient(running.endpoints.internal) as admin:
            resp = admin.close_round(TINY, 1)
        assert (resp.version, resp.released) == (1, False)
        assert "trainers" in resp.release_refused
        (refused,) = running.gateway.store.audit_entries("release.refused")
        assert refused.detail["reason"] == resp.release_refused
    finally:
        running.gateway.stop()


def test_two_file_release_travels_and_verifies_end_to_end(
    tmp_path: Path, tiny_schema: Schema, template_cache: Path
) -> None:
    import numpy as np
    import onnxruntime as ort

    # Force the large-model layout on the tiny model: model.onnx + model.onnx.data.
    running = start_gateway(tmp_path / "gw", template_cache, two_file_bytes=0)
    try:
        _publish_one(running, tiny_schema)
        (release_dir,) = (running.data_dir / "registry" / TINY).iterdir()
        assert sorted(p.name for p in release_dir.iterdir()) == [
            "manifest.json", "model.onnx", "model.onnx.data"
        ]  # fmt: skip
        out = tmp_path / "global"
        key = public_key_path(running)
        with EgressClient(running.endpoints.egress) as egress:
            doc = egress.pull_release(TINY, out, load_public_key(key))
        assert [f["name"] for f in doc["files"]] == ["model.onnx", "model.onnx.data"]
        assert main(["verify", str(out / "model.onnx"), str(out / "manifest.json"),
                     "--public-key", str(key)]) == 0  # fmt: skip
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        frames = np.random.default_rng(0).random((2, 3, 64, 128), dtype=np.float32)
        assert all(np.isfinite(o).all() for o in session.run(None, {"frames": frames}))

        # A side file next to the two legitimate ones: the next pull is refused.
        (release_dir / "notes.txt").write_bytes(b"\x00" * 98304)
        with EgressClient(running.endpoints.egress) as egress, pytest.raises(grpc.RpcError) as err:
            list(egress.pull_stream(TINY, file="model.onnx.data"))
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        # Offline, a data file with bytes appended fails verification.
        with (out / "model.onnx.data").open("ab") as f:
            f.write(b"frame")
        assert main(["verify", str(out / "model.onnx"), str(out / "manifest.json"),
                     "--public-key", str(key)]) == 1  # fmt: skip
    finally:
        running.gateway.stop()


def test_a_file_swapped_or_symlinked_after_the_guard_is_not_what_leaves(
    gateway: Running, tiny_schema: Schema
) -> None:
    import os

    _publish_one(gateway, tiny_schema)
    directory = gateway.data_dir / "registry" / TINY / "1"
    genuine = (directory / "model.onnx").read_bytes()
    blob = next(
        p for p in (gateway.data_dir / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"
    )
    for attack in ("swap", "symlink"):
        pull = gateway.gateway.gate.open_pull(TEST_CALLER, TINY, 1, "", 0)  # guard passed
        if attack == "swap":
            (directory / ".x").write_bytes(b"RAW-UPDATE " * (len(genuine) // 11 + 1))
            os.replace(directory / ".x", directory / "model.onnx")
        else:
            os.unlink(directory / "model.onnx")
            os.symlink(blob, directory / "model.onnx")
        assert b"".join(data for _, data in pull.chunks) == genuine, attack
        (directory / "model.onnx").unlink()
        (directory / "model.onnx").write_bytes(genuine)


def test_a_file_changed_in_place_mid_pull_never_completes(
    gateway: Running, tiny_schema: Schema
) -> None:
    from sluice.gateway.core.errors import IntegrityError

    _publish_one(gateway, tiny_schema)
    path = gateway.data_dir / "registry" / TINY / "1" / "model.onnx"
    pull = gateway.gateway.gate.open_pull(TEST_CALLER, TINY, 1, "", 0)
    with path.open("r+b") as f:  # same inode, new bytes
        f.seek(10)
        f.write(b"FRAME")
    with pytest.raises(IntegrityError, match="changed during the pull"):
        list(pull.chunks)


def test_pull_refuses_a_genuine_but_different_release(
    gateway: Running, tiny_schema: Schema, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish_one(gateway, tiny_schema)
    key = load_public_key(public_key_path(gateway))
    with EgressClient(gateway.endpoints.egress) as egress:
        real = egress.manifest
        # A man in the middle answers "v7" with the (genuinely signed) manifest of v1.
        monkeypatch.setattr(egress, "manifest", lambda model, version=0: real(model, 1))
        with pytest.raises(ManifestRefused, match="asked for drivenet-tiny v7"):
            egress.pull_release(TINY, tmp_path / "out", key, version=7)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
