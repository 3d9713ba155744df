"""Generate the committed Python code for protos/ (used by `make proto` and the freshness test)."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "sluice" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under out_dir."""
    from grpc_tools import protoc  # dev-only dependency, imported lazily on purpose

    include = str(resources.files("grpc_tools") / "_proto")
    # mypy-protobuf's plugin sits beside this interpreter, which need not be on PATH.
    plugins = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        plugin = Path(sys.executable).parent / name
        if not plugin.exists():
            plugin = Path(shutil.which(name) or plugin)
        plugins.append(f"--plugin={name}={plugin}")
    args = [
        "grpc_tools.protoc",
        *plugins,
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    (out_dir / "sluice" / "v1" / "__init__.py").touch()
    (out_dir / "sluice" / "__init__.py").touch()  # kept when it exists: written by hand


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
