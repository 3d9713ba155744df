"""A real `sluice serve` process for the benchmarks, plus the helpers to push to it.

Templates are built once per bench run: each gateway's templates/ is hard-linked from a
shared cache and new ones are linked back when it stops (a template never changes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sluice.clients.sdk import PUSH_CHUNK_BYTES, chunk_wire
from sluice.models import registry
from sluice.models.schema import Schema
from sluice.v1 import trainer_pb2


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    internal: str
    egress: str
    startup_s: float  # until /readyz answers: template build/load, self-test, bootstrap
    live_s: float  # until /healthz first answered: the ports are bound
    built: tuple[str, ...]  # models whose templates this start exported (none cached)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        log = self.data_dir / "gateway.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of src that dst lacks into dst."""
    for path in src.rglob("*") if src.is_dir() else ():
        target = dst / path.relative_to(src)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def _http_status(port: int, path: str) -> int:
    """The status of GET path on the ops listener; 0 while nothing answers."""
    try:
        with _DIRECT.open(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def start(
    data_dir: Path,
    models: tuple[str, ...],
    templates: Path,
    *,
    quorum: int = 1000,
    min_trainers: int = 1,
    env: dict[str, str] | None = None,
) -> GatewayProcess:
    """`sluice serve` on loopback ports (plain text: the transport is what we measure), timed
    until its ops listener's /readyz answers 200, as a load balancer would see it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    _link_tree(templates, data_dir / "templates")
    built = tuple(
        m for m in models if not any((data_dir / "templates" / m).glob("*/template.json"))
    )
    (data_dir / "endpoints.json").unlink(missing_ok=True)
    ops = _free_port()  # known before the start, so readiness is polled from the first moment
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "sluice.gateway.cli", "serve",
            "--data-dir", str(data_dir), "--models", ",".join(models),
            "--quorum", str(quorum), "--min-updates", "1", "--min-trainers", str(min_trainers),
            "--round-seconds", "86400", "--insecure-loopback",
            "--internal", "127.0.0.1:0", "--egress", "127.0.0.1:0",
            "--ops", f"127.0.0.1:{ops}", "--health", "127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(data_dir / "gateway.log").open("wb"),
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    live_s = 0.0
    while (status := _http_status(ops, "/readyz")) != 200:
        if status and not live_s:
            live_s = time.perf_counter() - started
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.returncode}; see {data_dir / 'gateway.log'}")
        time.sleep(0.01)
    ready_s = time.perf_counter() - started
    doc = json.loads((data_dir / "endpoints.json").read_text())  # written before ready
    return GatewayProcess(
        proc, data_dir, doc["internal"], doc["egress"], ready_s, live_s or ready_s, built
    )


def ready_seconds(
    data_dir: Path, models: tuple[str, ...], templates: Path, starts: int
) -> list[float]:
    """Seconds from spawning `sluice serve` on an existing data dir (its templates built)
    until /readyz answers, per start; each gateway is stopped before the next starts."""
    times = []
    for _ in range(starts):
        gw = start(data_dir, models, templates)
        stop(gw, templates)
        if gw.built:
            raise RuntimeError(f"{data_dir}: {gw.built} had no template; not an existing data dir")
        times.append(gw.startup_s)
    return times


def warm_templates(root: Path, models: tuple[str, ...], templates: Path) -> float:
    """Build the models' templates in a throw-away start unless cached: a deployment builds a
    template once, ever, so a measurement of a running gateway should not include the
    exporter's leftovers (its modules stay imported). Returns the seconds it took."""
    missing = tuple(m for m in models if not any((templates / m).glob("*/template.json")))
    if not missing:
        return 0.0
    gw = start(root / "warm-up", missing, templates)
    stop(gw, templates)
    return gw.startup_s


def stop(gw: GatewayProcess, templates: Path) -> None:
    gw.proc.terminate()
    try:
        gw.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        gw.proc.kill()
        gw.proc.wait()
    _link_tree(gw.data_dir / "templates", templates)


def random_payload(schema: Schema, seed: int) -> bytes:
    """A valid delta: small random floats, zero integer steps, flattened in schema order."""
    rng = np.random.default_rng(seed)
    out = bytearray(schema.payload_bytes)
    for spec, start, end in schema.spans():
        view = np.frombuffer(memoryview(out)[start:end], dtype=spec.dtype)
        if spec.is_float:
            view[:] = rng.standard_normal(view.size, dtype=np.float32) * np.float32(1e-3)
    return bytes(out)


def distinct(payload: bytes, schema: Schema, i: int) -> bytes:
    """A copy of payload with one float changed for i: the i-th of distinct updates of the
    same size. Blobs are content-addressed: a push of bytes the gateway already holds
    replaces that blob, and freeing the old file's blocks lands in the push's commit (the
    directory's fsync: 0.11-0.12 s of a 1 GB push here, against 1 ms for new bytes). A
    trainer's updates differ from round to round, so a repeated push must too."""
    spec, start, _ = [span for span in schema.spans() if span[0].is_float][-1]
    out = bytearray(payload)
    value = np.array([1e-3 * (i + 1)], dtype=np.float32).astype(spec.np_dtype)
    out[start : start + value.nbytes] = value.tobytes()  # the last float tensor's first value
    return bytes(out)


@dataclass(frozen=True)
class SharedPayload:
    """Distinct updates without N copies: every trainer sends the same bytes but its own last
    chunk (content-addressed blobs would otherwise merge identical payloads)."""

    body: bytes  # everything but the last chunk, shared
    tail: bytes  # the last chunk, which each variant perturbs
    body_digest: hashlib._Hash  # sha256 state after body, copied per variant

    @classmethod
    def of(cls, payload: bytes) -> SharedPayload:
        cut = (len(payload) - 1) // PUSH_CHUNK_BYTES * PUSH_CHUNK_BYTES  # tail: 1..one chunk
        digest = hashlib.sha256(memoryview(payload)[:cut])
        return cls(payload[:cut], payload[cut:], digest)

    @property
    def size(self) -> int:
        return len(self.body) + len(self.tail)

    def variant(self, i: int) -> tuple[bytes, str]:
        """Trainer i's last chunk and the sha256 of its whole payload."""
        tail = bytearray(self.tail)
        tail[:4] = np.float32(1e-3 * (i + 1)).tobytes()  # the first value, a float tensor's
        digest = self.body_digest.copy()
        digest.update(tail)
        return bytes(tail), digest.hexdigest()


def push_requests(header: trainer_pb2.UpdateHeader, body: bytes, tail: bytes) -> Iterator[bytes]:
    """The SDK's PushUpdate stream (clients.sdk.push_wire, serialized messages for
    clients.sdk.push_wire_call) over body then tail."""
    yield trainer_pb2.PushUpdateRequest(header=header).SerializeToString()
    count, offset, view = 0, 0, memoryview(body)
    parts = [view[at : at + PUSH_CHUNK_BYTES] for at in range(0, len(view), PUSH_CHUNK_BYTES)]
    for part in [*parts, memoryview(tail)]:
        if part:
            yield chunk_wire(offset, part)
            offset += len(part)
            count += 1
    trailer = trainer_pb2.UpdateTrailer(num_chunks=count)
    yield trainer_pb2.PushUpdateRequest(trailer=trailer).SerializeToString()


@functools.cache
def schema_of(model: str) -> Schema:
    return registry.get(model).schema()


def update_header(
    model: str, info: trainer_pb2.RoundInfo, trainer: str, size: int, sha256: str
) -> trainer_pb2.UpdateHeader:
    return trainer_pb2.UpdateHeader(
        update_id=uuid.uuid4().hex,
        trainer=trainer,
        region="shanghai",
        model=model,
        round=info.round,
        base_version=info.base_version,
        num_examples=100,
        schema_hash=schema_of(model).hash,
        payload_sha256=sha256,
        payload_bytes=size,
    )
