"""Ingest: updates pushed with the SDK over loopback gRPC to a `sluice serve` process, timed
until the commit is acknowledged, next to the machine's limits measured in the same run:
a raw TCP loopback socket moving the same bytes, sha256 of the same bytes, and the same
update sent as one unary gRPC message (the chunk-less way)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import gateway_proc
from bench.common import (
    MB,
    THROUGHPUT_HEADER,
    Options,
    Report,
    median,
    raw_socket_seconds,
    sha256_seconds,
    throughput_row,
    workdir,
)
from bench.grpc_sink import drain, put
from sluice.clients.sdk import TrainerClient

# (single-stream model, concurrent model, concurrent trainers)
FULL = ("drivenet-1gb", "drivenet-128mb", 8)
QUICK = ("drivenet", "drivenet", 8)


def _push(target: str, model: str, trainer: str, payload: bytes) -> float:
    """One SDK push of payload; seconds until the commit is acknowledged."""
    schema = gateway_proc.schema_of(model)
    with TrainerClient(target) as client:
        info = client.round(model)
        started = time.perf_counter()
        ack = client.push_update(
            model=model,
            round_no=info.round,
            base_version=info.base_version,
            schema_hash=schema.hash,
            trainer=trainer,
            region="shanghai",
            num_examples=100,
            payload=payload,
        )
        elapsed = time.perf_counter() - started
    if not ack.update_id:
        raise RuntimeError(f"push by {trainer} was not acknowledged")
    return elapsed


def _concurrent(target: str, model: str, payloads: list[bytes], tag: str) -> float:
    """Seconds from starting every push at once until the last commit is acknowledged."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(payloads) + 1)

    def run(i: int) -> None:
        barrier.wait()
        try:
            _push(target, model, f"{tag}-{i:02d}", payloads[i])
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} concurrent pushes failed: {errors[0]!r}")
    return time.perf_counter() - started


def _plain_grpc_seconds(payload: bytes, tmp: Path, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per Put (one unary message) and per Drain (a plain chunk stream)."""
    port_file = tmp / "grpc-sink.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_sink", str(port_file)], stdout=subprocess.DEVNULL
    )
    try:
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None:
                raise RuntimeError("the unary sink did not start")
            time.sleep(0.05)
        target = f"127.0.0.1:{port_file.read_text()}"
        expected = hashlib.sha256(payload).hexdigest()
        unary, stream = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            if put(target, payload) != expected:
                raise RuntimeError("the unary sink hashed other bytes")
            unary.append(time.perf_counter() - started)
        for _ in range(repeats):
            started = time.perf_counter()
            if drain(target, payload) != len(payload):
                raise RuntimeError("the stream sink counted other bytes")
            stream.append(time.perf_counter() - started)
        return unary, stream
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_ingest(options: Options, templates: Path) -> Report:
    single_model, many_model, trainers = QUICK if options.quick else FULL
    single = gateway_proc.random_payload(gateway_proc.schema_of(single_model), seed=1)
    many = [
        gateway_proc.random_payload(gateway_proc.schema_of(many_model), seed=100 + i)
        for i in range(trainers)
    ]
    many_bytes = sum(len(p) for p in many)
    report = Report(
        "ingest",
        f"Ingest over loopback gRPC into a `sluice serve` process: one {len(single) / MB:.0f} MB "
        f"update, and {trainers} x {len(many[0]) / MB:.0f} MB concurrently",
    )
    with workdir(options, "ingest") as tmp:
        gw = gateway_proc.start(
            Path(tmp) / "gw", tuple(dict.fromkeys((single_model, many_model))), templates
        )
        try:
            push_single = [
                _push(gw.internal, single_model, f"single-{i}", single)
                for i in range(options.repeats)
            ]
            push_many = [
                _concurrent(gw.internal, many_model, many, f"many{r}")
                for r in range(options.repeats)
            ]
        finally:
            gateway_proc.stop(gw, templates)
        unary, plain = _plain_grpc_seconds(single, Path(tmp), options.repeats)
    raw_single = [raw_socket_seconds(single) for _ in range(options.repeats)]
    raw_many = [raw_socket_seconds(many[0], streams=trainers) for _ in range(options.repeats)]
    sha = [sha256_seconds(single) for _ in range(options.repeats)]

    def rate(nbytes: int, times: list[float]) -> float:
        return nbytes / median(times) / MB

    figures = {
        "push_single_mb_s": rate(len(single), push_single),
        "raw_socket_single_mb_s": rate(len(single), raw_single),
        "sha256_mb_s": rate(len(single), sha),
        "unary_single_mb_s": rate(len(single), unary),
        "plain_grpc_stream_mb_s": rate(len(single), plain),
        "push_concurrent_mb_s": rate(many_bytes, push_many),
        "raw_socket_concurrent_mb_s": rate(many_bytes, raw_many),
    }
    raw1, rawn = figures["raw_socket_single_mb_s"], figures["raw_socket_concurrent_mb_s"]
    one, eight = f"{len(single) / MB:.0f} MB", f"{trainers} x {len(many[0]) / MB:.0f} MB"
    report.rows = [
        THROUGHPUT_HEADER,
        throughput_row("Sluice PushUpdate, 1 stream, until commit", one,
                       figures["push_single_mb_s"], raw1),
        throughput_row("one unary gRPC message (parse + sha256)", one,
                       figures["unary_single_mb_s"], raw1),
        throughput_row("plain gRPC Python stream, 4 MiB messages, no work", one,
                       figures["plain_grpc_stream_mb_s"], raw1),
        throughput_row("sha256 of the same bytes", one, figures["sha256_mb_s"], raw1),
        throughput_row("raw TCP loopback socket, 1 stream", one, raw1, raw1),
        throughput_row(f"Sluice PushUpdate, {trainers} streams, until last commit", eight,
                       figures["push_concurrent_mb_s"], rawn),
        throughput_row(f"raw TCP loopback socket, {trainers} streams", eight, rawn, rawn),
    ]  # fmt: skip
    report.notes += [
        f"medians of {options.repeats} runs; pushes use clients.sdk.TrainerClient (sha256 of "
        "the payload first, then header, 4 MiB chunks, trailer) from threads of this process",
        "until commit: streaming checks, spool, fsync, rename and the SQLite commit included",
        f"gateway start (templates loaded or built once, self-test): {gw.startup_s:.1f} s",
    ]
    report.check(
        "ingest: one stream >= 35% of the raw loopback socket",
        figures["push_single_mb_s"] >= 0.35 * raw1,
        f"{figures['push_single_mb_s']:.0f} MB/s = {figures['push_single_mb_s'] / raw1:.0%} "
        f"of {raw1:.0f} MB/s",
    )
    report.data = {
        **figures,
        "single_bytes": len(single),
        "concurrent_bytes": many_bytes,
        "trainers": trainers,
        "times_s": {
            "push_single": push_single,
            "push_concurrent": push_many,
            "unary_single": unary,
            "plain_grpc_stream": plain,
            "raw_single": raw_single,
            "raw_concurrent": raw_many,
            "sha256": sha,
        },
    }
    return report
