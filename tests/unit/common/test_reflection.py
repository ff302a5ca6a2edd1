"""Reflection resolves method names (what grpcurl describe and ghz ask), called
on the servicer directly: no server, no socket."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from coldstart.v1 import echo_pb2, encoder_pb2, fusion_pb2, gateway_pb2, trainer_pb2
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.common.reflection import SERVICE_NAME, MethodAwareReflectionServicer

MODULES: tuple[ModuleType, ...] = (echo_pb2, encoder_pb2, fusion_pb2, gateway_pb2, trainer_pb2)
SERVICES = [
    service for module in MODULES for service in module.DESCRIPTOR.services_by_name.values()
]
METHODS = [method for service in SERVICES for method in service.methods] + list(
    health_pb2.DESCRIPTOR.services_by_name["Health"].methods
)


def servicer() -> MethodAwareReflectionServicer:
    names = [service.full_name for service in SERVICES]
    return MethodAwareReflectionServicer([*names, health.SERVICE_NAME, SERVICE_NAME])


def ask(**request: str) -> reflection_pb2.ServerReflectionResponse:
    # The stubs type this generator as returning None.
    info: Any = servicer().ServerReflectionInfo
    replies = list(
        info(
            iter([reflection_pb2.ServerReflectionRequest(**request)]),
            None,  # the servicer never reads its context
        )
    )
    assert len(replies) == 1
    reply: reflection_pb2.ServerReflectionResponse = replies[0]
    return reply


def files_of(
    reply: reflection_pb2.ServerReflectionResponse,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert not reply.HasField("error_response"), reply.error_response
    files = {}
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    return files


def test_the_five_services_and_their_methods_are_all_checked() -> None:
    assert {s.full_name for s in SERVICES} == {
        "coldstart.v1.EchoService",
        "coldstart.v1.EncoderService",
        "coldstart.v1.FusionService",
        "coldstart.v1.GatewayService",
        "coldstart.v1.TrainerService",
    }
    assert "coldstart.v1.GatewayService.Recommend" in {m.full_name for m in METHODS}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_a_method_name_resolves_to_its_service_file_with_dependencies(method: object) -> None:
    full_name: str = method.full_name  # type: ignore[attr-defined]
    service = method.containing_service  # type: ignore[attr-defined]
    files = files_of(ask(file_containing_symbol=full_name))
    own = files[service.file.name]
    described = next(s for s in own.service if s.name == service.name)
    assert method.name in {m.name for m in described.method}  # type: ignore[attr-defined]
    # The request and response types are described too (their files travel along).
    for dependency in service.file.dependencies:
        assert dependency.name in files


@pytest.mark.parametrize(
    "symbol",
    [
        "coldstart.v1.GatewayService",
        "coldstart.v1.GatewayRecommendRequest",
        "coldstart.v1.GatewayRecommendRequest.k",
        "grpc.health.v1.Health",
    ],
)
def test_what_grpc_reflection_resolved_before_still_resolves(symbol: str) -> None:
    assert files_of(ask(file_containing_symbol=symbol))


@pytest.mark.parametrize(
    "symbol",
    ["coldstart.v1.GatewayService.NoSuchMethod", "coldstart.v1.Nothing", "", "Recommend"],
)
def test_unknown_symbols_are_not_found(symbol: str) -> None:
    reply = ask(file_containing_symbol=symbol)
    assert reply.HasField("error_response")
    assert reply.error_response.error_code == 5  # NOT_FOUND
    assert reply.original_request.file_containing_symbol == symbol


def test_list_services_and_file_by_filename_are_unchanged() -> None:
    listed = ask(list_services="").list_services_response.service
    assert {s.name for s in listed} >= {
        "coldstart.v1.GatewayService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert "coldstart/v1/gateway.proto" in files_of(
        ask(file_by_filename="coldstart/v1/gateway.proto")
    )
