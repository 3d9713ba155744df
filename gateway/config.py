"""Gateway settings: one typed object, loaded from TOML, then SLUICE_* environment, then flags."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sluice.gateway.core.errors import bounded
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
    """A setting's value from TOML, the environment (strings) or flags, as its own type; a
    value that is not one refuses with the setting's name (never a silent truncation:
    2.7 is not 2, true is not 1)."""
    if name == "import_keys":
        return _paths(name, value)
    if isinstance(current, Path) or name == "pki_dir":
        if not isinstance(value, str | Path):
            raise ValueError(f"setting {name!r}: expected a path, got {_shown(value)}")
        return Path(value)
    if isinstance(current, Mapping):
        if not isinstance(value, Mapping) or not all(
            isinstance(v, Mapping) for v in value.values()
        ):
            raise ValueError(f"setting {name!r}: expected a table of tables")
        return {str(k): dict(v) for k, v in value.items()}
    if isinstance(current, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"setting {name!r}: expected a list of names, got {_shown(value)}")
        return tuple(items)
    if isinstance(current, bool):
        return _boolean(name, value)
    if isinstance(current, int):
        return _whole(name, value)
    if isinstance(current, float):
        return _number(name, value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ValueError(f"setting {name!r}: expected a string, got {_shown(value)}")
        return value
    raise TypeError(f"setting {name!r}: unsupported type")


def _shown(value: Any) -> str:
    return bounded(repr(value), 40)


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in {"1", "true", "yes", "on"}:
        return True
    if word in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"setting {name!r}: expected true or false, got {_shown(value)}")


_WHOLE = re.compile(r"[+-]?[0-9]+")


def _whole(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        return int(value.strip())
    raise ValueError(f"setting {name!r}: expected a whole number, got {_shown(value)}")


def _number(name: str, value: Any) -> float:
    number = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        # Not a number, or an integer past a float's range: NaN, refused below.
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value.strip() if isinstance(value, str) else value)
    if not math.isfinite(number):
        raise ValueError(f"setting {name!r}: expected a finite number, got {_shown(value)}")
    return number


# Every numeric setting's range, inclusive, checked however the Config was made (load_config,
# Gateway): a wedged listener (workers = 0), a round that never ends (round_seconds < 0) or
# a gRPC option past int32 (max_chunk_bytes) is refused before anything starts.
_GIB = 1 << 30
RANGES: dict[str, tuple[float, float]] = {
    "quorum": (1, MAX_SAFE_INT),
    "min_updates": (1, MAX_SAFE_INT),
    "min_trainers": (1, MAX_SAFE_INT),
    "round_seconds": (0.001, 10 * 365 * 86400.0),
    "max_chunk_bytes": (1, 64 << 20),  # far under protobuf's 2 GB and gRPC's int32 limits
    "max_header_bytes": (64, 16 << 20),
    "workers": (1, 4096),
    "reserved_workers": (1, 4095),
    "two_file_bytes": (0, TWO_FILE_THRESHOLD),  # one ONNX file stays under protobuf's 2 GB
    "max_streams_per_principal": (1, 4096),
    "idle_stream_seconds": (0.001, 86400.0),
    "first_message_seconds": (0.001, 86400.0),
    "push_grace_seconds": (0.0, 86400.0),
    "push_min_bytes_per_second": (0, _GIB),
    "send_stall_seconds": (0.001, 86400.0),
    "audit_window_seconds": (0.0, 86400.0),
    "start_reserve_bytes": (0, _GIB),
    "dp_noise_multiplier": (0.0, 1e6),
    "dp_clipping_norm": (1e-12, 1e12),
    "dp_max_epsilon": (0.0, 1e6),
    "dp_delta": (1e-300, 0.5),
    "dp_sampling_rate": (1e-12, 1.0),
    "dp_clipped_count_stddev": (0.0, 1e6),
    "max_staleness": (0, MAX_SAFE_INT),
    "staleness_exponent": (0.0, 1e3),
    "max_num_examples": (1, MAX_SAFE_INT),
    "max_update_abs_value": (1e-30, 1.7e308),  # positive and finite (over 3.4e38: no bound)
    "keep_rounds": (0, MAX_SAFE_INT),  # 0 keeps everything
    "keep_versions": (0, MAX_SAFE_INT),
}


def _n(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else f"{bound:g}"


def check_settings(config: Config) -> None:
    """Raises ValueError naming the first setting outside its range (RANGES) or in conflict."""
    check_ranges(config)
    check_call_room(config.workers, config.reserved_workers, config.max_streams_per_principal)
    if config.fedbuff and 0 < config.keep_versions <= config.max_staleness:
        raise ValueError(
            f"keep_versions = {config.keep_versions} must exceed max_staleness = "
            f"{config.max_staleness} with fedbuff: a trainer may still train on that old a base"
        )


def check_call_room(workers: int, reserved_workers: int, max_calls_per_principal: int) -> None:
    """A listener's threads leave room for a third principal when two are at their cap
    (README: what one principal can hold), and some are never held by admitted calls."""
    if reserved_workers < 1 or workers - reserved_workers < 3 * max_calls_per_principal:
        raise ValueError(
            f"workers ({workers}) - reserved_workers ({reserved_workers}) must be at least "
            f"3 x max_streams_per_principal ({max_calls_per_principal}) and reserved_workers "
            "at least 1: two principals at their cap must leave room for a third"
        )


def check_ranges(config: Config) -> None:
    """Raises ValueError naming the first setting outside its own range (RANGES)."""
    for name, (least, most) in RANGES.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"setting {name!r}: expected a number, got {_shown(value)}")
        finite = isinstance(value, int) or math.isfinite(value)  # an int of 400 digits too
        if not (finite and least <= value <= most):
            wanted = (
                f"at least {_n(least)}" if most >= MAX_SAFE_INT else f"{_n(least)} to {_n(most)}"
            )
            raise ValueError(f"setting {name!r} is {_shown(value)}: expected {wanted}")


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
    check_settings(config)
    return config
