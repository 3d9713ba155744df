"""EgressService: all the cross-border listener serves; it reads releases, nothing else."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc

from gateway.core.errors import IntegrityError, NotFound
from gateway.core.records import Release, ReleaseFile
from gateway.export.publish import MODEL_FILE
from gateway.services.errors import mapped_errors
from gateway.services.streaming import file_chunks
from gateway.store.sqlite import Store
from sluice.v1 import egress_pb2, egress_pb2_grpc, tensors_pb2


def _release_msg(r: Release) -> egress_pb2.Release:
    return egress_pb2.Release(
        model=r.model,
        version=r.version,
        round=r.round,
        created_unix_ms=r.created_ms,
        num_trainers=r.num_trainers,
        files=[egress_pb2.ReleaseFile(name=f.name, size=f.size, sha256=f.sha256) for f in r.files],
    )


def _verify_file(path: Path, expected: ReleaseFile) -> None:
    """Refuse a release file that changed on disk since it was published."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while data := f.read(8 << 20):
            digest.update(data)
            size += len(data)
    if size != expected.size or digest.hexdigest() != expected.sha256:
        raise IntegrityError(
            f"release file {expected.name!r} no longer matches its manifest; it is withheld"
        )


class EgressServicer(egress_pb2_grpc.EgressServiceServicer):
    def __init__(self, store: Store, registry_root: Path) -> None:
        self.store = store
        self.registry_root = registry_root

    def _release(self, model: str, version: int) -> Release:
        r = self.store.get_release(model, version)
        if r is None:
            which = f"version {version}" if version else "any release"
            raise NotFound(f"model {model!r} has no published {which}")
        return r

    def ListReleases(
        self, request: egress_pb2.ListReleasesRequest, context: grpc.ServicerContext
    ) -> egress_pb2.ListReleasesResponse:
        with mapped_errors(context):
            releases = self.store.list_releases(request.model)
            return egress_pb2.ListReleasesResponse(releases=[_release_msg(r) for r in releases])

    def GetManifest(
        self, request: egress_pb2.GetManifestRequest, context: grpc.ServicerContext
    ) -> egress_pb2.GetManifestResponse:
        with mapped_errors(context):
            r = self._release(request.model, request.version)
            return egress_pb2.GetManifestResponse(
                manifest_json=r.manifest_json, signature=r.signature
            )

    def PullRelease(
        self, request: egress_pb2.PullReleaseRequest, context: grpc.ServicerContext
    ) -> Iterator[egress_pb2.PullReleaseResponse]:
        with mapped_errors(context):
            r = self._release(request.model, request.version)
            name = request.file or MODEL_FILE
            entry = next((f for f in r.files if f.name == name), None)
            if entry is None:
                listed = ", ".join(f.name for f in r.files)
                raise NotFound(f"release {r.version} of {r.model!r} has no file {name!r}: {listed}")
            # Names come from the database row, never from the request, so no path escapes.
            path = self.registry_root / r.model / str(r.version) / entry.name
            _verify_file(path, entry)
            chunks = file_chunks(path, request.offset, entry.size)
            yield egress_pb2.PullReleaseResponse(
                header=egress_pb2.PullReleaseHeader(
                    model=r.model,
                    version=r.version,
                    file=entry.name,
                    total_bytes=entry.size,
                    sha256=entry.sha256,
                )
            )
            for offset, data in chunks:
                yield egress_pb2.PullReleaseResponse(
                    chunk=tensors_pb2.Chunk(offset=offset, data=data)
                )
