"""The installed distribution claims one top-level name, `sluice`: it installs next to a
project that has its own `models`, `clients` or `gateway` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_users_own_models_package_is_theirs_and_sluice_still_works(tmp_path: Path) -> None:
    for name in ("models", "clients", "gateway"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    code = (
        "import models, clients, gateway\n"
        "from sluice.models import registry\n"
        "from sluice.clients.sdk import TrainerClient\n"
        "import sluice.gateway.cli\n"
        "print(models.OWNER, clients.OWNER, gateway.OWNER, registry.get('drivenet-tiny').name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["user", "models", "user", "clients", "user", "gateway",
                                  "drivenet-tiny"]  # fmt: skip


def test_outside_the_repository_no_bare_name_is_installed(tmp_path: Path) -> None:
    code = (
        "import importlib.util as u\n"
        "print([n for n in ('models', 'clients', 'gateway') if u.find_spec(n) is not None])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_wheel_holds_the_builtin_declarations_and_only_sluice(tmp_path: Path) -> None:
    """The DriveNet family is declared in models/builtin.toml: a wheel without it would
    install a gateway that knows no model."""
    import zipfile

    root = Path(__file__).parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("sluicegate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sluice/models/builtin.toml" in names
    assert "sluice/models/declare.py" in names and "sluice/clients/flower.py" in names
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"sluice"}
