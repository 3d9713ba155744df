"""Every misuse of the CLI that issue 12 lists ends in one line on stderr, saying what is
wrong and what to do, with its own exit code (docs/CLI.md); never a traceback. Most run
main() in-process; Ctrl-C and a few others run `python -m sluice.gateway.cli` for real."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.gateway.cli import main
from sluice.gateway.cli.common import Exit
from sluice.gateway.pki import PkiLayout, init_pki
from tests.conftest import TINY, Running, start_gateway

# A log record of the in-process gateway (it logs to the same stderr): not the CLI's line.
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """main(argv): (exit code, the one line it printed on stderr)."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_RECORD.match(line)]
    assert len(lines) == 1, err
    return code, lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(
        tmp_path_factory.mktemp("cli-pki") / "pki",
        trainers=[("shanghai-01", "shanghai")],
        readers=["global-team"],
        operators=["ops"],
    )


@pytest.fixture
def mtls(tmp_path: Path, template_cache: Path, pki: PkiLayout) -> Iterator[Running]:
    running = start_gateway(
        tmp_path / "gw", template_cache, insecure_loopback=False, pki_dir=pki.directory
    )
    yield running
    running.gateway.stop()


def as_(pki: PkiLayout, name: str) -> list[str]:
    return ["--pki", str(pki.directory), "--identity", name]


def test_exit_codes_are_the_documented_ones() -> None:
    documented = {"OK": 0, "REFUSED": 1, "USAGE": 2, "UNREACHABLE": 3, "IDENTITY": 4, "BUSY": 5,
                  "BUG": 70, "INTERRUPTED": 130}  # fmt: skip
    assert {e.name: int(e) for e in Exit} == documented  # docs/CLI.md's table
    table = (Path(__file__).parents[2] / "docs" / "CLI.md").read_text()
    for name, code in documented.items():
        assert f"| {code} | `{name}` |" in table, name


# --- the gateway is not where the command looks ------------------------------------------


def test_gateway_down_or_wrong_port(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, line = run(["status", "--target", address, "--insecure"], capsys)
    assert code == Exit.UNREACHABLE
    assert line.startswith(f"sluice status: cannot reach the gateway at {address}: ")
    assert "is `sluice serve` running there?" in line


def test_status_against_the_egress_port(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    egress = gateway.endpoints.egress
    code, line = run(["status", "--target", egress, "--insecure"], capsys)
    assert code == Exit.UNREACHABLE
    assert "the egress port serves only EgressService" in line and "internal listener" in line


def test_pull_against_the_internal_port(
    gateway: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = gateway.data_dir / "keys" / "release-signing.pub"
    code, line = run(
        ["pull", "--egress", gateway.endpoints.internal, "--model", TINY, "--insecure",
         "--public-key", str(key), "--out", str(tmp_path / "out")],
        capsys,
    )  # fmt: skip
    assert code == Exit.UNREACHABLE and "--egress" in line and "EgressService" in line
    assert not (tmp_path / "out").exists()


def test_an_address_without_a_port(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run(["status", "--target", "gateway.example.cn", "--insecure"], capsys)
    assert code == Exit.USAGE and "expected HOST:PORT" in line


def test_plain_text_against_a_tls_gateway(
    mtls: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = run(["status", "--target", mtls.endpoints.internal, "--insecure"], capsys)
    assert code == Exit.UNREACHABLE and "it wants TLS; pass --pki DIR --identity NAME" in line


# --- the caller's identity ------------------------------------------------------------


def test_wrong_pki_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nope = tmp_path / "nope"
    code, line = run(
        ["status", "--target", "127.0.0.1:1", "--pki", str(nope), "--identity", "ops"], capsys
    )
    assert code == Exit.IDENTITY
    assert (
        line == f"sluice status: --pki {nope}: no such directory; pass the one `sluice init` wrote"
    )


def test_pki_directory_without_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run(
        ["status", "--target", "127.0.0.1:1", "--pki", str(tmp_path), "--identity", "ops"], capsys
    )
    assert code == Exit.IDENTITY and "no ca.pem" in line


def test_unknown_identity(pki: PkiLayout, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run(["status", "--target", "127.0.0.1:1", *as_(pki, "bob")], capsys)
    assert code == Exit.IDENTITY
    assert "--identity 'bob': no certificate" in line
    assert "known: global-team, ops, shanghai-01" in line


def test_garbled_certificate(
    pki: PkiLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "pki"
    shutil.copytree(pki.directory, copy)
    (copy / "clients" / "ops.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n")
    code, line = run(
        ["status", "--target", "127.0.0.1:1", "--pki", str(copy), "--identity", "ops"], capsys
    )
    assert code == Exit.IDENTITY and "cannot read the certificates" in line
    (copy / "clients" / "ops.key").write_bytes((copy / "clients" / "global-team.key").read_bytes())
    shutil.copy(pki.directory / "clients" / "ops.pem", copy / "clients" / "ops.pem")
    code, line = run(
        ["status", "--target", "127.0.0.1:1", "--pki", str(copy), "--identity", "ops"], capsys
    )
    assert code == Exit.IDENTITY and "not the key of" in line


def test_no_identity_at_all(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run(["status", "--target", "127.0.0.1:1"], capsys)
    assert code == Exit.USAGE and "pass --pki DIR --identity NAME" in line


def test_wrong_role_says_which_role_the_command_needs(
    mtls: Running, pki: PkiLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    internal, egress = mtls.endpoints.internal, mtls.endpoints.egress
    code, line = run(["status", "--target", internal, *as_(pki, "shanghai-01")], capsys)
    assert code == Exit.IDENTITY
    assert line.startswith("sluice status: refused: PERMISSION_DENIED: ")
    assert "needs an operator certificate" in line and "shanghai-01 is a trainer" in line
    key = mtls.data_dir / "keys" / "release-signing.pub"
    code, line = run(
        ["pull", "--egress", egress, "--model", TINY, "--public-key", str(key),
         "--out", str(tmp_path / "out"), *as_(pki, "ops")],
        capsys,
    )  # fmt: skip
    assert code == Exit.IDENTITY and "needs a reader certificate" in line
    assert "ops is an operator" in line


def test_a_certificate_of_another_ca(
    mtls: Running, pki: PkiLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = init_pki(tmp_path / "other", operators=["ops"])
    code, line = run(["status", "--target", mtls.endpoints.internal, *as_(other, "ops")], capsys)
    assert code == Exit.IDENTITY and "is --pki the directory the gateway was started with?" in line


# --- sluice serve -------------------------------------------------------------------------


def serve(tmp_path: Path, *extra: str) -> list[str]:
    return ["serve", "--data-dir", str(tmp_path / "gw"), "--models", TINY, *extra]


def test_port_in_use_fails_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started = time.monotonic()
        code, line = run(
            serve(tmp_path, "--insecure-loopback", "--internal", f"127.0.0.1:{port}"), capsys
        )
        took = time.monotonic() - started
    assert code == Exit.USAGE
    assert f"{port}" in line and "in use" in line, line
    # Bound before the slow part (the model's ONNX template): no template was built.
    assert not list((tmp_path / "gw").glob("templates/*/*")), "built a template first"
    assert took < 5, f"{took:.1f} s"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[gateway]\nquorumm = 3\n", "unknown setting 'quorumm'"),
        ('[gateway]\nmodels = ["nosuch"]\n', "unknown model 'nosuch'"),
        (
            f'[gateway]\nmodels = ["{TINY}"]\n[gateway.strategies.{TINY}]\nname = "FedFoo"\n',
            "unknown strategy 'FedFoo'",
        ),
        ("[gateway\n", "not valid TOML"),
    ],
    ids=["unknown key", "unknown model", "unknown strategy", "not TOML"],
)
def test_config_file_mistakes(
    tmp_path: Path,
    template_cache: Path,
    capsys: pytest.CaptureFixture[str],
    toml: str,
    expected: str,
) -> None:
    shutil.copytree(template_cache, tmp_path / "gw" / "templates")
    config = tmp_path / "sluice.toml"
    config.write_text(toml)
    argv = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "gw")]
    code, line = run([*argv, "--insecure-loopback"], capsys)
    assert code == Exit.USAGE and line.startswith("sluice serve: ") and expected in line, line


def test_unknown_model_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "--data-dir", str(tmp_path / "gw"), "--models", "nosuch"]
    code, line = run([*argv, "--insecure-loopback"], capsys)
    assert code == Exit.USAGE and "unknown model 'nosuch'" in line and "drivenet-tiny" in line


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    code, line = run(["serve", "--config", str(missing), "--insecure-loopback"], capsys)
    assert code == Exit.USAGE and line == f"sluice serve: --config {missing}: no such file"


def test_environment_setting_that_is_no_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLUICE_QUORUM", "abc")
    code, line = run(serve(tmp_path, "--insecure-loopback"), capsys)
    assert code == Exit.USAGE and line.startswith("sluice serve: ")
    assert "'abc'" in line and "quorum" in line.lower(), line


def test_no_pki_in_the_data_dir(
    tmp_path: Path, template_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(template_cache, tmp_path / "gw" / "templates")
    code, line = run(serve(tmp_path), capsys)
    assert code == Exit.USAGE and "sluice init" in line and "--insecure-loopback" in line


# --- steering rounds -------------------------------------------------------------------


def test_close_round_on_the_wrong_round(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", gateway.endpoints.internal, "--insecure", "--model", TINY]
    code, line = run(["close-round", *target, "--round", "5"], capsys)
    assert code == Exit.REFUSED
    assert line.startswith("sluice close-round: refused: NOT_FOUND: round 5 ")
    assert "(open: 1; without a round the open one is closed)" in line
    code, line = run(["close-round", *target], capsys)  # the open one: no updates yet
    assert code == Exit.REFUSED and "FAILED_PRECONDITION" in line and "updates of 0" in line


def test_an_unusable_certificate_to_revoke(
    gateway: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", gateway.endpoints.internal, "--insecure"]
    code, line = run(["revoke", *target, "--cert", str(tmp_path / "gone.pem")], capsys)
    assert code == Exit.USAGE and "gone.pem" in line and "No such file" in line
    code, line = run(["revoke", *target], capsys)
    assert code == Exit.USAGE and "pass --cert FILE, or --serial HEX --principal NAME" in line


# --- the command line itself -----------------------------------------------------------


def test_version_and_global_flags_after_the_command(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"sluice {version('sluicegate')}\n"
    target = ["--target", gateway.endpoints.internal, "--insecure"]
    for argv in (["-v", "status", *target], ["status", *target, "-v", "--log-format", "json"]):
        assert main(argv) == 0
    assert logging_level() == "DEBUG"
    assert main(["status", *target]) == 0 and logging_level() == "INFO"
    with pytest.raises(SystemExit) as done:
        main(["status", "--log-format", "xml", *target])
    assert done.value.code == 2 and "invalid choice: 'xml'" in capsys.readouterr().err


def logging_level() -> str:
    import logging

    return logging.getLevelName(logging.getLogger().level)


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, shown in (
        (["pull", "--help"], "(default: drivenet)"),
        (["audit", "list", "--help"], "(default: 50)"),
        (["serve", "--help"], "(default: 3)"),  # --min-trainers, from the gateway's settings
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert shown in " ".join(capsys.readouterr().out.split()), argv


# --- for real: exit codes and stderr of the process, and Ctrl-C -----------------------------


def sluice(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sluice.gateway.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_process_exit_codes_and_one_line(tmp_path: Path, pki: PkiLayout) -> None:
    down = f"127.0.0.1:{free_port()}"
    for argv, code, says in (
        (["status", "--target", down, "--insecure"], Exit.UNREACHABLE, "cannot reach"),
        (["status", "--target", down, *as_(pki, "bob")], Exit.IDENTITY, "no certificate"),
        (["serve", "--config", str(tmp_path / "x.toml")], Exit.USAGE, "no such file"),
    ):
        proc = sluice(*argv)
        _, err = proc.communicate(timeout=60)
        lines = err.strip().splitlines()
        assert proc.returncode == code, err
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers: a gateway that hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def interrupt(proc: subprocess.Popen[str], after_s: float) -> tuple[int, str]:
    time.sleep(after_s)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_in_pull_exits_130_quietly(silent_server: str, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = tmp_path / "key.pub"  # read before anything is dialed: it must be a key
    public = Ed25519PrivateKey.generate().public_key()
    key.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    proc = sluice(
        "pull", "--egress", silent_server, "--insecure", "--public-key", str(key),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    code, err = interrupt(proc, 3.0)
    assert code == Exit.INTERRUPTED, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    assert not list(tmp_path.glob("*out*"))  # no byte came: nothing to resume either


def test_ctrl_c_in_simulate_exits_130_quietly(silent_server: str) -> None:
    proc = sluice(
        "simulate", "--target", silent_server, "--insecure", "--model", TINY,
        "--trainers", "1", "--rounds", "1", "--clips", "8",
    )  # fmt: skip
    code, err = interrupt(proc, 4.0)
    assert code == Exit.INTERRUPTED, err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e9", "soon"])
def test_pull_idle_timeout_out_of_range_is_a_usage_error(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["pull", "--egress", "127.0.0.1:1", "--insecure", "--public-key", str(tmp_path),
              "--out", str(tmp_path / "out"), "--idle-timeout", value])  # fmt: skip
    assert exc.value.code == Exit.USAGE
    assert "--idle-timeout" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_message_over_the_client_s_limit_is_a_refusal_not_busy() -> None:
    """gRPC refuses a received message over this client's limit with RESOURCE_EXHAUSTED,
    the code a busy gateway answers with: told apart by its words, it is no 'try again'."""
    import argparse

    import grpc

    from sluice.gateway.cli.common import rpc_failure

    class Refused(grpc.RpcError):
        def __init__(self, details: str) -> None:
            self._details = details

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return self._details

    args = argparse.Namespace(listener="egress", egress="10.0.0.1:7443")
    local = rpc_failure(Refused("Received message larger than max (9437198 vs. 4259840)"), args)
    assert local.code == Exit.REFUSED and "over gRPC's size limit" in str(local)
    busy = rpc_failure(Refused("too many calls from reader-1; try again"), args)
    assert busy.code == Exit.BUSY
