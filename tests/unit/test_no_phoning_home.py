"""onnxruntime writes telemetry to be uploaded unless told not to; Sluice tells it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_A_SESSION = """
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
session.run(None, {"x": np.ones(1, np.float32)})
"""


def run(home: Path, first: str) -> Path:
    """A process that imports `first`, then runs an onnxruntime session, with HOME at home
    and none of the switches in its environment; where onnxruntime keeps its events."""
    env = {k: v for k, v in os.environ.items() if k not in _switches()}
    env["HOME"] = str(home)
    code = f"import {first}\n{RUN_A_SESSION}" if first else RUN_A_SESSION
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    return home / ".cache" / "Microsoft"


def _switches() -> set[str]:
    import sluice

    return set(sluice.QUIET_LIBRARIES)


def test_onnxruntime_keeps_events_for_upload_unless_sluice_came_first(tmp_path: Path) -> None:
    # Without Sluice: onnxruntime's own default. If a later onnxruntime stops collecting,
    # this line fails and says so: then the switch may no longer be needed.
    assert run(tmp_path / "plain", "").exists(), "onnxruntime no longer writes telemetry"
    # Any sluice module imported first: nothing written, nothing to upload.
    assert not run(tmp_path / "gateway", "sluice.gateway.config").exists()
    assert not run(tmp_path / "client", "sluice.clients.verify").exists()


@pytest.mark.parametrize("name", sorted(_switches()))
def test_an_operators_own_setting_is_kept(name: str) -> None:
    env = {**os.environ, name: "operator's"}
    done = subprocess.run(
        [sys.executable, "-c", f"import os, sluice; print(os.environ[{name!r}])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "operator's"
