"""What the soak watches: the gateway process and its data dir while it runs, and what a
stopped gateway left (audit chain, orphans, log problems)."""

from __future__ import annotations

import collections
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil  # type: ignore[import-untyped]  # psutil ships no type hints

from bench import gateway_proc
from sluice.clients.sdk import RetryPolicy, TrainerClient

SAMPLE_S = 2.0  # between samples of the gateway process and its data dir


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the trainers started
    rss: int
    fds: int
    threads: int
    cpu_s: float  # the gateway's user + system CPU seconds so far
    round: int  # the open round then
    disk: dict[str, int]  # bytes per part of the data dir (see disk_use)
    blob_files: int


def disk_use(data_dir: Path) -> tuple[dict[str, int], int]:
    """Bytes in blobs/ (spooled updates, weights), state/ (optimizer state), registry/
    (releases), sluice.db (and its -wal, -shm), the rest, and the gateway's log (our
    redirect of its stderr, not in `total`); and the number of files in blobs/."""
    parts = dict.fromkeys(("blobs", "state", "registry", "db", "other", "log"), 0)
    blob_files = 0
    for root, _dirs, files in os.walk(data_dir):
        top = Path(root).relative_to(data_dir).parts[:1]
        for name in files:
            try:
                size = os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while we walked
                continue
            if top and top[0] in parts:
                parts[top[0]] += size
                blob_files += top[0] == "blobs"
            elif not top and name.startswith("sluice.db"):
                parts["db"] += size
            elif not top and name == "gateway.log":
                parts["log"] += size
            else:
                parts["other"] += size
    parts["total"] = sum(v for k, v in parts.items() if k != "log")
    return parts, blob_files


class Sampler:
    """The gateway process and its data dir, sampled every SAMPLE_S in a thread; the open
    round is read on a connection of its own, made before the first sample."""

    def __init__(self, gw: gateway_proc.GatewayProcess, model: str, t0: float) -> None:
        self.model = model
        self.process = psutil.Process(gw.pid)
        self.data_dir = gw.data_dir
        self.t0 = t0
        self.client = TrainerClient(gw.internal, retry=RetryPolicy(attempts=3))
        self.client.round(self.model)
        self.samples: list[Sample] = []
        first = self.sample()
        if first is None:
            raise RuntimeError(f"the gateway exited; see {gw.data_dir / 'gateway.log'}")
        self.samples.append(first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> Sample | None:
        """One sample now; None once the gateway is gone (the run reports its exit)."""
        previous = self.samples[-1].round if self.samples else 0
        try:
            with self.process.oneshot():
                rss, fds = self.process.memory_info().rss, self.process.num_fds()
                threads, cpu = self.process.num_threads(), self.process.cpu_times()
        except psutil.Error:
            return None
        try:
            round_no = self.client.round(self.model).round
        except grpc.RpcError:
            round_no = previous
        disk, blob_files = disk_use(self.data_dir)
        at = time.perf_counter() - self.t0
        return Sample(at, rss, fds, threads, cpu.user + cpu.system, round_no, disk, blob_files)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S) and (sample := self.sample()) is not None:
            self.samples.append(sample)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def audit_facts(data_dir: Path) -> dict[str, Any]:
    """`sluice audit verify` on the stopped gateway's data dir, and its entries by kind."""
    cli = [sys.executable, "-m", "sluice.gateway.cli", "audit"]
    verify = subprocess.run(
        [*cli, "verify", "--data-dir", str(data_dir)], capture_output=True, text=True
    )
    export = subprocess.run(
        [*cli, "export", "--data-dir", str(data_dir)], capture_output=True, text=True, check=True
    )
    kinds: collections.Counter[str] = collections.Counter()
    deleted: collections.Counter[str] = collections.Counter()
    for line in export.stdout.splitlines():
        entry = json.loads(line)
        kinds[entry["kind"]] += 1
        if entry["kind"] == "retention.deleted":
            deleted[entry["subject"].split("/")[1]] += 1  # MODEL/round/N or MODEL/version/V
    return {
        "verify_rc": verify.returncode,
        "verify_output": (verify.stdout + verify.stderr).strip(),
        "kinds": dict(kinds),
        "retention_deleted": dict(deleted),
    }


def orphans(data_dir: Path) -> tuple[int, int, int]:
    """(files in blobs/ that no live row names, files left in blobs/tmp, live blobs) of a
    stopped gateway: retention's exact account, where sampled bytes are only a bound."""
    db = sqlite3.connect(f"file:{data_dir / 'sluice.db'}?mode=ro", uri=True)
    try:
        live = {
            row[0]
            for row in db.execute(
                "SELECT payload_sha256 FROM updates WHERE removed_ms IS NULL"
                " UNION SELECT weights_sha256 FROM versions WHERE removed_ms IS NULL"
            )
        }
    finally:
        db.close()
    blobs = data_dir / "blobs"
    stored = {p.name for p in blobs.glob("??/*") if p.is_file()}
    tmp = sum(1 for p in (blobs / "tmp").iterdir() if p.is_file())
    return len(stored - live), tmp, len(live)


def log_problems(data_dir: Path) -> list[str]:
    """The gateway log's warnings, errors and tracebacks, but --insecure-loopback's own."""
    path = data_dir / "gateway.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return [
        ln
        for ln in lines
        if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", ln) and "INSECURE:" not in ln
    ]


def floors(values: Sequence[int], parts: int = 10) -> list[int]:
    """The lowest value of each of `parts` consecutive stretches of values."""
    return [int(p.min()) for p in np.array_split(np.array(values), min(parts, len(values)))]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")
