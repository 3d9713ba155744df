"""Plain gRPC peers for ingest, in a server process of their own, writing nothing.

- Put: a whole update as one unary message, how a chunk-less protocol (Flower's, one
  message per update) moves weights: parsed, its bytes hashed, acknowledged.
- Drain: the update as a stream of 4 MiB `Chunk` messages, parsed and counted, nothing
  else: what gRPC Python itself moves on this machine, the ceiling under any checks.

Run by bench/ingest.py as `python -m bench.grpc_sink PORT_FILE`.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from sluice.v1 import tensors_pb2

SERVICE = "sluice.bench.UnarySink"
METHOD = f"/{SERVICE}/Put"
DRAIN = f"/{SERVICE}/Drain"
MAX_MESSAGE = 2**31 - 1  # protobuf's hard limit: one message can never carry more


def _put(request: tensors_pb2.Chunk, context: grpc.ServicerContext) -> tensors_pb2.Chunk:
    # The reply reuses Chunk: offset = bytes received, data = their sha256 (hex).
    digest = hashlib.sha256(request.data).hexdigest().encode()
    return tensors_pb2.Chunk(offset=len(request.data), data=digest)


def _drain(
    requests: Iterator[tensors_pb2.Chunk], context: grpc.ServicerContext
) -> tensors_pb2.Chunk:
    return tensors_pb2.Chunk(offset=sum(len(r.data) for r in requests))


def main() -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    handler = grpc.unary_unary_rpc_method_handler(
        _put,
        request_deserializer=tensors_pb2.Chunk.FromString,
        response_serializer=tensors_pb2.Chunk.SerializeToString,
    )
    drain = grpc.stream_unary_rpc_method_handler(
        _drain,
        request_deserializer=tensors_pb2.Chunk.FromString,
        response_serializer=tensors_pb2.Chunk.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Put": handler, "Drain": drain}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(sys.argv[1]).write_text(str(port))
    server.wait_for_termination()


def put(target: str, payload: bytes) -> str:
    """Send payload as one message; returns the sha256 the server computed."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=tensors_pb2.Chunk.SerializeToString,
            response_deserializer=tensors_pb2.Chunk.FromString,
        )
        reply = call(tensors_pb2.Chunk(offset=0, data=payload), timeout=600)
    if reply.offset != len(payload):
        raise RuntimeError(f"unary sink received {reply.offset} of {len(payload)} bytes")
    return reply.data.decode()


if __name__ == "__main__":
    main()


def drain(target: str, payload: bytes, chunk_bytes: int = 4 << 20) -> int:
    """Stream payload in chunk_bytes messages (a bytes copy each, as the SDK makes); returns
    the bytes the server counted."""

    def chunks() -> Iterator[tensors_pb2.Chunk]:
        view = memoryview(payload)
        for at in range(0, len(view), chunk_bytes):
            yield tensors_pb2.Chunk(offset=at, data=bytes(view[at : at + chunk_bytes]))

    with grpc.insecure_channel(target) as channel:
        call = channel.stream_unary(
            DRAIN,
            request_serializer=tensors_pb2.Chunk.SerializeToString,
            response_deserializer=tensors_pb2.Chunk.FromString,
        )
        return int(call(chunks(), timeout=600).offset)
