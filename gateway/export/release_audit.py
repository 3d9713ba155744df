"""Offline: is every published release on disk still what its signed manifest describes?

Run by `sluice audit verify` beside the audit chain, with or without a gateway running: the
same checks as every pull (signature, row, files, guard, finite values, policy), read-only.
"""

from __future__ import annotations

import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sluice.gateway.config import Config
from sluice.gateway.core.catalog import Catalog
from sluice.gateway.core.records import Release
from sluice.gateway.export.guard import GuardPolicy, GuardRefused
from sluice.gateway.export.publish import template_dir, template_for
from sluice.gateway.export.release_check import ReleaseChecker
from sluice.gateway.export.signing import PUBLIC_FILE
from sluice.gateway.export.template import OnnxTemplate
from sluice.gateway.store.sqlite import Store
from sluice.models import registry
from sluice.models.manifest import load_public_key


@dataclass(frozen=True)
class ReleaseStatus:
    model: str
    version: int
    withheld: str  # why a pull of it would be refused; empty when it is intact


def guard_policy(config: Config) -> GuardPolicy:
    """The egress policy a gateway with this configuration enforces."""
    dp_on = config.dp_noise_multiplier > 0
    return GuardPolicy(
        min_trainers=config.min_trainers, max_epsilon=config.dp_max_epsilon if dp_on else None
    )


def _rows(config: Config) -> list[Release]:
    path = config.data_dir / "sluice.db"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM releases ORDER BY model, version DESC").fetchall()
    finally:
        db.close()
    return [Store._release(r) for r in rows]


def verify_published(config: Config) -> list[ReleaseStatus]:
    """Every release row's status, checked like a pull would check it."""
    rows = _rows(config)
    if not rows:
        return []
    known = {name for name in {r.model for r in rows} if _registered(name, config)}
    catalog = Catalog(sorted(known), config.declared_models)
    root = config.data_dir
    with tempfile.TemporaryDirectory(prefix="sluice-audit-") as scratch:
        # The gateway's cached templates; one that is missing is built in a scratch
        # directory: this check writes nothing into the data dir.
        templates = {
            m.name: template_for(
                m,
                root / "templates"
                if (template_dir(m, root / "templates", config.two_file_bytes)).exists()
                else Path(scratch),
                config.two_file_bytes,
            )
            for m in catalog
        }
        return _check_all(rows, config, catalog, templates)


def _check_all(
    rows: list[Release],
    config: Config,
    catalog: Catalog,
    templates: dict[str, OnnxTemplate],
) -> list[ReleaseStatus]:
    root = config.data_dir
    checker = ReleaseChecker(
        catalog,
        templates,
        root / "registry",
        guard_policy(config),
        load_public_key(root / "keys" / PUBLIC_FILE),
    )
    statuses = []
    for row in rows:
        reason = ""
        try:
            checker.check(checker.signed(row))
        except GuardRefused as exc:
            reason = f"{', '.join(exc.layers)}: {exc.reason}"
        except (OSError, ValueError) as exc:
            reason = f"files: {exc}"
        except Exception as exc:  # a check ends in a verdict: one that crashed withholds
            reason = f"check: the check failed: {type(exc).__name__}: {exc}"
        statuses.append(ReleaseStatus(row.model, row.version, reason[:500]))
    return statuses


def _registered(name: str, config: Config) -> bool:
    try:
        registry.get(name, config.declared_models)
    except (KeyError, ValueError, LookupError):
        return False
    return True
