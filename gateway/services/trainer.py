"""TrainerService: thin gRPC adapter over rounds, versions and ingest."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import grpc

from sluice.gateway.core.errors import IntegrityError, InvalidInput, NotFound
from sluice.gateway.core.ingest import PUSH_PROTOCOL, BodyItem, Ingest, PayloadChunk, Trailer
from sluice.gateway.core.records import UpdateHeader, Version
from sluice.gateway.core.rounds import RoundManager
from sluice.gateway.metrics import Metrics
from sluice.gateway.services.auth import principal_of
from sluice.gateway.services.chunk_wire import ChunkView, PushRequest, chunk_message
from sluice.gateway.services.errors import mapped_errors
from sluice.gateway.services.observed import call_status
from sluice.gateway.store.blobs import BlobStore
from sluice.gateway.store.chunks import check_offset, read_chunks
from sluice.gateway.store.direct import NotARegularFile, open_regular
from sluice.gateway.store.sqlite import Store
from sluice.v1 import tensors_pb2, trainer_pb2, trainer_pb2_grpc


def _header(msg: trainer_pb2.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        update_id=msg.update_id,
        trainer=msg.trainer,
        region=msg.region,
        model=msg.model,
        round=msg.round,
        base_version=msg.base_version,
        num_examples=msg.num_examples,
        schema_hash=msg.schema_hash,
        payload_sha256=msg.payload_sha256,
        payload_bytes=msg.payload_bytes,
        metrics=dict(msg.metrics),
    )


@dataclass
class _Received:
    """Payload bytes a push has delivered so far, for its metrics."""

    payload_bytes: int = 0


def _body(requests: Iterator[PushRequest], received: _Received) -> Iterator[BodyItem]:
    data: bytes | memoryview
    for req in requests:
        if isinstance(req, ChunkView):  # decoded by the interceptor: a view of the bytes received
            offset, data = req.offset, req.data
        elif (kind := req.WhichOneof("kind")) == "chunk":
            chunk = req.chunk
            offset, data = chunk.offset, chunk.data  # each read of data copies: once
        elif kind == "trailer":
            yield Trailer(req.trailer.num_chunks, req.trailer.payload_sha256)
            continue
        else:
            raise InvalidInput(f"unexpected {kind or 'empty'} message; send the header only first")
        if not data:  # it would make no progress, and keep the stream alive
            raise InvalidInput(f"empty chunk at offset {offset}; chunks carry bytes")
        received.payload_bytes += len(data)
        yield PayloadChunk(offset, data)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        rounds: RoundManager,
        ingest: Ingest,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.rounds = rounds
        self.ingest = ingest
        self.metrics = metrics or Metrics()

    def GetRound(
        self, request: trainer_pb2.GetRoundRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RoundInfo:
        with mapped_errors(context):
            r = self.rounds.current(request.model)
            schema = self.rounds.catalog.get(request.model).schema
            strategy = self.rounds.strategy_for(request.model)
            return trainer_pb2.RoundInfo(
                model=r.model,
                round=r.round,
                base_version=r.base_version,
                schema_hash=schema.hash,
                payload_bytes=schema.payload_bytes,
                quorum=self.rounds.policy.quorum,
                min_updates=self.rounds.policy.min_updates,
                accepted=r.accepted,
                deadline_unix_ms=r.deadline_ms,
                max_chunk_bytes=self.ingest.limits.max_chunk_bytes,
                strategy=strategy.name,
                proximal_mu=float(getattr(strategy, "proximal_mu", 0.0)),
                push_protocol=PUSH_PROTOCOL,
                tensors=[
                    tensors_pb2.TensorSpec(name=t.name, shape=t.shape, dtype=t.dtype)
                    for t in schema.tensors
                ],
            )

    def PullGlobal(  # type: ignore[override]  # chunks go out serialized: bytes
        self, request: trainer_pb2.PullGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.PullGlobalResponse | bytes]:
        with mapped_errors(context):
            served = self.rounds.catalog.get(request.model)
            if request.version:
                v = self.store.get_version(request.model, request.version)
            else:
                v = self.store.latest_version(request.model)
            if v is None:
                raise NotFound(f"version {request.version} of {request.model!r} does not exist")
            total = served.schema.payload_bytes
            check_offset(request.offset, total)
            with self._open_weights(v) as weights:  # closed however the pull ends
                yield trainer_pb2.PullGlobalResponse(
                    header=trainer_pb2.GlobalHeader(
                        model=v.model,
                        version=v.version,
                        schema_hash=served.schema.hash,
                        total_bytes=total,
                        sha256=v.weights_sha256,
                    )
                )
                for offset, data in read_chunks(weights, request.offset, total):
                    # Serialized here, one copy of the data (auth._guarded passes bytes through).
                    yield chunk_message(offset, data)

    def _open_weights(self, v: Version) -> BinaryIO:
        """The version's weights file, open before the pull answers anything: the pull then
        reads its bytes to the end whatever retention does meanwhile. NotFound if retention
        removed them, before this lookup or since."""
        if v.removed_ms is None:
            try:
                return os.fdopen(open_regular(self.blobs.path(v.weights_sha256)), "rb")
            except NotARegularFile:
                raise IntegrityError(
                    f"version {v.version} of {v.model!r}: its weights on the gateway are not "
                    "a regular file (the data dir was tampered with); an operator must look"
                ) from None
            except FileNotFoundError:
                now = self.store.get_version(v.model, v.version)
                if now is None or now.removed_ms is None:
                    raise  # not retention: a blob missing from the store (a storage fault)
        latest = self.store.latest_version(v.model)
        raise NotFound(
            f"version {v.version} of {v.model!r}: its weights were removed by retention "
            f"(keep_versions); pull the current version {latest.version if latest else 0} "
            "(version 0 asks for it)"
        )

    def PushUpdate(
        self,
        request_iterator: Iterator[PushRequest],
        context: grpc.ServicerContext,
    ) -> trainer_pb2.PushUpdateResponse:
        started, received, model = time.monotonic(), _Received(), ""

        def ended(status: str) -> None:
            seconds = time.monotonic() - started
            self.metrics.pushed(model, status, received.payload_bytes, seconds)

        with mapped_errors(context), call_status(ended):
            first = next(request_iterator, None)
            if not isinstance(first, trainer_pb2.PushUpdateRequest) or (
                first.WhichOneof("kind") != "header"
            ):
                raise InvalidInput("a push starts with exactly one header message")
            header = _header(first.header)
            model = header.model  # a label only if served (Metrics.model)
            result = self.ingest.receive(
                header,
                first.ByteSize(),
                _body(request_iterator, received),  # paced by the interceptor (idle.py)
                peer=context.peer(),
                principal=principal_of(context),
            )
            return trainer_pb2.PushUpdateResponse(
                update_id=result.update_id,
                created=result.created,
                round=result.round,
                accepted=result.accepted,
            )
