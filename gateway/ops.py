"""The operations listeners: HTTP /metrics, /healthz and /readyz, and plain-text gRPC health.

Both are bound with the gateway's other ports, before the slow part of a start, and serve
at once: during a first start's template build /healthz answers 200 and readiness is not
yet given (/readyz 503, gRPC health NOT_SERVING), after start() both say ready, and from
the first moment of stop() neither does. They carry no TLS and no authentication and
serve no data (label values are bounded, never a principal): loopback by default; bound
elsewhere only where a network policy limits who reaches them. What one client can hold
is bounded: a few HTTP handler threads with a 5 s socket timeout, a few health calls.
"""

from __future__ import annotations

import http.server
import logging
import socket
import socketserver
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sluice.gateway.listeners import RequestParser, split_address, stop_server
from sluice.gateway.services.health import Health

log = logging.getLogger(__name__)

HTTP_HANDLERS = 4  # HTTP requests handled at once; a connection past them is closed
HTTP_TIMEOUT_S = 5.0  # a connection silent this long is dropped (no slow-loris holds)
HEALTH_THREADS = 2
HEALTH_CALLS = 16  # Checks answered at once, and Watch streams open at once; more: refused


class _HttpServer(http.server.HTTPServer):
    """An HTTP/1.0 server with a bounded number of handler threads."""

    def __init__(self, address: str, registry: CollectorRegistry, ready: threading.Event) -> None:
        host, port = split_address(address)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.registry = registry
        self.ready = ready
        self._slots = threading.BoundedSemaphore(HTTP_HANDLERS)
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: no reverse DNS lookup
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: the client retries, nothing queues
            return
        threading.Thread(
            target=self._handle, args=(request, client_address), name="ops-http", daemon=True
        ).start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("ops listener: a request from %s failed", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HttpServer
    timeout = HTTP_TIMEOUT_S
    server_version = "sluice-ops"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encode, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._answer(200, encode(self.server.registry), content_type)
        elif path == "/healthz":  # liveness: the process answers
            self._answer(200, b"ok\n")
        elif path == "/readyz":  # readiness: the listeners serve
            ready = self.server.ready.is_set()
            self._answer(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
        else:
            self._answer(404, b"not found: /metrics, /healthz, /readyz\n")

    def _answer(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ops listener: %s %s", self.address_string(), format % args)


class OpsListener:
    """Binds the operations listeners ("" turns one off) and serves them from serve()."""

    def __init__(
        self,
        metrics_address: str,
        health_address: str,
        registry: CollectorRegistry,
        services: tuple[str, ...],
        send_stall_s: float | None = None,
    ) -> None:
        self._ready = threading.Event()
        self._services = ("", *services)
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._grpc: grpc.Server | None = None
        self._serving = False
        self.health = Health(send_stall_s, max_watches=HEALTH_CALLS)
        self.ready(False)
        self.metrics_address = self.health_address = ""
        try:
            if metrics_address:
                self._http = _HttpServer(metrics_address, registry, self._ready)
                self.metrics_address = _named(metrics_address, self._http.server_port)
            if health_address:
                self._grpc = grpc.server(
                    futures.ThreadPoolExecutor(HEALTH_THREADS, thread_name_prefix="ops-health"),
                    interceptors=[RequestParser()],  # bytes that do not parse: INVALID_ARGUMENT
                    maximum_concurrent_rpcs=HEALTH_CALLS,
                    options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4096)],
                )
                health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
                port = self._grpc.add_insecure_port(health_address)  # RuntimeError: not bound
                self.health_address = _named(health_address, port)
        except BaseException:
            self.stop()
            raise

    def serve(self) -> None:
        self._serving = True
        if self._http is not None:
            self._thread = threading.Thread(
                target=self._http.serve_forever, name="ops-http-accept", daemon=True
            )
            self._thread.start()
        if self._grpc is not None:
            self._grpc.start()

    def ready(self, ready: bool) -> None:
        """Readiness for /readyz and gRPC health (every service and "")."""
        status = health_pb2.HealthCheckResponse.SERVING if ready else (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )  # fmt: skip
        if ready:
            self._ready.set()
        else:
            self._ready.clear()
        for name in self._services:
            self.health.set(name, status)

    def stop(self) -> None:
        self.ready(False)
        if self._http is not None:
            if self._thread is not None:
                self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            # A gRPC server bound but never started keeps its port until started and stopped.
            if not self._serving:
                self._grpc.start()
            stop_server(self._grpc, None)
            self._grpc = None


def _named(address: str, port: int) -> str:
    return f"{address.rsplit(':', 1)[0]}:{port}"
