"""The global team's install has no torch: pull, verify and export weights with torch,
onnxruntime and flwr blocked from import, against a live gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sluice.models.schema import Schema
from tests.conftest import TINY, Running
from tests.integration.test_egress_gate import public_key_path
from tests.integration.test_round import _publish_one

BLOCKED = ("torch", "onnxruntime", "flwr", "onnxscript", "scipy", "psutil", "dp_accounting")

RUNNER = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on the client")
        return None

sys.meta_path.insert(0, Block())
from sluice.gateway.cli import main
codes = [main(args) for args in json.loads(sys.argv[1])]
print(json.dumps({{"codes": codes, "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
"""


def test_pull_verify_and_export_weights_need_no_torch(
    gateway: Running, tiny_schema: Schema, tmp_path: Path
) -> None:
    _publish_one(gateway, tiny_schema)
    key = str(public_key_path(gateway))
    out = tmp_path / "release"
    calls = [
        ["pull", "--egress", gateway.endpoints.egress, "--model", TINY, "--public-key", key,
         "--out", str(out), "--insecure"],
        ["verify", str(out / "model.onnx"), str(out / "manifest.json"), "--public-key", key],
        ["export-weights", str(out), "--public-key", key, "--out", str(tmp_path / "w.safetensors")],
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", RUNNER.format(blocked=BLOCKED), json.dumps(calls)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0], "loaded": []}
    assert (tmp_path / "w.safetensors").stat().st_size > 0
