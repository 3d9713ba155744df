"""A verified release back as state_dict arrays, a loaded module and a safetensors file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file

from sluice.clients.weights import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    export_safetensors,
    load_release,
    release_arrays,
)
from sluice.gateway.cli import main
from sluice.gateway.export.guard import weight_specs
from sluice.gateway.export.refresh import write_release_files
from sluice.gateway.export.template import OnnxTemplate, build_template
from sluice.models.artifact import op_set
from sluice.models.manifest import (
    DATA_FILE,
    MANIFEST_FORMAT,
    MODEL_FILE,
    ManifestRefused,
    canonical_json,
)
from sluice.models.registry import ModelEntry, get
from tests.manifests import filler_fields

TINY = "drivenet-tiny"
KEY = Ed25519PrivateKey.generate()
EXPLICIT = {"parent_version", "rounds", "schema_hash"}  # this release states its own
LAYOUTS = ["one-file", "two-file"]


@dataclass(frozen=True)
class Source:
    entry: ModelEntry
    module: torch.nn.Module  # what the release's weights came from
    templates: dict[str, OnnxTemplate]  # by layout


@pytest.fixture(scope="module")
def source() -> Source:
    entry = get(TINY)
    templates = {
        "one-file": build_template(entry),
        "two-file": build_template(entry, two_file_threshold=0),
    }
    return Source(entry, entry.build(seed=7), templates)


def publish(source: Source, layout: str, out: Path) -> Path:
    """A signed release of source.module in `layout`, written as a pull writes one."""
    template, schema = source.templates[layout], source.entry.schema()
    payload = out.with_name(f"{out.name}.payload")
    payload.write_bytes(schema.flatten(source.module.state_dict()))
    written = write_release_files(template, schema, payload, out)
    manifest = canonical_json(
        {
            "format": MANIFEST_FORMAT,
            "model": TINY,
            "version": 3,
            "parent_version": 2,
            "rounds": [3],
            "schema_hash": schema.hash,
            "structure_hash": template.structure_hash,
            "weights": weight_specs(template, schema),
            "ops": sorted([d, o] for d, o in op_set(template.data)),
            "files": [{"name": n, "size": size, "sha256": sha} for n, size, sha in written],
            **{k: v for k, v in filler_fields(KEY.public_key()).items() if k not in EXPLICIT},
        }
    )
    (out / MANIFEST_FILE).write_bytes(manifest)
    (out / SIGNATURE_FILE).write_bytes(KEY.sign(manifest))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loaded_module_matches_onnxruntime(source: Source, layout: str, tmp_path: Path) -> None:
    release = publish(source, layout, tmp_path / "release")
    assert (release / DATA_FILE).exists() == (layout == "two-file")
    arrays = release_arrays(release, KEY.public_key())
    graph = {w["name"] for w in weight_specs(source.templates[layout], source.entry.schema())}
    assert set(arrays) == graph
    for name, values in arrays.items():
        np.testing.assert_array_equal(values, source.module.state_dict()[name].numpy())

    module = source.entry.factory()  # fresh weights: every value must come from the release
    doc = load_release(module, release, KEY.public_key())
    assert doc["version"] == 3
    (frames,) = source.entry.example_inputs(batch=2, seed=5)
    with torch.no_grad():
        controls, lanes = module.eval()(frames)
    session = ort.InferenceSession(str(release / MODEL_FILE), providers=["CPUExecutionProvider"])
    want = session.run(None, {"frames": frames.numpy()})
    np.testing.assert_allclose(controls.numpy(), want[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(lanes.numpy(), want[1], atol=1e-5, rtol=0)


def test_strict_load_allows_only_non_graph_buffers_missing(source: Source, tmp_path: Path) -> None:
    release = publish(source, "one-file", tmp_path / "release")
    module = source.entry.factory()
    counters = {n: t.clone() for n, t in module.state_dict().items() if "num_batches" in n}
    assert counters  # DriveNet has BatchNorm: these are not in the release, and stay
    load_release(module, release, KEY.public_key())
    for name, value in counters.items():
        assert torch.equal(module.state_dict()[name], value)

    module.register_buffer("extra", torch.zeros(2))  # a tensor the release cannot fill
    with pytest.raises(ValueError, match="lacks 1 tensors of the module"):
        load_release(module, release, KEY.public_key())
    load_release(module, release, KEY.public_key(), strict=False)
    small = get("drivenet-tiny").factory()
    del small.lane_head  # the release holds tensors this module has no place for
    with pytest.raises(ValueError, match="lane_head"):
        load_release(small, release, KEY.public_key())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_safetensors_round_trip(source: Source, layout: str, tmp_path: Path) -> None:
    release = publish(source, layout, tmp_path / "release")
    out = tmp_path / "model.safetensors"
    doc = export_safetensors(release, KEY.public_key(), out)
    loaded = load_file(out)
    arrays = release_arrays(release, KEY.public_key())
    assert set(loaded) == set(arrays)
    for name, values in arrays.items():
        assert loaded[name].dtype == values.dtype
        np.testing.assert_array_equal(loaded[name], values)
    with open(out, "rb") as f:  # the header: 8-byte length, then JSON with __metadata__
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    manifest_sha = hashlib.sha256((release / MANIFEST_FILE).read_bytes()).hexdigest()
    assert header["__metadata__"] == {
        "model": TINY,
        "version": "3",
        "structure_hash": doc["structure_hash"],
        "manifest_sha256": manifest_sha,
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("model", "sha256"),
        ("data", "sha256"),
        ("manifest", "signature does not verify"),
        ("key", "signature does not verify"),
        ("pin", "not the pinned"),
    ],
)
def test_refused_release_writes_nothing(
    source: Source, tamper: str, reason: str, tmp_path: Path
) -> None:
    release = publish(source, "two-file" if tamper == "data" else "one-file", tmp_path / "r")
    key = KEY.public_key()
    pin = None
    if tamper in ("model", "data", "manifest"):
        _flip(release / {"model": MODEL_FILE, "data": DATA_FILE, "manifest": MANIFEST_FILE}[tamper])
    elif tamper == "key":
        key = Ed25519PrivateKey.generate().public_key()
    else:
        pin = "0" * 64
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    with pytest.raises(ManifestRefused, match=reason):
        export_safetensors(release, key, out, structure_hash=pin)
    with pytest.raises(ManifestRefused, match=reason):
        release_arrays(release, key, structure_hash=pin)
    assert list(out.parent.iterdir()) == []


def test_cli_export_weights(
    source: Source, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = publish(source, "one-file", tmp_path / "release")
    pem = tmp_path / "release-signing.pub"
    pem.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    out = tmp_path / "model.safetensors"
    args = ["export-weights", str(release), "--public-key", str(pem), "--out", str(out)]
    n = len(weight_specs(source.templates["one-file"], source.entry.schema()))
    assert main(args) == 0
    assert capsys.readouterr().out == f"{out}: {TINY} v3, {n} tensors\n"
    assert main([*args, "--structure-hash", source.templates["one-file"].structure_hash]) == 0
    capsys.readouterr()

    out.unlink()
    assert main([*args, "--structure-hash", "f" * 64]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("refused: ") and "not the pinned" in captured.err
    assert not out.exists()
    assert main([*args[:2], "--public-key", str(tmp_path / "none.pem"), *args[4:]]) == 1
    assert capsys.readouterr().err.startswith("refused: public key")
