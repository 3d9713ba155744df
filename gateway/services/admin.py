"""AdminService: operators inspect models and close rounds by hand."""

from __future__ import annotations

import grpc

from gateway.core.errors import InvalidInput, PreconditionFailed
from gateway.core.records import NAME_PATTERN
from gateway.core.rounds import RoundManager
from gateway.services.errors import mapped_errors
from gateway.store.sqlite import Store
from sluice.v1 import admin_pb2, admin_pb2_grpc


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: Store, rounds: RoundManager) -> None:
        self.store = store
        self.rounds = rounds

    def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        with mapped_errors(context):
            out = []
            for name in self.rounds.catalog.names():
                r = self.rounds.current(name)
                v = self.store.latest_version(name)
                rel = self.store.get_release(name, 0)
                out.append(
                    admin_pb2.ModelStatus(
                        model=name,
                        open_round=r.round,
                        base_version=r.base_version,
                        accepted=r.accepted,
                        latest_version=v.version if v else 0,
                        latest_release=rel.version if rel else 0,
                    )
                )
            return admin_pb2.GetStatusResponse(models=out)

    def CloseRound(
        self, request: admin_pb2.CloseRoundRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CloseRoundResponse:
        with mapped_errors(context):
            current = self.rounds.current(request.model)
            if request.round != current.round:
                raise PreconditionFailed(
                    f"round {request.round} is not the open round of {request.model!r} "
                    f"(open: {current.round})"
                )
            closed = self.rounds.close(request.model, request.round)
            return admin_pb2.CloseRoundResponse(
                version=closed.version.version,
                released=closed.released,
                release_refused=closed.refused,
            )

    def Revoke(
        self, request: admin_pb2.RevokeRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RevokeResponse:
        with mapped_errors(context):
            serial = request.serial_hex.lower().removeprefix("0x")
            if not serial or any(c not in "0123456789abcdef" for c in serial):
                raise InvalidInput(f"serial_hex {request.serial_hex!r}: expected hex digits")
            if not NAME_PATTERN.fullmatch(request.principal):
                raise InvalidInput(f"principal {request.principal!r}: not a principal name")
            dropped = self.rounds.revoke(
                serial.lstrip("0") or "0", request.principal, request.reason
            )
            return admin_pb2.RevokeResponse(discarded_update_ids=dropped)
