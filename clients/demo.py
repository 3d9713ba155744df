"""`make demo`: a gateway, four regional trainers, three rounds, and the global team's pull."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sluice.clients.progress import Board
from sluice.clients.scenes import describe, make_clips
from sluice.clients.sdk import EgressClient, Identity
from sluice.clients.simulate import (
    DEFAULT_REGIONS,
    RoundReport,
    SimulationConfig,
    TrainerFailed,
    TrainerSpec,
    plan_trainers,
    simulate,
)
from sluice.clients.simulate_cli import watch
from sluice.clients.trainer import loss_np
from sluice.models.manifest import MODEL_FILE, load_public_key

PUBLIC_FILE = "release-signing.pub"  # written by the gateway next to its private key

LISTENERS = ("INTERNAL", "EGRESS", "OPS", "HEALTH")  # SLUICE_<NAME>_ADDRESS settings
GLOBAL_TEAM = "global-team"  # the reader principal outside the region
BENCHMARK_SEED = 7_000_000  # held-out scenes, disjoint from every trainer's private seeds


# A line of the gateway's text log: "2026-01-01 12:00:00,000 INFO sluice.gateway.x: message".
_LOG_LINE = re.compile(r"^\S+ \S+ (INFO|WARNING|ERROR|CRITICAL) (sluice\.[\w.]+): (.*)$")


def _say(text: str) -> None:
    print(text, flush=True)


class GatewayLog:
    """Echoes the gateway's own log lines as they are written: what sluice.gateway.* says
    (building the template, each round as it closes, each release) and any warning. Not
    the audit trail's or the configuration's lines: `sluice audit`, the log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.say: Callable[[str], None] = _say
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    @contextmanager
    def into(self, say: Callable[[str], None]) -> Iterator[None]:
        """Lines go to say() meanwhile (a Board's line, above its bars)."""
        self.say = say
        try:
            yield
        finally:
            self.say = _say

    def __enter__(self) -> GatewayLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join()

    def _follow(self) -> None:
        offset, partial = 0, b""
        while not self._stopping.wait(0.2):
            try:
                with self.path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            offset += len(data)
            *lines, partial = (partial + data).split(b"\n")
            for raw in lines:
                match = _LOG_LINE.match(raw.decode(errors="replace"))
                if match and match[1] != "INFO":
                    self.say(f"  gateway: {match[1]}: {match[3]}")
                elif match and match[2].startswith("sluice.gateway."):
                    self.say(f"  gateway: {match[3]}")


def make_pki(pki: Path, trainers: list[TrainerSpec]) -> None:
    """Certificates for every trainer, the global team and an operator (`sluice init`)."""
    args = [sys.executable, "-m", "sluice.gateway.cli", "init", str(pki)]
    for t in trainers:
        args += ["--trainer", f"{t.trainer}:{t.region}"]
    args += ["--reader", GLOBAL_TEAM, "--operator", "ops"]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def start_gateway(
    data_dir: Path, quorum: int, log_path: Path
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    endpoints = data_dir / "endpoints.json"
    endpoints.unlink(missing_ok=True)
    log = log_path.open("wb")
    # Every listener on a port the OS picks (endpoints.json names them): the demo never
    # collides with a gateway, or anything else, already on the fixed default ports.
    ports = {f"SLUICE_{name}_ADDRESS": "127.0.0.1:0" for name in LISTENERS}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluice.gateway.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--models",
            "drivenet",
            "--quorum",
            str(quorum),
            "--min-trainers",
            "3",
            "--pki",
            str(data_dir / "pki"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **ports},
    )
    deadline = time.monotonic() + 300
    while not endpoints.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the gateway did not start; see {log_path}")
        time.sleep(0.2)
    return proc, json.loads(endpoints.read_text())


def evaluate_release(path: Path, regions: list[str], clips: int) -> dict[str, float]:
    """The global team's view: run the pulled ONNX file in onnxruntime on benchmark scenes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    losses = {}
    for i, region in enumerate(regions):
        batch = make_clips(region, clips, seed=BENCHMARK_SEED + i)
        controls, lanes = session.run(["controls", "lanes"], {"frames": batch.frames.numpy()})
        losses[region] = loss_np(np.asarray(controls), np.asarray(lanes), batch)
    return losses


def write_report(data_dir: Path, model: str, out_dir: Path) -> Path:
    """`sluice report` on the demo's data: a page of its rounds. A subprocess, as the
    gateway itself is: clients never import the gateway's code."""
    done = subprocess.run(
        [sys.executable, "-m", "sluice.gateway.cli", "report", "--data-dir", str(data_dir),
         "--model", model, "--out", str(out_dir)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"`sluice report` failed ({done.returncode}): {done.stderr.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", type=Path, default=Path(".sluice/demo"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--clips", type=int, default=SimulationConfig.clips)
    p.add_argument("--benchmark-clips", type=int, default=256)
    args = p.parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; the gateway and every trainer were stopped", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    regions = list(DEFAULT_REGIONS)
    data_dir: Path = args.data_dir
    log_path = data_dir / "gateway.log"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    print("Sluice demo: regional trainers inside the region, the global team outside.\n")
    for region in regions:
        print(f"  {region:>9}: {describe(region)}")
    trainers = plan_trainers(args.trainers, regions)
    pki = data_dir / "pki"
    print(
        f"\ncreating a development PKI in {pki} (`sluice init`): a CA, listener certificates, "
        f"{len(trainers)} trainers, {GLOBAL_TEAM} and an operator",
        flush=True,
    )
    make_pki(pki, trainers)
    print(f"starting the gateway (log: {log_path}); it builds DriveNet's ONNX template first")
    starting = time.monotonic()
    releases_dir = data_dir / GLOBAL_TEAM
    with GatewayLog(log_path) as gateway_log:
        with Board(["gateway"]) as board, gateway_log.into(board.line):
            board.update("gateway", "starting")
            proc, endpoints = start_gateway(data_dir, args.trainers, log_path)
        print(
            f"gateway up in {time.monotonic() - starting:.0f}s, mTLS on both listeners: "
            f"internal {endpoints['internal']}, egress {endpoints['egress']}",
            flush=True,
        )
        try:
            config = SimulationConfig(
                target=endpoints["internal"], rounds=args.rounds, clips=args.clips, pki_dir=pki
            )
            print(
                f"\n{len(trainers)} trainer processes x {args.rounds} rounds "
                "(private clips stay in each):",
                flush=True,
            )
            with watch(trainers) as view, gateway_log.into(view.line):
                reports = simulate(config, trainers, view)
            table = _pull_releases(args, data_dir, endpoints, regions)
        except TrainerFailed as exc:
            print(f"\ndemo: {exc.failure}; the gateway's log: {log_path}", file=sys.stderr)
            return 1
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    _print_losses(table, reports, regions)
    print("\nwriting the report (`sluice report`) from the gateway's database", flush=True)
    try:
        report, report_ok = str(write_report(data_dir, "drivenet", data_dir / "report")), True
    except RuntimeError as exc:
        report, report_ok = f"FAIL: {exc}", False
    pulled = sorted((d.name for d in releases_dir.iterdir()), key=lambda name: int(name[1:]))
    print("\nwhere things are:")
    print(f"  data dir     {data_dir} (sluice.db, blobs/, registry/, pki/, keys/)")
    print(f"  gateway log  {log_path}")
    print(f"  releases     {releases_dir}: {', '.join(pulled)} (as pulled and verified)")
    print(f"  report       {report}")
    merged_by_round = [float(np.mean(list(v.values()))) for _, v in sorted(table.items())]
    elapsed = time.monotonic() - started
    if any(later >= earlier for earlier, later in itertools.pairwise(merged_by_round)):
        print(f"\nFAIL: merged loss did not fall every round ({merged_by_round}), {elapsed:.0f}s")
        return 1
    print(
        f"\nmerged loss fell {merged_by_round[0]:.4f} -> {merged_by_round[-1]:.4f}; "
        f"{elapsed:.0f}s in all"
    )
    return 0 if report_ok else 1


def _print_losses(
    table: dict[int, dict[str, float]], reports: list[RoundReport], regions: list[str]
) -> None:
    print("\nheld-out loss of the merged model (onnxruntime), per region and overall:")
    print("round | " + " | ".join(f"{r:>9}" for r in regions) + " |    merged")
    for round_no, losses in sorted(table.items()):
        merged = float(np.mean(list(losses.values())))
        cells = " | ".join(f"{losses[r]:9.4f}" for r in regions)
        print(f"{round_no:5d} | {cells} | {merged:9.4f}")
    local = {
        r.round: float(np.mean([x.holdout_before for x in reports if x.round == r.round]))
        for r in reports
    }
    print("\ntrainers' own view, global model on their private held-out clips before training:")
    print("  " + ", ".join(f"round {k}: {v:.4f}" for k, v in sorted(local.items())))


def _pull_releases(
    args: argparse.Namespace, data_dir: Path, endpoints: dict[str, str], regions: list[str]
) -> dict[int, dict[str, float]]:
    """The global team's side: every release pulled through egress, verified and run."""
    reader = Identity.from_pki(data_dir / "pki", GLOBAL_TEAM)
    with EgressClient(endpoints["egress"], identity=reader) as egress:
        deadline = time.monotonic() + 300
        while len(egress.releases("drivenet")) < args.rounds:
            if time.monotonic() > deadline:
                raise RuntimeError("the last round produced no release in time")
            time.sleep(0.2)
        # The global team is given the gateway's public key out of band; here, a file.
        public_key = load_public_key(data_dir / "keys" / PUBLIC_FILE)
        print(
            "\nthe global team pulls every release through the egress listener, verifies it "
            "(signature, sha256, format check) and runs it on benchmark scenes:",
            flush=True,
        )
        table: dict[int, dict[str, float]] = {}
        for release in sorted(egress.releases("drivenet"), key=lambda r: r.version):
            dest = data_dir / GLOBAL_TEAM / f"v{release.version}"
            manifest = egress.pull_release("drivenet", dest, public_key, release.version)
            (listed,) = manifest["files"]
            table[release.round] = evaluate_release(
                dest / MODEL_FILE, regions, args.benchmark_clips
            )
            merged = float(np.mean(list(table[release.round].values())))
            print(
                f"  v{release.version}: {listed['size']:,} bytes, sha256 "
                f"{listed['sha256'][:16]}..., signed by {manifest['signing_key_id']}, "
                f"{manifest['num_trainers']} trainers from {manifest['num_regions']} regions; "
                f"merged loss {merged:.4f}",
                flush=True,
            )
    return table


if __name__ == "__main__":
    sys.exit(main())
