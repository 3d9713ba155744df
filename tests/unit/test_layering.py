"""The rooms stay apart: core imports no gRPC, clients never the gateway, models neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("gateway/core", ("grpc", "sluice.v1", "sluice.gateway.services", "sluice.gateway.server")),
        ("gateway/store", ("grpc", "sluice.v1", "sluice.gateway.services")),
        ("gateway/export", ("grpc", "sluice.v1", "sluice.gateway.services")),
        ("clients", ("sluice.gateway",)),
        ("models", ("sluice.gateway", "sluice.clients", "grpc")),
        # Nothing imports the folders by their bare names: installed, they are sluice.*.
        *(
            (top, ("gateway", "clients", "models"))
            for top in ("gateway", "clients", "models", "bench", "tests")
        ),
    ],
)
def test_package_does_not_import(package: str, forbidden: tuple[str, ...]) -> None:
    bad = {
        f"{path}: {name}"
        for path, names in imported_modules(package).items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }
    assert not bad, f"forbidden imports: {sorted(bad)}"
