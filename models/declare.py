"""Models declared in configuration: `[model.NAME]` tables -> ModelEntry, checked at start.

    [model.camnet]
    factory = "mypkg.nets:CamNet"          # package.module:callable returning an nn.Module
    kwargs = { width = 64 }                # keyword arguments for it
    outputs = ["steer", "speed"]           # graph output names, in forward's order
    init_seed = 0                          # or init_weights = "camnet.safetensors"
    parity_tolerance = 1e-4                # onnxruntime vs torch (float16 graphs need more)
    limits = { structure_bytes = 131072 }  # StructureLimits fields, for a bigger graph
    [[model.camnet.inputs]]
    name = "frames"
    shape = [1, 3, 64, 128]                # an example, batch first
    dtype = "float32"
    dynamic = [0]                          # symbolic axes (default: the batch)
    range = [0.0, 1.0]                     # example values (integers: [low, high))

The gateway and every trainer read the same file, so both sides build the same module
and agree on its schema hash. Each mistake is one ValueError naming the model and key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice.models.artifact import StructureLimits
from sluice.models.entry import DEFAULT_PARITY_TOLERANCE, INPUT_DTYPES, InputSpec, ModelEntry
from sluice.models.schema import Schema, printable

if TYPE_CHECKING:
    from torch import nn

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # as the gateway's NAME_PATTERN
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_KEYS = frozenset(
    {"factory", "kwargs", "inputs", "outputs", "init_seed", "init_weights",
     "parity_tolerance", "limits", "description"}
)  # fmt: skip
_INPUT_KEYS = frozenset({"name", "shape", "dtype", "dynamic", "range"})
_MAX_DIMS = 8
# An input's declared example shape (batch first; the checks draw batches of 2 and 4 of
# it): 2**26 elements is a 1 x 4 x 4096 x 4096 image, 256 MiB of float32. Axes in `dynamic`
# may be longer in use.
MAX_INPUT_ELEMENTS = 1 << 26
# Example values: integers within the dtype (and exact in InputSpec's floats), floats
# whose range (drawn in float32) stays finite.
_INT_RANGE = {"int32": 2**31, "int64": 2**53}
_FLOAT_RANGE = {"float16": 65504.0, "bfloat16": 1e38, "float32": 1e38, "float64": 1e38}
_FLOAT_RANGE["bool"] = 1e38  # drawn as 0/1 whatever the range


class DeclarationError(ValueError):
    """A model declaration that cannot be served; the message names the model and key."""


def _fail(model: str, what: str) -> DeclarationError:
    return DeclarationError(f"model {_text(model)!r}: {what}")


def _text(value: object, limit: int = 64) -> str:
    """A value from the file or the user's code, for a one-line message."""
    return printable(value if isinstance(value, str) else repr(value), limit)


def _raised(exc: BaseException) -> str:
    """What the user's code raised, in one bounded line."""
    return f"{type(exc).__name__}: {_text(str(exc), 300)}"


def resolve_factory(model: str, path: str) -> Callable[..., Any]:
    """The callable at "package.module:attr" (attr may be dotted); one error per mistake."""
    if not isinstance(path, str) or not _FACTORY.fullmatch(path):
        raise _fail(model, f"factory {_text(path)!r}: expected 'package.module:callable'")
    module_name, attr = path.split(":", 1)
    where, module = f"factory {_text(path)!r}", repr(_text(module_name))
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise _fail(
            model, f"{where}: module {module} cannot be imported ({_text(str(exc), 300)})"
        ) from exc
    except Exception as exc:  # the user's module raised while importing
        raise _fail(model, f"{where}: importing {module} raised {_raised(exc)}") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise _fail(model, f"{where}: {module} has no attribute {_text(attr)!r}")
        target = getattr(target, part)
    if not callable(target):
        raise _fail(model, f"{where}: {_text(attr)!r} is not callable")
    factory: Callable[..., Any] = target
    return factory


def factory_file(model: str, path: str) -> Path | None:
    """The file of the factory's module, found without running the module (its parent
    packages are imported): a declaration is checked and a gateway starts on a cached
    schema without importing torch. None when the module has no file of its own."""
    module_name = path.split(":", 1)[0]
    where, module = f"factory {_text(path)!r}", repr(_text(module_name))
    try:
        spec = importlib.util.find_spec(module_name)
    except ImportError as exc:
        raise _fail(
            model, f"{where}: module {module} cannot be imported ({_text(str(exc), 300)})"
        ) from exc
    except Exception as exc:  # a parent package raised while importing
        raise _fail(model, f"{where}: importing {module} raised {_raised(exc)}") from exc
    if spec is None:
        raise _fail(
            model, f"{where}: module {module} cannot be imported (No module named {module})"
        )
    origin = spec.origin if spec.has_location else None
    return Path(origin) if origin else None


def _int_list(model: str, key: str, value: Any, low: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or len(value) > _MAX_DIMS:
        raise _fail(model, f"{key}: expected a list of 1 to {_MAX_DIMS} integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value):
        raise _fail(model, f"{key}: expected integers of at least {low}, got {_text(value)}")
    return tuple(value)


def _input(model: str, i: int, table: Any) -> InputSpec:
    key = f"inputs[{i}]"
    if not isinstance(table, Mapping):
        raise _fail(model, f"{key}: expected a table")
    unknown = sorted(set(table) - _INPUT_KEYS)
    if unknown:
        raise _fail(
            model, f"{key}: unknown key {_text(unknown[0])!r}; known: {sorted(_INPUT_KEYS)}"
        )
    name = table.get("name")
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise _fail(model, f"{key}.name: expected an identifier, got {_text(name)}")
    shape = _int_list(model, f"{key}.shape", table.get("shape"), 1)
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise _fail(
            model,
            f"{key}.shape: {math.prod(shape)} elements; an example input holds at most "
            f"{MAX_INPUT_ELEMENTS} (declare a smaller example: dynamic axes take any size "
            "at run time)",
        )
    dtype = table.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in INPUT_DTYPES:
        raise _fail(
            model, f"{key}.dtype {_text(dtype)!r}: expected one of {', '.join(INPUT_DTYPES)}"
        )
    dynamic = table.get("dynamic", [0])
    if dynamic != []:
        dynamic = _int_list(model, f"{key}.dynamic", dynamic, 0)
        if any(axis >= len(shape) for axis in dynamic) or len(set(dynamic)) != len(dynamic):
            raise _fail(model, f"{key}.dynamic: axes must be distinct and below {len(shape)}")
    low, high = _range(model, key, dtype, table.get("range"))
    return InputSpec(name, shape, dtype, tuple(dynamic), low, high)


def _range(model: str, key: str, dtype: str, value: Any) -> tuple[float, float]:
    """An input's [low, high) of example values: integers within the dtype for an integer
    input, finite numbers whose span float32 holds for a floating one."""
    if value is None:
        return (0.0, 2.0) if dtype in _INT_RANGE else (0.0, 1.0)
    integer = dtype in _INT_RANGE
    kind, bound = ("integers", _INT_RANGE[dtype]) if integer else ("numbers", _FLOAT_RANGE[dtype])

    def kind_ok(v: Any) -> bool:  # 16.0 is an integer too (README's ranges are written so)
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        return not integer or isinstance(v, int) or (math.isfinite(v) and v.is_integer())

    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(kind_ok(v) for v in value)
        or not all(math.isfinite(v) and -bound <= v <= bound for v in value)
        or not value[0] < value[1]
    ):
        raise _fail(
            model,
            f"{key}.range: expected [low, high], {kind} with low < high within "
            f"[{-bound}, {bound}] for {dtype}, got {_text(value)}",
        )
    return float(value[0]), float(value[1])


def _limits(model: str, table: Any) -> StructureLimits:
    if not isinstance(table, Mapping):
        raise _fail(model, "limits: expected a table of StructureLimits fields")
    known = {f.name for f in dataclasses.fields(StructureLimits)}
    for k, v in table.items():
        if k not in known:
            raise _fail(model, f"limits: unknown key {_text(k)!r}; known: {sorted(known)}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _fail(model, f"limits.{k}: expected a positive integer")
    return StructureLimits(**table)


def declare(name: str, table: Mapping[str, Any], base_dir: Path | None = None) -> ModelEntry:
    """A ModelEntry from one `[model.NAME]` table; relative paths are from base_dir.

    Checks the table and finds the factory's module without running it; the factory is
    imported at its first call (check_entry resolves it first and says what is wrong).
    """
    if not MODEL_NAME.fullmatch(name):
        raise _fail(name, "a model name is 1-64 of a-z 0-9 . _ - and starts alphanumeric")
    if not isinstance(table, Mapping):
        raise _fail(name, "expected a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise _fail(name, f"unknown key {_text(unknown[0])!r}; known: {', '.join(sorted(_KEYS))}")
    if "factory" not in table:
        raise _fail(name, "factory is required ('package.module:callable')")
    factory_path = table["factory"]
    if not isinstance(factory_path, str) or not _FACTORY.fullmatch(factory_path):
        raise _fail(name, f"factory {_text(factory_path)!r}: expected 'package.module:callable'")
    factory_file(name, factory_path)
    kwargs = table.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise _fail(name, "kwargs: expected a table")
    inputs = table.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _fail(name, "inputs: expected at least one [[model.NAME.inputs]] table")
    specs = tuple(_input(name, i, t) for i, t in enumerate(inputs))
    if len({s.name for s in specs}) != len(specs):
        raise _fail(name, "inputs: names must be distinct")
    outputs = table.get("outputs")
    if (
        not isinstance(outputs, list)
        or not outputs
        or not all(isinstance(o, str) and _IDENT.fullmatch(o) for o in outputs)
        or len(set(outputs)) != len(outputs)
    ):
        raise _fail(name, "outputs: expected a list of distinct identifiers")
    if set(outputs) & {s.name for s in specs}:
        raise _fail(name, "outputs: an output may not share an input's name")
    seed = table.get("init_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise _fail(name, "init_seed: expected a non-negative integer")
    weights = table.get("init_weights")
    init_weights = None
    if weights is not None:
        if not isinstance(weights, str) or not weights or "\x00" in weights:
            raise _fail(name, "init_weights: expected a path to a safetensors file")
        init_weights = Path(weights) if base_dir is None else base_dir / weights
        try:
            is_file = init_weights.is_file()
        except OSError:  # a name too long, a permission denied on the way
            is_file = False
        if not is_file:
            raise _fail(name, f"init_weights: {_text(str(init_weights))} is not a file")
    tolerance = table.get("parity_tolerance", DEFAULT_PARITY_TOLERANCE)
    if not isinstance(tolerance, int | float) or not 0 < tolerance <= 1:
        raise _fail(name, "parity_tolerance: expected a number in (0, 1]")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise _fail(name, "description: expected a string")
    frozen = dict(kwargs)
    resolved: list[Callable[..., Any]] = []
    lock = threading.Lock()

    def factory() -> nn.Module:
        with lock:  # imported once, at the first build (for the builtins: torch)
            if not resolved:
                resolved.append(resolve_factory(name, factory_path))
        return resolved[0](**frozen)  # type: ignore[no-any-return]

    return ModelEntry(
        name=name,
        factory=factory,
        inputs=specs,
        output_names=tuple(outputs),
        init_seed=seed,
        init_weights=init_weights,
        parity_tolerance=float(tolerance),
        limits=_limits(name, table.get("limits", {})),
        factory_path=factory_path,
        kwargs=frozen,
        description=description,
    )


def declare_all(tables: Mapping[str, Any], base_dir: Path | None = None) -> dict[str, ModelEntry]:
    if not isinstance(tables, Mapping):
        raise DeclarationError("[model]: expected one table per model, [model.NAME]")
    return {name: declare(name, table, base_dir) for name, table in tables.items()}


def declaration_fingerprint(entry: ModelEntry) -> str:
    """What check_entry's forward run depends on besides the module's parameters (which
    the schema hash covers): the declared inputs and outputs."""
    doc = repr((entry.name, entry.factory_path, entry.inputs, entry.output_names))
    return hashlib.sha256(doc.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def schema_fingerprint(entry: ModelEntry) -> str | None:
    """What the module's schema and check_entry depend on, known without running either:
    the declaration (factory path, kwargs, inputs, outputs), the bytes of the factory's
    module file and torch's version file. A schema recorded under this fingerprint after
    a full check (gateway/export/publish.py) stands for both at a later start, which then
    does not import torch. A change in another file the factory imports is not seen here:
    the gateway builds the module after it is ready and compares (server.py).

    None (nothing may be cached) for an entry not declared by factory path, or whose
    factory module or torch has no file to hash.
    """
    if not entry.factory_path:
        return None
    source = factory_file(entry.name, entry.factory_path)
    torch_spec = importlib.util.find_spec("torch")  # found, not imported
    if source is None or torch_spec is None or not torch_spec.origin:
        return None
    try:
        sources = [
            _file_sha256(source),
            _file_sha256(Path(torch_spec.origin).with_name("version.py")),
        ]
    except OSError:
        return None
    doc = {
        "name": entry.name,
        "factory": entry.factory_path,
        "kwargs": json.dumps(dict(entry.kwargs), sort_keys=True, default=repr),
        "inputs": repr(entry.inputs),
        "outputs": list(entry.output_names),
        "sources": sources,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def check_entry(entry: ModelEntry, *, run: bool = True) -> Schema:
    """The one check of a declaration, before anything is served or created: the factory
    builds a module whose state_dict the wire format carries (its schema, returned), the
    example inputs run through it and give one tensor per declared output, and the
    initial weights file, if declared, matches the schema.

    Builds on the meta device (no weights allocated, no arithmetic), and runs on the CPU
    only if an op has no meta kernel. Whatever the user's code raises becomes one
    DeclarationError naming the model and what was wrong. run=False builds the module and
    its schema only: for a declaration already run (its template was exported and
    self-tested with the same inputs, version 0 made), whose meta run would cost a start
    ~1.5 s of imports.
    """
    import torch
    from torch import nn

    name, where = entry.name, _text(entry.factory_path or "factory")
    if entry.factory_path:  # imports it: a mistake is named here, not as the factory's own
        resolve_factory(name, entry.factory_path)
    try:
        with torch.device("meta"):
            module = entry.factory()
    except (Exception, SystemExit) as exc:  # its sys.exit() would end the start silently
        raise _fail(name, f"{where} raised {_raised(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise _fail(name, f"{where} returned {type(module).__name__}, not a torch.nn.Module")
    schema = _schema(entry, module)
    if not run:
        return schema
    try:
        examples = entry.example_inputs(batch=2)
    except Exception as exc:  # bounded by declare(); a dtype torch cannot draw
        raise _fail(name, f"inputs: the examples cannot be made: {_raised(exc)}") from exc
    try:  # shapes only; an op without a meta kernel is retried for real on the CPU
        with torch.no_grad():
            outputs = module.eval()(*(x.to("meta") for x in examples))
    except SystemExit as exc:  # the user's code: its sys.exit() would end the start silently
        raise _fail(name, f"forward raised {_raised(exc)}") from exc
    except Exception:
        outputs = _run(entry, _build(entry))
    got = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
    if not isinstance(got, tuple | list) or not all(isinstance(t, torch.Tensor) for t in got):
        raise _fail(name, f"forward returned {type(outputs).__name__}, not tensors")
    if len(got) != len(entry.output_names):
        raise _fail(
            name,
            f"forward returned {len(got)} outputs, the declaration names "
            f"{len(entry.output_names)} ({', '.join(entry.output_names)})",
        )
    if entry.init_weights is not None:
        _check_initial_weights(name, entry.init_weights, schema)
    return schema


def _schema(entry: ModelEntry, module: nn.Module) -> Schema:
    try:
        # keep_vars: on meta only the objects themselves tell a tied parameter apart.
        state = module.state_dict(keep_vars=True)
    except (Exception, SystemExit) as exc:
        raise _fail(entry.name, f"state_dict() raised {_raised(exc)}") from exc
    if not isinstance(state, Mapping):
        raise _fail(entry.name, f"state_dict() returned {type(state).__name__}, not a mapping")
    try:
        return Schema.of(state)
    except ValueError as exc:
        raise _fail(entry.name, str(exc)) from exc


def _build(entry: ModelEntry) -> nn.Module:
    try:
        return entry.build(entry.init_seed)
    except (Exception, SystemExit) as exc:
        raise _fail(entry.name, f"{_text(entry.factory_path)} raised {_raised(exc)}") from exc


def _check_initial_weights(model: str, path: Path, schema: Schema) -> None:
    """Every tensor of the file against the schema (loads it: a first start reads it
    again for version 0)."""
    from sluice.models.initial import load_initial_weights

    try:
        load_initial_weights(path, schema)
    except Exception as exc:  # a file safetensors cannot read, too large a header, ...
        what = str(exc) if isinstance(exc, ValueError) else _raised(exc)
        raise _fail(model, f"init_weights: {_text(what, 300)}") from exc


def _run(entry: ModelEntry, module: nn.Module) -> Any:
    import torch

    inputs = entry.example_inputs(batch=2)
    try:
        with torch.no_grad():
            return module(*inputs)
    except (Exception, SystemExit) as exc:
        shapes = ", ".join(
            f"{s.name} {tuple(x.shape)} {s.dtype}"
            for s, x in zip(entry.inputs, inputs, strict=True)
        )
        raise _fail(
            entry.name, f"the declared inputs ({shapes}) do not run: {_raised(exc)}"
        ) from exc
