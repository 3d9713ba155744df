"""The peer for ingest: a gRPC server taking a whole update as one unary message.

This is how a chunk-less protocol (Flower's, one message per update) moves weights: the
server parses the message, checks the sha256 of its bytes and acknowledges; it writes
nothing. Run by bench/ingest.py as `python -m bench.unary_sink PORT_FILE`.
"""

from __future__ import annotations

import hashlib
import sys
from concurrent import futures
from pathlib import Path

import grpc

from sluice.v1 import tensors_pb2

SERVICE = "sluice.bench.UnarySink"
METHOD = f"/{SERVICE}/Put"
MAX_MESSAGE = 2**31 - 1  # protobuf's hard limit: one message can never carry more


def _put(request: tensors_pb2.Chunk, context: grpc.ServicerContext) -> tensors_pb2.Chunk:
    # The reply reuses Chunk: offset = bytes received, data = their sha256 (hex).
    digest = hashlib.sha256(request.data).hexdigest().encode()
    return tensors_pb2.Chunk(offset=len(request.data), data=digest)


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
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Put": handler}),)
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
