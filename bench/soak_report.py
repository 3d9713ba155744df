"""The soak's summary: every number of a run, its PASS/FAIL checks, and the text printed."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common import MB, Check, machine
from bench.soak_probe import (
    SAMPLE_S,
    Sample,
    floors,
    percentile,
)
from bench.soak_settings import (
    FD_SLACK,
    KEEP_ROUNDS,
    KEEP_VERSIONS,
    MIN_TRAINERS,
    MODEL,
    POLL_S,
    RSS_GROWTH,
    THREAD_SLACK,
    TRAIN_S,
    TRANSIENT_THREADS,
)

if TYPE_CHECKING:
    from bench.soak import Tally


@dataclass
class Run:
    """What one soak measured, for summarise()."""

    trainers: int
    workers: int
    run_s: float
    warmup_s: float
    payload_bytes: int
    tally: Tally
    samples: list[Sample]  # while the trainers ran
    idle_before: Sample  # before the first trainer connected
    idle_after: Sample | None  # after the last one disconnected
    audit: dict[str, Any]
    at_rest: tuple[int, int, int]  # orphans(): of the stopped gateway
    end_disk: dict[str, int]
    end_blob_files: int
    returncode: int | None
    startup_s: float
    stop_s: float
    log_problems: list[str]
    client_cpu_s: float


def rss_median(samples: Sequence[Sample], start: float, end: float) -> int:
    values = [s.rss for s in samples if start <= s.t_s <= end]
    return int(np.median(values)) if values else 0


def summarise(run: Run) -> dict[str, Any]:
    """Every number of the run, and its PASS/FAIL checks."""
    samples, tally, trainers = run.samples, run.tally, run.trainers
    after = [s for s in samples if s.t_s >= run.warmup_s] or samples[-1:]
    # RSS at the end of warm-up and at the end: medians of a window, so that one sample
    # taken while a round closes (fold buffers, the release) does not decide it.
    window = max(3 * SAMPLE_S, min(30.0, 0.1 * run.run_s))
    rss_warm = rss_median(samples, run.warmup_s, run.warmup_s + window)
    rss_end = rss_median(samples, run.run_s - window, run.run_s)
    growth = rss_end / rss_warm - 1 if rss_warm else float("inf")
    # The trend after warm-up (least squares): a leak that stays under RSS_GROWTH in ten
    # minutes still shows here, per minute and per 100 rounds.
    slope_per_s = float(np.polyfit([s.t_s for s in after], [s.rss for s in after], 1)[0])
    rounds_per_s = (after[-1].round - after[0].round) / max(1e-9, after[-1].t_s - after[0].t_s)
    fds, threads = [s.fds for s in after], [s.threads for s in after]
    fd_floors, thread_floors = floors(fds), floors(threads)
    latencies = [lat for _, lat in tally.push_s]
    latencies_after = [lat for at, lat in tally.push_s if at >= run.warmup_s]
    kinds, deleted = run.audit["kinds"], run.audit["retention_deleted"]
    errors = sum(tally.errors.values())
    thread_bound = run.idle_before.threads + trainers + 1 + TRANSIENT_THREADS
    settling = thread_floors[-3:]

    # Live bound on blobs/ + state/: the kept ended rounds' updates, those of the round
    # being closed (until its retention pass) and of the open one; the kept versions'
    # weights (the open round's base is the newest) and the one a close writes. FedAvg
    # keeps no optimizer state. A version's weights are the schema's flat payload.
    update_bound = (KEEP_ROUNDS + 2) * trainers * run.payload_bytes
    weights_bound = (KEEP_VERSIONS + 1) * run.payload_bytes
    bound = update_bound + weights_bound
    blobs_max = max(s.disk["blobs"] + s.disk["state"] for s in after)
    orphan_files, tmp_files, live_blobs = run.at_rest
    rest_files = run.end_blob_files - tmp_files
    # At rest (stopped): the kept rounds, the open round's pushes, the kept versions.
    rest_bound = (KEEP_ROUNDS + 1) * trainers + KEEP_VERSIONS
    first, last = after[0], samples[-1]
    rounds_after = max(1, last.round - first.round)
    idle = run.idle_after or last

    checks = [
        Check("no errors (any gRPC error but the close race; a stalled round)", errors == 0,
              f"{errors}: {dict(tally.errors) or 'none'}"),
        Check(f"gateway RSS growth after warm-up <= {RSS_GROWTH:.0%}", growth <= RSS_GROWTH,
              f"{rss_warm / MB:.1f} MB -> {rss_end / MB:.1f} MB ({growth:+.1%})"),
        Check(f"open files flat (lowest of each tenth after warm-up within {FD_SLACK})",
              max(fd_floors) - min(fd_floors) <= FD_SLACK,
              f"{min(fd_floors)}..{max(fd_floors)} (all samples {min(fds)}..{max(fds)}); "
              f"{run.idle_before.fds} before the trainers connected, {idle.fds} after they left"),
        Check(f"threads bounded (idle + trainers + 1 + {TRANSIENT_THREADS}) and flat at the "
              f"end (lowest of the last three tenths within {THREAD_SLACK})",
              max(threads) <= thread_bound and max(settling) - min(settling) <= THREAD_SLACK,
              f"max {max(threads)} <= {thread_bound}; last three tenths {settling}"),
        Check("blobs/ + state/ within retention's bound at every sample after warm-up",
              blobs_max <= bound, f"max {blobs_max / MB:.2f} MB <= {bound / MB:.2f} MB"),
        Check("stopped: every blob named by a live row, no temp spool, within retention's",
              orphan_files == 0 and tmp_files == 0 and rest_files <= rest_bound,
              f"{orphan_files} unnamed, {tmp_files} temp, {rest_files} blobs <= {rest_bound} "
              f"({live_blobs} named)"),
        Check("audit chain verifies (sluice audit verify)", run.audit["verify_rc"] == 0,
              run.audit["verify_output"].replace("\n", "; ")),
        Check("retention deleted (retention.deleted entries > 0)", sum(deleted.values()) > 0,
              f"{deleted.get('round', 0)} rounds' updates, {deleted.get('version', 0)} versions"),
        Check("every acknowledged push is audited (push.accepted)",
              kinds.get("push.accepted", 0) == tally.pushes,
              f"{kinds.get('push.accepted', 0)} entries, {tally.pushes} acknowledged"),
        Check("no warning or error in the gateway's log", not run.log_problems,
              f"{len(run.log_problems)} lines"),
        Check("gateway stopped cleanly (SIGTERM, exit 0)", run.returncode == 0,
              f"exit {run.returncode} after {run.stop_s:.1f} s"),
    ]  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"model": MODEL, "trainers": trainers, "minutes": run.run_s / 60,
                     "quorum": trainers, "min_trainers": MIN_TRAINERS, "workers": run.workers,
                     "keep_rounds": KEEP_ROUNDS, "keep_versions": KEEP_VERSIONS,
                     "payload_bytes": run.payload_bytes, "warmup_s": run.warmup_s,
                     "sample_s": SAMPLE_S, "train_s": TRAIN_S, "poll_s": POLL_S},
        "rounds_closed": kinds.get("round.closed", 0),
        "releases": kinds.get("release.published", 0),
        "pushes": tally.pushes,
        "pulls": tally.pulls,
        "errors": dict(tally.errors),
        "first_errors": tally.first_errors,
        "races": dict(tally.races),
        "push_latency_s": {
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
            "p50_after_warmup": percentile(latencies_after, 50),
            "p99_after_warmup": percentile(latencies_after, 99),
        },
        "rss": {"warmup_end": rss_warm, "end": rss_end, "growth": growth, "window_s": window,
                "slope_per_min": slope_per_s * 60,
                "slope_per_100_rounds": slope_per_s * 100 / max(rounds_per_s, 1e-9),
                "max_after_warmup": max(s.rss for s in after)},
        "fds": {"min": min(fds), "max": max(fds), "floors": fd_floors,
                "idle_before": run.idle_before.fds, "idle_after": idle.fds},
        "threads": {"min": min(threads), "max": max(threads), "floors": thread_floors,
                    "bound": thread_bound,
                    "idle_before": run.idle_before.threads, "idle_after": idle.threads},
        "cpu_s": {"gateway_after_warmup": last.cpu_s - first.cpu_s,
                  "gateway": last.cpu_s - run.idle_before.cpu_s, "trainers": run.client_cpu_s},
        "disk": {
            "blobs_state_max": blobs_max, "bound": bound, "bound_updates": update_bound,
            "bound_weights": weights_bound, "blob_files_max": max(s.blob_files for s in after),
            "end": run.end_disk, "end_blobs": rest_files, "rest_bound": rest_bound,
            "registry_per_round": (last.disk["registry"] - first.disk["registry"]) / rounds_after,
            "db_per_round": (last.disk["db"] - first.disk["db"]) / rounds_after,
        },
        "gateway": {"returncode": run.returncode, "startup_s": run.startup_s,
                    "stop_s": run.stop_s, "log_problems": run.log_problems[:20]},
        "audit": run.audit,
        "samples": [asdict(s) for s in samples],
        "checks": [asdict(c) for c in checks],
    }  # fmt: skip


def counted(kinds: dict[str, int]) -> str:
    return f"{sum(kinds.values())} {kinds}" if kinds else "0"


def render(r: dict[str, Any]) -> str:
    """The summary: what ran, the numbers, then the PASS/FAIL lines."""
    s, lat, rss, d, cpu = r["settings"], r["push_latency_s"], r["rss"], r["disk"], r["cpu_s"]
    fds, threads, end, ms = r["fds"], r["threads"], d["end"], 1e3
    lines = [
        f"soak {r['date']}: {s['trainers']} trainers of {s['model']} for {s['minutes']:g} min, "
        f"quorum {s['quorum']}, keep_rounds {s['keep_rounds']}, keep_versions "
        f"{s['keep_versions']}, warm-up {s['warmup_s']:.0f} s; {r['machine']['cpus']} CPUs, "
        f"load average {r['machine']['load_average']} at the end",
        f"rounds closed {r['rounds_closed']}, releases {r['releases']}, pushes {r['pushes']}, "
        f"pulls {r['pulls']}, errors {counted(r['errors'])}, close races {counted(r['races'])}",
        f"push latency p50 {lat['p50'] * ms:.0f} ms, p99 {lat['p99'] * ms:.0f} ms, max "
        f"{lat['max'] * ms:.0f} ms (after warm-up: p50 {lat['p50_after_warmup'] * ms:.0f}, "
        f"p99 {lat['p99_after_warmup'] * ms:.0f} ms)",
        f"gateway RSS {rss['warmup_end'] / MB:.1f} MB after warm-up, {rss['end'] / MB:.1f} MB "
        f"at the end ({rss['growth']:+.1%}; medians over {rss['window_s']:.0f} s), max "
        f"{rss['max_after_warmup'] / MB:.1f} MB; trend after warm-up "
        f"{rss['slope_per_min'] / MB:+.2f} MB a minute, "
        f"{rss['slope_per_100_rounds'] / MB:+.2f} MB per 100 rounds",
        f"open files {fds['min']}..{fds['max']} after warm-up (lowest of each tenth "
        f"{fds['floors']}), {fds['idle_before']} before the trainers, {fds['idle_after']} after",
        f"threads {threads['min']}..{threads['max']} after warm-up (lowest of each tenth "
        f"{threads['floors']}), {threads['idle_before']} before the trainers, "
        f"{threads['idle_after']} after",
        f"CPU seconds: gateway {cpu['gateway']:.0f} ({cpu['gateway_after_warmup']:.0f} after "
        f"warm-up), trainers (this process) {cpu['trainers']:.0f}",
        f"disk: blobs/+state/ max {d['blobs_state_max'] / MB:.2f} MB, bound "
        f"{d['bound'] / MB:.2f} MB; {d['blob_files_max']} blob files max; stopped: blobs/ "
        f"{end['blobs'] / MB:.2f} MB ({d['end_blobs']} blobs <= {d['rest_bound']})",
        f"growing by design: registry/ {end['registry'] / MB:.1f} MB "
        f"({d['registry_per_round'] / 1e3:.0f} kB a round), sluice.db "
        f"{end['db'] / MB:.1f} MB ({d['db_per_round'] / 1e3:.1f} kB a round); data dir "
        f"{end['total'] / MB:.1f} MB",
        f"audit: {sum(r['audit']['kinds'].values())} entries, retention.deleted "
        f"{r['audit']['retention_deleted']}",
    ]
    lines += [f"  error: {e}" for e in r["first_errors"]]
    lines += [f"  gateway log: {ln}" for ln in r["gateway"]["log_problems"][:5]]
    lines += [f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}" for c in r["checks"]]
    return "\n".join(lines)
