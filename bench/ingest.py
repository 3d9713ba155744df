"""Ingest: updates pushed with the SDK over loopback gRPC to a `sluice serve` process, timed
until the commit is acknowledged, next to its ceilings measured in the same run: a plain
gRPC Python stream of the same bytes in messages of the same size (and of 1, 2 and 4 MiB)
and the same stream doing only the least work of a verified, durable push
(bench/grpc_sink.py Spool), each run next to the push it is compared with; sha256 of the
same bytes, a raw TCP loopback socket and the same update sent as one unary gRPC message
(the chunk-less way). The gateway's CPU per GB is psutil's user + system seconds of its
process; the plain stream's server is measured alike."""

from __future__ import annotations

import hashlib
import threading
import time
from functools import partial
from pathlib import Path

from bench import gateway_proc, grpc_sink
from bench.common import (
    MB,
    THROUGHPUT_HEADER,
    Costed,
    Options,
    Report,
    machine,
    median,
    pull_write_seconds,
    raw_socket_seconds,
    sha256_seconds,
    spool_seconds,
    throughput_row,
    workdir,
)
from sluice.clients.sdk import PUSH_CHUNK_BYTES, TrainerClient

# (single-stream model, concurrent model, concurrent trainers)
FULL = ("drivenet-1gb", "drivenet-128mb", 8)
QUICK = ("drivenet", "drivenet", 8)
# The plain stream's message sizes: the SDK's, and those other gRPC languages receive by default.
PLAIN_CHUNKS = tuple(sorted({1 << 20, 2 << 20, 4 << 20, PUSH_CHUNK_BYTES}))
GB = 1e9

# The floors of issue 14 (bench/README.md: ingest).
SINGLE_VS_PLAIN = 0.60  # one push >= this share of the plain stream with the SDK's chunks
GATEWAY_CPU_S_PER_GB = 1.0  # user + sys seconds of `sluice serve` per GB pushed
CONCURRENT_VS_SINGLE = 1.3  # 8 concurrent pushes >= this many times one push's MB/s


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


def _drain(target: str, payload: bytes, chunk_bytes: int) -> None:
    if grpc_sink.drain(target, payload, chunk_bytes) != len(payload):
        raise RuntimeError("the stream sink counted other bytes")


def _least_work(target: str, payload: bytes) -> None:
    if grpc_sink.spool(target, payload, PUSH_CHUNK_BYTES) != len(payload):
        raise RuntimeError("the spool peer stored other bytes")


def _unary(target: str, payload: bytes, repeats: int) -> list[float]:
    """Seconds per Put: the update as one unary message, parsed and hashed."""
    expected = hashlib.sha256(payload).hexdigest()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        if grpc_sink.put(target, payload) != expected:
            raise RuntimeError("the unary sink hashed other bytes")
        times.append(time.perf_counter() - started)
    return times


def bench_ingest(options: Options, templates: Path) -> Report:
    single_model, many_model, trainers = QUICK if options.quick else FULL
    single_schema, many_schema = map(gateway_proc.schema_of, (single_model, many_model))
    single = gateway_proc.random_payload(single_schema, seed=1)
    many = [gateway_proc.random_payload(many_schema, seed=100 + i) for i in range(trainers)]
    many_bytes = sum(len(p) for p in many)
    report = Report(
        "ingest",
        f"Ingest over loopback gRPC into a `sluice serve` process: one {len(single) / MB:.0f} MB "
        f"update, and {trainers} x {len(many[0]) / MB:.0f} MB concurrently",
    )
    models = tuple(dict.fromkeys((single_model, many_model)))
    with workdir(options, "ingest") as tmp:
        # Templates built by a throw-away start: the measured gateway's CPU is a serving
        # gateway's, not one carrying the exporter's modules and heap (as gateway_round).
        gateway_proc.warm_templates(Path(tmp), models, templates)
        gw = gateway_proc.start(Path(tmp) / "gw", models, templates)
        try:
            with grpc_sink.running(Path(tmp)) as (target, sink_pid):
                push_single, push_many = Costed(gw.pid), Costed(gw.pid)
                plain = {size: Costed(sink_pid) for size in PLAIN_CHUNKS}
                least = Costed(sink_pid)
                # Each repeat runs the push and its same-run peers one after another, so
                # that the ratios compare moments of this VM that lie close together; each
                # push sends bytes the gateway does not hold yet, as a trainer's next update
                # does (gateway_proc.distinct), and its peers get the same bytes.
                for i in range(options.repeats):
                    update = gateway_proc.distinct(single, single_schema, i)
                    push = partial(_push, gw.internal, single_model, f"single-{i}", update)
                    push_single.run(push, wall=float)
                    for size, costed in plain.items():
                        costed.run(partial(_drain, target, update, size))
                    least.run(partial(_least_work, target, update))
                    del update, push
                for r in range(options.repeats):
                    round_many = [gateway_proc.distinct(p, many_schema, r) for p in many]
                    pushes = partial(_concurrent, gw.internal, many_model, round_many, f"many{r}")
                    push_many.run(pushes, wall=float)
                    del round_many, pushes
                unary = _unary(target, single, options.repeats)
        finally:
            gateway_proc.stop(gw, templates)
        spool = spool_seconds(single, Path(tmp), options.repeats)
        # The same bytes the way the gateway's spool and the SDK's pull write them (O_DIRECT
        # blocks where the file system takes it): what this disk takes without the page cache.
        direct = [pull_write_seconds(single, Path(tmp)) for _ in range(options.repeats)]
    raw_single = [raw_socket_seconds(single) for _ in range(options.repeats)]
    raw_many = [raw_socket_seconds(many[0], streams=trainers) for _ in range(options.repeats)]
    sha = [sha256_seconds(single) for _ in range(options.repeats)]

    def rate(nbytes: int, times: list[float]) -> float:
        return nbytes / median(times) / MB

    n1 = len(single)
    peer = plain[PUSH_CHUNK_BYTES]
    figures = {
        "push_single_mb_s": push_single.mb_s(n1),
        "push_single_gateway_cpu_s_per_gb": push_single.server_s_per_gb(n1),
        "push_single_client_cpu_s_per_gb": push_single.client_s_per_gb(n1),
        "push_concurrent_mb_s": push_many.mb_s(many_bytes),
        "push_concurrent_gateway_cpu_s_per_gb": push_many.server_s_per_gb(many_bytes),
        "plain_grpc_stream_mb_s": peer.mb_s(n1),
        "plain_grpc_stream_server_cpu_s_per_gb": peer.server_s_per_gb(n1),
        "plain_grpc_stream_client_cpu_s_per_gb": peer.client_s_per_gb(n1),
        "least_work_mb_s": least.mb_s(n1),
        "least_work_server_cpu_s_per_gb": least.server_s_per_gb(n1),
        "least_work_client_cpu_s_per_gb": least.client_s_per_gb(n1),
        "sha256_mb_s": rate(n1, [wall for wall, _ in sha]),
        "sha256_cpu_s_per_gb": median([cpu for _, cpu in sha]) / (n1 / GB),
        "spool_mb_s": rate(n1, [wall for wall, _ in spool]),
        "spool_cpu_s_per_gb": median([cpu for _, cpu in spool]) / (n1 / GB),
        "direct_write_mb_s": rate(n1, [wall for wall, _ in direct]),
        "direct_write_cpu_s_per_gb": median([cpu for _, cpu in direct]) / (n1 / GB),
        "unary_single_mb_s": rate(n1, unary),
        "raw_socket_single_mb_s": rate(n1, raw_single),
        "raw_socket_concurrent_mb_s": rate(many_bytes, raw_many),
        **{f"plain_grpc_stream_{size >> 20}mib_mb_s": c.mb_s(n1) for size, c in plain.items()},
    }
    raw1, rawn = figures["raw_socket_single_mb_s"], figures["raw_socket_concurrent_mb_s"]
    plain1 = figures["plain_grpc_stream_mb_s"]
    one, eight = f"{n1 / MB:.0f} MB", f"{trainers} x {len(many[0]) / MB:.0f} MB"
    sdk_chunk = f"{PUSH_CHUNK_BYTES >> 20} MiB"
    report.rows = [
        THROUGHPUT_HEADER,
        throughput_row(f"Sluice PushUpdate (SDK, {sdk_chunk} chunks), 1 stream, until commit",
                       one, figures["push_single_mb_s"], plain1, raw1,
                       figures["push_single_gateway_cpu_s_per_gb"]),
        *(throughput_row(f"plain gRPC Python stream, {size >> 20} MiB messages, no work", one,
                         c.mb_s(n1), plain1, raw1, c.server_s_per_gb(n1))
          for size, c in plain.items()),
        throughput_row(f"the same {sdk_chunk} stream doing a push's least work (sha256 on "
                       "both ends, O_DIRECT write + fsync)", one, figures["least_work_mb_s"],
                       plain1, raw1, figures["least_work_server_cpu_s_per_gb"]),
        throughput_row("one unary gRPC message (parse + sha256)", one,
                       figures["unary_single_mb_s"], plain1, raw1),
        throughput_row("sha256 of the same bytes", one, figures["sha256_mb_s"], plain1, raw1,
                       figures["sha256_cpu_s_per_gb"]),
        throughput_row("write + fsync of the same bytes to a new file (page cache)", one,
                       figures["spool_mb_s"], plain1, raw1, figures["spool_cpu_s_per_gb"]),
        throughput_row("the same with O_DIRECT blocks (the spool's and the pull's writer)", one,
                       figures["direct_write_mb_s"], plain1, raw1,
                       figures["direct_write_cpu_s_per_gb"]),
        throughput_row("raw TCP loopback socket, 1 stream", one, raw1, plain1, raw1),
        throughput_row(f"Sluice PushUpdate, {trainers} streams, until last commit", eight,
                       figures["push_concurrent_mb_s"], plain1, rawn,
                       figures["push_concurrent_gateway_cpu_s_per_gb"]),
        throughput_row(f"raw TCP loopback socket, {trainers} streams", eight, rawn, plain1, rawn),
    ]  # fmt: skip
    report.notes += [
        f"medians of {options.repeats} runs; pushes use clients.sdk.TrainerClient (push "
        f"protocol 2: header, {sdk_chunk} chunks hashed as they are handed to gRPC, trailer "
        "with the sha256) from threads of this process; until commit: streaming checks, "
        "spool, fsync, rename and the SQLite commit",
        "server CPU s/GB: user + system seconds of the process that receives (the `sluice "
        "serve` process; the plain stream's own server process), per GB moved; sha256 and "
        "write + fsync (the files kept, as a spool is): this thread's CPU seconds per GB",
        f"client CPU s/GB (this process, its own sha256 included): one push "
        f"{figures['push_single_client_cpu_s_per_gb']:.2f}, the plain stream "
        f"{figures['plain_grpc_stream_client_cpu_s_per_gb']:.2f}; client and server share "
        "the machine's cores",
        "gateway start on built templates (loaded, self-test; built by a start before it): "
        f"{gw.startup_s:.1f} s",
    ]
    push1 = figures["push_single_mb_s"]
    # Push protocol 2: the client hashes each chunk as it streams (the trailer carries the
    # sha256); the gateway hashes, checks and spools what arrives. With two cores for client
    # and gateway, a push moves at most 2 cores / (their CPU seconds per byte together).
    both = gw_cpu_1 = figures["push_single_gateway_cpu_s_per_gb"]
    both += figures["push_single_client_cpu_s_per_gb"]
    cores = int(machine()["cpus"] or 1)
    ceiling = cores / both * 1e3
    # Every acknowledged byte is on disk first: no push outruns the spool's own write + fsync
    # of its bytes (O_DIRECT blocks, models/appender.py).
    spool1 = figures["direct_write_mb_s"]
    durable = (
        f"; the spool's write + fsync of the same bytes alone moves {spool1:.0f} MB/s = "
        f"{spool1 / plain1:.0%} of the plain stream, and the push {push1 / spool1:.0%} of that"
    )
    # The least a verified, durable push can do over this stream (bench/grpc_sink.py Spool):
    # if that alone moves under the floor, no push on gRPC Python reaches it here.
    least1 = figures["least_work_mb_s"]
    out_of_reach = least1 < SINGLE_VS_PLAIN * plain1
    least_line = (
        f"; the same stream doing only a push's least work (the client's sha256 of each "
        f"chunk; the server's view of it, sha256 and O_DIRECT write + fsync, nothing else) "
        f"moves {least1:.0f} MB/s = {least1 / plain1:.0%} of the plain stream"
        f"{' (the floor is out of reach here)' if out_of_reach else ''}, and the push "
        f"{push1 / least1:.0%} of that"
    )
    # Each push ran next to its plain stream: their ratios, repeat by repeat.
    paired = ", ".join(
        f"{stream / push:.0%}"
        for push, stream in zip(push_single.wall, plain[PUSH_CHUNK_BYTES].wall, strict=True)
    )
    report.check(
        f"ingest: one stream >= {SINGLE_VS_PLAIN:.0%} of the plain gRPC stream with the same "
        f"chunk size ({sdk_chunk})",
        push1 >= SINGLE_VS_PLAIN * plain1,
        f"{push1:.0f} MB/s = {push1 / plain1:.0%} of {plain1:.0f} MB/s (repeat by repeat, "
        f"each push over the plain stream run after it: {paired}); gateway + client CPU "
        f"{both:.2f} s/GB (gateway {gw_cpu_1:.2f}) on {cores} cores bound a push to "
        f"{ceiling:.0f} MB/s = {ceiling / plain1:.0%}" + least_line + durable,
    )
    gw_cpu = figures["push_single_gateway_cpu_s_per_gb"]
    # What no gateway that receives over gRPC Python and hashes what it receives can skip.
    floor_parts = figures["sha256_cpu_s_per_gb"] + figures["plain_grpc_stream_server_cpu_s_per_gb"]
    report.check(
        f"ingest: gateway CPU per GB ingested <= {GATEWAY_CPU_S_PER_GB:.1f} s",
        gw_cpu <= GATEWAY_CPU_S_PER_GB,
        f"{gw_cpu:.2f} s/GB (user + sys of `sluice serve`); parts measured alone: the plain "
        f"stream's server {figures['plain_grpc_stream_server_cpu_s_per_gb']:.2f} + sha256 "
        f"{figures['sha256_cpu_s_per_gb']:.2f} = {floor_parts:.2f} s/GB before a byte is "
        f"stored ({'over' if floor_parts > GATEWAY_CPU_S_PER_GB else 'within'} the floor), "
        f"then the spool's write + fsync {figures['direct_write_cpu_s_per_gb']:.2f} (O_DIRECT "
        f"blocks; through the page cache {figures['spool_cpu_s_per_gb']:.2f})",
    )
    push8 = figures["push_concurrent_mb_s"]
    # Cores kept busy: (gateway + client CPU seconds) per second of the push. Streams at once
    # gain only what one stream leaves idle.
    busy1 = (gw_cpu + figures["push_single_client_cpu_s_per_gb"]) * push1 / 1e3
    both8 = push_many.server_s_per_gb(many_bytes) + push_many.client_s_per_gb(many_bytes)
    busy8 = both8 * push8 / 1e3
    # The same bound as one stream's: streams at once spend these CPU seconds per GB on
    # these cores, so together they move at most this (however well they overlap).
    ceiling8 = cores / both8 * 1e3
    report.check(
        f"ingest: {trainers} concurrent streams >= {CONCURRENT_VS_SINGLE}x one stream",
        push8 >= CONCURRENT_VS_SINGLE * push1,
        f"{push8 / push1:.2f}x ({push8:.0f} vs {push1:.0f} MB/s); cores busy (gateway + client "
        f"CPU per second): one stream {busy1:.2f}, {trainers} streams {busy8:.2f}, of "
        f"{cores}; {trainers} streams' gateway + client CPU {both8:.2f} s/GB bound them to "
        f"{ceiling8:.0f} MB/s = {ceiling8 / push1:.2f}x one stream"
        f"{' (the floor is out of reach here)' if ceiling8 < CONCURRENT_VS_SINGLE * push1 else ''}"
        f"; they spool to the same disk, whose O_DIRECT write + fsync alone moves "
        f"{spool1:.0f} MB/s ({spool1 / push1:.2f}x one stream)",
    )
    report.data = {
        **figures,
        "single_bytes": n1,
        "concurrent_bytes": many_bytes,
        "trainers": trainers,
        "push_chunk_bytes": PUSH_CHUNK_BYTES,
        "times_s": {
            "push_single": push_single.doc(),
            "push_concurrent": push_many.doc(),
            "unary_single": unary,
            "plain_grpc_stream": {str(size): c.doc() for size, c in plain.items()},
            "least_work": least.doc(),
            "raw_single": raw_single,
            "raw_concurrent": raw_many,
            "sha256": sha,
            "spool": spool,
        },
    }
    return report
