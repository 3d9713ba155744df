"""A start on a data dir whose templates are built imports no torch before it is ready: the
schema of a declaration already checked is cached beside its template (schema.json), and
torch, the factories, scipy's BLAS and onnxruntime are imported after ready, in the
background. A cache that is not whole, or not this declaration's, is not used."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from sluice.gateway.core.catalog import Catalog
from sluice.gateway.export.publish import SCHEMA_CACHE, cached_schema
from sluice.gateway.export.template import TWO_FILE_THRESHOLD
from sluice.models import registry
from sluice.models.declare import declare, schema_fingerprint
from sluice.models.entry import ModelEntry
from sluice.models.schema import Schema, TensorSpec
from tests.conftest import TINY, Running, start_gateway
from tests.integration.test_observability import http_status
from tests.integration.test_round import _publish_one

HEAVY = ("torch", "scipy", "onnxscript")

# `sluice serve` itself (cli.main), with OpsListener.ready wrapped to note what is imported
# at the moment the gateway says it is ready; then SIGTERM, once serve's handler is set.
RUNNER = """
import json, os, signal, sys, threading, time
from sluice.gateway import ops
HEAVY = {heavy!r}
seen = {{}}
ready = ops.OpsListener.ready

def noting(self, value):
    if value and "at_ready" not in seen:
        seen["at_ready"] = sorted(m for m in HEAVY if m in sys.modules)
        threading.Thread(target=stop_when_handled, daemon=True).start()
    ready(self, value)

def stop_when_handled():
    while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

ops.OpsListener.ready = noting
from sluice.gateway.cli import main
code = main(["serve", "--data-dir", sys.argv[1], "--models", sys.argv[2],
             "--insecure-loopback"])
seen["after_stop"] = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps({{"code": code, **seen}}))
"""


def serve_once(data_dir: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", RUNNER.format(heavy=HEAVY), str(data_dir), TINY],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def the_cache(data_dir: Path) -> Path:
    (path,) = (data_dir / "templates" / TINY).glob(f"*/{SCHEMA_CACHE}")
    return path


def test_a_start_on_built_templates_is_ready_before_importing_torch(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache)  # version 0, as a first start
    _publish_one(running, tiny_schema)  # a release: what a restart finds in place
    running.gateway.stop()
    result = serve_once(tmp_path / "gw")
    assert result["code"] == 0
    assert result["at_ready"] == [], result["stderr"]
    # Then warmed up in the background: the first close does not import torch itself.
    assert "torch" in result["after_stop"] and "scipy" in result["after_stop"]  # type: ignore[operator]
    assert "warmed up for the first release" in str(result["stderr"])


def test_a_start_without_a_cache_builds_the_module_and_writes_one(
    tmp_path: Path, template_cache: Path
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache)
    running.gateway.stop()
    path = the_cache(tmp_path / "gw")
    recorded = path.read_text()
    path.unlink()  # a data dir from before the cache: served as before, then cached
    result = serve_once(tmp_path / "gw")
    assert result["code"] == 0 and "torch" in result["at_ready"]  # type: ignore[operator]
    assert path.read_text() == recorded


def tampered(schema: Schema) -> Schema:
    first = schema.tensors[0]
    wider = TensorSpec(first.name, (first.shape[0] + 1, *first.shape[1:]), first.dtype)
    return Schema((wider, *schema.tensors[1:]), schema.aliases)


@pytest.mark.parametrize("how", ["hash", "rehashed", "garbage", "declaration"])
def test_a_tampered_cache_is_ignored_and_the_module_built(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache)
    running.gateway.stop()
    path = the_cache(tmp_path / "gw")
    doc = json.loads(path.read_text())
    other = tampered(tiny_schema)
    if how == "hash":  # the schema changed, its recorded hash not
        doc["schema"] = other.to_doc()
    elif how == "rehashed":  # both, consistently: the directory still names the old one
        doc["schema"], doc["hash"] = other.to_doc(), other.hash
    elif how == "garbage":
        doc["schema"] = [{"name": "x", "shape": [-1], "dtype": "<f4"}]
    else:  # the template's record of the declaration it checked is not this one's
        (path.parent / "declaration.sha256").write_text("0" * 64 + "\n")
    path.write_text(json.dumps(doc))
    entry = registry.get(TINY)
    with caplog.at_level(logging.WARNING, logger="sluice.gateway.export.publish"):
        assert cached_schema(entry, tmp_path / "gw" / "templates", TWO_FILE_THRESHOLD) is None
    assert "ignoring the cached schema" in caplog.text
    running = start_gateway(tmp_path / "gw", template_cache)  # built from the module
    try:
        assert running.gateway.catalog.get(TINY).schema == tiny_schema
        _publish_one(running, tiny_schema)
    finally:
        running.gateway.stop()
    assert cached_schema(entry, tmp_path / "gw" / "templates", TWO_FILE_THRESHOLD) == tiny_schema


def test_a_changed_declaration_or_factory_source_misses_the_cache(tmp_path: Path) -> None:
    package = tmp_path / "fastnets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = package / "nets.py"
    source.write_text("import torch\ndef build(width=4):\n    return torch.nn.Linear(width, 2)\n")
    table = {
        "factory": "fastnets.nets:build",
        "outputs": ["y"],
        "inputs": [{"name": "x", "shape": [1, 4]}],
    }
    sys.path.insert(0, str(tmp_path))
    try:
        before = schema_fingerprint(declare("fast", table))
        assert before is not None and before == schema_fingerprint(declare("fast", table))
        assert schema_fingerprint(declare("fast", {**table, "kwargs": {"width": 4}})) != before
        assert schema_fingerprint(declare("fast", {**table, "outputs": ["z"]})) != before
        source.write_text(source.read_text() + "# a change\n")
        assert schema_fingerprint(declare("fast", table)) != before
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("fastnets.nets", "fastnets"):
            sys.modules.pop(name, None)


def test_a_module_that_no_longer_gives_its_cached_schema_is_noticed(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file the factory imports changed (not in the fingerprint): the gateway served the
    cached schema, the warm-up builds the module, finds another one, drops the cache and
    says it is not ready until restarted."""
    start_gateway(tmp_path / "gw", template_cache).gateway.stop()
    path = the_cache(tmp_path / "gw")
    monkeypatch.setattr(ModelEntry, "schema", lambda self: tampered(tiny_schema))
    running: Running = start_gateway(tmp_path / "gw", template_cache)
    try:
        assert running.gateway._warming is not None
        running.gateway._warming.join(60)
        assert http_status(running.endpoints.ops, "/readyz") == 503
        assert not path.exists()
        assert "its module's schema is" in caplog.text
    finally:
        running.gateway.stop()


def test_the_catalog_takes_a_cached_schema_without_building(
    tiny_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    def built(self: ModelEntry) -> Schema:
        raise AssertionError("built at start")

    with monkeypatch.context() as patched:
        patched.setattr(ModelEntry, "schema", built)
        catalog = Catalog([TINY], cached=lambda entry: tiny_schema)
    assert catalog.get(TINY).schema == tiny_schema
    assert catalog.check_cached() == {}
    wrong = Catalog([TINY], cached=lambda entry: tampered(tiny_schema))
    assert list(wrong.check_cached()) == [TINY]
