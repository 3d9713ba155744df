"""The committed generated code in sluice/v1 is exactly what protos/ generates today."""

from __future__ import annotations

from pathlib import Path

from sluice.gateway.protogen import ROOT, generate


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    generate(tmp_path)
    generated = tmp_path / "sluice" / "v1"  # sluice/__init__.py is written by hand
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in generated.rglob("*.py*")}
    committed_dir = ROOT / "sluice" / "v1"
    committed = {
        p.relative_to(ROOT): p.read_bytes()
        for p in committed_dir.rglob("*.py*")
        if "__pycache__" not in p.parts
    }
    assert set(fresh) == set(committed), "generated file set differs: run `make proto`"
    stale = sorted(str(name) for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale generated code {stale}: run `make proto` and commit"
