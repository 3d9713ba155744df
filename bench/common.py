"""What every benchmark shares: options, reports with PASS/FAIL checks, timing and memory probes,
and the machine's own limits (loopback socket, sha256, disk write) measured in the same run."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil  # type: ignore[import-untyped]  # psutil ships no type hints

from sluice.gateway.export.pieces import PieceTags
from sluice.gateway.store.direct import DirectFile, aligned_buffer, window_bytes
from sluice.models.appender import Appender

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RSS_INTERVAL_S = 0.001
CHUNK = 4 << 20  # raw-socket limits send slices of this size
MB = 1e6
T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    quick: bool  # the 2-minute version: smaller sizes, fewer repeats, same code paths
    workdir: Path | None  # where spools, data dirs and releases go; None: the system temp dir
    repeats: int  # timed runs per measurement; medians are reported


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    """What one benchmark prints and saves: a titled table, notes and PASS/FAIL checks.

    `rows` is the table (a header row first), `data` the raw numbers for latest.json.
    """

    key: str
    title: str
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))


THROUGHPUT_HEADER = [
    "what", "bytes", "MB/s (med)", "server CPU s/GB", "vs plain gRPC stream", "vs raw socket"
]  # fmt: skip


def throughput_row(
    what: str,
    size: str,
    mb_s: float,
    plain_mb_s: float,
    raw_mb_s: float,
    cpu_s_per_gb: float | None = None,
) -> list[str]:
    """A table row: a transfer's MB/s, the CPU seconds per GB of the process that serves it,
    and its share of the plain gRPC stream's and the raw socket's MB/s, measured alike."""
    cpu = "-" if cpu_s_per_gb is None else f"{cpu_s_per_gb:.2f}"
    return [what, size, f"{mb_s:.0f}", cpu, f"{mb_s / plain_mb_s:.0%}", f"{mb_s / raw_mb_s:.0%}"]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds a process (default: this one, all threads) has used."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


class Costed:
    """Runs of one transfer, each measured alone: wall seconds, and CPU seconds of the
    process serving it and of this (the client's) process."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.wall: list[float] = []
        self.server_cpu: list[float] = []
        self.client_cpu: list[float] = []

    def run(self, transfer: Callable[[], T], wall: Callable[[T], float] | None = None) -> T:
        """transfer()'s result; `wall` takes the seconds from it (a transfer that times
        itself), else the call is timed whole."""
        server, client, started = cpu_seconds(self.server_pid), cpu_seconds(), time.perf_counter()
        result = transfer()
        elapsed = time.perf_counter() - started
        self.wall.append(wall(result) if wall is not None else elapsed)
        self.server_cpu.append(cpu_seconds(self.server_pid) - server)
        self.client_cpu.append(cpu_seconds() - client)
        return result

    def mb_s(self, nbytes: int) -> float:
        return nbytes / median(self.wall) / MB

    def server_s_per_gb(self, nbytes: int) -> float:
        return median(self.server_cpu) / (nbytes / 1e9)

    def client_s_per_gb(self, nbytes: int) -> float:
        return median(self.client_cpu) / (nbytes / 1e9)

    def doc(self) -> dict[str, list[float]]:
        return {"wall_s": self.wall, "server_cpu_s": self.server_cpu,
                "client_cpu_s": self.client_cpu}  # fmt: skip


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def settle() -> None:
    """Free garbage and give freed heap back to the OS, so baselines are honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def timed(run: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of `repeats` calls of run, each after settle()."""
    times = []
    for _ in range(repeats):
        settle()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


class PeakRss:
    """Samples a process's RSS in a thread; `extra` is the peak above the entry value.

    It can miss a spike shorter than the interval, and counts only touched pages.
    """

    def __init__(self, pid: int | None = None, interval_s: float = RSS_INTERVAL_S) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = 0
        self.peak = 0
        self.timeline: list[tuple[float, int]] = []  # (perf_counter, rss) of every sample

    def _rss(self) -> int:
        try:
            return int(self._process.memory_info().rss)
        except psutil.Error:  # the process ended: its last peak stands
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            rss = self._rss()
            self.timeline.append((time.perf_counter(), rss))
            self.peak = max(self.peak, rss)

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.baseline

    def peak_between(self, start: float, end: float) -> int:
        """The peak of the samples taken between two perf_counter() readings."""
        return max((rss for t, rss in self.timeline if start <= t <= end), default=0)


def workdir(options: Options, prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=f"sluice-bench-{prefix}-", dir=options.workdir)


# --- the machine's limits, measured in the same run -------------------------------------


def raw_socket_seconds(payload: bytes | memoryview, streams: int = 1) -> float:
    """Seconds to move `streams` copies of payload through loopback TCP, concurrently,
    in CHUNK sends into a reused receive buffer: what the kernel alone can do."""
    server = socket.create_server(("127.0.0.1", 0), backlog=streams)
    port = server.getsockname()[1]
    received = [0] * streams

    def sink(i: int, conn: socket.socket) -> None:
        buf = bytearray(CHUNK)
        with conn:
            while n := conn.recv_into(buf):
                received[i] += n

    def source() -> None:
        with socket.create_connection(("127.0.0.1", port)) as c:
            view = memoryview(payload)
            for off in range(0, len(view), CHUNK):
                c.sendall(view[off : off + CHUNK])

    started = time.perf_counter()
    senders = [threading.Thread(target=source) for _ in range(streams)]
    for t in senders:
        t.start()
    sinks = []
    for i in range(streams):
        conn, _ = server.accept()
        sinks.append(threading.Thread(target=sink, args=(i, conn)))
        sinks[-1].start()
    for t in senders + sinks:
        t.join()
    elapsed = time.perf_counter() - started
    server.close()
    if received != [len(payload)] * streams:
        raise RuntimeError(f"raw socket moved {received} bytes, expected {len(payload)} each")
    return elapsed


def _pass_seconds(
    update: Callable[[memoryview], object],
    finish: Callable[[], object],
    payload: bytes | memoryview,
) -> tuple[float, float]:
    """Wall and CPU seconds (this thread's) of one pass of update over payload in CHUNK
    views, then finish()."""
    view = memoryview(payload)
    started, cpu = time.perf_counter(), time.thread_time()
    for off in range(0, len(view), CHUNK):
        update(view[off : off + CHUNK])
    finish()
    return time.perf_counter() - started, time.thread_time() - cpu


def sha256_seconds(payload: bytes | memoryview) -> tuple[float, float]:
    """One sha256 over payload: the cost of the hash every push and pull pays on each side."""
    digest = hashlib.sha256()
    return _pass_seconds(digest.update, digest.hexdigest, payload)


def tag_seconds(payload: bytes | memoryview, piece_bytes: int) -> tuple[float, float]:
    """Tagging payload's pieces as the egress gate does (`gateway.export.pieces`): the
    check of a pull, and of each piece it sends."""
    tags = PieceTags(piece_bytes)
    return _pass_seconds(tags.feed, tags.finish, payload)


def _write_fsync(path: Path, view: memoryview) -> None:
    """view written to a new file at path in CHUNK writes, then fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, len(view), CHUNK):
            os.write(fd, view[off : off + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def write_seconds(payload: bytes | memoryview, directory: Path) -> float:
    """Seconds to write payload to a new file in directory and fsync it (then delete it)."""
    path = directory / "raw-write.bin"
    started = time.perf_counter()
    _write_fsync(path, memoryview(payload))
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def io_floor_seconds(source: Path, payload: bytes | memoryview, directory: Path) -> float:
    """Seconds to read `source` from the disk (O_DIRECT, nothing done with the bytes) while
    writing payload to a new file in directory and fsyncing it, both at once: the disk work
    no close of one update avoids (it reads the update and writes the version durably).
    The file written is then deleted."""
    path = directory / "io-floor.bin"

    def read() -> None:
        buf = aligned_buffer(window_bytes(8 << 20))
        with DirectFile(source) as f:
            offset = 0
            while got := f.read(offset, 8 << 20, buf).size:
                offset += got

    started = time.perf_counter()
    reader = threading.Thread(target=read, name="io-floor-read")
    reader.start()
    try:
        _write_fsync(path, memoryview(payload))
    finally:
        reader.join()
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def pull_write_seconds(payload: bytes | memoryview, directory: Path) -> tuple[float, float]:
    """Wall and CPU seconds (this thread's, user + system) to write payload to a new file
    as a pull writes what it receives (the SDK's Appender: whole blocks with O_DIRECT where
    the file system takes it, in CHUNK pieces) and fsync it; the file is then deleted."""
    view = memoryview(payload)
    path = directory / "pull-write.bin"
    started, cpu = time.perf_counter(), time.thread_time()
    with Appender(path, 0) as out:
        for off in range(0, len(view), CHUNK):
            out.write(view[off : off + CHUNK])
        out.sync()
    costs = time.perf_counter() - started, time.thread_time() - cpu
    path.unlink()
    return costs


def spool_seconds(
    payload: bytes | memoryview, directory: Path, count: int
) -> list[tuple[float, float]]:
    """Wall and CPU seconds (this thread's, user + system) to write payload to each of
    `count` new files in CHUNK writes and fsync it, keeping the files until all are written
    (as a gateway keeps its spool): what storing the bytes costs, without any check."""
    view = memoryview(payload)
    paths, costs = [], []
    try:
        for i in range(count):
            paths.append(directory / f"spool-{i}.bin")
            started, cpu = time.perf_counter(), time.thread_time()
            _write_fsync(paths[-1], view)
            costs.append((time.perf_counter() - started, time.thread_time() - cpu))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return costs


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
