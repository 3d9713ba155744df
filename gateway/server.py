"""The gateway process: one store, one round manager, two gRPC listeners (internal, egress)."""

from __future__ import annotations

import json
import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.config import Config
from gateway.core.catalog import Catalog
from gateway.core.ingest import Ingest, Limits
from gateway.core.rounds import RoundManager, RoundPolicy
from gateway.export.gate import EgressGate
from gateway.export.guard import GuardPolicy
from gateway.export.publish import ReleaseWriter, template_for
from gateway.export.signing import Signer
from gateway.services.admin import AdminServicer
from gateway.services.egress import EgressServicer
from gateway.services.trainer import TrainerServicer
from gateway.store.blobs import BlobStore, fsync_dir
from gateway.store.sqlite import Store
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "endpoints.json"
INTERNAL_SERVICES = (
    trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)
EGRESS_SERVICES = (egress_pb2.DESCRIPTOR.services_by_name["EgressService"].full_name,)
_MESSAGE_SLACK = 64 << 10  # room for the chunk message's own fields


@dataclass(frozen=True)
class Endpoints:
    internal: str
    egress: str


def _listener(
    config: Config, services: tuple[str, ...]
) -> tuple[grpc.Server, health.HealthServicer]:
    limit = config.max_chunk_bytes + _MESSAGE_SLACK
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    for name in services:
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, checker


def _bind(server: grpc.Server, address: str, what: str) -> str:
    host = address.rsplit(":", 1)[0]
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"{what} listener: cannot bind {address}")
    return f"{host}:{port}"


class Gateway:
    """Everything `sluice serve` runs; start() binds both listeners, stop() ends them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        root = config.data_dir
        root.mkdir(parents=True, exist_ok=True)
        self.store = Store(root / "sluice.db")
        self.blobs = BlobStore(root / "blobs")
        self.catalog = Catalog(config.models)
        templates = {
            m.name: template_for(m, root / "templates", config.two_file_bytes) for m in self.catalog
        }
        self.signer = Signer.load_or_create(root / "keys")
        policy = GuardPolicy(min_trainers=config.min_trainers)
        self.releases = ReleaseWriter(root / "registry", templates, policy, self.signer)
        self.gate = EgressGate(self.store, self.catalog, templates, root / "registry", policy)
        self.rounds = RoundManager(
            self.store,
            self.blobs,
            self.catalog,
            RoundPolicy(config.quorum, config.min_updates, config.round_seconds),
            self.releases,
        )
        self.ingest = Ingest(
            self.store,
            self.blobs,
            self.catalog,
            Limits(config.max_chunk_bytes, config.max_header_bytes),
            on_commit=self.rounds.note_commit,
        )
        self.store.record(
            "gateway.started",
            "gateway",
            "gateway",
            {"models": list(config.models), "signing_key_id": self.signer.key_id},
        )
        self.rounds.bootstrap()
        dropped = self.blobs.drop_orphans(self.store.referenced_blobs())
        if dropped:
            log.warning("dropped %d orphan blobs left by an interrupted push", len(dropped))
        self._internal, _ = _listener(config, INTERNAL_SERVICES)
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            TrainerServicer(self.store, self.blobs, self.rounds, self.ingest), self._internal
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.store, self.rounds), self._internal
        )
        self._egress, _ = _listener(config, EGRESS_SERVICES)
        egress_pb2_grpc.add_EgressServiceServicer_to_server(EgressServicer(self.gate), self._egress)
        self.endpoints: Endpoints | None = None

    def start(self) -> Endpoints:
        for address in (self.config.internal_address, self.config.egress_address):
            host = address.rsplit(":", 1)[0].strip("[]")
            if host not in {"127.0.0.1", "localhost", "::1"}:
                raise ValueError(
                    f"{address}: plain-text listeners bind to loopback only "
                    "(mTLS for other addresses is not built yet)"
                )
        log.warning("PLAIN TEXT listeners on loopback: for demos and tests only")
        self.endpoints = Endpoints(
            internal=_bind(self._internal, self.config.internal_address, "internal"),
            egress=_bind(self._egress, self.config.egress_address, "egress"),
        )
        self._internal.start()
        self._egress.start()
        self.rounds.start()
        self._write_endpoints(self.endpoints)
        log.info("internal listener %s, egress listener %s", *self.endpoints.__dict__.values())
        return self.endpoints

    def _write_endpoints(self, endpoints: Endpoints) -> None:
        path = self.config.data_dir / ENDPOINTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(endpoints.__dict__))
        tmp.replace(path)
        fsync_dir(path.parent)

    def stop(self, grace: float = 1.0) -> None:
        self.rounds.stop()
        self._internal.stop(grace).wait()
        self._egress.stop(grace).wait()
        self.store.close()
        (self.config.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)

    def wait(self) -> None:
        self._internal.wait_for_termination()
