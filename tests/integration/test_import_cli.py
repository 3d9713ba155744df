"""`sluice keygen`, `sluice sign-import` (outside the region) and `sluice import` (inside it),
run in-process against a real gateway; sign-import in a process without torch."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.clients.weights import release_arrays
from sluice.gateway.cli import main
from sluice.models.import_statement import SignedStatement
from sluice.models.manifest import key_id, load_public_key
from tests.conftest import TINY, start_gateway
from tests.integration.test_client_without_torch import BLOCKED, RUNNER
from tests.integration.test_import_base import (
    expected_payload,
    flip,
    global_weights,
    make_key,
    safetensors_file,
    schema,
    snapshot,
)
from tests.integration.test_round import _publish_one


@dataclass(frozen=True)
class Source:
    """A real signed release of another gateway (the global program's) and its key."""

    release: Path
    public_key: Path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, template_cache: Path) -> Source:
    root = tmp_path_factory.mktemp("global-program")
    running = start_gateway(root / "gw", template_cache)
    try:
        _publish_one(running, schema())
        public_key = root / "release-signing.pub"
        shutil.copy(running.data_dir / "keys" / "release-signing.pub", public_key)
        with EgressClient(running.endpoints.egress) as egress:
            egress.pull_release(TINY, root / "release", load_public_key(public_key))
    finally:
        running.gateway.stop()
    return Source(root / "release", public_key)


# 7. The CLI: keygen and sign-import outside the region, import inside it.


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def _one_line_refusal(err: str, command: str) -> None:
    assert err.startswith(f"sluice {command}: refused: "), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_keygen_sign_import_and_import(
    tmp_path: Path, template_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    code, out, _ = _run(["keygen", "--out", str(outside / "keys" / "global")], capsys)
    private, public = outside / "keys" / "global.key", outside / "keys" / "global.pub"
    kid = key_id(load_public_key(public))
    assert code == 0 and kid in out and len(out.splitlines()) == 1
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    pem = private.read_bytes()
    code, _, err = _run(["keygen", "--out", str(outside / "keys" / "global")], capsys)
    assert code == 1 and "already exists" in err and private.read_bytes() == pem
    _one_line_refusal(err, "keygen")

    arrays = global_weights(seed=5)
    weights = safetensors_file(outside / "global-v7.safetensors", arrays)
    sig = outside / "global-v7.sig"
    sign = ["sign-import", "--model", TINY, "--key", str(private)]
    code, out, _ = _run([*sign, "--weights", str(weights), "--schema-hash", schema().hash,
                         "--out", str(sig)], capsys)  # fmt: skip
    assert code == 0 and f"import key {kid}" in out
    assert (
        SignedStatement.read(sig).statement.sha256
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    code, _, err = _run([*sign, "--weights", str(weights), "--schema-hash", schema().hash,
                         "--out", str(sig)], capsys)  # fmt: skip
    assert code == 1  # never over a signature that is there
    _one_line_refusal(err, "sign-import")

    running = start_gateway(tmp_path / "gw", template_cache, import_keys=(public,))
    try:
        target = ["--target", running.endpoints.internal, "--insecure", "--model", TINY]
        code, out, _ = _run(["import", *target, "--weights", str(weights), "--signature",
                             str(sig), "--reason", "global v7"], capsys)  # fmt: skip
        assert code == 0 and len(out.splitlines()) == 1
        assert "version 1 imported" in out and f"signed by import key {kid}" in out
        v0 = running.gateway.store.get_version(TINY, 0)
        assert v0 is not None
        initial = running.gateway.blobs.path(v0.weights_sha256).read_bytes()
        with TrainerClient(running.endpoints.internal) as trainer:
            assert trainer.pull_global(TINY, 1).data == expected_payload(arrays, initial)

        # Refused here, before the upload: another file, another model.
        before = snapshot(running)
        other = safetensors_file(tmp_path / "other.safetensors", global_weights(seed=6))
        for args in (
            [*target, "--weights", str(other), "--signature", str(sig)],
            [*target[:-1], "drivenet", "--weights", str(weights), "--signature", str(sig)],
            [*target, "--weights", str(outside), "--signature", str(sig)],
            [*target, "--weights", str(weights), "--signature", str(weights)],
        ):
            code, _, err = _run(["import", *args], capsys)
            assert code == 1, args
            _one_line_refusal(err, "import")
        # Refused by the gateway: a signed file with a NaN.
        arrays["lane_head.bias"] = np.full(4, np.nan, dtype=np.float32)
        nan = safetensors_file(outside / "nan.safetensors", arrays)
        nan_sig = outside / "nan.sig"
        assert main([*sign, "--weights", str(nan), "--schema-hash", schema().hash,
                     "--out", str(nan_sig)]) == 0  # fmt: skip
        code, _, err = _run(
            ["import", *target, "--weights", str(nan), "--signature", str(nan_sig)], capsys
        )
        assert code == 1
        assert err.startswith("sluice import: refused: INVALID_ARGUMENT: tensor 'lane_head.bias'")
        assert snapshot(running) == before
    finally:
        running.gateway.stop()


def test_cli_signs_a_verified_release_directory(
    tmp_path: Path, template_cache: Path, source: Source, capsys: pytest.CaptureFixture[str]
) -> None:
    private = tmp_path / "global.key"
    code, _, _ = _run(["keygen", "--out", str(tmp_path / "global")], capsys)
    assert code == 0
    sig = tmp_path / "out" / "release-1.sig"
    sig.parent.mkdir()
    code, out, err = _run(["sign-import", "--model", TINY, "--weights", str(source.release),
                           "--public-key", str(source.public_key), "--key", str(private),
                           "--out", str(sig)], capsys)  # fmt: skip
    assert code == 0, err
    weights = sig.with_suffix(".safetensors")
    assert str(weights) in out
    statement = SignedStatement.read(sig).statement
    manifest = json.loads((source.release / "manifest.json").read_bytes())
    assert statement.schema_hash == manifest["schema_hash"] == schema().hash

    running = start_gateway(tmp_path / "gw", template_cache, import_keys=(tmp_path / "global.pub",))
    try:
        code, _, err = _run(["import", "--target", running.endpoints.internal, "--insecure",
                             "--model", TINY, "--weights", str(weights), "--signature",
                             str(sig)], capsys)  # fmt: skip
        assert code == 0, err
        v0 = running.gateway.store.get_version(TINY, 0)
        assert v0 is not None
        initial = running.gateway.blobs.path(v0.weights_sha256).read_bytes()
        key = load_public_key(source.public_key)
        with TrainerClient(running.endpoints.internal) as trainer:
            imported = trainer.pull_global(TINY, 1).data
        assert imported == expected_payload(release_arrays(source.release, key), initial)
    finally:
        running.gateway.stop()


@pytest.mark.parametrize("tamper", ["model", "manifest", "key", "file-with-key", "missing"])
def test_cli_sign_import_refuses_an_unverifiable_release_in_one_line(
    source: Source, tamper: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "--out", str(tmp_path / "global")]) == 0
    release = tmp_path / "release"
    shutil.copytree(source.release, release)
    key = source.public_key
    weights = release
    if tamper in ("model", "manifest"):
        path = release / ("model.onnx" if tamper == "model" else "manifest.json")
        path.write_bytes(flip(path.read_bytes(), len(path.read_bytes()) // 2))
    elif tamper == "key":
        key = make_key(tmp_path, "other").public
    elif tamper == "file-with-key":  # --public-key verifies a release, not a bare file
        weights = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=3))
    else:
        weights = tmp_path / "nothing-here"
    capsys.readouterr()
    out = tmp_path / "signed" / "w.sig"
    out.parent.mkdir()
    code, stdout, err = _run(["sign-import", "--model", TINY, "--weights", str(weights),
                              "--public-key", str(key), "--key", str(tmp_path / "global.key"),
                              "--out", str(out)], capsys)  # fmt: skip
    assert code == 1 and stdout == ""
    _one_line_refusal(err, "sign-import")
    assert not list(out.parent.iterdir())  # no signature, no half-made weights file


def test_keygen_and_sign_import_need_no_torch(tmp_path: Path, source: Source) -> None:
    weights = safetensors_file(tmp_path / "w.safetensors", global_weights(seed=7))
    key = str(tmp_path / "global.key")
    calls = [
        ["keygen", "--out", str(tmp_path / "global")],
        ["sign-import", "--model", TINY, "--weights", str(weights), "--key", key,
         "--manifest", str(source.release / "manifest.json"), "--out", str(tmp_path / "w.sig")],
        ["sign-import", "--model", TINY, "--weights", str(source.release), "--public-key",
         str(source.public_key), "--key", key, "--out", str(tmp_path / "r.sig")],
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", RUNNER.format(blocked=BLOCKED), json.dumps(calls)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0], "loaded": []}
    assert SignedStatement.read(tmp_path / "w.sig").statement.schema_hash == schema().hash
    assert (tmp_path / "r.safetensors").stat().st_size > 0
