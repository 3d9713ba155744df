"""A two-file release whose data file is the version's weights file itself (a hard link).

In the payload layout the data file is the payload byte for byte (a tensor the graph does
not read, such as a BatchNorm counter, keeps its place and is listed "in_graph": false), so
the release links the version blob instead of copying it; templates built before it (the
graph layout) copy, and only where the graph holds every tensor can they link.
What leaves is still only what the signed manifest names: an insider who rewrites the
shared file in place gets nothing out, and retention removing the blob leaves the release
whole.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from sluice.clients.sdk import EgressClient
from sluice.clients.weights import load_release
from sluice.gateway.config import Config
from sluice.gateway.core.strategies.base import FedAvg
from sluice.gateway.export import publish as publish_module
from sluice.gateway.export import refresh
from sluice.gateway.export.publish import template_dir, template_for
from sluice.gateway.export.template import load_template
from sluice.gateway.server import Gateway
from sluice.gateway.store.chunks import SEND_CHUNK_BYTES
from sluice.models.manifest import DATA_FILE, MODEL_FILE, load_public_key
from tests.conftest import Running, offline, start_gateway
from tests.integration.test_zoo import ZOO, run_round
from tests.layouts import graph_layout

LINKED, BATCHNORM = "patch-encoder", "multitask"  # no BatchNorm / BatchNorm (a counter)


@pytest.fixture(scope="module")
def two_file_templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two-file-templates")
    models = (LINKED, BATCHNORM)
    config = Config(data_dir=root, models=models, declared_models=ZOO, two_file_bytes=0)
    Gateway(offline(config)).stop()
    return root / "templates"


def _serve(tmp_path: Path, templates: Path, model: str) -> Running:
    """A gateway serving model in the two-file layout."""
    return start_gateway(
        tmp_path / "gw", templates, models=(model,), declared_models=ZOO, two_file_bytes=0
    )


def _released(running: Running, model: str, tmp_path: Path) -> tuple[Path, Path, bytes]:
    """Run one round; (the release dir, the new version's blob, the merged payload)."""
    _, _, merged = run_round(running, ZOO[model])
    version = running.gateway.store.latest_version(model)
    assert version is not None and version.version == 1
    blob = running.gateway.blobs.path(version.weights_sha256)
    release = running.data_dir / "registry" / model / "1"
    assert sorted(p.name for p in release.iterdir()) == ["manifest.json", MODEL_FILE, DATA_FILE]
    return release, blob, merged


def _pull(running: Running, model: str, out: Path) -> dict[str, object]:
    key = load_public_key(running.data_dir / "keys" / "release-signing.pub")
    with EgressClient(running.endpoints.egress) as egress:
        return egress.pull_release(model, out, key)


def test_a_graph_holding_every_tensor_releases_its_version_blob_by_link(
    tmp_path: Path, two_file_templates: Path
) -> None:
    running = _serve(tmp_path, two_file_templates, LINKED)
    try:
        release, blob, merged = _released(running, LINKED, tmp_path)
        data = release / DATA_FILE
        assert os.stat(data).st_ino == os.stat(blob).st_ino  # one file, two names
        assert data.read_bytes() == merged
        doc = _pull(running, LINKED, tmp_path / "pulled")
        files = {f["name"]: f for f in doc["files"]}  # type: ignore[attr-defined]
        assert files[DATA_FILE]["sha256"] == blob.name  # the version's own sha256
        assert (tmp_path / "pulled" / DATA_FILE).read_bytes() == merged
        key = load_public_key(running.data_dir / "keys" / "release-signing.pub")
        fresh = ZOO[LINKED].factory()
        load_release(fresh, tmp_path / "pulled", key)
        schema = ZOO[LINKED].schema()
        for name, tensor in schema.to_state_dict(merged).items():
            assert torch.equal(fresh.state_dict()[name], tensor), name

        # Retention removes the version's blob: one name goes, the release stays whole.
        blob.unlink()
        _pull(running, LINKED, tmp_path / "after-retention")
        assert (tmp_path / "after-retention" / DATA_FILE).read_bytes() == merged
    finally:
        running.gateway.stop()


def test_the_shared_file_rewritten_in_place_never_leaves(
    tmp_path: Path, two_file_templates: Path
) -> None:
    running = _serve(tmp_path, two_file_templates, LINKED)
    try:
        release, blob, merged = _released(running, LINKED, tmp_path)
        _pull(running, LINKED, tmp_path / "first")  # checked once: its verdict is remembered
        secret = b"RAW VIDEO FRAME "
        with blob.open("r+b") as f:  # the insider writes through the version blob's name
            f.seek(len(merged) // 2)
            f.write(secret)
        assert secret in (release / DATA_FILE).read_bytes()  # the same inode
        with EgressClient(running.endpoints.egress) as egress, pytest.raises(grpc.RpcError) as err:
            for resp in egress.pull_stream(LINKED, file=DATA_FILE):
                assert secret not in resp.chunk.data
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        with pytest.raises(grpc.RpcError) as err:  # the SDK's pull: the same; nothing kept
            _pull(running, LINKED, tmp_path / "second")
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert not (tmp_path / "second" / DATA_FILE).exists()
    finally:
        running.gateway.stop()


def test_the_version_changed_between_its_adoption_and_the_guard_is_never_released(
    tmp_path: Path, two_file_templates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard checks the linked data file against the tags the adoption recorded while
    those bytes hashed to the version's sha256 (publish.read_along), not a fresh hash: a
    changed byte is refused and its piece named; nothing is published. (Which piece, at
    any offset and piece size: tests/unit/test_pieces.py and test_guard_stream.py.)"""
    real = publish_module.max_output_diff  # type: ignore[attr-defined]
    changed: list[int] = []

    def insider_then_parity(onnx_path: Path, *args: Any, **kwargs: Any) -> float:
        data = onnx_path.with_name(DATA_FILE)  # the version blob: one inode, two names
        size = data.stat().st_size
        at = size // 2
        with data.open("r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0x01]))  # the lowest bit: the weights stay finite
        changed.append(at)
        return real(onnx_path, *args, **kwargs)

    monkeypatch.setattr(publish_module, "max_output_diff", insider_then_parity)
    running = _serve(tmp_path, two_file_templates, LINKED)
    try:
        # The trainers' pull of the changed version fails their own sha256 check too.
        with pytest.raises(ValueError, match="pulled bytes do not match their sha256"):
            run_round(running, ZOO[LINKED])
        (at,) = changed
        (refused,) = running.gateway.store.audit_entries("release.refused")
        reason = str(refused.detail["reason"])
        piece = at // SEND_CHUNK_BYTES
        assert f"{DATA_FILE}: piece {piece} differs from the bytes that hashed" in reason
        assert not (running.data_dir / "registry" / LINKED / "1").exists()
        assert running.gateway.store.get_release(LINKED, 1) is None
    finally:
        running.gateway.stop()


def test_the_fold_output_changed_before_its_adoption_is_never_released(
    tmp_path: Path, two_file_templates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedAvg's version is named and tagged from the blocks the fold wrote, not from a
    second read of its file (core/folding.py): an insider who rewrites the file between
    the fold's last write and its adoption gets a blob that does not hash to its name.
    The guard's check of the linked data file against those tags refuses the release,
    and the next close refuses it as a base; the insider's bytes are never signed."""
    real = FedAvg.aggregate
    computed: list[bytes] = []

    def fold_then_insider(self: FedAvg, inp: Any, out_path: Path, state_out: Path) -> Any:
        report = real(self, inp, out_path, state_out)
        data = out_path.read_bytes()
        computed.append(data)
        with out_path.open("r+b") as f:
            f.seek(len(data) // 2)
            f.write(bytes([data[len(data) // 2] ^ 0x01]))  # still finite
        return report

    monkeypatch.setattr(FedAvg, "aggregate", fold_then_insider)
    running = _serve(tmp_path, two_file_templates, LINKED)
    try:
        with pytest.raises(ValueError, match="pulled bytes do not match their sha256"):
            run_round(running, ZOO[LINKED])
        (fold,) = computed
        version = running.gateway.store.latest_version(LINKED)
        assert version is not None and version.version == 1
        assert version.weights_sha256 == hashlib.sha256(fold).hexdigest()  # what was computed
        (refused,) = running.gateway.store.audit_entries("release.refused")
        piece = (len(fold) // 2) // SEND_CHUNK_BYTES
        assert f"{DATA_FILE}: piece {piece} differs from the bytes that hashed" in str(
            refused.detail["reason"]
        )
        assert running.gateway.store.get_release(LINKED, 1) is None
        with EgressClient(running.endpoints.egress) as egress:
            assert [r.version for r in egress.releases(LINKED)] == []
    finally:
        running.gateway.stop()


def test_a_graph_leaving_a_counter_out_links_and_lists_it_outside_the_graph(
    tmp_path: Path, two_file_templates: Path
) -> None:
    """The payload layout: a BatchNorm counter the graph does not read keeps its place in
    the data file (the version blob itself), and the signed manifest lists it with
    "in_graph": false; the pull verifies it and the loaded module gets the merged counter."""
    running = _serve(tmp_path, two_file_templates, BATCHNORM)
    try:
        release, blob, merged = _released(running, BATCHNORM, tmp_path)
        data = release / DATA_FILE
        assert os.stat(data).st_ino == os.stat(blob).st_ino  # one file, two names
        schema = ZOO[BATCHNORM].schema()
        doc = _pull(running, BATCHNORM, tmp_path / "pulled")
        weights = doc["weights"]
        assert isinstance(weights, list)
        assert [w["name"] for w in weights] == [s.name for s in schema.tensors]
        outside = [w["name"] for w in weights if w.get("in_graph") is False]
        assert outside and all(name.endswith("num_batches_tracked") for name in outside)
        assert all("in_graph" not in w for w in weights if w["name"] not in outside)
        assert (tmp_path / "pulled" / DATA_FILE).read_bytes() == merged
        key = load_public_key(running.data_dir / "keys" / "release-signing.pub")
        fresh = ZOO[BATCHNORM].factory()
        load_release(fresh, tmp_path / "pulled", key)
        for name, tensor in schema.to_state_dict(merged).items():
            assert torch.equal(fresh.state_dict()[name], tensor), name
    finally:
        running.gateway.stop()


def test_a_graph_layout_template_copies_and_still_verifies(
    tmp_path: Path, two_file_templates: Path
) -> None:
    """A data dir keeps templates built before the payload layout (the graph's weights end
    to end): their releases copy those bytes and pull as before."""
    from sluice.gateway.core.catalog import ServedModel
    from sluice.gateway.export.template import save_template

    entry = ZOO[BATCHNORM]
    schema = entry.schema()
    directory = template_dir(ServedModel(entry, schema), two_file_templates, 0)
    old_templates = tmp_path / "old-templates"
    shutil.copytree(two_file_templates, old_templates)
    save_template(
        graph_layout(load_template(directory)),
        old_templates / directory.relative_to(two_file_templates),
    )
    running = _serve(tmp_path, old_templates, BATCHNORM)
    try:
        release, blob, merged = _released(running, BATCHNORM, tmp_path)
        data = release / DATA_FILE
        assert os.stat(data).st_ino != os.stat(blob).st_ino
        assert os.stat(data).st_nlink == 1
        graph = [s for s in schema.tensors if not s.name.endswith("num_batches_tracked")]
        views = schema.views(merged)
        assert data.read_bytes() == b"".join(views[s.name].tobytes() for s in graph)
        doc = _pull(running, BATCHNORM, tmp_path / "pulled")
        assert [w["name"] for w in doc["weights"]] == [s.name for s in graph]  # type: ignore[attr-defined]
    finally:
        running.gateway.stop()


def test_where_no_link_can_be_made_the_data_file_is_copied(
    tmp_path: Path, two_file_templates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluice.gateway.core.catalog import ServedModel

    entry = ZOO[LINKED]
    schema = entry.schema()
    template = template_for(ServedModel(entry, schema), two_file_templates, 0)
    assert refresh.payload_is_data_file(template, schema)
    payload = tmp_path / "payload"
    values = np.random.default_rng(5).standard_normal(schema.payload_bytes // 4, np.float32)
    payload.write_bytes(values.tobytes())
    sha = hashlib.sha256(payload.read_bytes()).hexdigest()

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    written = refresh.write_release_files(template, schema, payload, tmp_path / "r", True, sha)
    assert written[1] == (DATA_FILE, schema.payload_bytes, sha)
    data = tmp_path / "r" / DATA_FILE
    assert os.stat(data).st_ino != os.stat(payload).st_ino
    assert data.read_bytes() == payload.read_bytes()
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]
