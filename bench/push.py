"""Push real updates (drivenet-xl: 404 MB) over loopback gRPC to a `sluice serve` process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from clients.sdk import TrainerClient
from models import registry

LARGE_MODEL = "drivenet-xl"  # 100.9M float32 parameters


def _start(data_dir: Path, model: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "gateway.cli", "serve",
            "--data-dir", str(data_dir), "--models", model, "--quorum", "1000",
            "--insecure-loopback",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(data_dir / "gateway.log").open("wb"),
    )  # fmt: skip
    endpoints = data_dir / "endpoints.json"
    deadline = time.monotonic() + 600
    while not endpoints.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"gateway did not start; see {data_dir / 'gateway.log'}")
        time.sleep(0.2)
    return proc, json.loads(endpoints.read_text())


def raw_socket_mb_s(payload: bytes) -> float:
    """The loopback limit: the same bytes through a plain TCP socket, 4 MiB sends."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(4 << 20)
        with conn:
            while n := conn.recv_into(buf):
                received[0] += n

    t = threading.Thread(target=sink)
    t.start()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as c:
        view = memoryview(payload)
        for off in range(0, len(view), 4 << 20):
            c.sendall(view[off : off + (4 << 20)])
    t.join()
    elapsed = time.perf_counter() - started
    server.close()
    assert received[0] == len(payload)
    return len(payload) / elapsed / 1e6


def bench_push(model: str = LARGE_MODEL, repeats: int = 3) -> dict[str, float]:
    """MB/s of PushUpdate until the commit is acknowledged, median of `repeats` pushes."""
    schema = registry.get(model).schema()
    rng = np.random.default_rng(0)
    arrays = {
        t.name: (rng.standard_normal(t.shape, dtype=np.float32) * 1e-3).astype(t.dtype)
        if t.is_float
        else np.zeros(t.shape, dtype=t.dtype)
        for t in schema.tensors
    }
    payload = schema.flatten(arrays)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        proc, endpoints = _start(Path(tmp), model)
        startup_s = time.perf_counter() - started
        try:
            times = []
            with TrainerClient(endpoints["internal"]) as client:
                info = client.round(model)
                for i in range(repeats):
                    started = time.perf_counter()
                    ack = client.push_update(
                        model=model,
                        round_no=info.round,
                        base_version=info.base_version,
                        schema_hash=schema.hash,
                        trainer=f"bench-{i:02d}",
                        region="shanghai",
                        num_examples=1,
                        payload=payload,
                    )
                    times.append(time.perf_counter() - started)
                    if not ack.created:
                        raise RuntimeError("push was not committed")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    push_s = float(np.median(times))
    return {
        "payload_mb": len(payload) / 1e6,
        "push_s": push_s,
        "push_mb_s": len(payload) / push_s / 1e6,
        "raw_socket_mb_s": raw_socket_mb_s(payload),
        "gateway_startup_s": startup_s,
    }
