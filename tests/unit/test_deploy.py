"""deploy/: the sample config against the live settings, and every command in the Dockerfile,
compose file and systemd unit against the real `sluice` argument parser.

Docker and systemd cannot run where these tests run: this is what is checked instead.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML (installed with flwr) ships no stubs

from sluice.gateway.cli import parser
from sluice.gateway.config import Config, load_config
from sluice.models import declare

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SAMPLE = DEPLOY / "sluice.example.toml"
# `# name = value`: a setting's default, as the sample states it.
DEFAULT_LINE = re.compile(r"^# ([a-z_]+) = (.+)$")
SETTINGS = {f.name for f in fields(Config)} - {"declared_models"}  # [model.NAME] tables


def parses(argv: list[str], where: str) -> argparse.Namespace:
    """argv as `sluice` would parse it; a test failure naming where, if it would not. Every
    option must be spelled out: argparse would take `--see` for `--seed`, and a renamed
    option could hide behind such an abbreviation."""
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `sluice {shlex.join(argv)}` is refused by the CLI (exit {exc})")
    (commands,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    known = {o for action in commands.choices[argv[0]]._actions for o in action.option_strings}
    for token in argv[1:]:
        option = token.partition("=")[0]
        if option.startswith("--") and option not in known:
            pytest.fail(f"{where}: {option} is not an option of `sluice {argv[0]}` as spelled")
    return args


# ---- the sample config ------------------------------------------------------------------


def sample_lines() -> list[str]:
    return SAMPLE.read_text().splitlines()


def stated_defaults() -> dict[str, str]:
    """Setting -> the TOML value its `# name = value` line states."""
    found: dict[str, str] = {}
    for line in sample_lines():
        match = DEFAULT_LINE.match(line)
        if match and match[1] in SETTINGS:
            assert match[1] not in found, f"{match[1]}: stated twice"
            found[match[1]] = match[2]
    return found


def test_the_sample_loads_as_a_deployment_config() -> None:
    config = load_config(SAMPLE, environ={})
    assert config.data_dir == Path("/var/lib/sluice")
    assert config.pki_dir == Path("/etc/sluice/pki")
    assert config.internal_address.endswith(":7070") and config.egress_address.endswith(":7071")
    assert not config.insecure_loopback


def test_the_sample_documents_every_setting_and_no_other() -> None:
    active = set(tomllib.loads(SAMPLE.read_text())["gateway"])
    documented = set(stated_defaults()) | active
    assert SETTINGS - documented == set(), "settings missing from deploy/sluice.example.toml"
    assert documented - SETTINGS == set(), "the sample names settings Config does not have"


def test_each_setting_has_a_comment_saying_what_it_is() -> None:
    lines = sample_lines()
    for i, line in enumerate(lines):
        match = DEFAULT_LINE.match(line) or re.match(r"^([a-z_]+) = ", line)
        if not (match and match[1] in SETTINGS):
            continue
        j = i - 1  # up through the block's other settings to its prose
        while j >= 0 and (DEFAULT_LINE.match(lines[j]) or re.match(r"^[a-z_]+ = ", lines[j])):
            j -= 1
        assert j >= 0 and lines[j].startswith("# ") and lines[j][2:].strip(), (
            f"deploy/sluice.example.toml:{i + 1}: {match[1]} has no comment above it"
        )


def test_the_stated_defaults_are_the_live_defaults(tmp_path: Path) -> None:
    """Uncommented, the `# name = value` lines give exactly Config(): a default changed in
    gateway/config.py and not here fails."""
    stated = stated_defaults()
    unstated = {name for name in SETTINGS - set(stated) if getattr(Config(), name) is not None}
    assert unstated == set(), "settings whose default the sample does not state"
    path = tmp_path / "defaults.toml"
    path.write_text("[gateway]\n" + "".join(f"{k} = {v}\n" for k, v in stated.items()))
    assert load_config(path, environ={}) == Config()


def example_block(header: str) -> str:
    """The commented example starting at `# <header>`, uncommented (its own `# #` lines
    stay comments)."""
    lines = sample_lines()
    start = lines.index(f"# {header}")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else "")
    return "\n".join(block) + "\n"


def test_the_strategy_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "sluice.toml"
    path.write_text(SAMPLE.read_text() + example_block("[gateway.strategies.drivenet]"))
    config = load_config(path, environ={})
    assert config.strategies == {"drivenet": {"name": "FedAdam", "eta": 0.01}}


def test_the_model_example_uses_only_declaration_keys() -> None:
    doc = tomllib.loads(example_block("[model.camnet]"))
    camnet = doc["model"]["camnet"]
    # The factory is the user's own module, so only the shape of the declaration is checked.
    assert set(camnet) <= declare._KEYS
    for table in camnet["inputs"]:
        assert set(table) <= declare._INPUT_KEYS


# ---- the compose file -------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def sluice_services() -> dict[str, argparse.Namespace]:
    """Each service that runs the image's `sluice` entrypoint, its command parsed."""
    return {
        name: parses([str(a) for a in svc["command"]], f"compose service {name}")
        for name, svc in services().items()
        if "entrypoint" not in svc
    }


def test_every_compose_command_is_a_real_cli_invocation() -> None:
    parsed = sluice_services()
    commands = {name: args.command for name, args in parsed.items()}
    assert commands["init"] == "init" and commands["gateway"] == "serve"
    assert commands["puller"] == "pull" and commands["status"] == "status"
    trainers = [name for name, cmd in commands.items() if cmd == "simulate"]
    assert len(trainers) >= 3  # k = min_trainers = 3 distinct trainers for a release


def test_the_only_other_command_copies_the_public_release_key() -> None:
    others = {name: svc for name, svc in services().items() if "entrypoint" in svc}
    assert set(others) == {"release-key"}
    svc = others["release-key"]
    assert svc["entrypoint"] == ["cp"]
    source, dest = svc["command"]
    assert source.endswith("/keys/release-signing.pub") and ".key" not in dest
    assert all(str(m).endswith(":ro") for m in svc["volumes"] if str(m).startswith("data:"))


def kit_mounts(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in svc.get("volumes", []) if isinstance(m, dict) and m.get("source") == "kits"]


def test_each_participant_mounts_its_own_kit_and_never_the_pki() -> None:
    parsed = sluice_services()
    init = parsed["init"]
    issued = {spec.partition(":")[0] for spec in init.trainer} | {*init.reader, *init.operator}
    for name, svc in services().items():
        volumes = [str(v) for v in svc.get("volumes", []) if isinstance(v, str)]
        if name not in ("init", "gateway"):
            assert not any(v.startswith("pki:") for v in volumes), f"{name} mounts the PKI"
        if name == "init":
            continue
        mounts = kit_mounts(svc)
        args = parsed.get(name)
        if args is None or args.command == "serve":
            assert mounts == [], f"{name}: mounts kits"
            continue
        (mount,) = mounts
        assert mount["read_only"] is True and mount["target"] == str(args.pki)
        # The simulator's one trainer is <region>-01; the others name their identity.
        who = f"{args.regions}-01" if args.command == "simulate" else args.identity
        assert mount["volume"]["subpath"] == who and who in issued, name
    gateway = services()["gateway"]
    assert "pki:/etc/sluice/pki:ro" in gateway["volumes"]


def test_the_endpoints_are_the_names_the_listener_certificates_carry() -> None:
    parsed = sluice_services()
    init = parsed["init"]
    assert init.internal_endpoint.partition(":")[0] in init.server_name
    assert init.egress_endpoint.partition(":")[0] in init.server_name
    for args in parsed.values():
        if args.command in ("simulate", "status"):
            assert args.target == init.internal_endpoint
        if args.command == "pull":
            assert args.egress == init.egress_endpoint


def test_the_global_team_is_not_on_the_region_network() -> None:
    svc = services()
    assert "region" not in svc["puller"].get("networks", [])
    for name, args in sluice_services().items():
        if args.command == "simulate":
            assert svc[name]["networks"] == ["region"], name


def test_one_service_builds_the_image_from_the_dockerfile() -> None:
    builds = [svc["build"] for svc in services().values() if "build" in svc]
    (build,) = builds
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).is_file()
    images = {svc.get("image") for svc in services().values()}
    assert len(images) == 1 and None not in images


# ---- the Dockerfile ---------------------------------------------------------------------


def dockerfile() -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in "\n".join(lines).replace("\\\n", " ").splitlines() if line]


def instructions(keyword: str) -> list[str]:
    return [line[len(keyword) :].strip() for line in dockerfile() if line.startswith(keyword + " ")]


def test_the_image_is_multi_stage_and_runs_as_a_non_root_user() -> None:
    stages = instructions("FROM")
    assert len(stages) >= 2 and all(" AS " in stage for stage in stages)
    assert any(line.startswith("--from=builder") for line in instructions("COPY"))
    user = instructions("USER")[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) >= 1000
    assert not any(line.startswith("ADD ") for line in dockerfile()), "ADD: use COPY"


def test_every_install_is_pinned_by_the_constraints() -> None:
    installs = [line for line in instructions("RUN") if "pip install" in line]
    assert installs
    for line in installs:
        for part in line.split("&&"):
            if "pip install" in part:
                assert "-c constraints.txt" in part, part
    # torch from the CPU index: PyPI's Linux wheel would pull the CUDA build.
    assert any("download.pytorch.org/whl/cpu" in line for line in installs)


def test_the_entrypoint_and_command_are_a_real_serve_with_the_sample() -> None:
    import json

    (entrypoint,) = instructions("ENTRYPOINT")
    (cmd,) = instructions("CMD")
    assert json.loads(entrypoint) == ["sluice"]
    args = parses(json.loads(cmd), "deploy/Dockerfile CMD")
    assert args.command == "serve"
    copied = {line.split()[-1]: line.split()[-2] for line in instructions("COPY")}
    assert copied[str(args.config)] == "deploy/sluice.example.toml"
    config = load_config(SAMPLE, environ={})
    ports = {int(p) for p in instructions("EXPOSE")[0].split()}
    listen = (config.internal_address, config.egress_address)
    assert {int(a.rpartition(":")[2]) for a in listen} <= ports
    assert str(config.data_dir) in instructions("VOLUME")[0]
    # The health check asks the operations listener where the sample config binds it.
    (health,) = instructions("HEALTHCHECK")
    assert f"http://{config.ops_address}/readyz" in health


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!")
        regex = fnmatch.translate(body).replace(".*", "[^/]*")
        if body.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(body[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            allowed = negate
    return allowed


def test_the_docker_context_builds_the_wheel_and_holds_no_key(tmp_path: Path) -> None:
    """What /.dockerignore lets into the build context is enough to build the package, and
    holds no private key, PKI or virtual environment."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = tmp_path / "context"
    skip = {".git", ".venv", "build", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
    for top, dirs, names in os.walk(ROOT):  # symlinked dirs are listed, not followed
        dirs[:] = [d for d in dirs if d not in skip and d != "node_modules"]
        for name in [*dirs, *names]:
            path = Path(top, name)
            rel = path.relative_to(ROOT)
            if (path.is_dir() and not path.is_symlink()) or not dockerignore_allows(
                rel.as_posix(), patterns
            ):
                continue
            dest = context / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():  # sluice/clients -> ../clients: COPY keeps the link
                dest.symlink_to(path.readlink())
            else:
                shutil.copy2(path, dest)
    files = [p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()]
    assert "deploy/sluice.example.toml" in files and "constraints.txt" in files
    assert not [f for f in files if f.endswith((".key", ".pem")) or "/pki/" in f]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheel"), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "wheel").glob("sluicegate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sluice/gateway/cli/__init__.py" in names and "sluice/models/builtin.toml" in names


# ---- the systemd unit -------------------------------------------------------------------


def unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (DEPLOY / "sluice.service").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_unit_starts_a_real_serve_with_the_sample_config() -> None:
    service = unit()["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/") and argv[0].endswith("/sluice")
    args = parses(argv[1:], "deploy/sluice.service ExecStart")
    assert args.command == "serve" and str(args.config) == "/etc/sluice/sluice.toml"
    # The one writable path is the data dir the sample config sets.
    config = load_config(SAMPLE, environ={})
    assert service["ReadWritePaths"] == [str(config.data_dir)]
    assert service["StateDirectory"] == [config.data_dir.name]


def test_the_unit_runs_unprivileged_and_hardened() -> None:
    service = unit()["Service"]
    want = {
        "User": "sluice",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
    }
    assert {k: service.get(k, [None])[-1] for k in want} == want
    assert service["TimeoutStopSec"] and service["UMask"] == ["0077"]
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]
