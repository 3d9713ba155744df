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


XDG_HOMES = {
    "XDG_CACHE_HOME": ".cache",
    "XDG_DATA_HOME": ".local/share",
    "XDG_CONFIG_HOME": ".config",
}


def run(home: Path, first: str) -> list[Path]:
    """A process that imports `first`, then runs an onnxruntime session, with HOME and the
    XDG directories (onnxruntime keeps its events under XDG_CACHE_HOME when it is set) inside
    home and none of the switches in its environment; every file it left there."""
    # onnxruntime records nothing where CI is set (as in this project's CI): left out, so
    # the comparison runs there too.
    env = {k: v for k, v in os.environ.items() if k not in _switches() and k != "CI"}
    env["HOME"] = str(home)
    env.update({name: str(home / sub) for name, sub in XDG_HOMES.items()})
    home.mkdir(parents=True)
    code = f"import {first}\n{RUN_A_SESSION}" if first else RUN_A_SESSION
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    return sorted(p for p in home.rglob("*") if p.is_file())


def _switches() -> set[str]:
    import sluice

    return set(sluice.QUIET_LIBRARIES)


def test_onnxruntime_keeps_events_for_upload_unless_sluice_came_first(tmp_path: Path) -> None:
    # Without Sluice: onnxruntime's own default (a device id and an event queue under
    # Microsoft/DeveloperTools). Where it collects nothing there is nothing to compare.
    plain = run(tmp_path / "plain", "")
    if not plain:
        pytest.skip("onnxruntime collected nothing on this machine even without the switch")
    assert any("onnxruntime" in str(p) for p in plain), plain
    # Any sluice module imported first: nothing written, nothing to upload.
    assert run(tmp_path / "gateway", "sluice.gateway.config") == []
    assert run(tmp_path / "client", "sluice.clients.verify") == []


@pytest.mark.parametrize("first", ["sluice", "sluice.gateway.config", "sluice.clients.verify"])
def test_importing_sluice_turns_every_library_switch_on(first: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _switches()}
    code = (
        f"import os, {first}, sluice\n"
        "print({k: os.environ.get(k) for k in sluice.QUIET_LIBRARIES})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    import sluice

    assert done.stdout.strip() == str(dict(sluice.QUIET_LIBRARIES))


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
