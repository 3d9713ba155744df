"""The gateway process: one store, one round manager, two gRPC listeners (internal, egress)."""

from __future__ import annotations

import json
import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import heap
from gateway.config import Config
from gateway.core.catalog import Catalog
from gateway.core.dp import DpPolicy
from gateway.core.fedbuff import FedBuffPolicy
from gateway.core.ingest import Ingest, Limits
from gateway.core.privacy import RoundPrivacy
from gateway.core.rounds import RoundManager, RoundPolicy
from gateway.core.screening import ScreeningPolicy
from gateway.core.strategies import build_strategy
from gateway.export.gate import EgressGate
from gateway.export.guard import GuardPolicy, Verdicts
from gateway.export.publish import ReleaseWriter, template_for
from gateway.export.release_check import ReleaseChecker
from gateway.export.signing import Signer
from gateway.pki import PkiLayout
from gateway.services.admin import AdminServicer
from gateway.services.auth import AuthInterceptor, StreamLimits
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
    config: Config, services: tuple[str, ...], interceptors: list[grpc.ServerInterceptor]
) -> tuple[grpc.Server, health.HealthServicer]:
    limit = config.max_chunk_bytes + _MESSAGE_SLACK
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers),
        interceptors=interceptors,
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


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _server_credentials(layout: PkiLayout, listener: str) -> grpc.ServerCredentials:
    """TLS with a required client certificate from the CA, for one listener."""
    paths = (layout.server_key(listener), layout.server_cert(listener), layout.ca_cert)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"no TLS material for the {listener} listener ({', '.join(missing)}): run "
            f"`sluice init {layout.directory}` or use --insecure-loopback for a loopback demo"
        )
    key, cert, ca = (p.read_bytes() for p in paths)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def _bind(
    server: grpc.Server, address: str, what: str, creds: grpc.ServerCredentials | None
) -> str:
    host = address.rsplit(":", 1)[0]
    if creds is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, creds)
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
        dp = (
            DpPolicy(
                noise_multiplier=config.dp_noise_multiplier,
                clipping_norm=config.dp_clipping_norm,
                max_epsilon=config.dp_max_epsilon,
                delta=config.dp_delta,
                sampling_rate=config.dp_sampling_rate,
                adaptive=config.dp_adaptive_clipping,
                clipped_count_stddev=config.dp_clipped_count_stddev,
            )
            if config.dp_noise_multiplier > 0
            else None
        )
        policy = GuardPolicy(
            min_trainers=config.min_trainers, max_epsilon=dp.max_epsilon if dp else None
        )
        verdicts = Verdicts()  # what the guard accepted at publish, the gate need not parse
        self.releases = ReleaseWriter(root / "registry", templates, policy, self.signer, verdicts)
        checker = ReleaseChecker(
            self.catalog, templates, root / "registry", policy, self.signer.public_key, verdicts
        )
        self.gate = EgressGate(self.store, checker)
        fedbuff = (
            FedBuffPolicy(config.max_staleness, config.staleness_exponent)
            if config.fedbuff
            else None
        )
        self.rounds = RoundManager(
            self.store,
            self.blobs,
            self.catalog,
            RoundPolicy(config.quorum, config.min_updates, config.round_seconds),
            self.releases,
            fedbuff=fedbuff,
            privacy=RoundPrivacy(dp, ScreeningPolicy(drop_outliers=config.drop_outlier_updates)),
            strategies={m: build_strategy(spec) for m, spec in config.strategies.items()},
        )
        self.ingest = Ingest(
            self.store,
            self.blobs,
            self.catalog,
            Limits(config.max_chunk_bytes, config.max_header_bytes),
            on_commit=self.rounds.note_commit,
            fedbuff=fedbuff,
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
        self.pki = PkiLayout(config.pki_dir or root / "pki")
        limits = StreamLimits(config.max_streams_per_principal)

        self.auth: dict[str, AuthInterceptor] = {}  # listener -> its interceptor (mTLS only)

        def auth(listener: str) -> list[grpc.ServerInterceptor]:
            if config.insecure_loopback:
                return []
            self.auth[listener] = AuthInterceptor(self.store, listener, limits)
            return [self.auth[listener]]

        self._internal, _ = _listener(config, INTERNAL_SERVICES, auth("internal"))
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            TrainerServicer(
                self.store, self.blobs, self.rounds, self.ingest, config.idle_stream_seconds
            ),
            self._internal,
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.store, self.rounds), self._internal
        )
        self._egress, _ = _listener(config, EGRESS_SERVICES, auth("egress"))
        egress_pb2_grpc.add_EgressServiceServicer_to_server(EgressServicer(self.gate), self._egress)
        self.endpoints: Endpoints | None = None

    def start(self) -> Endpoints:
        internal_creds = egress_creds = None
        if self.config.insecure_loopback:
            for address in (self.config.internal_address, self.config.egress_address):
                if not _is_loopback(address):
                    raise ValueError(
                        f"{address}: --insecure-loopback binds loopback addresses only; "
                        "anything else needs mTLS"
                    )
            log.warning(
                "INSECURE: plain-text listeners, no client certificates, no roles: "
                "loopback demos and tests only"
            )
        else:
            internal_creds = _server_credentials(self.pki, "internal")
            egress_creds = _server_credentials(self.pki, "egress")
        self.endpoints = Endpoints(
            internal=_bind(
                self._internal, self.config.internal_address, "internal", internal_creds
            ),
            egress=_bind(self._egress, self.config.egress_address, "egress", egress_creds),
        )
        self._internal.start()
        self._egress.start()
        heap.trim()  # bootstrap's transient copies of the weights (version 0) go back
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
