"""`make demo`: a gateway, four regional trainers, three rounds, and the global team's pull."""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sluice.clients.scenes import describe, make_clips
from sluice.clients.sdk import EgressClient, Identity
from sluice.clients.simulate import (
    DEFAULT_REGIONS,
    SimulationConfig,
    TrainerSpec,
    plan_trainers,
    simulate,
)
from sluice.clients.trainer import loss_np
from sluice.models.manifest import MODEL_FILE, load_public_key

PUBLIC_FILE = "release-signing.pub"  # written by the gateway next to its private key

GLOBAL_TEAM = "global-team"  # the reader principal outside the region
BENCHMARK_SEED = 7_000_000  # held-out scenes, disjoint from every trainer's private seeds


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", type=Path, default=Path(".sluice/demo"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--clips", type=int, default=SimulationConfig.clips)
    p.add_argument("--benchmark-clips", type=int, default=256)
    args = p.parse_args(argv)
    started = time.monotonic()
    regions = list(DEFAULT_REGIONS)
    shutil.rmtree(args.data_dir, ignore_errors=True)
    args.data_dir.mkdir(parents=True)
    print("Sluice demo: regional trainers inside the region, the global team outside.\n")
    for region in regions:
        print(f"  {region:>9}: {describe(region)}")
    trainers = plan_trainers(args.trainers, regions)
    pki = args.data_dir / "pki"
    make_pki(pki, trainers)
    proc, endpoints = start_gateway(args.data_dir, args.trainers, args.data_dir / "gateway.log")
    print(
        f"\ngateway up, mTLS on both listeners: internal {endpoints['internal']}, "
        f"egress {endpoints['egress']}"
    )
    try:
        config = SimulationConfig(
            target=endpoints["internal"], rounds=args.rounds, clips=args.clips, pki_dir=pki
        )
        print(
            f"{len(trainers)} trainer processes x {args.rounds} rounds (private clips stay in each)"
        )
        reports = simulate(config, trainers)
        reader = Identity.from_pki(pki, GLOBAL_TEAM)
        with EgressClient(endpoints["egress"], identity=reader) as egress:
            deadline = time.monotonic() + 300
            while len(egress.releases("drivenet")) < args.rounds:
                if time.monotonic() > deadline:
                    raise RuntimeError("the last round produced no release in time")
                time.sleep(0.2)
            # The global team is given the gateway's public key out of band; here, a file.
            public_key = load_public_key(args.data_dir / "keys" / PUBLIC_FILE)
            print(
                "\nthe global team pulls every release through the egress listener and "
                "verifies it (signature, sha256, format check):"
            )
            table: dict[int, dict[str, float]] = {}
            for release in sorted(egress.releases("drivenet"), key=lambda r: r.version):
                dest = args.data_dir / "global-team" / f"v{release.version}"
                manifest = egress.pull_release("drivenet", dest, public_key, release.version)
                (listed,) = manifest["files"]
                print(
                    f"  v{release.version}: {listed['size']:,} bytes, sha256 "
                    f"{listed['sha256'][:16]}..., signed by {manifest['signing_key_id']}, "
                    f"{manifest['num_trainers']} trainers from {manifest['num_regions']} regions"
                )
                table[release.round] = evaluate_release(
                    dest / MODEL_FILE, regions, args.benchmark_clips
                )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
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
    merged_by_round = [float(np.mean(list(v.values()))) for _, v in sorted(table.items())]
    elapsed = time.monotonic() - started
    if any(later >= earlier for earlier, later in itertools.pairwise(merged_by_round)):
        print(f"\nFAIL: merged loss did not fall every round ({merged_by_round}), {elapsed:.0f}s")
        return 1
    print(
        f"\nmerged loss fell {merged_by_round[0]:.4f} -> {merged_by_round[-1]:.4f}; "
        f"{elapsed:.0f}s in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
