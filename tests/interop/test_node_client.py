"""A grpc-js client with default options lists, verifies and pulls a release, with a resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.gateway.store.chunks import SEND_CHUNK_BYTES
from sluice.models import registry
from sluice.models.manifest import load_public_key
from tests.conftest import Running, random_delta, start_gateway

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "interop" / "node"
# 2.5M parameters: a ~10 MB model.onnx, five chunks, published in ~10 s (the tiny model's
# release fits in one chunk, which would leave the chunking and the resume untested).
MODEL = "drivenet"
DEFAULT_MAX_RECEIVE_BYTES = 4 << 20


def node_binary() -> str:
    # CI must not pass by skipping this: a missing toolchain fails, and says how to fix it.
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found on PATH: install Node.js 18 or newer, then `make interop-deps`")
    if not (NODE_DIR / "node_modules").is_dir():
        pytest.fail(f"{NODE_DIR / 'node_modules'} is missing: run `make interop-deps`")
    return node


@contextmanager
def published(data_dir: Path, template_cache: Path) -> Iterator[Running]:
    """A gateway whose newest release of MODEL came out of a round of three trainers."""
    running = start_gateway(data_dir, template_cache, models=(MODEL,))
    try:
        schema = registry.get(MODEL).schema()
        with TrainerClient(running.endpoints.internal) as client:
            for i, trainer in enumerate(["shanghai-01", "beijing-01", "chengdu-01"]):
                client.push_update(model=MODEL, round_no=1, base_version=0,
                                   schema_hash=schema.hash, trainer=trainer,
                                   region=trainer.split("-")[0], num_examples=10,
                                   payload=random_delta(schema, seed=20 + i))  # fmt: skip
        with EgressClient(running.endpoints.egress) as egress:
            deadline = time.monotonic() + 30
            while not egress.releases(MODEL):
                if time.monotonic() > deadline:
                    pytest.fail(f"no release of {MODEL} 30 s after the round's quorum")
                time.sleep(0.05)
        yield running
    finally:
        running.gateway.stop()


def test_node_grpc_js_client_with_defaults_pulls_and_verifies_a_release(
    tmp_path: Path, template_cache: Path
) -> None:
    node = node_binary()  # first: a missing toolchain fails before a gateway is started
    with published(tmp_path / "gw", template_cache) as running:
        summary, node_bytes = run_node_client(node, running, tmp_path)
        with EgressClient(running.endpoints.egress) as egress:
            (release,) = egress.releases(MODEL)
            key = load_public_key(running.data_dir / "keys" / "release-signing.pub")
            doc = egress.pull_release(MODEL, tmp_path / "sdk", key)
    sdk_bytes = (tmp_path / "sdk" / "model.onnx").read_bytes()
    (signed,) = doc["files"]

    assert summary["release_found"] and summary["version"] == release.version == doc["version"]
    assert summary["signature_valid"] and summary["canonical"]
    assert summary["manifest_format"] == doc["format"] == "sluice.release/2"
    assert summary["sha256_match"]
    assert summary["sha256"] == summary["header_sha256"] == signed["sha256"]
    assert summary["size"] == signed["size"] == len(sdk_bytes) > SEND_CHUNK_BYTES
    assert 0 < summary["resumed_at"] < summary["size"]
    assert summary["chunks"] >= 2
    assert summary["max_chunk_bytes"] <= SEND_CHUNK_BYTES
    assert summary["max_message_bytes"] <= DEFAULT_MAX_RECEIVE_BYTES
    assert node_bytes == sdk_bytes


def run_node_client(node: str, running: Running, tmp_path: Path) -> tuple[dict[str, Any], bytes]:
    """pull.js's JSON summary and the file it reassembled."""
    public_key = running.data_dir / "keys" / "release-signing.pub"
    out = tmp_path / "node-model.onnx"
    cmd = [node, str(NODE_DIR / "pull.js"), "--target", running.endpoints.egress,
           "--model", MODEL, "--public-key", str(public_key), "--protos", str(ROOT / "protos"),
           "--out", str(out), "--deadline-s", "60"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, f"pull.js exited {proc.returncode}:\n{proc.stderr}{proc.stdout}"
    summary = json.loads(proc.stdout)
    return summary, out.read_bytes()
