"""Every gRPC listener turns off the bandwidth-delay probe (listeners.GRPC_OPTIONS).

With it on, 16 concurrent pushes of a 404 MB model held 3.5-8.9x the model in the gateway
(bytes received ahead of handlers that write to disk); without it 1.06-1.10x (bench round).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from sluice.gateway import listeners
from sluice.gateway.config import Config


def test_bdp_probe_is_off_and_port_reuse_refused() -> None:
    options = dict(listeners.GRPC_OPTIONS)
    assert options["grpc.http2.bdp_probe"] == 0
    assert options["grpc.so_reuseport"] == 0


def test_every_listener_is_built_with_the_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = grpc.server

    def server(*args: Any, **kwargs: Any) -> grpc.Server:
        seen.append(dict(kwargs.get("options", ())))
        return real(*args, **kwargs)

    monkeypatch.setattr(grpc, "server", server)
    built, _ = listeners.grpc_listener(Config(data_dir=tmp_path), ("sluice.v1.Trainer",), [])
    built.stop(None)
    assert seen and seen[0]["grpc.http2.bdp_probe"] == 0
    assert seen[0]["grpc.max_receive_message_length"] > Config().max_chunk_bytes
