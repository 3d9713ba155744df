"""Prometheus metrics of one gateway, on a registry of its own (docs/OBSERVABILITY.md).

Counters are counted where the event happens (a push's end, an egress call, a denial) or
from the audit log's committed entries (rounds, releases, accepted updates: one source of
truth); gauges of state (rounds, versions, held threads) are read from the store when
scraped. Label values are bounded: fixed vocabularies, gRPC code names, method names the
gateway serves and the models it serves, never a principal, a peer or any free text a
caller sent, so no caller can grow the series count.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sluice.gateway.core.records import RoundState
from sluice.gateway.store.audit import AuditEntry

OTHER = "other"  # the label value of anything outside a bounded vocabulary
# Push and pull durations: from a small update on loopback to a GB-sized one on a WAN.
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_FOLD_SECONDS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)
_UPDATES = (1, 2, 3, 4, 5, 8, 10, 16, 32, 64, 128, 256, 1024)
# Egress refusal outcomes (gate.py) -> reason classes.
_EGRESS_REASONS = {
    "not found": "not_found",
    "invalid request": "invalid",
    "withheld": "withheld",
    "withheld mid-stream": "withheld_mid_stream",
}
_ROUND_ENDS = {"round.closed": "closed", "round.failed": "failed", "round.reopened": "reopened"}
_RELEASES = {"release.published": "published", "release.refused": "refused"}


def _count(entry: AuditEntry) -> int:
    """How many events an audit row stands for (a coalesced row carries `count`)."""
    count = entry.detail.get("count", 1)
    return count if isinstance(count, int) and count > 0 else 1


class Metrics:
    """Every metric of one gateway; `registry` is what /metrics serves."""

    def __init__(self, models: Iterable[str] = ()) -> None:
        self.models = frozenset(models)  # the model label's values; anything else: "other"
        self.registry = CollectorRegistry()
        r = self.registry
        self.pushes = Counter(
            "sluice_pushes", "PushUpdate calls that ended, by model and gRPC status",
            ["model", "status"], registry=r,
        )  # fmt: skip
        self.push_bytes = Counter(
            "sluice_push_bytes", "Payload bytes received by PushUpdate calls, by their status",
            ["model", "status"], registry=r,
        )  # fmt: skip
        self.push_seconds = Histogram(
            "sluice_push_duration_seconds", "Time from a push's start to its answer, by status",
            ["status"], buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.open_calls = Gauge(
            "sluice_open_calls", "Admitted calls open now, by listener and method",
            ["listener", "method"], registry=r,
        )  # fmt: skip
        self.auth_denials = Counter(
            "sluice_auth_denials",
            "Calls refused by authentication or the role table, by listener, method, gRPC "
            "status and the caller's role (none: no trusted identity)",
            ["listener", "method", "code", "role"], registry=r,
        )  # fmt: skip
        self.calls_limited = Counter(
            "sluice_calls_limited",
            "Calls refused for a principal's cap (RESOURCE_EXHAUSTED) or the listener's "
            "budget (UNAVAILABLE)",
            ["listener", "code"], registry=r,
        )  # fmt: skip
        self.egress_requests = Counter(
            "sluice_egress_requests", "Egress calls that ended, by method and gRPC status",
            ["method", "status"], registry=r,
        )  # fmt: skip
        self.egress_bytes = Counter(
            "sluice_egress_bytes", "Release bytes sent across the border by PullRelease",
            ["model"], registry=r,
        )  # fmt: skip
        self.egress_refusals = Counter(
            "sluice_egress_refusals",
            "Egress refusals by class: not_found, invalid, withheld (the guard refused the "
            "release), withheld_mid_stream (a file changed during a pull)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.guard_refusals = Counter(
            "sluice_guard_refusals",
            "Releases the egress guard refused, by stage (publish, egress) and failing layer",
            ["stage", "layer"], registry=r,
        )  # fmt: skip
        self.releases = Counter(
            "sluice_releases", "Releases published or refused at a round's close, by model",
            ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.rounds_ended = Counter(
            "sluice_rounds_ended", "Rounds closed into a version, failed, or reopened, by model",
            ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.updates_accepted = Counter(
            "sluice_updates_accepted", "Updates committed to a round (new ones, not replays)",
            ["model"], registry=r,
        )  # fmt: skip
        self.round_updates = Histogram(
            "sluice_round_updates", "Updates folded into each closed round", ["model"],
            buckets=_UPDATES, registry=r,
        )  # fmt: skip
        self.fold_seconds = Histogram(
            "sluice_fold_duration_seconds", "Time to aggregate a round's updates", ["model"],
            buckets=_FOLD_SECONDS, registry=r,
        )  # fmt: skip
        self.dp_epsilon = Gauge(
            "sluice_dp_epsilon_spent",
            "Central DP: epsilon spent by the model's lineage at its last closed round",
            ["model"], registry=r,
        )  # fmt: skip
        self.audit_events = Counter(
            "sluice_audit_events", "Events recorded in the audit log, by kind", ["kind"],
            registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            "sluice_ready", "1 while the gateway serves, 0 while starting or stopping",
            registry=r,
        )  # fmt: skip
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU, open fds
        # The series every gateway has, at 0 from the start: rate() needs no first event.
        for model in self.models:
            self.pushes.labels(model, "OK")
            self.updates_accepted.labels(model)
            for outcome in _RELEASES.values():
                self.releases.labels(model, outcome)
            for outcome in _ROUND_ENDS.values():
                self.rounds_ended.labels(model, outcome)
        for reason in _EGRESS_REASONS.values():
            self.egress_refusals.labels(reason)

    def model(self, name: str) -> str:
        return name if name in self.models else OTHER

    # -- counted where it happens -------------------------------------------------------

    def pushed(self, model: str, status: str, payload_bytes: int, seconds: float) -> None:
        model = self.model(model)
        self.pushes.labels(model, status).inc()
        self.push_bytes.labels(model, status).inc(payload_bytes)
        self.push_seconds.labels(status).observe(seconds)

    def denied(self, listener: str, method: str, code: str, role: str) -> None:
        self.auth_denials.labels(listener, method, code, role).inc()

    def egress_refused(self, outcome: str) -> None:
        self.egress_refusals.labels(_EGRESS_REASONS.get(outcome, OTHER)).inc()

    def guard_refused(self, stage: str, layers: Iterable[str]) -> None:
        for layer in layers or ("check",):
            self.guard_refusals.labels(stage, layer).inc()

    # -- counted from the audit log -----------------------------------------------------

    def audited(self, entry: AuditEntry) -> None:
        """Count one committed audit entry (a coalesced one for all it stands for)."""
        n = _count(entry)
        self.audit_events.labels(entry.kind).inc(n)
        model = self.model(entry.subject.split("/", 1)[0])
        if entry.kind == "push.accepted":
            self.updates_accepted.labels(model).inc(n)
        elif entry.kind in _RELEASES:
            self.releases.labels(model, _RELEASES[entry.kind]).inc(n)
        elif entry.kind in _ROUND_ENDS:
            self.rounds_ended.labels(model, _ROUND_ENDS[entry.kind]).inc(n)
            if entry.kind == "round.closed":
                self._closed(model, entry.detail)

    def _closed(self, model: str, detail: Mapping[str, object]) -> None:
        updates = detail.get("updates")
        if isinstance(updates, list):
            self.round_updates.labels(model).observe(len(updates))
        fold_s = detail.get("fold_s")
        if isinstance(fold_s, int | float) and math.isfinite(fold_s):
            self.fold_seconds.labels(model).observe(fold_s)
        self.spent(model, detail.get("dp"))

    def spent(self, model: str, dp: object) -> None:
        """The DP facts of a model's last closed round (None: DP off)."""
        epsilon = dp.get("epsilon") if isinstance(dp, Mapping) else None
        if isinstance(epsilon, int | float) and math.isfinite(epsilon):
            self.dp_epsilon.labels(model).set(epsilon)

    # -- read when scraped --------------------------------------------------------------

    def watch_state(self, read: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Serve the gauges `read` builds from the gateway's state at each scrape."""
        self.registry.register(_StateCollector(read))


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            families = list(self._read())
        except sqlite3.Error:  # a scrape while the store closes: no state, not a crash
            return
        yield from families

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected per scrape; nothing to check at registration


def round_families(
    latest: Mapping[str, tuple[int, str, int]],
    counts: Iterable[tuple[str, str, int]],
    versions: Mapping[str, int],
    releases: Mapping[str, int],
) -> list[GaugeMetricFamily]:
    """Gauges of rounds and versions: latest is model -> (round, state, trainers with an
    update in it); counts (model, state, rounds in that state)."""
    rounds = GaugeMetricFamily(
        "sluice_rounds", "Rounds of each model in each state", labels=["model", "state"]
    )
    for model, state, n in counts:
        rounds.add_metric([model, state], n)
    current = GaugeMetricFamily(
        "sluice_round", "Number of each model's current (latest) round", labels=["model"]
    )
    states = GaugeMetricFamily(
        "sluice_round_state",
        "1 for the state the current round is in, 0 for the others",
        labels=["model", "state"],
    )
    trainers = GaugeMetricFamily(
        "sluice_round_trainers",
        "Distinct trainers with an update committed to the current round",
        labels=["model"],
    )
    for model, (number, now, accepted) in latest.items():
        current.add_metric([model], number)
        trainers.add_metric([model], accepted)
        for each in RoundState:
            states.add_metric([model, str(each)], 1.0 if str(each) == now else 0.0)
    version = GaugeMetricFamily(
        "sluice_model_version", "Latest version of each model's global weights", labels=["model"]
    )
    for model, v in versions.items():
        version.add_metric([model], v)
    released = GaugeMetricFamily(
        "sluice_release_version", "Latest published release of each model", labels=["model"]
    )
    for model, v in releases.items():
        released.add_metric([model], v)
    return [rounds, current, states, trainers, version, released]


def held_threads_family(held: Mapping[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "sluice_listener_threads_held",
        "Handler threads admitted calls hold on each listener now",
        labels=["listener"],
    )
    for listener, n in held.items():
        family.add_metric([listener], n)
    return family
