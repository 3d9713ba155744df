"""The gateway process: one store, one round manager, two gRPC listeners (internal, egress)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.core import GaugeMetricFamily

from sluice.gateway import heap
from sluice.gateway.config import Config, check_settings
from sluice.gateway.core.catalog import Catalog
from sluice.gateway.core.dp import DpPolicy
from sluice.gateway.core.fedbuff import FedBuffPolicy
from sluice.gateway.core.import_trust import ImportKeys
from sluice.gateway.core.importing import BaseImporter, ImportLimits
from sluice.gateway.core.ingest import Ingest, Limits
from sluice.gateway.core.privacy import RoundPrivacy
from sluice.gateway.core.retention import RetentionPolicy
from sluice.gateway.core.rounds import RoundManager, RoundPolicy
from sluice.gateway.core.screening import ScreeningPolicy
from sluice.gateway.core.strategies import build_strategy
from sluice.gateway.export.gate import EgressGate
from sluice.gateway.export.guard import Verdicts
from sluice.gateway.export.pieces import PieceCache, PieceTags
from sluice.gateway.export.publish import (
    ReleaseWriter,
    cached_schema,
    declaration_ran,
    forget_schema,
    record_declaration,
    template_dir,
    template_for,
)
from sluice.gateway.export.release_audit import guard_policy
from sluice.gateway.export.release_check import ReleaseChecker
from sluice.gateway.export.signing import Signer, SigningKeyError
from sluice.gateway.export.template import OnnxTemplate
from sluice.gateway.listeners import (
    StartupError,
    bind,
    check_addresses,
    claim,
    grpc_listener,
    release_unstarted,
    server_credentials,
    stop_server,
    warn_exposed,
)
from sluice.gateway.metrics import Metrics, held_threads_family, round_families
from sluice.gateway.ops import OpsListener
from sluice.gateway.pki import PkiLayout
from sluice.gateway.services.admin import AdminServicer
from sluice.gateway.services.auth import AuthInterceptor, Certificates
from sluice.gateway.services.egress import EgressServicer
from sluice.gateway.services.health import NOT_SERVING
from sluice.gateway.services.idle import CallLimits, Pace
from sluice.gateway.services.trainer import TrainerServicer
from sluice.gateway.store.audit import Coalescer, log_entry
from sluice.gateway.store.blobs import BlobStore, fsync_dir
from sluice.gateway.store.chunks import SEND_CHUNK_BYTES
from sluice.gateway.store.datadir import LOCK_FILE, DataDirInUse, DataDirLock
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

__all__ = ["ENDPOINTS_FILE", "LOCK_FILE", "RESERVE_FILE", "Endpoints", "Gateway", "StartupError"]

log = logging.getLogger(__name__)
config_log = logging.getLogger("sluice.config")

ENDPOINTS_FILE = "endpoints.json"
CA_FILE = "trusted-ca.sha256"  # the CA this data dir's principals were issued by
# Space held back while the disk has room, and given up when a start finds it full: SQLite
# needs a little (its 32 KiB WAL index, a few pages) to open the database and serve.
RESERVE_FILE = "sluice.reserve"
LISTENERS = ("internal", "egress")
INTERNAL_SERVICES = (
    trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)
EGRESS_SERVICES = (egress_pb2.DESCRIPTOR.services_by_name["EgressService"].full_name,)


@dataclass(frozen=True)
class Endpoints:
    """What each listener bound (endpoints.json holds the same)."""

    internal: str
    egress: str
    ops: str = ""  # HTTP /metrics, /healthz, /readyz; "" when turned off
    health: str = ""  # plain-text gRPC health; "" when turned off


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


def _setting(value: object) -> object:
    """A setting as the effective configuration shows it: paths absolute, JSON types."""
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, Mapping):
        return {str(k): _setting(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_setting(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _log_config(config: Config) -> None:
    """The effective configuration, one line per setting (no secrets: keys are files)."""
    config_log.info("effective configuration (defaults < sluice.toml < SLUICE_* < flags):")
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "pki_dir" and value is None:
            value = config.data_dir / "pki"
        if f.name == "declared_models":
            value = {name: entry.factory_path for name, entry in value.items()}
        shown = _setting(value)
        text = shown if isinstance(shown, str) else json.dumps(shown, ensure_ascii=False)
        extra = {"event": "config", "setting": f.name, "value": shown}
        config_log.info("  %s = %s", f.name, text, extra=extra)


def _state(
    store: Store, models: tuple[str, ...], auth: Mapping[str, AuthInterceptor]
) -> list[GaugeMetricFamily]:
    """The gauges read from the gateway's state at each scrape."""
    latest = {}
    for model in models:
        r = store.latest_round(model)
        if r is not None:
            latest[model] = (r.round, str(r.state), r.accepted)
    counts = [row for row in store.round_counts() if row[0] in models]
    versions, releases = (
        {m: v for m, v in store.newest(table).items() if m in models}
        for table in ("versions", "releases")
    )
    held = {name: interceptor.held_threads() for name, interceptor in auth.items()}
    return [*round_families(latest, counts, versions, releases), held_threads_family(held)]


def _release(servers: Iterable[grpc.Server], ops: OpsListener | None) -> None:
    """Give back the ports of a gateway that never started (or failed to build)."""
    for server in servers:
        release_unstarted(server)
    if ops is not None:
        ops.stop()


class Gateway:
    """Everything `sluice serve` runs. Building it binds every port first (a port in use
    fails at once), then does the slow part (templates, bootstrap); start() serves, stop()
    ends. A gateway built but never started gives its ports back at stop(), or when it is
    dropped."""

    def __init__(self, config: Config) -> None:
        try:
            check_settings(config)  # however the Config was made: before anything is touched
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        # Each declaration is checked before the data dir is touched too: a model that
        # cannot be served leaves nothing behind. A declaration whose template a start
        # built and checked has its schema cached beside it: such a start builds no module
        # and imports no torch before it is ready (~2 s); _warm_up builds them afterwards
        # and compares. Both only read the templates (absent in a new data dir).
        templates, threshold = config.data_dir / "templates", config.two_file_bytes
        self.catalog = Catalog(
            config.models,
            config.declared_models,
            lambda served: declaration_ran(served, templates, threshold),
            lambda entry: cached_schema(entry, templates, threshold),
        )
        # A first start that fails before it serves (a template the exporter cannot make,
        # a port in use, Ctrl-C) removes the data dir it made: nothing was served from it.
        made = not config.data_dir.exists()
        config.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = DataDirLock(config.data_dir)
        except DataDirInUse as exc:
            raise StartupError(str(exc)) from None
        self._servers: list[grpc.Server] = []
        self.ops: OpsListener | None = None
        self._started = self._stopped = False
        self._stop_lock = threading.Lock()
        self._warming: threading.Thread | None = None  # _warm_up, once started
        try:
            self._build(config)
        except BaseException:
            _release(self._servers, self.ops)
            if hasattr(self, "store"):
                self.store.close()
            aside: Path | None = None
            if made:  # moved aside under the lock: no other start can be building in it
                aside = config.data_dir.with_name(f".{config.data_dir.name}.failed-{os.getpid()}")
                try:
                    config.data_dir.rename(aside)
                except OSError:
                    aside = None
            self._lock.release()
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            raise
        self._unstarted = weakref.finalize(self, _release, list(self._servers), self.ops)
        self._unstarted.atexit = False

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
        check_addresses(config)
        _keep_reserve(root, config.start_reserve_bytes)
        self.store = Store(root / "sluice.db")
        self.metrics = Metrics(config.models)
        self.store.observe_audit(log_entry)  # every audit entry is a log line too
        self.store.observe_audit(self.metrics.audited)
        for model in config.models:  # the DP budget spent before this start
            closed = self.store.last_audit_entry("round.closed", f"{model}/round/")
            if closed is not None:
                self.metrics.spent(model, closed.detail.get("dp"))
        self.pki = PkiLayout(config.pki_dir or root / "pki")
        ca_changed = None
        credentials: dict[str, grpc.ServerCredentials | None] = dict.fromkeys(LISTENERS)
        if not config.insecure_loopback:
            ca_changed = _check_ca(root, self.pki, config.accept_new_ca)
            credentials = {name: server_credentials(self.pki, name) for name in LISTENERS}
        # Repeated refusals and egress reads: one audit row per window, counted.
        self.audit = Coalescer(self.store.record_soon, config.audit_window_seconds)
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
                metrics=self.metrics,
            )
            for listener in LISTENERS
        }
        self._bind_all(config, credentials)
        # The slow part, with every port bound: a first start exports each model's template.
        # Every blob this gateway writes is also tagged by piece as it is hashed: a close
        # then checks the updates and the base it made against those tags, not a sha256.
        self.blobs = BlobStore(
            root / "blobs", tagger=functools.partial(PieceTags, SEND_CHUNK_BYTES)
        )
        threshold = config.two_file_bytes
        templates = self._templates(root)
        for served in self.catalog:
            record_declaration(served, root / "templates", threshold)
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
        tags = PieceCache()  # release files' piece tags, recorded at publish, for the pulls
        self.releases = ReleaseWriter(
            root / "registry",
            templates,
            policy,
            self.signer,
            verdicts,
            metrics=self.metrics,
            pieces=tags,
        )
        checker = ReleaseChecker(
            self.catalog, templates, root / "registry", policy, self.signer.public_key, verdicts
        )
        self.gate = EgressGate(self.store, checker, self.audit, metrics=self.metrics, pieces=tags)
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
            retention=RetentionPolicy(config.keep_rounds, config.keep_versions),
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
        dropped = self.ingest.drop_crash_leftovers()
        if dropped:
            log.warning("dropped %d orphan blobs left by an interrupted push", len(dropped))
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            TrainerServicer(self.store, self.blobs, self.rounds, self.ingest, self.metrics),
            self._internal,
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
        egress_pb2_grpc.add_EgressServiceServicer_to_server(
            EgressServicer(self.gate, self.metrics), self._egress
        )
        # Not a bound method: what the ops listener holds must not keep the gateway alive.
        self.metrics.watch_state(functools.partial(_state, self.store, config.models, self.auth))

    def _bind_all(
        self, config: Config, credentials: Mapping[str, grpc.ServerCredentials | None]
    ) -> None:
        """Every port, before the slow part of the start: a port in use fails at once. The
        operations listeners serve from here on (live; ready once start() has run)."""
        self._internal, self._internal_health = grpc_listener(
            config, INTERNAL_SERVICES, [self.auth["internal"]]
        )
        self._servers.append(self._internal)
        self._egress, self._egress_health = grpc_listener(
            config, EGRESS_SERVICES, [self.auth["egress"]]
        )
        self._servers.append(self._egress)
        internal = bind(
            self._internal, config.internal_address, "internal_address", credentials["internal"]
        )
        egress = bind(self._egress, config.egress_address, "egress_address", credentials["egress"])
        for setting in ("ops_address", "health_address"):
            if getattr(config, setting):
                claim(getattr(config, setting), setting)
        try:
            self.ops = OpsListener(
                config.ops_address,
                config.health_address,
                self.metrics.registry,
                (*INTERNAL_SERVICES, *EGRESS_SERVICES),
                config.send_stall_seconds,
            )
        except (OSError, RuntimeError) as exc:  # lost a race for a port since the claim
            raise StartupError(f"cannot bind the operations listeners: {exc}") from None
        self.ops.serve()
        self.endpoints = Endpoints(
            internal, egress, self.ops.metrics_address, self.ops.health_address
        )

    def _templates(self, root: Path) -> dict[str, OnnxTemplate]:
        """Each model's ONNX template: loaded, or at a first start exported and self-tested
        (publish.template_for logs each step with its seconds)."""
        threshold = self.config.two_file_bytes
        missing = [
            m.name
            for m in self.catalog
            if not (template_dir(m, root / "templates", threshold) / "template.json").exists()
        ]
        if missing:
            log.info(
                "first start of %s: exporting ONNX templates before serving; bound internal "
                "%s, egress %s, metrics %s, health %s (/healthz answers, not ready yet)",
                ", ".join(missing),
                self.endpoints.internal,
                self.endpoints.egress,
                self.endpoints.ops or "off",
                self.endpoints.health or "off",
            )
        started = time.perf_counter()
        templates = {m.name: template_for(m, root / "templates", threshold) for m in self.catalog}
        if missing:
            log.info("templates ready in %.1f s", time.perf_counter() - started)
        return templates

    def start(self) -> Endpoints:
        """Serve on the ports bound when the gateway was built."""
        self._unstarted.detach()  # stop() gives everything back from now on
        self._started = True
        self._internal.start()
        self._egress.start()
        self.audit.start()
        for interceptor in self.auth.values():
            interceptor.start()
        heap.trim()  # bootstrap's transient copies of the weights (version 0) go back
        self.rounds.start()
        _log_config(self.config)
        warn_exposed(self.config)
        self._write_endpoints(self.endpoints)
        if self.ops is not None:
            self.ops.ready(True)
        self.metrics.ready.set(1)
        log.info(
            "serving: internal %s, egress %s, metrics %s, health %s",
            self.endpoints.internal,
            self.endpoints.egress,
            self.endpoints.ops or "off",
            self.endpoints.health or "off",
        )
        self._warming = threading.Thread(target=self._warm_up, name="sluice-warm-up", daemon=True)
        self._warming.start()
        return self.endpoints

    # What a round's close and release import, beyond torch and the models' factories
    # (which building the modules imports): loaded after ready, not by the first close.
    WARM_MODULES = ("scipy.linalg.blas", "onnxruntime")

    def warmed_up(self, timeout: float | None = None) -> bool:
        """Wait for the warm-up started with start() (not started: True at once); whether
        it has ended. Tests wait for it, so its log line never lands in what they read."""
        if self._warming is not None:
            self._warming.join(timeout)
            return not self._warming.is_alive()
        return True

    def _warm_up(self) -> None:
        """Once ready, in the background: build every module whose schema came from the
        cache (torch, each factory) and compare, then import what a close needs; the first
        close does not pay those ~2 s. A module that no longer gives its cached schema (a
        file its factory imports changed) or no longer builds: the cache is dropped and the
        gateway says it is not ready, with an error naming the model, until restarted."""
        started = time.perf_counter()
        try:
            wrong = self.catalog.check_cached()
            for name in self.WARM_MODULES:
                importlib.import_module(name)
        except Exception as exc:  # an import that fails here fails the first close too
            log.exception("warming up for the first release failed")
            wrong = {name: f"warm-up failed: {exc}" for name in self.catalog.names()}
        if wrong:
            root, threshold = self.config.data_dir / "templates", self.config.two_file_bytes
            for name, reason in wrong.items():
                forget_schema(self.catalog.get(name), root, threshold)
                log.error("not ready: %s; restart the gateway to check and serve it anew", reason)
            if self.ops is not None:
                self.ops.ready(False)
            self.metrics.ready.set(0)
            return
        log.info("warmed up for the first release in %.1f s", time.perf_counter() - started)

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
        """Not ready from the first moment (probes see it while calls drain), then end.
        Every step runs even if one before it raised (the first error is raised after):
        servers stopped, store closed, data dir lock given back. Once: a second stop
        does nothing."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        with contextlib.ExitStack() as steps:  # callbacks run last-registered first
            steps.callback(self._lock.release)
            if self._started:
                steps.callback(self._after_listeners)
            steps.callback(self.store.close)
            steps.callback(self.audit.stop)  # coalesced refusals' counts, before the store
            for interceptor in self.auth.values():
                steps.callback(interceptor.close)
            if self._started:
                steps.callback(stop_server, self._egress, grace)
                steps.callback(stop_server, self._internal, grace)
                steps.callback(self.rounds.stop)
            else:
                steps.callback(self._unstarted)  # built, never started: the ports back
            steps.callback(self._not_ready)

    def _not_ready(self) -> None:
        self.metrics.ready.set(0)
        if self.ops is not None:
            self.ops.ready(False)
        # The mTLS listeners' health too: a trainer watching it hears NOT_SERVING first.
        # (Setting it never waits on a Watch stream: services/health.py.)
        self._internal_health.set_all(NOT_SERVING)
        self._egress_health.set_all(NOT_SERVING)

    def _after_listeners(self) -> None:
        (self.config.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        if self.ops is not None:
            self.ops.stop()
        # Not left importing torch while the interpreter exits (a crash at exit), nor
        # writing in the data dir once the next holder of its lock has it.
        if self._warming is not None:
            self._warming.join(60)

    def wait(self) -> None:
        self._internal.wait_for_termination()
