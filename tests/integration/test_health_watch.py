"""A gRPC health Watch client that takes nothing (an HTTP/2 flow-control window of 0, sent
by hand: no gRPC library lets a caller do it) holds nothing of the gateway's: on every
gRPC listener, Check answers at once, a stop says NOT_SERVING to the other watchers and
ends, and the stuck stream is cut off after send_stall_seconds. With grpc_health's own servicer one
such client made every later Check wait forever, and a gateway's stop() with it."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from sluice.gateway.ops import HEALTH_CALLS
from tests.conftest import Running, start_gateway

WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
LISTENERS = ("internal", "egress", "health")
SEND_S = 1.5  # send_stall_seconds: a Watch message not taken in this long cancels it


class StuckWatch:
    """A Watch call (or another response stream) over a raw HTTP/2 connection that gives
    the server no window to send in, and reads only frames (settings, pings, resets),
    never a message."""

    def __init__(self, target: str, path: str = WATCH, request: bytes = b"") -> None:
        host, port = target.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        zero = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values=zero)
        self.conn.initiate_connection()
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            self.stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", target),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        body = request or health_pb2.HealthCheckRequest().SerializeToString()
        self.conn.send_data(self.stream, b"\0" + struct.pack(">I", len(body)) + body, True)
        self.sock.sendall(self.conn.data_to_send())
        self.reset = self.message = False

    def pump(self, seconds: float) -> None:
        """Read what the server sends for `seconds` (answering settings and pings)."""
        end = time.monotonic() + seconds
        while not self.reset and (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionError):
                return
            if not data:
                self.reset = True  # the connection went away: the stream with it
                return
            for event in self.conn.receive_data(data):
                self.message |= isinstance(event, h2.events.DataReceived)
                self.reset |= isinstance(event, h2.events.StreamReset | h2.events.StreamEnded)
            self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def running(tmp_path: Path, template_cache: Path) -> Iterator[Running]:
    gw = start_gateway(tmp_path / "gw", template_cache, send_stall_seconds=SEND_S)
    try:
        yield gw
    finally:
        stopping = threading.Thread(target=gw.gateway.stop, daemon=True)
        stopping.start()
        stopping.join(60)


def stub_of(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel)  # the stub's methods are untyped


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_watch_that_takes_nothing_holds_neither_check_nor_stop(
    running: Running, listener: str
) -> None:
    target = getattr(running.endpoints, listener)
    stuck = [StuckWatch(target) for _ in range(2)]
    try:
        for watch in stuck:
            watch.pump(0.2)  # its settings are in force: the first message cannot go
        with grpc.insecure_channel(target) as channel:
            stub = stub_of(channel)
            started = time.monotonic()
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - started < 2
            watching = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watching).status == health_pb2.HealthCheckResponse.SERVING

            stopping = threading.Thread(target=running.gateway.stop, daemon=True)
            stopping.start()
            # Not ready first, to every watcher that takes its messages.
            assert next(watching).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stopping.join(30)
            assert not stopping.is_alive(), "the gateway's stop waited on a Watch stream"
        assert not any(watch.message for watch in stuck)
    finally:
        for watch in stuck:
            watch.close()


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_watch_that_takes_nothing_is_cut_off_after_send_stall_seconds(
    running: Running, listener: str
) -> None:
    """Its first message never leaves: after send_stall_seconds the gateway cancels the stream (the
    client may watch again), and the listener goes on answering."""
    target = getattr(running.endpoints, listener)
    assert_cut_off_then_serving(target, StuckWatch(target))


def assert_cut_off_then_serving(target: str, stuck: StuckWatch) -> None:
    try:
        stuck.pump(SEND_S + 5)
        assert stuck.reset and not stuck.message
    finally:
        stuck.close()
    with grpc.insecure_channel(target) as channel:
        answer = stub_of(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("listener", ["internal", "egress"])
def test_a_reflection_stream_that_takes_nothing_is_cut_off_too(
    running: Running, listener: str
) -> None:
    """The sibling on the mTLS listeners' other response stream: reflection's answer
    cannot leave either, and the listener's stream watchdog cancels it."""
    target = getattr(running.endpoints, listener)
    ask = reflection_pb2.ServerReflectionRequest(list_services="*").SerializeToString()
    assert_cut_off_then_serving(target, StuckWatch(target, REFLECTION, ask))


def test_stuck_watches_on_the_open_health_port_are_bounded(
    tmp_path: Path, template_cache: Path
) -> None:
    """The plain-text health port asks no identity: a client opening Watch after Watch
    with no window gets HEALTH_CALLS of them, each holding one sending thread and its
    timer; the next is RESOURCE_EXHAUSTED, and Check still answers."""
    running = start_gateway(tmp_path / "gw", template_cache, send_stall_seconds=60.0)
    target = running.endpoints.health
    stuck = []
    try:
        stuck = [StuckWatch(target) for _ in range(HEALTH_CALLS)]
        health = running.gateway.ops.health  # type: ignore[union-attr]
        end = time.monotonic() + 10
        while health.watching() < HEALTH_CALLS and time.monotonic() < end:
            time.sleep(0.02)
        assert health.watching() == HEALTH_CALLS
        with grpc.insecure_channel(target) as channel:
            stub = stub_of(channel)
            with pytest.raises(grpc.RpcError) as err:
                next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=5))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        senders = [t for t in threading.enumerate() if t.name == "health-watch"]
        assert len(senders) <= HEALTH_CALLS
    finally:
        for watch in stuck:
            watch.close()
        running.gateway.stop()
