"""Each listener serves only its own side: egress cannot reach trainer or admin RPCs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    egress_pb2,
    egress_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.conftest import TINY, Running, start_gateway

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def listed_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as ch:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(ch)  # stubs type it loosely
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=10))
    return {s.name for s in resp.list_services_response.service}


def test_reflection_lists_only_each_sides_services(gateway: Running) -> None:
    assert listed_services(gateway.endpoints.egress) == {
        "sluice.v1.EgressService",
        HEALTH,
        REFLECTION,
    }
    assert listed_services(gateway.endpoints.internal) == {
        "sluice.v1.TrainerService",
        "sluice.v1.AdminService",
        HEALTH,
        REFLECTION,
    }


def test_egress_listener_does_not_serve_trainer_or_admin(gateway: Running) -> None:
    with grpc.insecure_channel(gateway.endpoints.egress) as ch:
        trainer = trainer_pb2_grpc.TrainerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            trainer.GetRound(trainer_pb2.GetRoundRequest(model=TINY), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as err:
            list(trainer.PullGlobal(trainer_pb2.PullGlobalRequest(model=TINY), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_internal_listener_does_not_serve_egress(gateway: Running) -> None:
    with grpc.insecure_channel(gateway.endpoints.internal) as ch:
        egress = egress_pb2_grpc.EgressServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            egress.ListReleases(egress_pb2.ListReleasesRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("side", ["internal", "egress"])
def test_health_is_served_on_both_listeners(gateway: Running, side: str) -> None:
    with grpc.insecure_channel(getattr(gateway.endpoints, side)) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
        resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_egress_listener_health_does_not_know_trainer_service(gateway: Running) -> None:
    with grpc.insecure_channel(gateway.endpoints.egress) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)  # the stub's methods are untyped
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="sluice.v1.TrainerService"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("address", ["0.0.0.0:0", "10.1.2.3:0", "[::]:0"])
def test_insecure_mode_refuses_non_loopback_addresses(
    tmp_path: Path, template_cache: Path, address: str
) -> None:
    with pytest.raises(ValueError, match="loopback addresses only"):
        start_gateway(tmp_path / "gw", template_cache, egress_address=address)


def test_tls_mode_without_certificates_says_how_to_make_them(
    tmp_path: Path, template_cache: Path
) -> None:
    with pytest.raises(FileNotFoundError, match="sluice init"):
        start_gateway(tmp_path / "gw", template_cache, insecure_loopback=False)
