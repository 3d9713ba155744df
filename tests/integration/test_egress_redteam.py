"""Held-out style attacks on the egress side: an insider with write access to registry/ and
sluice.db (no signing key), a reader sending hostile requests, a file changed between the
check and the stream, and the offline tools given hostile inputs."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import grpc
import pytest

from sluice.clients.sdk import EgressClient
from sluice.gateway.cli import main
from sluice.gateway.core.errors import IntegrityError
from sluice.gateway.export import gate as gate_module
from sluice.gateway.export.gate import Caller
from sluice.gateway.store.chunks import SEND_CHUNK_BYTES
from sluice.models.schema import Schema
from tests.conftest import TINY, Running
from tests.integration.test_egress_gate import public_key_path
from tests.integration.test_egress_insider import (
    publish_two,
    refused_before_any_byte,
    release_dir,
    sql,
)
from tests.integration.test_round import _publish_one

Code = grpc.StatusCode
READER = Caller("redteam-reader", "in-process")


# --- an insider's row the gateway cannot even parse ------------------------------------

ROW_EDITS = {
    "files_json not JSON": "UPDATE releases SET files_json = 'garbage' WHERE version = 2",
    "files_json of the wrong shape": "UPDATE releases SET files_json = '[1, {}]' WHERE version = 2",
    "files_json an object": "UPDATE releases SET files_json = '{\"a\": 1}' WHERE version = 2",
    "manifest a number": "UPDATE releases SET manifest_json = 12 WHERE version = 2",
    "signature text": "UPDATE releases SET signature = 'x' WHERE version = 2",
    "round text": "UPDATE releases SET round = 'r' WHERE version = 2",
    "num_trainers huge": "UPDATE releases SET num_trainers = 9223372036854775807 WHERE version = 2",
}


@pytest.mark.parametrize("edit", sorted(ROW_EDITS))
def test_a_row_the_gateway_cannot_parse_is_withheld_never_internal(
    gateway: Running, tiny_schema: Schema, edit: str
) -> None:
    publish_two(gateway, tiny_schema)
    sql(gateway, ROW_EDITS[edit])
    with EgressClient(gateway.endpoints.egress) as egress:
        listed = egress.releases(TINY)  # the intact release is still listed
        assert 1 in [r.version for r in listed]
        assert all(r.withheld for r in listed if r.version == 2)
        assert egress.manifest(TINY).signature  # newest intact: v1
        with pytest.raises(grpc.RpcError) as err:
            egress.manifest(TINY, 2)
        assert err.value.code() == Code.DATA_LOSS
    assert refused_before_any_byte(gateway, version=2).code() == Code.DATA_LOSS
    # Withheld means audited with a reason, not a crash in the log.
    gateway.gateway.audit.flush(everything=True)
    refused = gateway.gateway.store.audit_entries("egress.refused")
    assert any(e.detail.get("release") == 2 for e in refused)


# --- TOCTOU: the bytes that leave are the bytes that were checked ----------------------


@pytest.mark.parametrize("where", ["first chunk", "middle chunk", "last chunk"])
@pytest.mark.parametrize("offset", [0, 5000])
def test_no_byte_changed_in_place_after_the_check_ever_leaves(
    gateway: Running, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch, where: str, offset: int
) -> None:
    """An insider rewrites the guarded file in place (same inode) between the check and the
    stream: not one chunk holding a changed byte may be sent, whatever chunk it lies in."""
    _publish_one(gateway, tiny_schema)
    monkeypatch.setattr(gate_module, "SEND_CHUNK_BYTES", 4096)  # many chunks of a tiny file
    path = release_dir(gateway) / "model.onnx"
    genuine = path.read_bytes()
    at = {"first chunk": 10, "middle chunk": len(genuine) // 2, "last chunk": len(genuine) - 9}
    pull = gateway.gateway.gate.open_pull(READER, TINY, 1, "", offset)
    with path.open("r+b") as f:
        f.seek(at[where])
        f.write(b"FRAME")
    sent = []
    try:
        for chunk_offset, data in pull.chunks:
            sent.append((chunk_offset, data))
    except IntegrityError as exc:
        assert "changed during the pull" in str(exc)
    else:  # only a change before the offset's piece, which is never read, goes unnoticed
        assert at[where] + 5 <= offset - offset % 4096
    for chunk_offset, data in sent:
        assert data == genuine[chunk_offset : chunk_offset + len(data)], "a changed byte left"
    if sent:
        assert sent[0][0] == offset


@pytest.mark.parametrize("where", [0, 4095, 4096, "middle", "last byte"])
@pytest.mark.parametrize("when", ["before the check", "after the check", "and put back"])
def test_tags_remembered_from_an_earlier_pull_never_send_a_changed_byte(
    gateway: Running,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
    where: int | str,
) -> None:
    """A later pull of the same file checks it against the piece tags of the first (the
    gate keeps them by the signed sha256) instead of hashing it whole: a file rewritten in
    place since then, its mtime even put back, is refused by the check, naming the piece;
    rewritten after it, the pull stops at the first changed piece; put back as it was,
    it passes and leaves whole."""
    _publish_one(gateway, tiny_schema)
    monkeypatch.setattr(gate_module, "SEND_CHUNK_BYTES", 4096)
    path = release_dir(gateway) / "model.onnx"
    genuine = path.read_bytes()
    first = gateway.gateway.gate.open_pull(READER, TINY, 1, "", 0)
    assert b"".join(d for _, d in first.chunks) == genuine  # the tags are now remembered
    at = {"middle": len(genuine) // 2, "last byte": len(genuine) - 1}.get(str(where), where)
    assert isinstance(at, int)
    stat = path.stat()

    def rewrite(data: bytes) -> None:
        with path.open("r+b") as f:
            f.seek(at)
            f.write(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    flipped = bytes([genuine[at] ^ 0x01])
    if when == "before the check":
        rewrite(flipped)
        with pytest.raises(IntegrityError, match="withheld"):
            gateway.gateway.gate.open_pull(READER, TINY, 1, "", 0)
        gateway.gateway.audit.flush(everything=True)
        reasons = [
            e.detail["reason"] for e in gateway.gateway.store.audit_entries("egress.refused")
        ]
        assert f"piece {at // 4096} differs" in str(reasons[-1])
        return
    if when == "and put back":
        rewrite(flipped)
        rewrite(genuine[at : at + 1])
        again = gateway.gateway.gate.open_pull(READER, TINY, 1, "", 0)
        assert b"".join(d for _, d in again.chunks) == genuine
        return
    pull = gateway.gateway.gate.open_pull(READER, TINY, 1, "", 0)
    rewrite(flipped)
    sent = []
    with pytest.raises(IntegrityError, match="changed during the pull"):
        for chunk_offset, data in pull.chunks:
            sent.append((chunk_offset, data))
    for chunk_offset, data in sent:
        assert data == genuine[chunk_offset : chunk_offset + len(data)], "a changed byte left"
        assert chunk_offset + len(data) <= at - at % 4096


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 4097, -1])
def test_a_resumed_pull_from_any_offset_sends_exactly_the_rest(
    gateway: Running, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch, offset: int
) -> None:
    _publish_one(gateway, tiny_schema)
    monkeypatch.setattr(gate_module, "SEND_CHUNK_BYTES", 4096)
    genuine = (release_dir(gateway) / "model.onnx").read_bytes()
    offset = len(genuine) if offset < 0 else offset
    pull = gateway.gateway.gate.open_pull(READER, TINY, 1, "", offset)
    sent = list(pull.chunks)
    assert b"".join(d for _, d in sent) == genuine[offset:]
    assert all(len(d) <= 4096 for _, d in sent)
    position = offset
    for chunk_offset, data in sent:
        assert chunk_offset == position
        position += len(data)


# --- a reader in a loop cannot make the gateway re-hash a withheld release --------------


def test_a_withheld_release_is_not_read_again_on_every_call(
    gateway: Running, tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_two(gateway, tiny_schema)
    path = release_dir(gateway, 2) / "model.onnx"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    checker = gateway.gateway.gate.checker
    checks: list[int] = []
    real = checker._check  # the reading part of `check`

    def counted(signed, *args, **kwargs):  # type: ignore[no-untyped-def]
        if signed.release.version == 2:
            checks.append(2)
        return real(signed, *args, **kwargs)

    monkeypatch.setattr(checker, "_check", counted)
    with EgressClient(gateway.endpoints.egress) as egress:
        for _ in range(5):
            assert [r.withheld for r in egress.releases(TINY)] == [True, False]
            assert json.loads(egress.manifest(TINY).manifest_json)["version"] == 1
            with pytest.raises(grpc.RpcError):
                egress.manifest(TINY, 2)
            with pytest.raises(grpc.RpcError):
                list(egress.pull_stream(TINY, version=2))
            list(egress.pull_stream(TINY))  # newest intact: v1, v2 skipped
    assert len(checks) == 1, f"the withheld release was read {len(checks)} times"
    # Mended (the genuine bytes back, so its ctime changes): it is checked again and served.
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with EgressClient(gateway.endpoints.egress) as egress:
        assert [r.withheld for r in egress.releases(TINY)] == [False, False]
        assert json.loads(egress.manifest(TINY).manifest_json)["version"] == 2


# --- the offline tools on hostile inputs -------------------------------------------------


def _pulled(gateway: Running, tiny_schema: Schema, tmp_path: Path) -> tuple[Path, str]:
    _publish_one(gateway, tiny_schema)
    key = str(public_key_path(gateway))
    out = tmp_path / "out"
    assert main(["pull", "--egress", gateway.endpoints.egress, "--model", TINY,
                 "--public-key", key, "--out", str(out), "--insecure"]) == 0  # fmt: skip
    return out, key


def _one_line_failure(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "manifest",
    [
        b'{"files":5,"format":"sluice.release/2"}',
        b'{"files":[5],"format":"sluice.release/2"}',
        b'{"files":[{"name":[]}],"format":"sluice.release/2"}',
        b'{"format":"sluice.release/2","x":' + b"1" * 5000 + b"}",
        b"[" * 100000,
        b"\xff\xfe",
        b"",
        b" " * ((1 << 20) + 10),
    ],
    ids=[
        "files-number",
        "files-of-numbers",
        "name-a-list",
        "huge-int",
        "deep",
        "not-utf8",
        "empty",
        "over-1MiB",
    ],
)
def test_sluice_verify_refuses_any_manifest_in_one_line(
    gateway: Running,
    tiny_schema: Schema,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    manifest: bytes,
) -> None:
    out, key = _pulled(gateway, tiny_schema, tmp_path)
    (out / "manifest.json").write_bytes(manifest)
    capsys.readouterr()
    code = main(["verify", str(out / "model.onnx"), str(out / "manifest.json"),
                 "--public-key", key])  # fmt: skip
    assert _one_line_failure(capsys, code).startswith("sluice verify: FAILED: ")


def test_sluice_verify_does_not_read_a_huge_manifest_into_memory(
    gateway: Running, tiny_schema: Schema, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, key = _pulled(gateway, tiny_schema, tmp_path)
    with (out / "manifest.json").open("r+b") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB that would take forever to read
    capsys.readouterr()
    code = main(["verify", str(out / "model.onnx"), str(out / "manifest.json"),
                 "--public-key", key])  # fmt: skip
    assert "manifest" in _one_line_failure(capsys, code)


@pytest.mark.parametrize(
    "what", ["pin file deep", "pin file not JSON", "public key garbage", "out is a file"]
)
def test_sluice_pull_refuses_hostile_local_inputs_in_one_line(
    gateway: Running,
    tiny_schema: Schema,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
) -> None:
    _publish_one(gateway, tiny_schema)
    key = public_key_path(gateway)
    out, pins = tmp_path / "out", tmp_path / "pins.json"
    if what == "pin file deep":
        pins.write_text('{"structure_hashes": ' + "[" * 100000)
    elif what == "pin file not JSON":
        pins.write_bytes(b"\xff\x00garbage")
    elif what == "public key garbage":
        key = tmp_path / "key.pem"
        key.write_bytes(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")
    else:
        out.write_bytes(b"precious")
    args = ["pull", "--egress", gateway.endpoints.egress, "--model", TINY,
            "--public-key", str(key), "--out", str(out), "--insecure"]  # fmt: skip
    if what.startswith("pin"):
        args += ["--pin-file", str(pins)]
    capsys.readouterr()
    code = main(args)
    line = _one_line_failure(capsys, code)
    assert line.startswith("refused: ") or line.startswith("sluice pull: "), line
    if what == "out is a file":
        assert out.read_bytes() == b"precious"
        assert not list(tmp_path.glob(".out*"))


def test_sluice_pull_into_a_symlinked_out_leaves_the_target_alone_on_refusal(
    gateway: Running, tiny_schema: Schema, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_one(gateway, tiny_schema)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    out = tmp_path / "out"
    os.symlink(target, out)
    path = release_dir(gateway) / "model.onnx"
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0x01
    path.write_bytes(bytes(raw))
    key = str(public_key_path(gateway))
    args = ["pull", "--egress", gateway.endpoints.egress, "--model", TINY,
            "--public-key", key, "--out", str(out), "--insecure"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 1
    assert sorted(p.name for p in target.iterdir()) == ["keep"]
    assert out.is_symlink()


# --- what the gateway publishes with DP on and the two-file layout is what readers accept --


def test_a_dp_two_file_release_lists_pulls_verifies_and_streams_only_checked_bytes(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sluice.gateway.config import Config
    from sluice.gateway.export.release_audit import verify_published
    from sluice.models.manifest import check_fields, load_public_key, parse
    from tests.conftest import start_gateway

    running = start_gateway(
        tmp_path / "gw",
        template_cache,
        two_file_bytes=0,
        dp_noise_multiplier=1.0,
        dp_clipping_norm=0.05,
        dp_max_epsilon=9.0,
        dp_adaptive_clipping=True,
        dp_clipped_count_stddev=1.0,
    )
    try:
        _publish_one(running, tiny_schema)
        key = public_key_path(running)
        with EgressClient(running.endpoints.egress) as egress:
            (listed,) = egress.releases(TINY)
            assert not listed.withheld
            doc = egress.pull_release(TINY, tmp_path / "out", load_public_key(key))
        check_fields(parse((tmp_path / "out" / "manifest.json").read_bytes()))
        assert doc["dp"]["adaptive_clipping"] is True and doc["dp"]["noise_stddev"] > 0
        assert [f["name"] for f in doc["files"]] == ["model.onnx", "model.onnx.data"]
        capsys.readouterr()
        out = tmp_path / "out"
        verify = ["verify", str(out / "model.onnx"), str(out / "manifest.json")]
        assert main([*verify, "--public-key", str(key)]) == 0
        config = Config().replace(data_dir=running.data_dir, models=(TINY,))
        config = config.replace(dp_noise_multiplier=1.0, dp_max_epsilon=9.0, two_file_bytes=0)
        assert [s.withheld for s in verify_published(config)] == [""]

        # The data file rewritten in place after the check: no changed byte leaves.
        monkeypatch.setattr(gate_module, "SEND_CHUNK_BYTES", 4096)
        data_path = release_dir(running) / "model.onnx.data"
        genuine = data_path.read_bytes()
        pull = running.gateway.gate.open_pull(READER, TINY, 1, "model.onnx.data", 0)
        with data_path.open("r+b") as f:
            f.seek(len(genuine) // 2)
            f.write(b"FRAME")
        sent = []
        with pytest.raises(IntegrityError):
            for chunk_offset, data in pull.chunks:
                sent.append((chunk_offset, data))
        assert sent and all(d == genuine[o : o + len(d)] for o, d in sent)
    finally:
        running.gateway.stop()


@pytest.mark.parametrize("what", ["key gone", "key garbage", "row garbage", "model.onnx a dir"])
def test_sluice_audit_verify_names_the_problem_in_one_line(
    gateway: Running, tiny_schema: Schema, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    import shutil

    _publish_one(gateway, tiny_schema)
    gateway.gateway.stop()
    key = gateway.data_dir / "keys" / public_key_path(gateway).name
    if what == "key gone":
        key.unlink()
    elif what == "key garbage":
        key.write_bytes(b"\x00" * 10)
    elif what == "row garbage":
        sql(gateway, "UPDATE releases SET files_json = 'garbage', signature = 'x'")
    else:
        path = release_dir(gateway) / "model.onnx"
        path.unlink()
        path.mkdir()
    capsys.readouterr()
    code = main(["audit", "verify", "--data-dir", str(gateway.data_dir)])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
    if what.startswith("row") or what.startswith("model"):
        assert err.startswith("WITHHELD drivenet-tiny v1: ")
    shutil.rmtree(gateway.data_dir / "registry", ignore_errors=True)
    key.unlink(missing_ok=True)  # written again from the private key
    gateway.restart()  # the fixture stops it again


@pytest.mark.parametrize("failure", [OSError(5, "Input/output error"), ValueError("odd")])
@pytest.mark.parametrize("bad_piece", [0, 1, 3])
def test_a_piece_that_cannot_be_read_mid_pull_withholds_the_rest_audited(
    gateway: Running,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
    bad_piece: int,
) -> None:
    """A read that fails while the file streams (a bad sector: EIO; or any error in the
    worker) ends the pull as withheld mid-stream, audited, never INTERNAL: only the pieces
    before it, checked, have left."""
    _publish_one(gateway, tiny_schema)
    monkeypatch.setattr(gate_module, "SEND_CHUNK_BYTES", 4096)
    genuine = (release_dir(gateway) / "model.onnx").read_bytes()
    assert len(genuine) > 4 * 4096
    real_read = gate_module._pread_exactly

    def failing(fd: int, size: int, pos: int) -> bytes:
        if pos == bad_piece * 4096 and threading.current_thread().name.startswith("egress-read"):
            raise failure
        return real_read(fd, size, pos)

    monkeypatch.setattr(gate_module, "_pread_exactly", failing)
    with EgressClient(gateway.endpoints.egress) as egress:
        sent = bytearray()
        with pytest.raises(grpc.RpcError) as err:
            for message in egress.pull_stream(TINY, file="model.onnx"):
                if message.WhichOneof("kind") == "chunk":
                    sent += message.chunk.data
    assert err.value.code() == Code.DATA_LOSS, err.value.details()
    assert "withheld" in (err.value.details() or "")
    assert bytes(sent) == genuine[: bad_piece * 4096]
    gateway.gateway.audit.flush(everything=True)
    (refused,) = gateway.gateway.store.audit_entries("egress.refused")
    assert refused.detail["outcome"] == "withheld mid-stream"
    assert "unreadable" in str(refused.detail["reason"])


@pytest.mark.parametrize("gate", ["the serving gate", "a gate started since"])
def test_the_first_pull_checks_the_tags_publish_recorded_or_hashes_the_file_whole(
    gateway: Running, tiny_schema: Schema, gate: str
) -> None:
    """Publish tags each release file's pieces as its guard reads it, so even the first pull
    checks those tags instead of hashing the file whole; a gate without them (a gateway
    started after the release) hashes it. Either way a byte changed in place since
    publish, its mtime put back, withholds the release before its first byte."""
    _publish_one(gateway, tiny_schema)
    served = gateway.gateway.gate
    if gate == "the serving gate":
        egress = served
    else:
        egress = gate_module.EgressGate(served.store, served.checker, metrics=served.metrics)
    path = release_dir(gateway) / "model.onnx"
    genuine = path.read_bytes()
    stat = path.stat()
    with path.open("r+b") as f:
        f.seek(len(genuine) - 3)
        f.write(bytes([genuine[-3] ^ 0x80]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(IntegrityError, match="withheld"):
        egress.open_pull(READER, TINY, 1, "", 0)
    gateway.gateway.audit.flush(everything=True)
    (refused,) = gateway.gateway.store.audit_entries("egress.refused")
    reason = str(refused.detail["reason"])
    if gate == "the serving gate":
        assert f"piece {(len(genuine) - 3) // SEND_CHUNK_BYTES} differs" in reason
    else:
        assert "sha256" in reason and "differs" not in reason
    path.write_bytes(genuine)  # put back: both pull it whole again
    pull = egress.open_pull(READER, TINY, 1, "", 0)
    assert b"".join(d for _, d in pull.chunks) == genuine
