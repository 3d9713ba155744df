"""Model declarations ([model.NAME] tables): every mistake is one clear error at start."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sluice.gateway.config import Config, load_config
from sluice.gateway.core.catalog import Catalog
from sluice.gateway.server import Gateway
from sluice.models import registry
from sluice.models.declare import DeclarationError, check_entry, declare
from sluice.models.registry import load_declarations
from tests.conftest import offline

ZOO_FILE = Path(__file__).parents[1] / "zoo" / "zoo.toml"


def table(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "factory": "tests.zoo.nets:MultiTask",
        "outputs": ["steer", "speed", "lanes"],
        "inputs": [
            {"name": "frames", "shape": [1, 3, 32, 64]},
            {"name": "state", "shape": [1, 6]},
        ],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def refused(message: str, name: str = "camnet", **changes: Any) -> None:
    with pytest.raises(DeclarationError, match=message) as err:
        check_entry(declare(name, table(**changes)))
    assert str(err.value).startswith(f"model {name!r}: ")
    assert "\n" not in str(err.value)


def test_the_zoo_and_the_builtins_declare_and_run() -> None:
    for entry in [*load_declarations(ZOO_FILE).values(), registry.get("drivenet-tiny")]:
        check_entry(entry)
    assert registry.get("drivenet").factory_path == "sluice.models.drivenet:build"


FRAMES = {"name": "frames", "shape": [1, 3, 32, 64]}


def one(**fields: Any) -> dict[str, Any]:
    """changes with a single input: x of shape (1, 4), plus fields."""
    return {"inputs": [{"name": "x", "shape": [1, 4], **fields}]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"factory": "tests.zoo.nowhere:Net"}, r"module 'tests.zoo.nowhere' cannot be imported"),
        ({"factory": "tests.zoo.nets:Nope"}, r"'tests.zoo.nets' has no attribute 'Nope'"),
        ({"factory": "math:pi"}, r"'pi' is not callable"),
        ({"factory": "tests.zoo.nets"}, r"expected 'package.module:callable'"),
        ({"factory": "builtins:dict"}, r"returned dict, not a torch.nn.Module"),
        ({"kwargs": {"bogus": 1}}, r"raised TypeError: .*bogus"),
        ({"factory": None}, r"factory is required"),
        ({"inputs": [FRAMES]}, r"declared inputs .* do not run"),
        ({"inputs": [FRAMES, {"name": "state", "shape": [1, 5]}]}, r"do not run: RuntimeError"),
        ({"outputs": ["steer", "speed"]}, r"forward returned 3 outputs, the declaration names 2"),
        ({"outputs": ["steer", "steer", "x"]}, r"outputs: expected a list of distinct"),
        ({"outputs": ["frames", "b", "c"]}, r"may not share an input's name"),
        ({"inputs": []}, r"inputs: expected at least one"),
        ({"inputs": [{"name": "x", "shape": [1, 0]}]}, r"inputs\[0\].shape: expected integers"),
        (one(dtype="complex64"), r"inputs\[0\].dtype 'complex64'"),
        (one(dynamic=[2]), r"inputs\[0\].dynamic: axes"),
        (one(range=[1, 1]), r"inputs\[0\].range"),
        (one(name="x y"), r"inputs\[0\].name: expected an identifier"),
        (one(colour=1), r"inputs\[0\]: unknown key 'colour'"),
        ({"colour": "red"}, r"unknown key 'colour'"),
        ({"limits": {"nodez": 5}}, r"limits: unknown key 'nodez'"),
        ({"limits": {"nodes": 0}}, r"limits.nodes: expected a positive integer"),
        ({"parity_tolerance": 0}, r"parity_tolerance: expected a number in \(0, 1\]"),
        ({"init_seed": -1}, r"init_seed: expected a non-negative integer"),
        ({"init_weights": "nowhere.safetensors"}, r"init_weights: nowhere.safetensors is not a"),
    ],
)
def test_each_mistake_is_one_line_naming_it(changes: dict[str, Any], message: str) -> None:
    refused(message, **changes)


def test_a_name_must_be_a_model_name() -> None:
    with pytest.raises(DeclarationError, match="a model name is 1-64 of"):
        declare("Cam Net", table())


def test_a_declaration_may_not_take_a_builtin_name(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(
        '[gateway]\nmodels = ["drivenet"]\n[model.drivenet]\nfactory = "tests.zoo.nets:MultiTask"\n'
        'outputs = ["a", "b", "c"]\ninputs = [{ name = "x", shape = [1, 6] }]\n'
    )
    with pytest.raises(DeclarationError, match="'drivenet': the name is built in"):
        load_config(path, environ={})


def test_config_declares_serves_and_resolves_paths_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    entry = declare("cam", table())
    save_file(entry.build(seed=3).state_dict(), str(tmp_path / "conf" / "v0.safetensors"))
    path = tmp_path / "conf" / "sluice.toml"
    path.write_text(
        '[gateway]\nmodels = ["cam"]\n'
        '[model.cam]\nfactory = "tests.zoo.nets:MultiTask"\n'
        'outputs = ["steer", "speed", "lanes"]\ninit_weights = "v0.safetensors"\n'
        '[[model.cam.inputs]]\nname = "frames"\nshape = [1, 3, 32, 64]\n'
        '[[model.cam.inputs]]\nname = "state"\nshape = [1, 6]\n'
    )
    config = load_config(path, environ={})
    assert config.models == ("cam",)
    assert config.declared_models["cam"].init_weights == tmp_path / "conf" / "v0.safetensors"
    # the trainer side reads the same file and builds the same schema
    assert load_declarations(path)["cam"].schema().hash == entry.schema().hash
    state = config.declared_models["cam"].initial_state()
    for name, tensor in entry.build(seed=3).state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_unknown_served_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'camnet'; known: .*drivenet-tiny"):
        load_config(None, {"models": "camnet"}, environ={})


def test_initial_weights_must_match_the_model(tmp_path: Path) -> None:
    entry = declare("cam", table())
    state = entry.build(seed=1).state_dict()
    cases: dict[str, tuple[dict[str, torch.Tensor], str]] = {
        "missing": ({k: v for k, v in state.items() if k != "trunk.bias"}, "'trunk.bias' is"),
        "extra": ({**state, "ghost": torch.zeros(2)}, r"not in the model: \['ghost'\]"),
        "shape": ({**state, "trunk.bias": torch.zeros(7)}, r"'trunk.bias' is \(7,\)"),
        "dtype": ({**state, "trunk.bias": state["trunk.bias"].double()}, "float64"),
        "nan": ({**state, "trunk.bias": torch.full_like(state["trunk.bias"], float("nan"))},
                "'trunk.bias' is not finite"),
    }  # fmt: skip
    for label, (tensors, message) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, str(path))
        bad = declare("cam", table(init_weights=str(path)))
        with pytest.raises(ValueError, match=message):
            bad.initial_state()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        declare("cam", table(init_weights=str(tmp_path / "junk.safetensors"))).initial_state()


def test_a_graph_onnxruntime_cannot_run_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    native = declare(
        "bf-native",
        {"factory": "tests.zoo.nets:BfloatNative", "outputs": ["y"],
         "inputs": [{"name": "x", "shape": [1, 4]}]},
    )  # fmt: skip
    check_entry(native)  # torch runs it
    with pytest.raises(ValueError, match=r"'bf-native': self-test failed: .*NOT_IMPLEMENTED"):
        Gateway(
            offline(
                Config(
                    data_dir=tmp_path, models=("bf-native",), declared_models={"bf-native": native}
                )
            )
        )


def test_a_model_the_exporter_cannot_trace_stops_the_start(tmp_path: Path) -> None:
    branching = declare(
        "branching",
        {"factory": "tests.zoo.nets:DataDependent", "outputs": ["y"],
         "inputs": [{"name": "x", "shape": [1, 4]}]},
    )  # fmt: skip
    check_entry(branching)  # on the CPU: meta cannot branch on a value
    with pytest.raises(ValueError, match=r"'branching': torch.onnx.export failed: "):
        Gateway(
            offline(
                Config(
                    data_dir=tmp_path,
                    models=("branching",),
                    declared_models={"branching": branching},
                )
            )
        )


def test_catalog_checks_declared_models_at_start() -> None:
    bad = declare("cam", table(outputs=["a", "b"]))
    with pytest.raises(DeclarationError, match="forward returned 3 outputs"):
        Catalog(["cam"], {"cam": bad})


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**64), st.floats(allow_nan=True),
    st.text(max_size=12), st.lists(st.integers(-2, 9), max_size=10),
    st.dictionaries(st.text(max_size=6), st.integers(-2, 9), max_size=3),
)  # fmt: skip
_KEYS = st.sampled_from(
    ["factory", "kwargs", "inputs", "outputs", "init_seed", "init_weights", "parity_tolerance",
     "limits", "description", "unknown"]
)  # fmt: skip
_INPUT = st.dictionaries(
    st.sampled_from(["name", "shape", "dtype", "dynamic", "range", "x"]), _VALUES, max_size=6
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(_KEYS, _VALUES, max_size=4),
    inputs=st.one_of(st.none(), st.lists(_INPUT, max_size=3)),
)
def test_any_malformed_table_is_a_declaration_error(
    changes: dict[str, Any], inputs: list[dict[str, Any]] | None
) -> None:
    doc = table()
    doc.update(changes)
    if inputs is not None:
        doc["inputs"] = inputs
    try:
        entry = declare("fuzzed", doc)
    except DeclarationError as exc:
        assert re.fullmatch(r"model 'fuzzed': [^\n]+", str(exc))
        return
    try:
        check_entry(entry)
    except DeclarationError as exc:
        assert re.fullmatch(r"model 'fuzzed': [^\n]+", str(exc))
