"""Each role's view from the CLI against a live gateway: `status` (human and --json) after
real rounds, `releases`, `audit list/export` with filters, `close-round` without --round,
and `pull` resumed by a second process after the first was interrupted."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sluice.clients.sdk import EgressClient, TrainerClient
from sluice.gateway.cli import main
from sluice.gateway.cli.common import Exit
from sluice.gateway.export import gate as gate_module
from sluice.models.schema import Schema
from tests.conftest import TINY, Running, random_delta, start_gateway
from tests.integration.test_round import _publish_one, push, wait_for_round


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    return code, out, err


def internal(running: Running) -> list[str]:
    return ["--target", running.endpoints.internal, "--insecure"]


def egress(running: Running) -> list[str]:
    return ["--egress", running.endpoints.egress, "--insecure"]


# --- status ---------------------------------------------------------------------------


def test_status_after_a_round_human_and_json(
    gateway: Running, tiny_schema: Schema, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_one(gateway, tiny_schema)  # three trainers: round 1 -> version 1, released
    with TrainerClient(gateway.endpoints.internal) as client:
        push(client, tiny_schema, random_delta(tiny_schema, 7), "shanghai-01", 5, 2, 1)
    code, out, _ = run(["status", *internal(gateway)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{TINY}: round 2 open on version 1, latest version 1"
    assert lines[1].startswith("  deadline  ") and "(in " in lines[1]
    assert "1 update from 1 trainer; quorum 3, at the deadline 1" in lines[2]
    assert "FedAvg; a release needs k=3 trainers" in lines[3]
    assert lines[4] == "  privacy   DP off"
    assert lines[5].startswith("  releases  v1 (") and "3 trainers" in lines[5]
    assert not any("FAILED" in line for line in lines)

    code, out, _ = run(["status", *internal(gateway), "--json"], capsys)
    doc = json.loads(out)
    (m,) = doc["models"]
    assert m["model"] == TINY
    r = m["round"]
    assert (r["number"], r["state"], r["base_version"]) == (2, "open", 1)
    assert (r["updates"], r["trainers"], r["close_error"]) == (1, 1, None)
    assert r["opened_unix_ms"] <= doc["now_unix_ms"] < r["deadline_unix_ms"]
    assert r["deadline_unix_ms"] - r["opened_unix_ms"] == 600_000  # round_seconds
    assert m["policy"] == {
        "strategy": "FedAvg",
        "fedbuff": False,
        "quorum": 3,
        "min_updates": 1,
        "min_trainers": 3,
    }
    assert m["dp"] == {"enabled": False, "epsilon_spent": None, "max_epsilon": None}
    assert (m["latest_version"], m["latest_release"], m["failed_round"]) == (1, 1, None)
    (rel,) = m["releases"]
    on_disk = gateway.data_dir / "registry" / TINY / "1" / "model.onnx"
    assert rel["version"] == 1 and rel["round"] == 1 and rel["num_trainers"] == 3
    assert (rel["num_files"], rel["total_bytes"]) == (1, on_disk.stat().st_size)
    assert rel["created_unix_ms"] <= doc["now_unix_ms"]

    code, _, err = run(["status", *internal(gateway), "--model", "nosuch"], capsys)
    assert code == Exit.REFUSED and f"no model 'nosuch' ({TINY})" in err


def test_status_shows_dp_epsilon_spent(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, capsys: pytest.CaptureFixture[str]
) -> None:
    running = start_gateway(
        tmp_path / "gw",
        template_cache,
        dp_noise_multiplier=1.0,
        dp_clipping_norm=0.05,
        dp_max_epsilon=9.0,
    )
    try:
        code, out, _ = run(["status", *internal(running), "--json"], capsys)
        assert code == 0
        before = json.loads(out)["models"][0]["dp"]
        assert before == {"enabled": True, "epsilon_spent": 0.0, "max_epsilon": 9.0}
        _publish_one(running, tiny_schema)
        _, out, _ = run(["status", *internal(running), "--json"], capsys)
        dp = json.loads(out)["models"][0]["dp"]
        manifest = json.loads(
            (running.data_dir / "registry" / TINY / "1" / "manifest.json").read_text()
        )
        assert dp["epsilon_spent"] == pytest.approx(manifest["dp"]["epsilon"])
        assert 0 < dp["epsilon_spent"] <= 9.0
        _, out, _ = run(["status", *internal(running)], capsys)
        assert f"DP epsilon spent {dp['epsilon_spent']:.3g} of at most 9" in out
    finally:
        running.gateway.stop()


def test_status_shows_a_failed_round(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, capsys: pytest.CaptureFixture[str]
) -> None:
    # Krum with f = 1 needs 2f + 3 = 5 updates: a round closed by a quorum of 2 fails.
    krum = {TINY: {"name": "Krum", "num_malicious_clients": 1}}
    running = start_gateway(tmp_path / "gw", template_cache, quorum=2, strategies=krum)
    try:
        with TrainerClient(running.endpoints.internal) as client:
            push(client, tiny_schema, random_delta(tiny_schema, 1), "shanghai-01", 5)
            push(client, tiny_schema, random_delta(tiny_schema, 2), "beijing-01", 5)
            wait_for_round(client, 2)
        code, out, _ = run(["status", *internal(running)], capsys)
        assert code == 0
        assert out.startswith(f"{TINY}: round 2 open on version 0")
        assert "  policy    Krum;" in out
        failed = [line for line in out.splitlines() if "FAILED" in line]
        assert len(failed) == 1 and failed[0].startswith("  FAILED    round 1: ")
        assert "needs at least 2f + 3 = 5 updates" in failed[0]
        code, out, _ = run(["status", *internal(running), "--json"], capsys)
        gone = json.loads(out)["models"][0]["failed_round"]
        assert gone["number"] == 1 and "2f + 3" in gone["reason"]
    finally:
        running.gateway.stop()


# --- close-round ----------------------------------------------------------------------


def test_close_round_without_round_closes_the_open_one_and_exits_1_when_refused(
    tmp_path: Path, template_cache: Path, tiny_schema: Schema, capsys: pytest.CaptureFixture[str]
) -> None:
    running = start_gateway(tmp_path / "gw", template_cache, quorum=10, min_trainers=3)
    close = ["close-round", *internal(running), "--model", TINY]
    try:
        with TrainerClient(running.endpoints.internal) as client:
            for i, name in enumerate(["shanghai-01", "beijing-01"]):
                push(client, tiny_schema, random_delta(tiny_schema, i), name, 5)
            code, out, _ = run(close, capsys)  # two trainers, k = 3: no release
            assert code == Exit.REFUSED
            assert out.startswith(f"round 1 of {TINY}: version 1, NOT released: ")
            assert "aggregates 2 distinct trainers" in out
            code, out, _ = run([*close, "--round", "1"], capsys)  # asked again: the same
            assert code == Exit.REFUSED and "(the round had already been closed)" in out
            for i, name in enumerate(["shanghai-01", "beijing-01", "chengdu-01"]):
                push(client, tiny_schema, random_delta(tiny_schema, 10 + i), name, 5, 2, 1)
            code, out, _ = run(close, capsys)
        assert code == 0 and out.strip() == f"round 2 of {TINY}: version 2, released"
    finally:
        running.gateway.stop()


# --- releases -------------------------------------------------------------------------


def test_releases_for_the_global_team(
    gateway: Running, tiny_schema: Schema, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["releases", *egress(gateway)], capsys)
    assert code == 0 and out.strip() == "no published release"
    _publish_one(gateway, tiny_schema)
    code, out, _ = run(["releases", *egress(gateway), "--model", TINY], capsys)
    (line,) = out.splitlines()
    assert line.startswith(f"{TINY} v1  round 1  ") and "3 trainers" in line
    assert "(model.onnx)" in line and "WITHHELD" not in line
    code, out, _ = run(["releases", *egress(gateway), "--json"], capsys)
    (rel,) = json.loads(out)["releases"]
    manifest = json.loads(
        (gateway.data_dir / "registry" / TINY / "1" / "manifest.json").read_text()
    )
    assert (rel["model"], rel["version"], rel["num_trainers"], rel["withheld"]) == (
        TINY,
        1,
        3,
        False,
    )
    assert rel["files"] == [
        {"name": f["name"], "size": f["size"], "sha256": f["sha256"]} for f in manifest["files"]
    ]


# --- audit list / export -----------------------------------------------------------------


def test_audit_list_and_export_with_filters(
    gateway: Running, tiny_schema: Schema, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_one(gateway, tiny_schema)
    with EgressClient(gateway.endpoints.egress) as client:
        client.releases(TINY)
    data = ["--data-dir", str(gateway.data_dir)]
    everything = gateway.gateway.store.audit_entries()

    code, out, _ = run(["audit", "list", *data, "--limit", "0"], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == len(everything)
    assert lines[0].split()[:3][0] == "1" and "gateway.started" in lines[0]

    code, out, _ = run(["audit", "list", *data, "--limit", "2", "--json"], capsys)
    newest = [json.loads(line) for line in out.splitlines()]
    assert [e["seq"] for e in newest] == [e.seq for e in everything[-2:]]  # oldest first

    code, out, _ = run(["audit", "list", *data, "--kind", "push.accepted", "--json"], capsys)
    pushes = [json.loads(line) for line in out.splitlines()]
    assert len(pushes) == 3 and {e["kind"] for e in pushes} == {"push.accepted"}
    code, out, _ = run(["audit", "list", *data, "--kind", "push", "--kind", "egress.*"], capsys)
    kinds = {line.split()[2] for line in out.splitlines()}
    assert "push.accepted" in kinds and "egress.list" in kinds
    assert all(k.startswith(("push.", "egress.")) for k in kinds)

    code, out, _ = run(["audit", "list", *data, "--principal", "beijing-01", "--json"], capsys)
    mine = [json.loads(line) for line in out.splitlines()]
    assert mine and {e["actor"] for e in mine} == {"beijing-01"}

    code, out, err = run(["audit", "list", *data, "--since", "2999-01-01"], capsys)
    assert code == 0 and out == "" and "no audit entry matches" in err
    for ago in ("--since", "1h"), ("--since=-30m",):
        code, out, _ = run(["audit", "list", *data, *ago, "--limit", "0"], capsys)
        assert len(out.splitlines()) == len(everything)

    jsonl = tmp_path / "audit.jsonl"
    code, _, err = run(["audit", "export", *data, "--kind", "round", "--out", str(jsonl)], capsys)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    expected = [e for e in everything if e.kind.startswith("round.")]
    assert code == 0 and [r["seq"] for r in rows] == [e.seq for e in expected]
    assert rows[0]["hash"] == expected[0].hash and rows[0]["detail"] == dict(expected[0].detail)
    assert f"{len(rows)} audit entries" in err
    table = tmp_path / "audit.csv"
    code, _, _ = run(["audit", "export", *data, "--format", "csv", "--out", str(table)], capsys)
    with table.open(newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(everything) and records[-1]["hash"] == everything[-1].hash
    code, out, _ = run(["audit", "export", *data, "--limit", "1"], capsys)  # stdout
    assert json.loads(out)["kind"] == "gateway.started"

    code, _, err = run(["audit", "list", "--data-dir", str(tmp_path / "none")], capsys)
    assert code == Exit.USAGE and "sluice audit list: " in err and "does not exist" in err
    with pytest.raises(SystemExit) as bad:
        main(["audit", "list", *data, "--since", "yesterday"])
    assert bad.value.code == 2


# --- pull, resumed across processes --------------------------------------------------------


@pytest.fixture
def many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_module, "SEND_CHUNK_BYTES", 4096)  # a tiny file in many chunks


def test_pull_resumes_in_a_new_process_after_ctrl_c(
    gateway: Running,
    tiny_schema: Schema,
    tmp_path: Path,
    many_chunks: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _publish_one(gateway, tiny_schema)
    key = gateway.data_dir / "keys" / "release-signing.pub"
    out = tmp_path / "out"
    pull = ["pull", *egress(gateway), "--model", TINY, "--public-key", str(key), "--out", str(out)]
    real = EgressClient._pull_serialized  # what pull() reads: the messages' bytes

    def cut_after_five_chunks(
        self: EgressClient, *args: object, **kwargs: object
    ) -> Iterator[bytes]:
        stream = real(self, *args, **kwargs)  # type: ignore[arg-type]
        for i, msg in enumerate(stream):
            yield msg
            if i == 5:  # the header and five chunks
                stream.close()  # type: ignore[attr-defined]  # the call is cancelled
                raise KeyboardInterrupt

    monkeypatch.setattr(EgressClient, "_pull_serialized", cut_after_five_chunks)
    code, _, err = run(pull, capsys)
    assert code == Exit.INTERRUPTED and "the same command resumes" in err
    assert not out.exists()
    (partial,) = (tmp_path / ".out.pull").glob(".model.onnx.*.part")  # kept for the next run
    assert partial.stat().st_size == 5 * 4096
    monkeypatch.setattr(EgressClient, "_pull_serialized", real)

    done = subprocess.run(
        [sys.executable, "-m", "sluice.gateway.cli", *pull],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    model = (out / "model.onnx").read_bytes()
    assert hashlib.sha256(model).hexdigest() == manifest["files"][0]["sha256"]
    assert not (tmp_path / ".out.pull").exists()  # the partial files went with success
    asked = [
        e.detail["offset"]
        for e in gateway.gateway.store.audit_entries("egress.pull")
        if e.subject.endswith("model.onnx")
    ]
    assert asked == [0, 5 * 4096]  # the second process asked only for the rest


def test_a_partial_of_another_release_is_discarded(
    gateway: Running, tiny_schema: Schema, tmp_path: Path
) -> None:
    _publish_one(gateway, tiny_schema)
    staging = tmp_path / ".out.pull"
    staging.mkdir()
    stale = staging / f".model.onnx.{'0' * 32}.part"
    stale.write_bytes(b"another release's bytes")
    from sluice.models.manifest import load_public_key

    key = load_public_key(gateway.data_dir / "keys" / "release-signing.pub")
    with EgressClient(gateway.endpoints.egress) as client:
        doc = client.pull_release(TINY, tmp_path / "out", key)
    assert doc["version"] == 1 and not staging.exists()
    asked = [e.detail["offset"] for e in gateway.gateway.store.audit_entries("egress.pull")]
    assert asked == [0]


def test_a_partial_file_that_is_no_prefix_starts_over(
    gateway: Running, tiny_schema: Schema, tmp_path: Path
) -> None:
    """Bytes that rotted in a partial file fail the sha256 at the end: pulled again from 0."""
    _publish_one(gateway, tiny_schema)
    manifest = json.loads(
        (gateway.data_dir / "registry" / TINY / "1" / "manifest.json").read_text()
    )
    staging = tmp_path / ".out.pull"
    staging.mkdir()
    (staging / f".model.onnx.{manifest['files'][0]['sha256'][:32]}.part").write_bytes(bytes(4096))
    from sluice.models.manifest import load_public_key

    key = load_public_key(gateway.data_dir / "keys" / "release-signing.pub")
    with EgressClient(gateway.endpoints.egress) as client:
        assert client.pull_release(TINY, tmp_path / "out", key)["version"] == 1
    asked = [e.detail["offset"] for e in gateway.gateway.store.audit_entries("egress.pull")]
    assert asked == [4096, 0] and not staging.exists()


def test_a_refused_pull_leaves_no_partial_file(
    gateway: Running, tiny_schema: Schema, tmp_path: Path
) -> None:
    """A partial file is kept for a pull that was cut off, never for one that was refused:
    here the release changed on disk since the partial was written (DATA_LOSS)."""
    _publish_one(gateway, tiny_schema)
    path = gateway.data_dir / "registry" / TINY / "1" / "model.onnx"
    manifest = json.loads(path.with_name("manifest.json").read_text())
    client_dir = tmp_path / "client"
    staging = client_dir / ".out.pull"
    staging.mkdir(parents=True)
    raw = bytearray(path.read_bytes())
    (staging / f".model.onnx.{manifest['files'][0]['sha256'][:32]}.part").write_bytes(raw[:4096])
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    from sluice.models.manifest import load_public_key

    key = load_public_key(gateway.data_dir / "keys" / "release-signing.pub")
    with EgressClient(gateway.endpoints.egress) as client, pytest.raises(grpc.RpcError) as err:
        client.pull_release(TINY, client_dir / "out", key)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert not list(client_dir.iterdir())


def test_pull_shows_progress_lines_when_not_a_terminal(
    gateway: Running,
    tiny_schema: Schema,
    tmp_path: Path,
    many_chunks: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sluice.clients import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line for every chunk
    _publish_one(gateway, tiny_schema)
    key = gateway.data_dir / "keys" / "release-signing.pub"
    out = tmp_path / "out"
    code, _, err = run(
        ["pull", *egress(gateway), "--model", TINY, "--public-key", str(key), "--out", str(out)],
        capsys,
    )
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith(f"{TINY} v1 model.onnx: ")]
    assert len(lines) > 5 and "(100%)" in lines[-1] and "\x1b" not in err
