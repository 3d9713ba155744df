"""Plain gRPC peers for ingest and egress, in a server process of their own (only Spool writes).

- Put: a whole update as one unary message, how a chunk-less protocol (Flower's, one
  message per update) moves weights: parsed, its bytes hashed, acknowledged.
- Drain: an update as a client stream of `Chunk` messages, parsed and counted, nothing
  else: what gRPC Python itself moves towards a server on this machine, the ceiling of a
  push under any checks.
- Spool: the least work any verified, durable push does, over the same stream: the client
  hashes each chunk as it hands it to gRPC (as the SDK does) and sends it pre-serialized;
  the server reads each message as a view of the received bytes, hashes it and writes it
  with the gateway's own spool writer (O_DIRECT blocks, a worker writing behind), then
  fsyncs and answers the sha256. No NaN/Inf scan, offsets, audit or SQLite: what any
  gateway on gRPC Python that stores what it acknowledges and checks its sha256 pays.
- Source: a server stream of `Chunk` messages of one reused buffer, counted by the client:
  the ceiling of a pull (PullRelease) under any checks.

Run as `python -m bench.grpc_sink PORT_FILE [SPOOL_DIR]`; `running(directory)` starts and
stops it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from functools import partial
from pathlib import Path

import grpc

from sluice.gateway.store.blobs import SPOOL_BLOCK
from sluice.models.appender import Appender
from sluice.models.chunk_codec import chunk_message, chunk_view
from sluice.v1 import tensors_pb2

SERVICE = "sluice.bench.UnarySink"
METHOD = f"/{SERVICE}/Put"
DRAIN = f"/{SERVICE}/Drain"
SOURCE = f"/{SERVICE}/Source"
SPOOL = f"/{SERVICE}/Spool"
MAX_MESSAGE = 2**31 - 1  # protobuf's hard limit: one message can never carry more
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def _put(request: tensors_pb2.Chunk, context: grpc.ServicerContext) -> tensors_pb2.Chunk:
    # The reply reuses Chunk: offset = bytes received, data = their sha256 (hex).
    digest = hashlib.sha256(request.data).hexdigest().encode()
    return tensors_pb2.Chunk(offset=len(request.data), data=digest)


def _drain(
    requests: Iterator[tensors_pb2.Chunk], context: grpc.ServicerContext
) -> tensors_pb2.Chunk:
    return tensors_pb2.Chunk(offset=sum(len(r.data) for r in requests))


def _spool(
    directory: Path, requests: Iterator[bytes], context: grpc.ServicerContext
) -> tensors_pb2.Chunk:
    # The reply reuses Chunk: offset = bytes stored, data = their sha256 (hex).
    digest, size = hashlib.sha256(), 0
    path = directory / f"spool-{os.getpid()}-{time.monotonic_ns()}.part"
    out = Appender(path, 0, exclusive=True, behind=True, block=SPOOL_BLOCK)
    try:
        for message in requests:
            view = chunk_view(message)
            if view is None or view.offset != size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not the next chunk")
            digest.update(view.data)
            out.write(view.data)
            size += len(view.data)
        out.sync()
    finally:
        out.close()
        path.unlink()
    return tensors_pb2.Chunk(offset=size, data=digest.hexdigest().encode())


def _source(
    request: tensors_pb2.Chunk, context: grpc.ServicerContext
) -> Iterator[tensors_pb2.Chunk]:
    # The request reuses Chunk: offset = bytes to send, data = the chunk size (8 bytes, LE).
    total, chunk_bytes = request.offset, int.from_bytes(request.data, "little")
    data = bytes(chunk_bytes)
    for at in range(0, total, chunk_bytes):
        yield tensors_pb2.Chunk(offset=at, data=data[: min(chunk_bytes, total - at)])


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_OPTIONS)
    handlers = {
        "Put": grpc.unary_unary_rpc_method_handler(
            _put,
            request_deserializer=tensors_pb2.Chunk.FromString,
            response_serializer=tensors_pb2.Chunk.SerializeToString,
        ),
        "Drain": grpc.stream_unary_rpc_method_handler(
            _drain,
            request_deserializer=tensors_pb2.Chunk.FromString,
            response_serializer=tensors_pb2.Chunk.SerializeToString,
        ),
        "Spool": grpc.stream_unary_rpc_method_handler(
            partial(_spool, Path(sys.argv[2] if len(sys.argv) > 2 else ".")),
            response_serializer=tensors_pb2.Chunk.SerializeToString,
        ),
        "Source": grpc.unary_stream_rpc_method_handler(
            _source,
            request_deserializer=tensors_pb2.Chunk.FromString,
            response_serializer=tensors_pb2.Chunk.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(sys.argv[1]).write_text(str(port))
    server.wait_for_termination()


@contextlib.contextmanager
def running(directory: Path) -> Iterator[tuple[str, int]]:
    """The peers' server in a process of its own; yields its target and process id."""
    port_file = directory / "grpc-sink.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_sink", str(port_file), str(directory)],
        stdout=subprocess.DEVNULL,
    )
    try:
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None:
                raise RuntimeError("the plain gRPC peer did not start")
            time.sleep(0.05)
        yield f"127.0.0.1:{port_file.read_text()}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def put(target: str, payload: bytes) -> str:
    """Send payload as one message; returns the sha256 the server computed."""
    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=tensors_pb2.Chunk.SerializeToString,
            response_deserializer=tensors_pb2.Chunk.FromString,
        )
        reply = call(tensors_pb2.Chunk(offset=0, data=payload), timeout=600)
    if reply.offset != len(payload):
        raise RuntimeError(f"unary sink received {reply.offset} of {len(payload)} bytes")
    return reply.data.decode()


def drain(target: str, payload: bytes, chunk_bytes: int) -> int:
    """Stream payload in chunk_bytes messages; returns the bytes the server counted."""

    def chunks() -> Iterator[tensors_pb2.Chunk]:
        view = memoryview(payload)
        for at in range(0, len(view), chunk_bytes):
            yield tensors_pb2.Chunk(offset=at, data=view[at : at + chunk_bytes].tobytes())

    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        call = channel.stream_unary(
            DRAIN,
            request_serializer=tensors_pb2.Chunk.SerializeToString,
            response_deserializer=tensors_pb2.Chunk.FromString,
        )
        return int(call(chunks(), timeout=600).offset)


def spool(target: str, payload: bytes, chunk_bytes: int) -> int:
    """Stream payload to Spool in chunk_bytes messages, hashed as they are handed to gRPC;
    returns the bytes the server stored, once it answered the same sha256."""
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        view = memoryview(payload)
        for at in range(0, len(view), chunk_bytes):
            piece = view[at : at + chunk_bytes]
            digest.update(piece)
            yield chunk_message(at, piece)

    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        call: grpc.StreamUnaryMultiCallable[bytes, tensors_pb2.Chunk] = channel.stream_unary(
            SPOOL,
            request_serializer=None,  # the items are already serialized
            response_deserializer=tensors_pb2.Chunk.FromString,
        )
        reply = call(chunks(), timeout=600)
    if reply.data.decode() != digest.hexdigest():
        raise RuntimeError("the spool peer stored other bytes")
    return int(reply.offset)


def source(target: str, total: int, chunk_bytes: int) -> int:
    """Receive total bytes as a server stream of chunk_bytes messages; returns the count."""
    request = tensors_pb2.Chunk(offset=total, data=chunk_bytes.to_bytes(8, "little"))
    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        call = channel.unary_stream(
            SOURCE,
            request_serializer=tensors_pb2.Chunk.SerializeToString,
            response_deserializer=tensors_pb2.Chunk.FromString,
        )
        return sum(len(m.data) for m in call(request, timeout=600))


if __name__ == "__main__":
    main()
