"""Shared fixtures: a real gateway on ephemeral loopback ports, and helpers to build updates."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sluice.gateway import logs
from sluice.gateway.config import Config
from sluice.gateway.server import Endpoints, Gateway
from sluice.models import registry
from sluice.models.schema import Schema
from sluice.v1 import trainer_pb2

TINY = "drivenet-tiny"
# Config's fixed default ports (7070, 7071, 9464, 7072) would collide between gateways:
# every test gateway binds ports the OS picks.
EPHEMERAL = {
    "internal_address": "127.0.0.1:0",
    "egress_address": "127.0.0.1:0",
    "ops_address": "127.0.0.1:0",
    "health_address": "127.0.0.1:0",
}


def offline(config: Config) -> Config:
    """A gateway built only to prepare its templates (or to fail doing so): plain text on
    ports the OS picks, so it needs no PKI and collides with nothing."""
    return config.replace(insecure_loopback=True, **EPHEMERAL)


@pytest.fixture(scope="session", autouse=True)
def _ephemeral_ports() -> Iterator[None]:
    """The same for `sluice serve` run by a test (a subprocess, or main()): SLUICE_* env."""
    names = {f"SLUICE_{key.upper()}": value for key, value in EPHEMERAL.items()}
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# The gateway's own log lines (every audit entry, the effective configuration): in a test
# they would land in the stderr of an in-process CLI command (main() puts a handler on the
# root logger), which tests read line by line. Tests that read them ask for gateway_logs.
GATEWAY_LOGGERS = ("sluice.audit", "sluice.config")


@pytest.fixture(autouse=True)
def _gateway_logs_apart() -> Iterator[None]:
    """Each test starts without the stderr handler an earlier test's main() left on the root
    logger, and the gateway's audit and configuration lines stay out of the CLI's stderr."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logs.StderrHandler)]:
        root.removeHandler(handler)
    loggers = [logging.getLogger(name) for name in GATEWAY_LOGGERS]
    before = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.propagate = False
    yield
    for logger, propagate in zip(loggers, before, strict=True):
        logger.propagate = propagate


@pytest.fixture
def gateway_logs() -> None:
    """The gateway's audit and configuration lines reach the root logger (and caplog)."""
    for name in GATEWAY_LOGGERS:
        logging.getLogger(name).propagate = True


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
    Gateway(offline(Config(data_dir=root, models=(TINY,)))).stop()
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
        **EPHEMERAL,
    }
    values.update(settings)
    config = Config().replace(**values)
    gateway = Gateway(config)
    endpoints = gateway.start()
    # The warm-up after ready (server.py) imports and logs in the background: done before
    # a test reads the process's stderr or counts its threads.
    assert gateway.warmed_up(timeout=120), "the gateway's warm-up did not end"
    return Running(gateway, endpoints, data_dir, config)


# Gateways a test built in-process without a fixture (tests/unit/test_races.make_gateway):
# stopped when the test ends, so none is left to a garbage collector's finalizer, which
# runs in whatever thread it happens to (its own serving thread among them).
BUILT: list[Gateway] = []


@pytest.fixture(autouse=True)
def _built_gateways_stopped() -> Iterator[None]:
    yield
    while BUILT:
        BUILT.pop().stop()  # once: a gateway the test stopped itself is left as it is


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
