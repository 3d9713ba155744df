"""Shared fixtures: a real gateway on ephemeral loopback ports, and helpers to build updates."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sluice.gateway.config import Config
from sluice.gateway.server import Endpoints, Gateway
from sluice.models import registry
from sluice.models.schema import Schema
from sluice.v1 import trainer_pb2

TINY = "drivenet-tiny"


@dataclass
class Running:
    gateway: Gateway
    endpoints: Endpoints
    data_dir: Path
    config: Config

    def restart(self) -> None:
        self.gateway.stop()
        self.gateway = Gateway(self.config)
        self.endpoints = self.gateway.start()


@pytest.fixture(scope="session")
def template_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny model's ONNX template once per session; gateways copy it."""
    root = tmp_path_factory.mktemp("templates-seed")
    Gateway(Config(data_dir=root, models=(TINY,))).store.close()
    return root / "templates"


def start_gateway(data_dir: Path, template_cache: Path, **settings: object) -> Running:
    import shutil

    if not (data_dir / "templates").exists():
        shutil.copytree(template_cache, data_dir / "templates")
    # Plain text unless a test asks for mTLS: tests/integration/test_auth.py does.
    values: dict[str, object] = {
        "data_dir": data_dir,
        "models": (TINY,),
        "quorum": 3,
        "insecure_loopback": True,
    }
    values.update(settings)
    config = Config().replace(**values)
    gateway = Gateway(config)
    return Running(gateway, gateway.start(), data_dir, config)


@pytest.fixture
def gateway(tmp_path: Path, template_cache: Path) -> Iterator[Running]:
    running = start_gateway(tmp_path / "gw", template_cache)
    yield running
    running.gateway.stop()


@pytest.fixture(scope="session")
def tiny_schema() -> Schema:
    return registry.get(TINY).schema()


def random_delta(schema: Schema, seed: int, scale: float = 0.01) -> bytes:
    """A valid delta payload: small random floats, small integer steps for int tensors."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in schema.tensors:
        if spec.is_float:
            arrays[spec.name] = (rng.standard_normal(spec.shape) * scale).astype(spec.np_dtype)
        else:
            arrays[spec.name] = rng.integers(0, 10, spec.shape).astype(spec.np_dtype)
    return schema.flatten(arrays)


def update_header(
    schema: Schema, payload: bytes, *, round_no: int = 1, base_version: int = 0, **fields: object
) -> trainer_pb2.UpdateHeader:
    values: dict[str, object] = {
        "update_id": uuid.uuid4().hex,
        "trainer": "shanghai-01",
        "region": "shanghai",
        "model": TINY,
        "round": round_no,
        "base_version": base_version,
        "num_examples": 100,
        "schema_hash": schema.hash,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
    }
    values.update(fields)
    return trainer_pb2.UpdateHeader(**values)  # type: ignore[arg-type]


def stored_state(running: Running) -> tuple[list[str], int]:
    """Blob files and update rows: what a rejected push must not change."""
    blobs = sorted(p.name for p in (running.data_dir / "blobs").rglob("*") if p.is_file())
    rows = running.gateway.store._all("SELECT COUNT(*) AS n FROM updates")[0]["n"]
    return blobs, int(rows)
