"""EgressService: all the cross-border listener serves; it reads releases, nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager

import grpc

from sluice.gateway.core.records import Release
from sluice.gateway.export.gate import Caller, EgressGate
from sluice.gateway.metrics import Metrics
from sluice.gateway.services.auth import principal_of
from sluice.gateway.services.chunk_wire import chunk_message
from sluice.gateway.services.errors import mapped_errors
from sluice.gateway.services.observed import call_status
from sluice.v1 import egress_pb2, egress_pb2_grpc


def _release_msg(r: Release, withheld: bool = False) -> egress_pb2.Release:
    return egress_pb2.Release(
        model=r.model,
        version=r.version,
        round=r.round,
        created_unix_ms=r.created_ms,
        num_trainers=r.num_trainers,
        files=[egress_pb2.ReleaseFile(name=f.name, size=f.size, sha256=f.sha256) for f in r.files],
        withheld=withheld,
    )


def _caller(context: grpc.ServicerContext) -> Caller:
    principal = principal_of(context)
    return Caller(principal.name if principal else "anonymous", context.peer())


class EgressServicer(egress_pb2_grpc.EgressServiceServicer):
    def __init__(self, gate: EgressGate, metrics: Metrics | None = None) -> None:
        self.gate = gate
        self.metrics = metrics or Metrics()

    def _counted(self, method: str) -> AbstractContextManager[None]:
        """Counts the call by how it ended (inside mapped_errors, which answers it)."""
        requests = self.metrics.egress_requests

        def record(status: str) -> None:
            requests.labels(method, status).inc()

        return call_status(record)

    def ListReleases(
        self, request: egress_pb2.ListReleasesRequest, context: grpc.ServicerContext
    ) -> egress_pb2.ListReleasesResponse:
        with mapped_errors(context), self._counted("ListReleases"):
            listed = self.gate.releases(_caller(context), request.model)
            return egress_pb2.ListReleasesResponse(
                releases=[_release_msg(x.release, x.withheld) for x in listed]
            )

    def GetManifest(
        self, request: egress_pb2.GetManifestRequest, context: grpc.ServicerContext
    ) -> egress_pb2.GetManifestResponse:
        with mapped_errors(context), self._counted("GetManifest"):
            r = self.gate.manifest(_caller(context), request.model, request.version)
            return egress_pb2.GetManifestResponse(
                manifest_json=r.manifest_json, signature=r.signature
            )

    def PullRelease(  # type: ignore[override]  # chunks go out serialized: bytes
        self, request: egress_pb2.PullReleaseRequest, context: grpc.ServicerContext
    ) -> Iterator[egress_pb2.PullReleaseResponse | bytes]:
        with mapped_errors(context), self._counted("PullRelease"):
            pull = self.gate.open_pull(
                _caller(context), request.model, request.version, request.file, request.offset
            )
            try:
                yield egress_pb2.PullReleaseResponse(
                    header=egress_pb2.PullReleaseHeader(
                        model=pull.release.model,
                        version=pull.release.version,
                        file=pull.file.name,
                        total_bytes=pull.file.size,
                        sha256=pull.file.sha256,
                    )
                )
                sent = self.metrics.egress_bytes.labels(self.metrics.model(pull.release.model))
                for offset, data in pull.chunks:
                    # Serialized here, one copy of the data: a protobuf message would copy
                    # it in, out and on every read (auth._guarded passes bytes through).
                    yield chunk_message(offset, data)
                    sent.inc(len(data))  # handed to gRPC: sent unless the call is cut
            finally:  # a client gone before the first chunk: the stream never started
                pull.close()
