"""A declaration that cannot be served: `sluice serve` says so in one bounded line naming
the model and key (exit 2), before the data dir is touched; never exit 70."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sluice.gateway.cli import main
from sluice.models.declare import MAX_INPUT_ELEMENTS, DeclarationError, check_entry, declare

MAX_LINE = 600  # a refusal echoes at most short cuts of what it was given


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace("\x00", "\\u0000") + '"'
    return repr(value)


def declaration(model: dict[str, Any] | None = None, **x: Any) -> str:
    """A sluice.toml serving one model 'm' with one input x of shape (1, 4)."""
    table = {"factory": "tests.zoo.nets:ExtraState", "outputs": ["y"], **(model or {})}
    lines = ['[gateway]\nmodels = ["m"]\n[model.m]']
    lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    lines += ["[[model.m.inputs]]", 'name = "x"']
    lines += [f"{k} = {toml_value(v)}" for k, v in {"shape": [1, 4], **x}.items()]
    return "\n".join(lines) + "\n"


def serve(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    config = tmp_path / "sluice.toml"
    config.write_text(text)
    code = main(["serve", "--config", str(config), "--data-dir", str(tmp_path / "dd"),
                 "--insecure-loopback", "--internal", "127.0.0.1:0", "--egress", "127.0.0.1:0",
                 "--ops", "", "--health", ""])  # fmt: skip
    return code, capsys.readouterr().err.strip()


def weights(path: Path, **tensors: torch.Tensor) -> str:
    save_file(tensors, str(path))
    return str(path)


def truncated(path: Path) -> str:
    whole = Path(weights(path, **{"a.weight": torch.zeros(2, 4), "a.bias": torch.zeros(2)}))
    whole.write_bytes(whole.read_bytes()[:-8])
    return str(path)


TINY = {"factory": "tests.zoo.nets:ByteBuffer", "kwargs": {"dtype": "int64"}}
CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    # user code that raised or returned the wrong thing: exit 70 before
    ("kwargs", {"kwargs": {"nope": 1}}, {}, r"ExtraState raised TypeError: .*nope"),
    ("returns 42", {"factory": "tests.zoo.nets:not_a_module"}, {}, r"returned int, not a torch"),
    ("returns str", {"factory": "os:getcwd"}, {}, r"returned str, not a torch.nn.Module"),
    ("extra state", {}, {}, r"state_dict '_extra_state': a dict, not a tensor"),
    ("range scalar", {}, {"range": 5}, r"inputs\[0\].range: expected \[low, high\]"),
    # refused, but naming neither model nor key before
    ("range of 3", {}, {"range": [0, 1, 2]}, r"inputs\[0\].range: expected \[low, high\]"),
    ("uint8 buffer", {"factory": "tests.zoo.nets:ByteBuffer"}, {}, r"'counts': dtype torch.uint8"),
    ("bool buffer", {**TINY, "kwargs": {"dtype": "bool"}}, {}, r"'counts': dtype torch.bool"),
    ("huge input", TINY, {"shape": [1, 2**40]}, r"inputs\[0\].shape: 1099511627776 elements"),
    ("int64 overflow", TINY, {"shape": [2**31, 2**31, 2**31]}, r"inputs\[0\].shape: \d+ elem"),
    ("int fractions", TINY, {"dtype": "int64", "range": [0.2, 0.7]}, r"inputs\[0\].range: .*int"),
    ("int32 1e30", TINY, {"dtype": "int32", "range": [0, 1e30]}, r"inputs\[0\].range: .*int32"),
    (
        "long path",
        {**TINY, "init_weights": "x" * 5000},
        {},
        r"init_weights: \S+\.\.\.\(50\d\d chars\) is not a file",
    ),
    ("NUL in path", {**TINY, "init_weights": "a\x00b"}, {}, r"init_weights: expected a path"),
    ("sys.exit in forward", {"factory": "tests.zoo.nets:ExitsInForward"}, {}, r"forward raised"),
    ("list state", {"factory": "tests.zoo.nets:ListState"}, {}, r"returned list, not a mapping"),
    # found after the data dir was made before
    ("outputs", {**TINY, "outputs": ["y", "z"]}, {}, r"forward returned 1 outputs, .* names 2"),
]


@pytest.mark.parametrize(
    ("model", "x", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_declaration_that_cannot_be_served_is_one_line_and_no_data_dir(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: dict[str, Any],
    x: dict[str, Any],
    message: str,
) -> None:
    code, err = serve(tmp_path, declaration(model, **x), capsys)
    assert code == 2, err
    assert re.fullmatch(rf"sluice serve: model 'm': .*{message}.*", err), err
    assert len(err) < MAX_LINE and err.isprintable(), err
    assert not (tmp_path / "dd").exists()


def test_initial_weights_are_checked_before_the_data_dir_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        truncated(tmp_path / "t.safetensors"): r"t\.safetensors: not a readable safetensors",
        weights(tmp_path / "w.safetensors", counts=torch.zeros(2, dtype=torch.int32),
                **{"a.weight": torch.zeros(3, 4), "a.bias": torch.zeros(2)}):
            r"'a.weight' is \(3, 4\)",
    }  # fmt: skip
    header = tmp_path / "h.safetensors"  # a header of 2**40 bytes, announced in 8 bytes
    header.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    cases[str(header)] = r"h\.safetensors: not a readable safetensors file: .*header too large"
    for path, message in cases.items():
        model = {**TINY, "kwargs": {"dtype": "int32"}, "init_weights": path}
        code, err = serve(tmp_path, declaration(model), capsys)
        assert code == 2, err
        assert re.fullmatch(rf"sluice serve: model 'm': init_weights: .*{message}.*", err), err
        assert not (tmp_path / "dd").exists()


def base(**x: Any) -> dict[str, Any]:
    return {"factory": "tests.zoo.nets:ExtraState", "outputs": ["y"],
            "inputs": [{"name": "x", "shape": [1, 4], **x}]}  # fmt: skip


def refused_here(exc: DeclarationError, key: str) -> None:
    text = str(exc)
    assert text.startswith(f"model 'm': {key}"), text
    assert len(text) < MAX_LINE and text.isprintable(), text


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(1, 2**63 - 1), min_size=1, max_size=8))
def test_any_declared_shape_is_bounded_or_refused_naming_it(shape: list[int]) -> None:
    try:
        entry = declare("m", base(shape=shape, dynamic=[]))
    except DeclarationError as exc:
        assert math.prod(shape) > MAX_INPUT_ELEMENTS
        refused_here(exc, "inputs[0].shape")
        return
    assert math.prod(entry.inputs[0].shape) <= MAX_INPUT_ELEMENTS


_NUMBER = st.one_of(
    st.integers(-(2**64), 2**64), st.floats(allow_nan=True, allow_infinity=True), st.booleans()
)
_RANGE = st.one_of(_NUMBER, st.text(max_size=3), st.lists(_NUMBER, max_size=4))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64", "int64", "int32",
                              "bool"]), value=_RANGE)  # fmt: skip
def test_any_declared_range_draws_examples_in_it_or_is_refused_naming_it(
    dtype: str, value: Any
) -> None:
    try:
        entry = declare("m", base(dtype=dtype, range=value))
    except DeclarationError as exc:
        refused_here(exc, "inputs[0].range")
        return
    (example,) = entry.example_inputs(batch=2)  # never an error of torch's
    assert example.dtype == getattr(torch, dtype)
    if dtype != "bool":
        low, high = value
        assert torch.isfinite(example.double()).all()
        assert (example.double() >= low - abs(low) * 1e-2).all()
        assert (example.double() <= high + abs(high) * 1e-2).all()


@settings(max_examples=200, deadline=None)
@given(path=st.text(min_size=1, max_size=6000), name=st.text(max_size=300))
def test_any_path_or_name_is_echoed_bounded_and_printable(path: str, name: str) -> None:
    for doc, key in [({**base(), "init_weights": path}, "init_weights"),
                     (base(), "inputs[0].name")]:  # fmt: skip
        if key == "inputs[0].name":
            doc["inputs"][0]["name"] = name
        try:
            declare("m", doc)
        except DeclarationError as exc:
            refused_here(exc, key)


def test_whatever_the_factory_raises_is_named(tmp_path: Path) -> None:
    for kwargs, message in [({"nope": 1}, "raised TypeError"), ({}, "'_extra_state': a dict")]:
        with pytest.raises(DeclarationError, match=message) as err:
            check_entry(declare("m", {**base(), "kwargs": kwargs}), run=False)
        refused_here(err.value, "")


def test_integral_float_ranges_of_an_integer_input_are_accepted() -> None:
    """README writes ranges as floats; [0.0, 16.0] for an int64 input was accepted before."""
    entry = declare("m", {"factory": "tests.zoo.nets:ByteBuffer", "kwargs": {"dtype": "int64"},
                          "outputs": ["y"], "inputs": [{"name": "x", "shape": [1, 4],
                          "dtype": "int64", "range": [0.0, 16.0]}]})  # fmt: skip
    assert (entry.inputs[0].low, entry.inputs[0].high) == (0.0, 16.0)


def test_a_model_the_exporter_cannot_trace_is_one_line_and_leaves_no_new_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A declaration that passes every check and then fails in torch.onnx.export (a branch
    on a value) ends the first start with one printable line naming the model (the
    exporter's colours stripped, its pages cut); the data dir that start made is gone, and
    one that existed before is left as it was."""
    text = declaration({"factory": "tests.zoo.nets:DataDependent", "outputs": ["y"]})
    code, err = serve(tmp_path, text, capsys)
    line = err.splitlines()[-1]  # the exporter prints its own diagnostics before
    assert code == 2, err
    assert line.startswith("sluice serve: model 'm': torch.onnx.export failed: "), line
    assert len(line) < MAX_LINE + 200 and line.isprintable(), line
    assert not (tmp_path / "dd").exists()

    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "notes.txt").write_text("the operator's")
    code, err = serve(tmp_path, text, capsys)
    assert code == 2, err
    assert (tmp_path / "dd" / "notes.txt").read_text() == "the operator's"
