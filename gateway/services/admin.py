"""AdminService: operators inspect models, close rounds by hand, revoke, import a base."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc

from sluice.gateway.core.dp import PrivacyLedger
from sluice.gateway.core.errors import InvalidInput, NotFound, bounded
from sluice.gateway.core.folding import now_ms
from sluice.gateway.core.importing import (
    SAFETENSORS,
    BaseImporter,
    FileChunk,
    ImportHeader,
    ImportItem,
)
from sluice.gateway.core.privacy import LEDGER_FILE
from sluice.gateway.core.records import NAME_PATTERN
from sluice.gateway.core.rounds import RoundManager
from sluice.gateway.export.guard import GuardPolicy
from sluice.gateway.services.auth import Certificates, principal_of
from sluice.gateway.services.errors import mapped_errors
from sluice.gateway.store.sqlite import Store
from sluice.v1 import admin_pb2, admin_pb2_grpc

MAX_SERIAL_HEX = 40  # RFC 5280: a serial number is at most 20 octets
MAX_REASON_CHARS = 512  # stored and audited
MAX_STATUS_RELEASES = 5  # newest releases per model in GetStatus
MAX_STATUS_PROBES = 50  # versions looked at for them (a refused version has no release)
MAX_STATUS_TEXT = 512  # characters of a failure reason or close error in GetStatus
_FORMATS = {admin_pb2.WEIGHTS_FORMAT_SAFETENSORS: SAFETENSORS}


def _import_header(msg: admin_pb2.ImportHeader) -> ImportHeader:
    return ImportHeader(
        model=msg.model,
        format=_FORMATS.get(msg.format, f"unknown format {msg.format}"),
        file_bytes=msg.file_bytes,
        statement_json=msg.statement_json,
        signature=msg.signature,
        reason=msg.reason,
    )


def _import_items(requests: Iterator[admin_pb2.ImportBaseRequest]) -> Iterator[ImportItem]:
    for req in requests:
        kind = req.WhichOneof("kind")
        if kind == "header":
            yield _import_header(req.header)
        elif kind == "chunk":
            yield FileChunk(req.chunk.offset, req.chunk.data)
        else:
            raise InvalidInput("empty message; an import sends a header, then chunks")


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        store: Store,
        rounds: RoundManager,
        certificates: Certificates,
        importer: BaseImporter | None = None,
    ) -> None:
        self.store = store
        self.rounds = rounds
        self.certificates = certificates  # whose each serial is: Revoke checks the pair
        self.importer = importer or BaseImporter(rounds)
        self._epsilons: dict[str, tuple[int, float]] = {}  # model -> (version, epsilon)

    def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        with mapped_errors(context):
            models = [self._model_status(name) for name in self.rounds.catalog.names()]
            return admin_pb2.GetStatusResponse(models=models, now_unix_ms=now_ms())

    def _model_status(self, name: str) -> admin_pb2.ModelStatus:
        r = self.rounds.current(name)
        v = self.store.latest_version(name)
        newest = v.version if v else 0
        rel = self.store.get_release(name, 0)
        failed = self.store.latest_failed_round(name)
        policy = self.rounds.policy
        dp = self.rounds.folder.privacy.dp
        guard = getattr(self.rounds.publisher, "policy", None)  # the release writer's
        return admin_pb2.ModelStatus(
            model=name,
            open_round=r.round,
            base_version=r.base_version,
            accepted=r.accepted,
            latest_version=newest,
            latest_release=rel.version if rel else 0,
            round_state=str(r.state),
            close_error=self.rounds.close_error(name, r.round)[:MAX_STATUS_TEXT],
            failed_round=failed.round if failed else 0,
            failed_reason=failed.failure[:MAX_STATUS_TEXT] if failed else "",
            opened_unix_ms=r.opened_ms,
            deadline_unix_ms=r.deadline_ms,
            updates=len(self.store.round_updates(name, r.round)),
            strategy=self.rounds.strategy_for(name).name,
            quorum=policy.quorum,
            min_updates=policy.min_updates,
            min_trainers=guard.min_trainers if isinstance(guard, GuardPolicy) else 0,
            fedbuff=self.rounds.folder.fedbuff is not None,
            dp_enabled=dp is not None,
            dp_epsilon=self._epsilon(name, newest) if dp is not None else 0.0,
            dp_max_epsilon=dp.max_epsilon if dp is not None else 0.0,
            releases=self._releases(name, newest, MAX_STATUS_RELEASES),
        )

    def _releases(self, model: str, newest: int, count: int) -> list[admin_pb2.ReleaseSummary]:
        """The newest `count` releases, walking down from the newest version: bounded by
        MAX_STATUS_PROBES lookups however many versions and releases there are."""
        out: list[admin_pb2.ReleaseSummary] = []
        for version in range(newest, max(newest - MAX_STATUS_PROBES, 0), -1):
            rel = self.store.get_release(model, version)
            if rel is None:
                continue
            out.append(
                admin_pb2.ReleaseSummary(
                    version=rel.version,
                    round=rel.round,
                    created_unix_ms=rel.created_ms,
                    num_trainers=rel.num_trainers,
                    num_files=len(rel.files),
                    total_bytes=sum(f.size for f in rel.files),
                )
            )
            if len(out) == count:
                break
        return out

    def _epsilon(self, model: str, version: int) -> float:
        """DP epsilon spent by the lineage of a version: its privacy ledger (kept with the
        version's state), at the gateway's delta; computed once per newest version."""
        dp = self.rounds.folder.privacy.dp
        assert dp is not None
        cached = self._epsilons.get(model)
        if cached is not None and cached[0] == version:
            return cached[1]
        path = self.rounds.folder.state_dir(model, version) / LEDGER_FILE
        try:
            ledger = PrivacyLedger.from_json(path.read_text()) if path.exists() else PrivacyLedger()
            epsilon = ledger.epsilon(dp.delta)
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: shown as unknown
            epsilon = math.nan
        self._epsilons[model] = (version, epsilon)
        return epsilon

    def CloseRound(
        self, request: admin_pb2.CloseRoundRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CloseRoundResponse:
        with mapped_errors(context):
            current = self.rounds.current(request.model)  # NOT_FOUND for an unknown model
            if request.round > current.round:
                raise NotFound(
                    f"round {request.round} of {request.model!r} does not exist "
                    f"(open: {current.round}; without a round the open one is closed)"
                )
            round_no = request.round or current.round
            # An older round answers what its close produced: a close retried after a
            # restart finished it is told so, not refused.
            closed = self.rounds.close(request.model, round_no)
            return admin_pb2.CloseRoundResponse(
                version=closed.version.version,
                released=closed.released,
                release_refused=closed.refused[: MAX_STATUS_TEXT * 2],
                already_closed=closed.already_closed,
                round=round_no,
            )

    def Revoke(
        self, request: admin_pb2.RevokeRequest, context: grpc.ServicerContext
    ) -> admin_pb2.RevokeResponse:
        with mapped_errors(context):
            digits = request.serial_hex.lower().removeprefix("0x")
            if not 0 < len(digits) <= MAX_SERIAL_HEX or digits.strip("0123456789abcdef"):
                raise InvalidInput(
                    f"serial_hex {bounded(request.serial_hex)!r}: expected 1-{MAX_SERIAL_HEX} "
                    "hex digits"
                )
            if not NAME_PATTERN.fullmatch(request.principal):
                raise InvalidInput(
                    f"principal {bounded(request.principal)!r}: not a principal name"
                )
            if len(request.reason) > MAX_REASON_CHARS:
                raise InvalidInput(
                    f"reason is {len(request.reason)} characters; at most {MAX_REASON_CHARS}"
                )
            serial = digits.lstrip("0") or "0"
            operator = principal_of(context)
            self.certificates.check_revocation(
                int(serial, 16), request.principal, operator.name if operator else "operator"
            )
            dropped = self.rounds.revoke(serial, request.principal, request.reason)
            return admin_pb2.RevokeResponse(discarded_update_ids=dropped)

    def ImportBase(
        self,
        request_iterator: Iterator[admin_pb2.ImportBaseRequest],
        context: grpc.ServicerContext,
    ) -> admin_pb2.ImportBaseResponse:
        with mapped_errors(context):
            imported = self.importer.receive(
                _import_items(request_iterator),  # paced by the interceptor (services/idle.py)
                principal=principal_of(context),
                peer=context.peer(),
            )
            return admin_pb2.ImportBaseResponse(
                model=imported.model,
                version=imported.version,
                weights_sha256=imported.weights_sha256,
                round=imported.round,
                kept_tensors=imported.kept,
                signing_key_id=imported.signing_key_id,
            )
