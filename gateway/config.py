"""Gateway settings: one typed object, loaded from TOML, then SLUICE_* environment, then flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sluice.gateway.core.ingest import MAX_CHUNK_BYTES, MAX_NUM_EXAMPLES
from sluice.gateway.core.records import MAX_SAFE_INT
from sluice.gateway.export.template import TWO_FILE_THRESHOLD
from sluice.models import registry
from sluice.models.declare import declare_all
from sluice.models.entry import ModelEntry


@dataclass(frozen=True)
class Config:
    data_dir: Path = Path(".sluice")  # sluice.db, blobs/, registry/, templates/
    # Fixed ports, loopback by default (serve 0.0.0.0:7070 etc. to be reached from other
    # hosts); port 0 lets the OS pick one (tests), endpoints.json names what was bound.
    internal_address: str = "127.0.0.1:7070"  # trainers and operators
    egress_address: str = "127.0.0.1:7071"  # the cross-border side: EgressService only
    # The operations listeners: no TLS, no authentication, no data; "" turns one off.
    ops_address: str = "127.0.0.1:9464"  # HTTP: /metrics (Prometheus), /healthz, /readyz
    health_address: str = "127.0.0.1:7072"  # plain-text gRPC health, for Kubernetes probes
    models: tuple[str, ...] = ("drivenet",)  # built-in or declared models served
    # Models declared in the file's [model.NAME] tables (models/declare.py), by name.
    declared_models: Mapping[str, ModelEntry] = field(default_factory=dict)
    quorum: int = 4  # updates that close a round early
    min_updates: int = 1  # updates needed to close at the deadline
    round_seconds: float = 600.0  # round deadline after opening
    min_trainers: int = 3  # k: distinct trainers a release must aggregate
    max_chunk_bytes: int = MAX_CHUNK_BYTES  # largest payload chunk accepted
    max_header_bytes: int = 16 << 10  # largest serialized update header accepted
    workers: int = 32  # gRPC handler threads per listener
    reserved_workers: int = 4  # of those, never held by admitted calls: refusals stay prompt
    two_file_bytes: int = TWO_FILE_THRESHOLD  # graph weights above this: model.onnx + .data
    pki_dir: Path | None = None  # CA and listener certificates; None: <data_dir>/pki
    insecure_loopback: bool = False  # plain text, loopback addresses only: demos and tests
    # Availability (README: what one principal can hold). workers - reserved_workers must be
    # at least 3 x max_streams_per_principal: two principals at their cap leave room.
    max_streams_per_principal: int = 4  # concurrent calls of one principal per listener
    idle_stream_seconds: float = 60.0  # a client stream silent this long is dropped
    first_message_seconds: float = 10.0  # a client stream's first message comes this soon
    # A push (and a pull's reader) must average push_min_bytes_per_second of payload from
    # its start once push_grace_seconds have passed: N bytes take at most grace + N / rate.
    push_grace_seconds: float = 30.0
    push_min_bytes_per_second: int = 1_000_000
    send_stall_seconds: float = 60.0  # a response stream whose client stops reading: cancelled
    audit_window_seconds: float = 10.0  # repeated refusals: one audit row per window, counted
    accept_new_ca: bool = False  # start with a CA other than the one recorded at first start
    start_reserve_bytes: int = 1 << 20  # held in the data dir, given up to start on a full disk
    # Per model, Flower's strategy name and hyperparameters, e.g. from TOML:
    # [gateway.strategies.drivenet] name = "FedAdam", eta = 0.01. Absent: FedAvg.
    strategies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Central DP (off while dp_noise_multiplier is 0): clip each update to dp_clipping_norm,
    # Gaussian noise on the aggregate, RDP accounting; no release past dp_max_epsilon.
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    dp_max_epsilon: float = 10.0
    dp_delta: float = 1e-5
    dp_sampling_rate: float = 1.0  # below 1 only with random, secret participation
    dp_adaptive_clipping: bool = False
    dp_clipped_count_stddev: float = 0.0  # adaptive: sigma_b, > noise multiplier / 2
    drop_outlier_updates: bool = False  # norm screening: False flags and audits only
    fedbuff: bool = False  # buffered async aggregation: a version every `quorum` updates
    max_staleness: int = 4  # FedBuff: versions an update's base may lag behind
    staleness_exponent: float = 0.5  # FedBuff: stale updates weigh (1 + tau) ** -exponent
    # An update's num_examples (its FedAvg weight) is at most this: a round's sum must stay
    # below 2**53 (the manifest's JSON integers), so 2**31 - 1 allows 2**22 trainers a round.
    max_num_examples: int = MAX_NUM_EXAMPLES
    # Largest magnitude of any float in an update (its delta): bounded inputs keep every
    # fold finite, so one trainer cannot fail every round with float32-max values.
    max_update_abs_value: float = 1e6
    # The global program's Ed25519 public keys (PEM): an imported base must be signed by
    # one of them (docs/IMPORT.md). Empty: imports are off. In TOML, relative to the file.
    import_keys: tuple[Path, ...] = ()
    # Retention (core/retention.py), applied after every round ends, at start and by
    # `sluice gc`; 0 keeps everything. Releases and the audit chain are always kept.
    keep_rounds: int = 0  # ended rounds per model whose spooled update files are kept
    keep_versions: int = 0  # versions per model whose weights and optimizer state are kept

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _paths(name: str, value: Any, base_dir: Path | None = None) -> tuple[Path, ...]:
    """A list of paths, or one string of comma-separated paths (the environment's form)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(p, str | Path) for p in items):
        raise ValueError(f"setting {name!r}: expected a list of paths")
    paths = [Path(p.strip() if isinstance(p, str) else p) for p in items if str(p).strip()]
    return tuple(p if base_dir is None else base_dir / p for p in paths)


def _coerce(name: str, value: Any, current: Any) -> Any:
    if name == "import_keys":
        return _paths(name, value)
    if isinstance(current, Path) or name == "pki_dir":
        return Path(value)
    if isinstance(current, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"setting {name!r}: expected a table")
        return {str(k): dict(v) for k, v in value.items()}
    if isinstance(current, tuple):
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if isinstance(current, bool):
        return value if isinstance(value, bool) else str(value).lower() in {"1", "true", "yes"}
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, str):
        return str(value)
    raise TypeError(f"setting {name!r}: unsupported type")


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Defaults < TOML file ([gateway] table or top level) < SLUICE_<NAME> env < overrides."""
    config = Config()
    known = {f.name for f in fields(Config)}
    known.discard("declared_models")  # from [model.NAME] tables only
    layers: list[Mapping[str, Any]] = []
    if path is not None:
        doc = tomllib.loads(path.read_text())
        declared = declare_all(doc.pop("model", {}), path.parent)
        config = config.replace(declared_models=declared)
        table = dict(doc.get("gateway", doc))
        if "import_keys" in table:  # relative to the file, like a model's init_weights
            table["import_keys"] = _paths("import_keys", table["import_keys"], path.parent)
        layers.append(table)
    env = os.environ if environ is None else environ
    layers.append({k[7:].lower(): v for k, v in env.items() if k.startswith("SLUICE_")})
    layers.append({k: v for k, v in (overrides or {}).items() if v is not None})
    for i, layer in enumerate(layers):
        for key, value in layer.items():
            if key not in known:
                if i == 1:
                    continue  # other SLUICE_* variables belong to other tools
                raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            config = config.replace(**{key: _coerce(key, value, getattr(config, key))})
    registry.models(config.declared_models)  # a declaration may not reuse a built-in name
    for name in config.models:
        try:
            registry.get(name, config.declared_models)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None
    if config.quorum < 1 or config.min_updates < 1 or config.min_trainers < 1:
        raise ValueError("quorum, min_updates and min_trainers must be at least 1")
    if not (0 < config.max_update_abs_value < float("inf")):
        raise ValueError("max_update_abs_value must be a positive finite number")
    if config.keep_rounds < 0 or config.keep_versions < 0:
        raise ValueError("keep_rounds and keep_versions must be 0 (keep everything) or more")
    if config.fedbuff and 0 < config.keep_versions <= config.max_staleness:
        raise ValueError(
            f"keep_versions = {config.keep_versions} must exceed max_staleness = "
            f"{config.max_staleness} with fedbuff: a trainer may still train on that old a base"
        )
    if not 1 <= config.max_num_examples <= MAX_SAFE_INT:
        raise ValueError(f"max_num_examples must be 1 to {MAX_SAFE_INT}")
    return config
