"""Observability: /metrics counts what happened, health over plain gRPC and HTTP follows the
gateway's state, security events are logged (JSON lines with their fields), the effective
configuration is shown at start, and a port in use fails the start at once."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sluice.clients.sdk import AdminClient, EgressClient, Identity, RetryPolicy, TrainerClient
from sluice.gateway.cli import main
from sluice.gateway.config import Config
from sluice.gateway.logs import JsonFormatter
from sluice.gateway.pki import cert_serial, init_pki
from sluice.gateway.server import Gateway, StartupError
from sluice.models.schema import Schema
from sluice.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import EPHEMERAL, TINY, Running, random_delta, start_gateway, update_header
from tests.integration.test_round import push

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NO_RETRY = RetryPolicy(attempts=1)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(running: Running | Gateway) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client: (name, labels) -> value."""
    gateway = running.gateway if isinstance(running, Running) else running
    with urllib.request.urlopen(f"http://{gateway.endpoints.ops}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(running: Running, name: str, want: float, **labels: str) -> Samples:
    """Scrape until the sample has the value (round closes run on the gateway's worker)."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(running)
        if value(samples, name, **labels) == want or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def http_status(address: str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def health_of(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


# ---- fixed defaults ---------------------------------------------------------------------


def test_default_ports_are_fixed_and_loopback() -> None:
    c = Config()
    assert c.internal_address == "127.0.0.1:7070"
    assert c.egress_address == "127.0.0.1:7071"
    assert c.ops_address == "127.0.0.1:9464"
    assert c.health_address == "127.0.0.1:7072"


# ---- metrics ----------------------------------------------------------------------------


def test_metrics_count_exactly_what_happened(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=3, min_trainers=3)
    try:
        before = scrape(running)
        assert value(before, "sluice_ready") == 1
        assert value(before, "sluice_round", model=TINY) == 1
        assert value(before, "sluice_round_state", model=TINY, state="open") == 1
        assert value(before, "process_resident_memory_bytes") > 0
        payload = random_delta(tiny_schema, seed=1)
        with TrainerClient(running.endpoints.internal, retry=NO_RETRY) as client:
            with pytest.raises(grpc.RpcError) as err:  # a schema hash of another model
                client.push_update(
                    model=TINY, round_no=1, base_version=0, schema_hash="0" * 64,
                    trainer="harbin-01", region="harbin", num_examples=1, payload=payload,
                )  # fmt: skip
            refused = err.value.code().name
            for i, name in enumerate(("shanghai-01", "beijing-01", "chengdu-01")):
                push(client, tiny_schema, random_delta(tiny_schema, seed=i), name, 10)
        samples = eventually(running, "sluice_releases_total", 1, model=TINY, outcome="published")
        assert value(samples, "sluice_pushes_total", model=TINY, status="OK") == 3
        assert value(samples, "sluice_pushes_total", model=TINY, status=refused) == 1
        assert value(samples, "sluice_push_bytes_total", model=TINY, status="OK") == 3 * len(
            payload
        )
        assert value(samples, "sluice_push_duration_seconds_count", status="OK") == 3
        assert value(samples, "sluice_updates_accepted_total", model=TINY) == 3
        assert value(samples, "sluice_audit_events_total", kind="push.accepted") == 3
        assert value(samples, "sluice_audit_events_total", kind="push.rejected") == 1
        assert value(samples, "sluice_rounds_ended_total", model=TINY, outcome="closed") == 1
        assert value(samples, "sluice_round_updates_sum", model=TINY) == 3
        assert value(samples, "sluice_round", model=TINY) == 2
        assert value(samples, "sluice_round_state", model=TINY, state="open") == 1
        assert value(samples, "sluice_rounds", model=TINY, state="closed") == 1
        assert value(samples, "sluice_model_version", model=TINY) == 1
        assert value(samples, "sluice_release_version", model=TINY) == 1
        assert value(samples, "sluice_open_calls", listener="internal", method=PUSH) == 0

        with EgressClient(running.endpoints.egress, retry=NO_RETRY) as egress:
            egress.pull(TINY, tmp_path / "model.onnx")
            with pytest.raises(grpc.RpcError) as err:
                egress.pull("no-such-model", tmp_path / "other.onnx")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        samples = scrape(running)
        pulled = (tmp_path / "model.onnx").stat().st_size
        assert (
            value(samples, "sluice_egress_requests_total", method="PullRelease", status="OK") == 1
        )
        assert (
            value(samples, "sluice_egress_requests_total", method="PullRelease", status="NOT_FOUND")
            == 1
        )
        assert value(samples, "sluice_egress_bytes_total", model=TINY) == pulled
        assert value(samples, "sluice_egress_refusals_total", reason="not_found") == 1
        assert value(samples, "sluice_guard_refusals_total", stage="egress", layer="files") == 0
    finally:
        running.gateway.stop()


PUSH = "/sluice.v1.TrainerService/PushUpdate"


def test_a_guard_refusal_at_egress_is_counted_by_layer(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=3, min_trainers=3)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for i, name in enumerate(("shanghai-01", "beijing-01", "chengdu-01")):
                push(client, tiny_schema, random_delta(tiny_schema, seed=i), name, 10)
        eventually(running, "sluice_releases_total", 1, model=TINY, outcome="published")
        path = running.data_dir / "registry" / TINY / "1" / "model.onnx"
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
        with EgressClient(running.endpoints.egress, retry=NO_RETRY) as egress:
            with pytest.raises(grpc.RpcError) as err:
                egress.pull(TINY, tmp_path / "model.onnx", version=1)
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
        samples = scrape(running)
        assert value(samples, "sluice_egress_refusals_total", reason="withheld") == 1
        refusals = {
            labels: n
            for (name, labels), n in samples.items()
            if name == "sluice_guard_refusals_total" and n
        }
        assert refusals and all(dict(labels)["stage"] == "egress" for labels in refusals)
        assert (
            value(samples, "sluice_egress_requests_total", method="PullRelease", status="DATA_LOSS")
            == 1
        )
    finally:
        running.gateway.stop()


def test_dp_epsilon_spent_is_shown_and_survives_a_restart(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    running = start_gateway(
        tmp_path / "gw", template_cache, dp_noise_multiplier=1.0, dp_clipping_norm=0.05
    )
    try:
        assert ("sluice_dp_epsilon_spent", (("model", TINY),)) not in scrape(running)
        with TrainerClient(running.endpoints.internal) as client:
            for i, name in enumerate(("shanghai-01", "beijing-01", "chengdu-01")):
                push(client, tiny_schema, random_delta(tiny_schema, seed=i), name, 10)
        eventually(running, "sluice_releases_total", 1, model=TINY, outcome="published")
        manifest = json.loads(running.gateway.store.list_releases(TINY)[0].manifest_json)
        spent = manifest["dp"]["epsilon"]
        assert 4.5 < spent < 5.0  # z = 1, q = 1, one round
        assert value(scrape(running), "sluice_dp_epsilon_spent", model=TINY) == spent
        running.restart()
        assert value(scrape(running), "sluice_dp_epsilon_spent", model=TINY) == spent
    finally:
        running.gateway.stop()


# ---- health -----------------------------------------------------------------------------


def test_health_follows_the_gateway_from_build_to_stop(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema
) -> None:
    data_dir = tmp_path / "gw"
    running = start_gateway(data_dir, template_cache)  # copies the templates in
    running.gateway.stop()
    config = running.config
    gateway = Gateway(config)  # built, not started: live, not ready
    release = threading.Event()
    stopping: threading.Thread | None = None
    try:
        ep = gateway.endpoints
        assert health_of(ep.health) == NOT_SERVING
        assert http_status(ep.ops, "/healthz") == 200
        assert http_status(ep.ops, "/readyz") == 503
        assert value(scrape(gateway), "sluice_ready") == 0
        assert gateway.start() == ep
        assert json.loads((data_dir / "endpoints.json").read_text()) == ep.__dict__
        for service in ("", "sluice.v1.TrainerService", "sluice.v1.EgressService"):
            assert health_of(ep.health, service) == SERVING
        assert http_status(ep.ops, "/readyz") == 200
        assert http_status(ep.ops, "/nothing") == 404

        # A push left open holds stop() for its grace period: meanwhile, not ready.
        def requests() -> Iterator[trainer_pb2.PushUpdateRequest]:
            payload = random_delta(tiny_schema, seed=1)
            yield trainer_pb2.PushUpdateRequest(header=update_header(tiny_schema, payload))
            release.wait(10)

        channel = grpc.insecure_channel(ep.internal)
        call = trainer_pb2_grpc.TrainerServiceStub(channel).PushUpdate.future(requests())
        deadline = time.monotonic() + 10
        while not value(scrape(gateway), "sluice_open_calls", listener="internal", method=PUSH):
            assert time.monotonic() < deadline, "the push never opened"
            time.sleep(0.05)
        stopping = threading.Thread(target=gateway.stop, kwargs={"grace": 3.0})
        stopping.start()
        deadline = time.monotonic() + 2
        while health_of(ep.health) != NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING while stopping"
            time.sleep(0.02)
        assert http_status(ep.ops, "/readyz") == 503
        assert stopping.is_alive()  # still draining: the probes saw it first
        release.set()
        stopping.join(10)
        channel.close()
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
    finally:
        release.set()
        if stopping is None:
            gateway.stop()
        else:
            stopping.join(10)


def test_health_of_the_ops_listener_needs_no_tls(tmp_path: Path, template_cache: Path) -> None:
    layout = init_pki(tmp_path / "pki", operators=["ops"])
    running = start_gateway(
        tmp_path / "gw", template_cache, insecure_loopback=False, pki_dir=layout.directory
    )
    try:
        assert health_of(running.endpoints.health) == SERVING  # plain text, no certificate
        with pytest.raises(grpc.RpcError) as err:
            health_of(running.endpoints.internal)  # the listeners themselves want mTLS
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.gateway.stop()


def test_ops_listeners_can_be_turned_off(tmp_path: Path, template_cache: Path) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, ops_address="", health_address="")
    try:
        assert running.endpoints.ops == running.endpoints.health == ""
        doc = json.loads((running.data_dir / "endpoints.json").read_text())
        assert doc["ops"] == doc["health"] == ""
    finally:
        running.gateway.stop()


# ---- logs -------------------------------------------------------------------------------


def test_denials_and_revocations_are_logged_and_counted(
    tmp_path: Path, template_cache: Path, caplog: pytest.LogCaptureFixture, gateway_logs: None
) -> None:
    layout = init_pki(
        tmp_path / "pki",
        trainers=[("shanghai-01", "shanghai")],
        readers=["global-team"],
        operators=["ops"],
    )
    running = start_gateway(
        tmp_path / "gw", template_cache, insecure_loopback=False, pki_dir=layout.directory
    )
    caplog.set_level(logging.INFO)
    try:
        reader = Identity.from_pki(layout.directory, "global-team")
        with TrainerClient(running.endpoints.internal, identity=reader, retry=NO_RETRY) as client:
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as err:
                    client.round(TINY)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        samples = scrape(running)
        assert (
            value(
                samples,
                "sluice_auth_denials_total",
                listener="internal",
                method="/sluice.v1.TrainerService/GetRound",
                code="PERMISSION_DENIED",
                role="reader",
            )
            == 2
        )
        metrics_text = urllib.request.urlopen(
            f"http://{running.endpoints.ops}/metrics", timeout=10
        ).read()
        assert b"global-team" not in metrics_text  # never a principal as a label value

        # The first denial is logged at once (the repeat is counted into the next row).
        (denied,) = [r for r in caplog.records if getattr(r, "event", "") == "auth.denied"]
        assert denied.name == "sluice.audit" and denied.levelno == logging.WARNING
        assert denied.principal == "global-team"  # type: ignore[attr-defined]
        assert denied.status == "PERMISSION_DENIED"  # type: ignore[attr-defined]
        assert denied.listener == "internal"  # type: ignore[attr-defined]
        assert str(denied.peer).startswith(("ipv4:", "ipv6:"))  # type: ignore[attr-defined]
        line = json.loads(JsonFormatter().format(denied))
        assert line["event"] == "auth.denied" and line["level"] == "warning"
        assert (
            line["principal"] == "global-team" and line["detail"]["status"] == "PERMISSION_DENIED"
        )

        ops = Identity.from_pki(layout.directory, "ops")
        serial = cert_serial(layout.client_cert("shanghai-01"))
        with AdminClient(running.endpoints.internal, identity=ops) as admin:
            admin.revoke(f"{serial:x}", "shanghai-01", "test: host lost")
        (revoked,) = [r for r in caplog.records if getattr(r, "event", "") == "cert.revoked"]
        assert revoked.subject == "shanghai-01"  # type: ignore[attr-defined]
        assert "host lost" in json.dumps(json.loads(JsonFormatter().format(revoked)))
        assert value(scrape(running), "sluice_audit_events_total", kind="cert.revoked") == 1
    finally:
        running.gateway.stop()


def test_pushes_and_pulls_are_logged_as_json_lines(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    caplog: pytest.LogCaptureFixture,
    gateway_logs: None,
) -> None:
    caplog.set_level(logging.INFO)
    running = start_gateway(tmp_path / "gw", template_cache, quorum=3, min_trainers=3)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for i, name in enumerate(("shanghai-01", "beijing-01", "chengdu-01")):
                push(client, tiny_schema, random_delta(tiny_schema, seed=i), name, 10)
        eventually(running, "sluice_releases_total", 1, model=TINY, outcome="published")
        with EgressClient(running.endpoints.egress) as egress:
            egress.pull(TINY, tmp_path / "model.onnx")
    finally:
        running.gateway.stop()
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    events = [line for line in lines if line["logger"] == "sluice.audit"]
    accepted = [e for e in events if e["event"] == "push.accepted"]
    assert sorted(e["principal"] for e in accepted) == ["beijing-01", "chengdu-01", "shanghai-01"]
    assert all(e["model"] == TINY and e["round"] == 1 and e["peer"] for e in accepted)
    (published,) = [e for e in events if e["event"] == "release.published"]
    assert published["version"] == 1 and published["level"] == "info"
    (pulled,) = [e for e in events if e["event"] == "egress.pull"]
    assert pulled["principal"] == "anonymous" and pulled["outcome"] == "sending"


def test_the_effective_configuration_is_logged_at_start(
    tmp_path: Path, template_cache: Path, caplog: pytest.LogCaptureFixture, gateway_logs: None
) -> None:
    caplog.set_level(logging.INFO)
    running = start_gateway(tmp_path / "gw", template_cache, quorum=7)
    running.gateway.stop()
    shown = {
        r.setting: r.value  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "sluice.config" and getattr(r, "event", "") == "config"
    }
    assert set(shown) == set(running.config.__dataclass_fields__)  # every setting, once
    assert shown["quorum"] == 7
    assert shown["data_dir"] == str((tmp_path / "gw").resolve())
    assert shown["pki_dir"] == str((tmp_path / "gw" / "pki").resolve())  # its effective value
    assert shown["ops_address"] == "127.0.0.1:0" and shown["models"] == [TINY]
    for record in caplog.records:
        if record.name == "sluice.config":
            json.loads(JsonFormatter().format(record))  # every line is one JSON object


def test_text_log_lines_cannot_be_forged_by_a_caller(
    tmp_path: Path,
    template_cache: Path,
    tiny_schema: Schema,
    caplog: pytest.LogCaptureFixture,
    gateway_logs: None,
) -> None:
    caplog.set_level(logging.INFO)
    running = start_gateway(tmp_path / "gw", template_cache)
    try:
        payload = random_delta(tiny_schema, seed=1)
        client = TrainerClient(running.endpoints.internal, retry=NO_RETRY)
        with client, pytest.raises(grpc.RpcError):
            client.push_update(
                model=TINY, round_no=1, base_version=0, schema_hash="0" * 64,
                trainer="evil\nINFO sluice.audit: forged", region="x", num_examples=1,
                payload=payload,
            )  # fmt: skip
    finally:
        running.gateway.stop()
    (rejected,) = [r for r in caplog.records if getattr(r, "event", "") == "push.rejected"]
    assert "\n" not in rejected.getMessage() and "\\x0a" in rejected.getMessage()


def test_sluice_serve_logs_json_lines_only_and_can_dump_no_core(
    tmp_path: Path, template_cache: Path
) -> None:
    data_dir = tmp_path / "gw"
    shutil.copytree(template_cache, data_dir / "templates")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.gateway.cli", "serve", "--log-format", "json",
         "--data-dir", str(data_dir), "--models", TINY, "--insecure-loopback"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (data_dir / "endpoints.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        ops = json.loads((data_dir / "endpoints.json").read_text())["ops"]
        # endpoints.json names the bound ports a moment before the gateway says it is ready
        while http_status(ops, "/readyz") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "serve never ready"
            time.sleep(0.05)
        # Its keys never reach a core file: no soft or hard limit above 0 (raising the hard
        # limit back takes privileges the gateway does not use).
        (limit,) = [x for x in Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
                    if x.startswith("Max core file size")]  # fmt: skip
        assert limit.split()[4:6] == ["0", "0"], limit
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines()]  # every line is one JSON object
    settings = {line["setting"] for line in lines if line.get("event") == "config"}
    assert settings == set(Config.__dataclass_fields__)
    (started,) = [line for line in lines if line.get("event") == "gateway.started"]
    assert started["logger"] == "sluice.audit" and started["detail"]["models"] == [TINY]


# ---- ports ------------------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


@pytest.mark.parametrize("setting", ["internal_address", "egress_address", "ops_address"])
def test_a_port_in_use_fails_the_start_at_once_before_templates(
    tmp_path: Path, busy_port: int, setting: str
) -> None:
    data_dir = tmp_path / "gw"  # no templates: a start that got that far would build them
    config = Config(data_dir=data_dir, models=(TINY,), insecure_loopback=True).replace(
        **{**EPHEMERAL, setting: f"127.0.0.1:{busy_port}"}
    )
    started = time.monotonic()
    with pytest.raises(StartupError, match=rf"^port 127\.0\.0\.1:{busy_port} \(.*\) is in use: "):
        Gateway(config)
    assert time.monotonic() - started < 2.0
    assert list(tmp_path.iterdir()) == []  # the data dir this first start made is gone
    data_dir.mkdir()  # one that existed before the start stays, unlocked
    with pytest.raises(StartupError, match="is in use: "):
        Gateway(config)
    assert not (data_dir / "templates").exists()
    assert not (data_dir / "endpoints.json").exists()
    fd = os.open(data_dir, os.O_RDONLY)  # the data dir's lock went with the failed start
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_sluice_serve_says_which_port_is_in_use_in_one_line(
    tmp_path: Path, busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    code = main(["serve", "--data-dir", str(tmp_path / "gw"), "--models", TINY,
                 "--insecure-loopback", "--internal", f"127.0.0.1:{busy_port}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.monotonic() - started < 2.0
    assert err.splitlines() == [
        f"sluice serve: port 127.0.0.1:{busy_port} (internal listener) is in use: Address "
        "already in use; stop what listens there, or set internal_address (sluice.toml, "
        "SLUICE_INTERNAL_ADDRESS or its flag)"
    ]


def test_two_listeners_on_one_port_are_refused(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "gw", models=(TINY,), insecure_loopback=True).replace(
        **{**EPHEMERAL, "ops_address": "127.0.0.1:7999", "health_address": "127.0.0.1:7999"}
    )
    with pytest.raises(StartupError, match="ops_address and health_address are both"):
        Gateway(config)
