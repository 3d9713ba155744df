"""Turn a new version into a release: refresh the template, check parity, write the manifest."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.core.catalog import ServedModel
from gateway.core.records import CommittedUpdate, Release, ReleaseFile, Version
from gateway.export.parity import PARITY_TOLERANCE, max_output_diff
from gateway.export.refresh import write_atomic, write_refreshed
from gateway.export.template import OnnxTemplate, build_template, load_template, save_template
from gateway.export.template import self_test as template_self_test

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "sluice.release/1"


@dataclass(frozen=True)
class ReleasePolicy:
    min_trainers: int = 3  # distinct trainers a release must aggregate (k)
    parity_tolerance: float = PARITY_TOLERANCE  # onnxruntime vs torch, max abs diff


def canonical_json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def template_for(served: ServedModel, root: Path) -> OnnxTemplate:
    """Load the model's template from root, or build, self-test and save it once."""
    directory = root / served.name / served.schema.hash
    if (directory / "template.json").exists():
        return load_template(directory)
    log.info("building the ONNX template of %s (once per schema)", served.name)
    t = build_template(served.entry)
    diff = template_self_test(t, served.entry)
    log.info("template self-test of %s: max abs diff %.2e", served.name, diff)
    save_template(t, directory)
    return t


class ReleaseWriter:
    """Writes registry/<model>/<version>/{model.onnx,manifest.json}; never a partial release."""

    def __init__(
        self, root: Path, templates: dict[str, OnnxTemplate], policy: ReleasePolicy
    ) -> None:
        self.root = root
        self.templates = templates
        self.policy = policy

    def release_dir(self, model: str, version: int) -> Path:
        return self.root / model / str(version)

    def publish(
        self,
        served: ServedModel,
        version: Version,
        weights: Path,
        updates: Sequence[CommittedUpdate],
    ) -> Release | None:
        if version.num_trainers < self.policy.min_trainers:
            log.warning(
                "version %d of %s aggregates %d trainers; a release needs %d: not published",
                version.version,
                served.name,
                version.num_trainers,
                self.policy.min_trainers,
            )
            return None
        final = self.release_dir(served.name, version.version)
        staging = final.with_name(f".{final.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            onnx_path = staging / MODEL_FILE
            sha = write_refreshed(self.templates[served.name], served.schema, weights, onnx_path)
            module = served.entry.build()
            payload = np.fromfile(weights, dtype=np.uint8)
            module.load_state_dict(served.schema.to_state_dict(payload))
            diff = max_output_diff(onnx_path, served.entry, module)
            if diff > self.policy.parity_tolerance:
                log.error(
                    "release %d of %s: onnxruntime differs from torch by %.2e: not published",
                    version.version,
                    served.name,
                    diff,
                )
                return None
            files = (ReleaseFile(MODEL_FILE, onnx_path.stat().st_size, sha),)
            manifest = canonical_json(
                {
                    "format": MANIFEST_FORMAT,
                    "model": served.name,
                    "version": version.version,
                    "parent_version": version.version - 1,
                    "round": version.round,
                    "schema_hash": served.schema.hash,
                    "structure_hash": self.templates[served.name].structure_hash,
                    "files": [f.__dict__ for f in files],
                    "num_trainers": version.num_trainers,
                    "num_regions": version.num_regions,
                    "num_examples": version.num_examples,
                    "num_updates": len(updates),
                    "parity_max_abs_diff": diff,
                    "created_ms": version.created_ms,
                }
            )
            write_atomic(staging / MANIFEST_FILE, [manifest])
            shutil.rmtree(final, ignore_errors=True)  # a rerun after a crash writes it anew
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Release(
            model=served.name,
            version=version.version,
            round=version.round,
            created_ms=version.created_ms,
            num_trainers=version.num_trainers,
            files=files,
            manifest_json=manifest,
        )
