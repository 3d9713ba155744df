"""EgressService: all the cross-border listener serves; it reads releases, nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from sluice.gateway.core.records import Release
from sluice.gateway.export.gate import Caller, EgressGate
from sluice.gateway.services.auth import principal_of
from sluice.gateway.services.errors import mapped_errors
from sluice.v1 import egress_pb2, egress_pb2_grpc, tensors_pb2


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
    def __init__(self, gate: EgressGate) -> None:
        self.gate = gate

    def ListReleases(
        self, request: egress_pb2.ListReleasesRequest, context: grpc.ServicerContext
    ) -> egress_pb2.ListReleasesResponse:
        with mapped_errors(context):
            listed = self.gate.releases(_caller(context), request.model)
            return egress_pb2.ListReleasesResponse(
                releases=[_release_msg(x.release, x.withheld) for x in listed]
            )

    def GetManifest(
        self, request: egress_pb2.GetManifestRequest, context: grpc.ServicerContext
    ) -> egress_pb2.GetManifestResponse:
        with mapped_errors(context):
            r = self.gate.manifest(_caller(context), request.model, request.version)
            return egress_pb2.GetManifestResponse(
                manifest_json=r.manifest_json, signature=r.signature
            )

    def PullRelease(
        self, request: egress_pb2.PullReleaseRequest, context: grpc.ServicerContext
    ) -> Iterator[egress_pb2.PullReleaseResponse]:
        with mapped_errors(context):
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
                for offset, data in pull.chunks:
                    yield egress_pb2.PullReleaseResponse(
                        chunk=tensors_pb2.Chunk(offset=offset, data=data)
                    )
            finally:  # a client gone before the first chunk: the stream never started
                pull.close()
