"""Kits over real mTLS: each holds only its own key, the CA key stays with the operator, a
trainer's kit pushes (its run.sh too), the reader's run.sh pulls, kits are never replaced."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sluice.clients.kit import KitError, load_kit
from sluice.clients.sdk import AdminClient, TrainerClient
from sluice.gateway import kits as kits_module
from sluice.gateway import pki as pki_module
from sluice.gateway.cli import main
from sluice.gateway.kits import export_kits
from sluice.gateway.pki import PkiLayout, init_pki
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta, start_gateway
from tests.unit.test_deploy import parses

TRAINERS = (("shanghai-01", "shanghai"), ("beijing-01", "beijing"), ("wuhan-07", "wuhan"))
READER, OPERATOR = "global-team", "ops"
NAMES = (*(name for name, _ in TRAINERS), READER, OPERATOR)
PRIVATE_PEM = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", re.S
)
BIN = Path(sys.executable).parent  # where this venv's `sluice` is


@dataclass
class World:
    running: Running
    layout: PkiLayout
    kits: Path
    init_args: list[str]

    def kit(self, name: str) -> Path:
        return self.kits / name


def init_argv(pki: Path, kits: Path, running: Running) -> list[str]:
    argv = ["init", str(pki)]
    argv += [f"--trainer={name}:{region}" for name, region in TRAINERS]
    argv += [f"--reader={READER}", f"--operator={OPERATOR}", f"--kits={kits}"]
    argv += [f"--internal-endpoint={running.endpoints.internal}"]
    return [*argv, f"--egress-endpoint={running.endpoints.egress}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, template_cache: Path) -> Iterator[World]:
    root = tmp_path_factory.mktemp("kits")
    # The gateway's listeners need the PKI first; the kits need the listeners' ports.
    layout = init_pki(root / "pki", trainers=TRAINERS, readers=[READER], operators=[OPERATOR])
    running = start_gateway(
        root / "gw",
        template_cache,
        insecure_loopback=False,
        pki_dir=layout.directory,
        quorum=3,
        min_trainers=3,
    )
    argv = init_argv(layout.directory, root / "kits", running)
    assert main(argv) == 0  # init again: the PKI is kept, the kits are written
    yield World(running, layout, root / "kits", argv)
    running.gateway.stop()


def tree(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under directory: bytes, mode, inode (a replaced file has another)."""
    found = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        info = path.stat()
        found[path.relative_to(directory).as_posix()] = (
            path.read_bytes(),
            stat.S_IMODE(info.st_mode),
            info.st_ino,
        )
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_script(kit: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(kit / "run.sh"), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


# ---- what a kit holds -------------------------------------------------------------------


def test_each_kit_holds_its_own_files_and_nothing_else(world: World) -> None:
    assert sorted(p.name for p in world.kits.iterdir()) == sorted(NAMES)
    for name in NAMES:
        files = set(tree(world.kit(name)))
        assert files == {
            "ca.pem", f"clients/{name}.pem", f"clients/{name}.key", "kit.json", "README.txt",
            "run.sh",
        }, name  # fmt: skip
        assert (world.kit(name) / "ca.pem").read_bytes() == world.layout.ca_cert.read_bytes()
        cert = world.layout.client_cert(name).read_bytes()
        assert (world.kit(name) / "clients" / f"{name}.pem").read_bytes() == cert


def test_no_kit_holds_another_principals_key_or_the_ca_key(world: World) -> None:
    """Scan every byte of every kit: each private key found is the kit's own; no other key
    of the PKI (the CA's, a listener's, another principal's) appears in any encoding."""
    layout = world.layout
    secret_files = [layout.ca_key, *(layout.server_key(side) for side in ("internal", "egress"))]
    secret_files += [layout.client_key(name) for name in NAMES]
    for name in NAMES:
        kit = world.kit(name)
        own = x509.load_pem_x509_certificate((kit / "clients" / f"{name}.pem").read_bytes())
        for path in (p for p in kit.rglob("*") if p.is_file()):
            data = path.read_bytes()
            for block in PRIVATE_PEM.findall(data):
                key = serialization.load_pem_private_key(block, password=None)
                assert key.public_key() == own.public_key(), f"{path}: a key not {name}'s"
                assert path == kit / "clients" / f"{name}.key"
            for secret in secret_files:
                if secret == layout.client_key(name):
                    continue
                pem = secret.read_bytes()
                key = serialization.load_pem_private_key(pem, password=None)
                der = key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                body = b"".join(pem.split(b"\n")[1:-2])  # the base64 lines
                assert der not in data and body not in data.replace(b"\n", b""), (
                    f"{path} holds {secret.name}"
                )


def test_keys_are_the_owners_alone_and_the_ca_key_stays_in_the_pki(world: World) -> None:
    assert mode(world.layout.ca_key) == 0o600 and mode(world.layout.directory) == 0o700
    assert mode(world.kits) == 0o700
    for name in NAMES:
        kit = world.kit(name)
        assert mode(kit) == 0o700 and mode(kit / "clients") == 0o700
        assert mode(kit / "clients" / f"{name}.key") == 0o600
        assert mode(kit / "run.sh") == 0o755 and mode(kit / "kit.json") == 0o644
    assert not list(world.kits.rglob("ca.key")) and not list(world.kits.rglob("internal.*"))


def test_kit_json_says_who_where_and_which_ca(world: World) -> None:
    fingerprint = (world.running.data_dir / "trusted-ca.sha256").read_text().strip()
    for name in NAMES:
        kit = load_kit(world.kit(name))
        assert kit.principal == name and kit.ca_sha256 == fingerprint
        doc = json.loads((world.kit(name) / "kit.json").read_text())
        assert doc["spiffe_id"].endswith(f"/{name}") and doc["not_after"] == kit.not_after
    assert load_kit(world.kit("beijing-01")).region == "beijing"
    # Only the listener a role may call: a reader never learns the internal address.
    assert load_kit(world.kit(READER)).endpoints == {"egress": world.running.endpoints.egress}
    assert load_kit(world.kit(OPERATOR)).endpoints == {"internal": world.running.endpoints.internal}
    with pytest.raises(KitError, match="names no internal endpoint"):
        load_kit(world.kit(READER)).endpoint("internal")


def test_every_run_script_is_a_real_cli_invocation(world: World) -> None:
    for name in NAMES:
        lines = (world.kit(name) / "run.sh").read_text().splitlines()
        execs = [line for line in lines if line.startswith("exec sluice ")]
        if name == "wuhan-07":  # not <region>-01: the simulator cannot be it
            assert execs == [] and "exit 2" in lines
            continue
        (line,) = execs
        argv = [a.replace("$KIT", "/kit") for a in shlex.split(line)[2:] if a != "$@"]
        args = parses(argv, f"{name}/run.sh")
        assert args.pki == Path("/kit")
        assert getattr(args, "identity", None) in (name, None)


# ---- never replaced, never half written -------------------------------------------------


def test_init_again_keeps_every_kit_as_it_is(world: World) -> None:
    before = tree(world.kits)
    assert main(world.init_args) == 0
    assert tree(world.kits) == before


def test_a_kit_for_other_endpoints_is_refused_and_nothing_changes(world: World) -> None:
    before = tree(world.kits)
    argv = [a for a in world.init_args if not a.startswith("--internal-endpoint")]
    assert main([*argv, "--internal-endpoint=localhost:7070"]) == 2
    assert tree(world.kits) == before


def test_an_endpoint_outside_the_listener_certificate_is_refused(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["kit", str(world.layout.directory), "--all", f"--out={tmp_path / 'kits'}"]
    assert main([*argv, "--internal-endpoint=gateway.example.cn:7070"]) == 2
    assert "--server-name gateway.example.cn" in capsys.readouterr().err
    assert not (tmp_path / "kits").exists()


def test_endpoints_default_to_the_first_server_name(tmp_path: Path) -> None:
    argv = ["init", str(tmp_path / "pki"), "--server-name=gw.example.cn", "--server-name=gw2"]
    assert main([*argv, "--trainer=shanghai-01:shanghai", f"--kits={tmp_path / 'kits'}"]) == 0
    assert load_kit(tmp_path / "kits" / "shanghai-01").endpoints == {
        "internal": "gw.example.cn:7070"
    }
    assert main([*argv, "--reader=global-team", f"--kits={tmp_path / 'kits'}"]) == 0
    assert load_kit(tmp_path / "kits" / "global-team").endpoints == {"egress": "gw.example.cn:7071"}


def test_kits_are_kept_apart_from_the_pki(world: World) -> None:
    for inside in (world.layout.directory / "kits", world.layout.directory):
        with pytest.raises(KitError, match="keep them apart"):
            export_kits(world.layout, [OPERATOR], inside)
    assert sorted(p.name for p in world.layout.directory.iterdir()) == sorted(
        ["ca.pem", "ca.key", "clients", "internal.pem", "internal.key", "egress.pem",
         "egress.key", "issued.jsonl"]
    )  # fmt: skip


def test_a_kit_is_written_whole_or_not_at_all(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "kits"
    out.mkdir(mode=0o700)
    stale = out / ".ops.0123456789ab.tmp"  # a kill mid-write left this, key and all
    (stale / "clients").mkdir(parents=True)
    (stale / "clients" / "ops.key").write_bytes(world.layout.client_key(OPERATOR).read_bytes())
    real = pki_module.create_public_file

    def failing(path: Path, data: bytes, *, executable: bool = False) -> None:
        if path.name == "run.sh":
            raise OSError(28, "No space left on device", str(path))
        real(path, data, executable=executable)

    monkeypatch.setattr(kits_module, "create_public_file", failing)
    with pytest.raises(OSError, match="No space"):
        export_kits(
            world.layout, [OPERATOR], out, internal_endpoint=world.running.endpoints.internal
        )
    assert list(out.iterdir()) == []  # the stale temp went, and the failed kit left nothing
    monkeypatch.undo()
    (done,) = export_kits(
        world.layout, [OPERATOR], out, internal_endpoint=world.running.endpoints.internal
    )
    assert done.written and load_kit(done.path).principal == OPERATOR


def test_load_kit_refuses_files_that_do_not_belong_together(world: World, tmp_path: Path) -> None:
    def copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(world.kit("beijing-01"), dest)
        return dest

    loose = copy("loose")
    (loose / "clients" / "beijing-01.key").chmod(0o644)
    with pytest.raises(KitError, match="chmod 600"):
        load_kit(loose)
    other_ca = copy("other-ca")
    foreign = init_pki(tmp_path / "foreign", operators=["x"])
    (other_ca / "ca.pem").write_bytes(foreign.ca_cert.read_bytes())
    with pytest.raises(KitError, match="not the CA"):
        load_kit(other_ca)
    swapped = copy("swapped")
    (swapped / "clients" / "beijing-01.key").write_bytes(
        world.layout.client_key("shanghai-01").read_bytes()
    )
    with pytest.raises(KitError, match="not the key"):
        load_kit(swapped)
    bare = copy("bare")
    (bare / "kit.json").unlink()
    with pytest.raises(KitError, match="not a kit"):
        load_kit(bare)


# ---- kits in use over mTLS (last: it re-exports the reader's kit) ------------------------


def push_with_kit(kit_dir: Path, schema: Schema, seed: int) -> None:
    kit = load_kit(kit_dir)
    assert kit.region is not None
    with TrainerClient(kit.endpoint("internal"), identity=kit.identity) as client:
        info = client.round(TINY)
        client.pull_global(TINY, info.base_version)
        client.push_update(
            model=TINY,
            round_no=info.round,
            base_version=info.base_version,
            schema_hash=info.schema_hash,
            trainer=kit.principal,
            region=kit.region,
            num_examples=100,
            payload=random_delta(schema, seed),
        )


def test_trainer_kits_push_and_the_reader_kit_pulls_a_release(
    world: World, tiny_schema: Schema, tmp_path: Path
) -> None:
    # shanghai-01 runs its kit's own command line: the simulator, one round of real training.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    simulated = subprocess.Popen(
        [str(world.kit("shanghai-01") / "run.sh"), "--model", TINY, "--rounds", "1",
         "--clips", "16", "--epochs", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        push_with_kit(world.kit("beijing-01"), tiny_schema, seed=1)
        push_with_kit(world.kit("wuhan-07"), tiny_schema, seed=2)
        output, _ = simulated.communicate(timeout=300)
    finally:
        if simulated.poll() is None:
            simulated.kill()
    assert simulated.returncode == 0, output

    ops = load_kit(world.kit(OPERATOR))
    with AdminClient(ops.endpoint("internal"), identity=ops.identity) as admin:
        status = admin.status()
    assert TINY in {m.model for m in status.models}  # the operator's kit is let in
    done = run_script(world.kit(OPERATOR), cwd=tmp_path)
    assert done.returncode == 0 and TINY in done.stdout, done.stderr

    # The reader's kit was cut before the gateway had a signing key: run.sh says so.
    reader = world.kit(READER)
    refused = run_script(reader, "--model", TINY, cwd=tmp_path)
    assert refused.returncode == 2 and "release-signing.pub" in refused.stderr
    # Exporting it again with the key is refused while the old kit is there...
    before = tree(world.kits)
    public = world.running.data_dir / "keys" / "release-signing.pub"
    argv = ["kit", str(world.layout.directory), READER, f"--out={world.kits}"]
    argv += [f"--egress-endpoint={world.running.endpoints.egress}", f"--release-key={public}"]
    assert main(argv) == 2
    assert tree(world.kits) == before
    # ... and done once the operator moved it away (and withdrew the copy handed out).
    reader.rename(tmp_path / "withdrawn")
    assert main(argv) == 0
    assert (reader / "release-signing.pub").read_bytes() == public.read_bytes()
    pulled = run_script(reader, "--model", TINY, "--out", str(tmp_path / "release"), cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert {p.name for p in (tmp_path / "release").iterdir()} >= {"model.onnx", "manifest.json"}
    assert TINY in json.loads((reader / "pins.json").read_text())["structure_hashes"]
