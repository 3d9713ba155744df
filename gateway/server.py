"""The gateway process: one store, one round manager, two gRPC listeners (internal, egress)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import weakref
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sluice.gateway import heap
from sluice.gateway.config import Config
from sluice.gateway.core.catalog import Catalog
from sluice.gateway.core.dp import DpPolicy
from sluice.gateway.core.fedbuff import FedBuffPolicy
from sluice.gateway.core.import_trust import ImportKeys
from sluice.gateway.core.importing import BaseImporter, ImportLimits
from sluice.gateway.core.ingest import Ingest, Limits
from sluice.gateway.core.privacy import RoundPrivacy
from sluice.gateway.core.rounds import RoundManager, RoundPolicy
from sluice.gateway.core.screening import ScreeningPolicy
from sluice.gateway.core.strategies import build_strategy
from sluice.gateway.export.gate import EgressGate
from sluice.gateway.export.guard import Verdicts
from sluice.gateway.export.publish import ReleaseWriter, template_for
from sluice.gateway.export.release_audit import guard_policy
from sluice.gateway.export.release_check import ReleaseChecker
from sluice.gateway.export.signing import Signer, SigningKeyError
from sluice.gateway.pki import PkiLayout, key_matches_cert
from sluice.gateway.services.admin import AdminServicer
from sluice.gateway.services.auth import AuthInterceptor, Certificates
from sluice.gateway.services.egress import EgressServicer
from sluice.gateway.services.idle import CallLimits, Pace
from sluice.gateway.services.trainer import TrainerServicer
from sluice.gateway.store.audit import Coalescer
from sluice.gateway.store.blobs import BlobStore, fsync_dir
from sluice.gateway.store.sqlite import Store
from sluice.models.import_statement import StatementRefused, trusted_keys
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
LOCK_FILE = "sluice.lock"  # flock'ed by the one gateway serving the data dir; holds its pid
CA_FILE = "trusted-ca.sha256"  # the CA this data dir's principals were issued by
# Space held back while the disk has room, and given up when a start finds it full: SQLite
# needs a little (its 32 KiB WAL index, a few pages) to open the database and serve.
RESERVE_FILE = "sluice.reserve"
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


class StartupError(RuntimeError):
    """The gateway will not start; the message says why and what to do."""


class _DataDirLock:
    """An exclusive flock on the data dir itself and on its lock file (which holds the
    pid), held until release() (or until the object is collected, or the process ends: the
    kernel drops them with the descriptors). The directory's lock holds even when someone
    deletes or replaces the lock file under a running gateway (a "stale" pid file)."""

    def __init__(self, root: Path) -> None:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            try:
                holder = (root / LOCK_FILE).read_text(errors="replace").strip()[:32]
            except OSError:
                holder = ""
            raise StartupError(
                f"{root} is in use by another gateway (pid {holder or 'unknown'}); stop it "
                "first or serve another --data-dir: two gateways on one data dir would "
                "corrupt each other"
            ) from None
        try:
            # Not through a link: the pid is written over what the path names.
            fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            os.close(dir_fd)
            raise StartupError(
                f"{root / LOCK_FILE}: cannot open it ({exc.strerror}); it must be a regular "
                "file (or absent)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            os.close(dir_fd)
            raise StartupError(
                f"{root} is in use by another gateway (pid {holder}); stop it first or serve "
                "another --data-dir: two gateways on one data dir would corrupt each other"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk: the lock holds, only the pid is missing
            log.warning("could not write the pid into %s: %s", root / LOCK_FILE, exc)
        self.release = weakref.finalize(self, _close_all, fd, dir_fd)


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _keep_reserve(root: Path, size: int) -> None:
    """Hold `size` bytes in the data dir while there is room; give them up on a full disk."""
    path = root / RESERVE_FILE
    free = shutil.disk_usage(root).free
    if path.exists():
        if free < size or size == 0:
            path.unlink()
            log.warning(
                "the disk of %s is full (%d bytes free): gave up the %d-byte start-up reserve "
                "to serve what is stored; free space, then restart to hold it again",
                root,
                free,
                size,
            )
        return
    if size == 0 or free < 4 * size:
        return  # none wanted, or no room to spare now: held again by a start that has it
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)
        log.warning("could not hold the start-up reserve %s: %s", path, exc)


def ca_fingerprint(pem: bytes) -> str:
    """sha256 over the DER of every certificate in a CA bundle."""
    digest = hashlib.sha256()
    for cert in x509.load_pem_x509_certificates(pem):
        digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.hexdigest()


def _check_ca(root: Path, layout: PkiLayout, accept_new: bool) -> dict[str, object] | None:
    """Record the CA at first start; refuse another one later unless accept_new. Returns
    what changed, for the audit log (None: the CA recorded before)."""
    if not layout.ca_cert.exists():
        return None  # start() says how to make one
    try:
        now = ca_fingerprint(layout.ca_cert.read_bytes())
    except ValueError as exc:
        raise StartupError(f"{layout.ca_cert}: not a PEM CA bundle ({exc})") from exc
    path = root / CA_FILE
    recorded = path.read_text().strip() if path.exists() else None
    if recorded == now:
        return None
    if recorded is not None and not accept_new:
        raise StartupError(
            f"the CA in {layout.ca_cert} (sha256 {now[:16]}...) is not the one this data dir "
            f"was first served with ({recorded[:16]}...): every principal would be someone "
            "else's. If the CA was replaced on purpose, start once with accept_new_ca = true "
            "(SLUICE_ACCEPT_NEW_CA=1 or --accept-new-ca)"
        )
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(now + "\n")
        tmp.replace(path)
        fsync_dir(root)
    except OSError as exc:  # a full disk: serve, record it on a later start
        tmp.unlink(missing_ok=True)
        log.warning("could not record the CA fingerprint in %s: %s", path, exc)
    return {"sha256": now, "previous": recorded}


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
    if not key_matches_cert(layout.server_cert(listener), layout.server_key(listener)):
        raise StartupError(
            f"{layout.server_key(listener)} and {layout.server_cert(listener)} are unreadable or "
            f"not a pair: run `sluice init {layout.directory}` again to reissue them"
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
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _DataDirLock(config.data_dir)
        try:
            self._build(config)
        except BaseException:
            if hasattr(self, "store"):
                self.store.close()
            self._lock.release()
            raise

    def _build(self, config: Config) -> None:
        self.config = config
        root = config.data_dir
        stream = Pace(config.first_message_seconds, config.idle_stream_seconds)
        limits = CallLimits(
            max_calls_per_principal=config.max_streams_per_principal,
            workers=config.workers,
            reserved_workers=config.reserved_workers,
            stream=stream,
            push=Pace(
                config.first_message_seconds,
                config.idle_stream_seconds,
                config.push_grace_seconds,
                config.push_min_bytes_per_second,
            ),
            send_stall_seconds=config.send_stall_seconds,
            max_header_bytes=config.max_header_bytes,
        )
        limits.check()  # before any work: settings that let two principals fill a listener
        _keep_reserve(root, config.start_reserve_bytes)
        self.store = Store(root / "sluice.db")
        self.pki = PkiLayout(config.pki_dir or root / "pki")
        ca_changed = None
        if not config.insecure_loopback:
            ca_changed = _check_ca(root, self.pki, config.accept_new_ca)
        self.blobs = BlobStore(root / "blobs")
        self.catalog = Catalog(config.models, config.declared_models)
        templates = {
            m.name: template_for(m, root / "templates", config.two_file_bytes) for m in self.catalog
        }
        try:
            self.signer = Signer.load_or_create(root / "keys")
        except SigningKeyError as exc:
            raise StartupError(str(exc)) from exc
        try:  # the global program's keys: an unusable one stops the start, never skipped
            self.import_keys = ImportKeys(trusted_keys(config.import_keys))
        except StatementRefused as exc:
            raise StartupError(str(exc)) from exc
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
        policy = guard_policy(config)
        verdicts = Verdicts()  # what the guard accepted at publish, the gate need not parse
        self.releases = ReleaseWriter(root / "registry", templates, policy, self.signer, verdicts)
        checker = ReleaseChecker(
            self.catalog, templates, root / "registry", policy, self.signer.public_key, verdicts
        )
        # Repeated refusals and egress reads: one audit row per window, counted.
        self.audit = Coalescer(self.store.record_soon, config.audit_window_seconds)
        self.gate = EgressGate(self.store, checker, self.audit)
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
            Limits(
                config.max_chunk_bytes,
                config.max_header_bytes,
                max_num_examples=config.max_num_examples,
                max_abs_value=config.max_update_abs_value,
            ),
            on_commit=self.rounds.note_commit,
            fedbuff=fedbuff,
            coalesce=self.audit,
        )
        try:
            self.store.record(
                "gateway.started",
                "gateway",
                "gateway",
                {
                    "models": list(config.models),
                    "signing_key_id": self.signer.key_id,
                    "import_key_ids": self.import_keys.ids,
                },
            )
            if ca_changed is not None:
                kind = (
                    "gateway.ca_recorded"
                    if ca_changed["previous"] is None
                    else "gateway.ca_changed"
                )
                self.store.record(kind, "gateway", "ca", ca_changed)
        except (OSError, sqlite3.Error) as exc:  # a full disk: serve what is there
            log.warning("could not audit the start (%s); serving anyway", exc)
        self.rounds.bootstrap()
        self.ingest.record_interrupted()  # before the temp files they left are dropped
        dropped = self.blobs.drop_orphans(self.store.referenced_blobs())
        if dropped:
            log.warning("dropped %d orphan blobs left by an interrupted push", len(dropped))
        self.certificates = Certificates(self.store, self.pki)
        # listener -> its interceptor; with --insecure-loopback it authenticates no one but
        # still keeps the listener's budget, pacing and decode-after-admission.
        self.auth = {
            listener: AuthInterceptor(
                self.store,
                listener,
                limits,
                self.audit,
                self.certificates,
                authenticate=not config.insecure_loopback,
            )
            for listener in ("internal", "egress")
        }

        self._internal, _ = _listener(config, INTERNAL_SERVICES, [self.auth["internal"]])
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            TrainerServicer(self.store, self.blobs, self.rounds, self.ingest), self._internal
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(
                self.store,
                self.rounds,
                self.certificates,
                BaseImporter(
                    self.rounds,
                    ImportLimits(config.max_chunk_bytes, config.max_update_abs_value),
                    self.import_keys,
                ),
            ),
            self._internal,
        )
        self._egress, _ = _listener(config, EGRESS_SERVICES, [self.auth["egress"]])
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
        self.audit.start()
        for interceptor in self.auth.values():
            interceptor.start()
        heap.trim()  # bootstrap's transient copies of the weights (version 0) go back
        self.rounds.start()
        self._write_endpoints(self.endpoints)
        log.info("internal listener %s, egress listener %s", *self.endpoints.__dict__.values())
        return self.endpoints

    def _write_endpoints(self, endpoints: Endpoints) -> None:
        path = self.config.data_dir / ENDPOINTS_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(endpoints.__dict__))
            tmp.replace(path)
            fsync_dir(path.parent)
        except OSError as exc:  # a full disk: the listeners serve, only the note is missing
            tmp.unlink(missing_ok=True)
            log.warning("could not write %s (%s); serving anyway", path, exc)

    def stop(self, grace: float = 1.0) -> None:
        self.rounds.stop()
        self._internal.stop(grace).wait()
        self._egress.stop(grace).wait()
        for interceptor in self.auth.values():
            interceptor.close()
        self.audit.stop()  # the counts of coalesced refusals, before the store closes
        self.store.close()
        (self.config.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        self._lock.release()

    def wait(self) -> None:
        self._internal.wait_for_termination()
