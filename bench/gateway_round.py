"""A whole round in a `sluice serve` process: 16 trainers push a 100M-parameter model at once,
the quorum closes the round and publishes the release. Measures the gateway's peak RSS
through all of it, then the egress listener's PullRelease throughput on that release."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench import gateway_proc, grpc_sink
from bench.common import (
    MB,
    THROUGHPUT_HEADER,
    Costed,
    Options,
    PeakRss,
    Report,
    median,
    pull_write_seconds,
    raw_socket_seconds,
    sha256_seconds,
    tag_seconds,
    throughput_row,
    workdir,
)
from sluice.clients.sdk import EgressClient, TrainerClient, channel, push_wire_call
from sluice.gateway.store.chunks import SEND_CHUNK_BYTES
from sluice.models.manifest import MODEL_FILE, parse

FULL_MODEL, QUICK_MODEL = "drivenet-xl", "drivenet"
TRAINERS = 16
PULL_VS_PLAIN = 0.60  # issue 14's floor: a pull to a file vs a plain stream, same chunk size


def _push_all(target: str, model: str, shared: gateway_proc.SharedPayload) -> None:
    """TRAINERS concurrent pushes of distinct updates; raises the first failure."""
    with TrainerClient(target) as client:
        info = client.round(model)
    variants = [shared.variant(i) for i in range(TRAINERS)]  # hashed before the clock starts
    errors: list[BaseException] = []

    def run(i: int) -> None:
        tail, sha = variants[i]
        header = gateway_proc.update_header(model, info, f"trainer-{i:02d}", shared.size, sha)
        try:
            with channel(target) as ch:
                push = push_wire_call(ch)
                push(gateway_proc.push_requests(header, shared.body, tail), timeout=600)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(TRAINERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {TRAINERS} pushes failed: {errors[0]!r}")


def _wait_release(target: str, model: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    with EgressClient(target) as egress:
        while not egress.releases(model):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no release of {model} after {timeout_s:.0f} s")
            time.sleep(0.05)


def bench_gateway_round(options: Options, templates: Path) -> tuple[Report, Report]:
    model = QUICK_MODEL if options.quick else FULL_MODEL
    schema = gateway_proc.schema_of(model)
    model_bytes = schema.payload_bytes
    shared = gateway_proc.SharedPayload.of(gateway_proc.random_payload(schema, seed=5))
    memory = Report(
        "memory",
        f"Gateway memory: peak RSS of `sluice serve` while {TRAINERS} trainers push "
        f"{model} ({schema.num_parameters / 1e6:.1f}M parameters, {model_bytes / MB:.0f} MB) "
        "at once and the round closes into a release",
    )
    egress = Report("egress", f"Egress: PullRelease of the {model} release over loopback")
    with workdir(options, "round") as tmp:
        gateway_proc.warm_templates(Path(tmp), (model,), templates)
        gw = gateway_proc.start(Path(tmp) / "gw", (model,), templates, quorum=TRAINERS)
        try:
            with PeakRss(gw.pid, interval_s=0.005) as rss:
                started = time.perf_counter()
                _push_all(gw.internal, model, shared)
                pushed = time.perf_counter()
                _wait_release(gw.egress, model)
                released = time.perf_counter()
            pushed_s, round_s = pushed - started, released - started
            peak_push, peak_close = (
                rss.peak_between(started, pushed),
                rss.peak_between(pushed, released),
            )
            first, pulls, streams, size, matched = _pull(
                gw.egress, model, Path(tmp), options.repeats, gw.pid
            )
        finally:
            gateway_proc.stop(gw, templates)
        plain = _plain_source(Path(tmp), size, options.repeats)
        release_payload = os.urandom(size)
        # A pull to a file ends with the bytes on disk: no pull outruns its own writer's
        # write + fsync of the same bytes; its CPU and sha256's are parts of the ceiling.
        writes = [pull_write_seconds(release_payload, Path(tmp)) for _ in range(options.repeats)]
    raw = [raw_socket_seconds(release_payload) for _ in range(options.repeats)]
    sha_cpu = median([sha256_seconds(release_payload)[1] for _ in range(options.repeats)])
    tag_cpu = median(
        [tag_seconds(release_payload, SEND_CHUNK_BYTES)[1] for _ in range(options.repeats)]
    )
    write = [wall for wall, _ in writes]
    write_cpu = median([cpu for _, cpu in writes])
    del release_payload

    memory.rows = [
        ["what", "bytes", "x model"],
        ["idle gateway (interpreter, torch, onnxruntime, template)", f"{rss.baseline / MB:.0f} MB",
         f"{rss.baseline / model_bytes:.2f}x"],
        ["peak while the 16 pushes stream in", f"{peak_push / MB:.0f} MB",
         f"{peak_push / model_bytes:.2f}x"],
        ["peak while the round closes (fold, release, guard)", f"{peak_close / MB:.0f} MB",
         f"{peak_close / model_bytes:.2f}x"],
        ["peak during the round", f"{rss.peak / MB:.0f} MB", f"{rss.peak / model_bytes:.2f}x"],
        ["peak above idle", f"{rss.extra / MB:.0f} MB", f"{rss.extra / model_bytes:.2f}x"],
    ]  # fmt: skip
    memory.notes += [
        f"{TRAINERS} pushes of {TRAINERS * model_bytes / MB:.0f} MB in all took {pushed_s:.1f} s; "
        f"round closed and released {round_s - pushed_s:.1f} s after the last commit",
        "RSS sampled every 5 ms with psutil from before the first push until the release is listed;"
        " the model's ONNX template was built by an earlier start (once per model, ever)",
    ]
    memory.check(
        f"gateway peak RSS during the {TRAINERS}-trainer round <= 3x the model",
        rss.peak <= 3 * model_bytes,
        f"{rss.peak / MB:.0f} MB = {rss.peak / model_bytes:.2f}x of {model_bytes / MB:.0f} MB",
    )
    memory.data = {
        "model": model,
        "model_bytes": model_bytes,
        "idle_rss_bytes": rss.baseline,
        "peak_rss_bytes": rss.peak,
        "peak_rss_pushing_bytes": peak_push,
        "peak_rss_closing_bytes": peak_close,
        "pushes_s": pushed_s,
        "round_s": round_s,
    }

    walls = {"file": pulls.wall, "first": first.wall, "stream": streams.wall,
             "plain": plain.wall, "raw": raw, "write": write}  # fmt: skip
    rate = {k: size / median(v) / MB for k, v in walls.items()}
    gb = size / 1e9
    mb = f"{size / MB:.0f} MB"
    chunk = f"{SEND_CHUNK_BYTES >> 20} MiB"
    egress.rows = [
        THROUGHPUT_HEADER,
        throughput_row("EgressClient.pull to a file (sha256, fsync, rename)", mb, rate["file"],
                       rate["plain"], rate["raw"], median(pulls.server_cpu) / gb),
        throughput_row("  the release's first pull (tags recorded at publish)", mb,
                       rate["first"], rate["plain"], rate["raw"], median(first.server_cpu) / gb),
        throughput_row("PullRelease stream, bytes counted only", mb, rate["stream"],
                       rate["plain"], rate["raw"], median(streams.server_cpu) / gb),
        throughput_row(f"plain gRPC Python server stream, {chunk} messages, no work", mb,
                       rate["plain"], rate["plain"], rate["raw"], median(plain.server_cpu) / gb),
        throughput_row("raw TCP loopback socket, same bytes", mb, rate["raw"], rate["plain"],
                       rate["raw"]),
        throughput_row("the pull's writer alone: write + fsync of the same bytes, no network",
                       mb, rate["write"], rate["plain"], rate["raw"]),
    ]  # fmt: skip
    ceiling = PullCeiling(
        transport=(median(plain.server_cpu) + median(plain.client_cpu)) / gb,
        sha256=sha_cpu / gb,
        tags=tag_cpu / gb,
        write=write_cpu / gb,
        cores=os.cpu_count() or 1,
    )
    egress.check(
        "egress: every pull to a file is the signed manifest's model.onnx (sha256)",
        matched == len(pulls.wall) + 1,
        f"{matched} of {len(pulls.wall) + 1} pulls of {size / MB:.0f} MB",
    )
    egress.check(
        f"egress: a pull to a file >= {PULL_VS_PLAIN:.0%} of a plain gRPC stream of the same "
        f"chunk size ({chunk})",
        rate["file"] >= PULL_VS_PLAIN * rate["plain"],
        f"{rate['file']:.0f} MB/s = {rate['file'] / rate['plain']:.0%} of {rate['plain']:.0f} "
        f"MB/s; CPU s/GB, server + client: the pull {median(pulls.server_cpu) / gb:.2f} + "
        f"{median(pulls.client_cpu) / gb:.2f}, the plain stream "
        f"{median(plain.server_cpu) / gb:.2f} + {median(plain.client_cpu) / gb:.2f}, on "
        f"{os.cpu_count()} cores; the pull's writer alone (write + fsync) moves "
        f"{rate['write']:.0f} MB/s = {rate['write'] / rate['plain']:.0%} of the plain stream; "
        f"the release's first pull {rate['first']:.0f} MB/s. "
        f"{ceiling.describe(rate['plain'], PULL_VS_PLAIN)}",
    )
    egress.notes += [
        f"medians of {options.repeats} pulls of {MODEL_FILE} after the release's first pull; "
        "every pull passes the egress gate (release checked against its signed manifest, "
        "every piece against the tag the guard recorded at publish; streamed from the "
        "checked descriptor, each piece checked against its tag again before it is sent; a "
        "gateway started after the release hashes the file whole on its first pull instead); "
        "to a file: the client's sha256 against the manifest's, fsync, rename",
        "server CPU s/GB: user + system seconds of the sending process (`sluice serve`; the "
        "plain stream's own server process) per GB; client CPU s/GB (this process): pull to a "
        f"file {median(pulls.client_cpu) / gb:.2f}, plain stream "
        f"{median(plain.client_cpu) / gb:.2f}",
    ]
    egress.data = {
        "release_bytes": size,
        "chunk_bytes": SEND_CHUNK_BYTES,
        "ceiling": {**dataclasses.asdict(ceiling), "mb_s": ceiling.mb_s},
        "mb_s": rate,
        "server_cpu_s_per_gb": {"file": median(pulls.server_cpu) / gb,
                                "stream": median(streams.server_cpu) / gb,
                                "plain": median(plain.server_cpu) / gb},
        "times_s": {"file": pulls.doc(), "first": first.doc(), "stream": streams.doc(),
                    "plain": plain.doc(),
                    "raw": raw, "write": write},
    }  # fmt: skip
    return memory, egress


@dataclass(frozen=True)
class PullCeiling:
    """The fastest a pull keeping every check can go on this machine, from parts measured
    alone in the same run: CPU seconds per GB of each part, and the cores they share."""

    transport: float  # the plain gRPC stream's, server + client: moving the bytes, no work
    sha256: float  # one sha256 pass over the bytes
    tags: float  # one pass tagging the bytes' pieces (the gate's check and re-check)
    write: float  # the pull's writer: write + fsync of the bytes
    cores: int

    @property
    def seconds_per_gb(self) -> float:
        """The check of every piece against its tag before the first byte (the egress gate
        judges the file before sending any of it) runs alone: one pass holding the GIL, and
        the client has nothing to do until the first byte. Then the transport, the gateway's
        check of each piece against its tag before it is sent, and the client's sha256 and
        durable write share the cores, at best perfectly."""
        return self.tags + (self.transport + self.tags + self.sha256 + self.write) / self.cores

    @property
    def mb_s(self) -> float:
        return 1e9 / self.seconds_per_gb / MB

    def describe(self, plain_mb_s: float, floor: float) -> str:
        share = self.mb_s / plain_mb_s
        verdict = (
            f"under the {floor:.0%} floor: out of reach here with every check kept"
            if share < floor
            else f"the {floor:.0%} floor is within it"
        )
        return (
            f"Ceiling with every check kept, from this run's parts: {self.mb_s:.0f} MB/s = "
            f"{share:.0%} of the plain stream ({verdict}): the check of the file's piece tags "
            f"before the first byte alone, {self.tags:.2f} s/GB, then on {self.cores} cores "
            f"the plain stream's CPU {self.transport:.2f} + the gateway's tag check "
            f"{self.tags:.2f} + the client's sha256 {self.sha256:.2f} + the pull's write + "
            f"fsync {self.write:.2f} s/GB"
        )


def _pull(
    target: str, model: str, tmp: Path, repeats: int, server_pid: int
) -> tuple[Costed, Costed, Costed, int, int]:
    """Pull timings (the release's first pull to a file, later ones to a file, stream only)
    and the file's size; every pulled file must be the one the signed manifest lists."""
    first, files, streams = Costed(server_pid), Costed(server_pid), Costed(server_pid)
    size, matched = 0, 0
    with EgressClient(target) as egress:
        listed = {
            f["name"]: f["sha256"] for f in parse(egress.manifest(model).manifest_json)["files"]
        }
        dest = tmp / "pulled-first.onnx"
        matched += (
            first.run(partial(egress.pull, model, dest, file=MODEL_FILE)) == listed[MODEL_FILE]
        )
        dest.unlink()
        for i in range(repeats):
            dest = tmp / f"pulled-{i}.onnx"
            sha = files.run(partial(egress.pull, model, dest, file=MODEL_FILE))
            matched += sha == listed[MODEL_FILE]
            size = dest.stat().st_size
            dest.unlink()
        for _ in range(repeats):
            got = streams.run(partial(_count, egress, model))
            if got != size:
                raise RuntimeError(f"stream pull got {got} of {size} bytes")
    return first, files, streams, size, matched


def _count(egress: EgressClient, model: str) -> int:
    """The raw PullRelease stream of the model's model.onnx: its chunks' bytes, counted."""
    chunks = egress.pull_stream(model, file=MODEL_FILE)
    return sum(len(m.chunk.data) for m in chunks if m.WhichOneof("kind") == "chunk")


def _plain_source(tmp: Path, size: int, repeats: int) -> Costed:
    """A plain gRPC server stream of size bytes in SEND_CHUNK_BYTES messages, counted."""
    with grpc_sink.running(tmp) as (target, pid):
        plain = Costed(pid)
        for _ in range(repeats):
            got = plain.run(partial(grpc_sink.source, target, size, SEND_CHUNK_BYTES))
            if got != size:
                raise RuntimeError(f"plain stream got {got} of {size} bytes")
    return plain
