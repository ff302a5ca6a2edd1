"""A trivial service on the shared runtime: the floor of this stack in the
benchmarks, and the subject of the runtime's own tests."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from coldstart.v1 import echo_pb2, echo_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.ports import ECHO_PORT
from services.common.server import ServiceApp, ServiceParts
from services.common.settings import ServerSettings, SettingsError


@dataclass(frozen=True)
class EchoSettings(ServerSettings):
    port: int = ECHO_PORT
    # Longest sleep a caller may ask for (graceful-shutdown tests use it).
    max_sleep_ms: int = 60_000

    def validate(self) -> None:
        super().validate()
        if self.max_sleep_ms < 0:
            raise SettingsError(f"max_sleep_ms: must be >= 0, got {self.max_sleep_ms}")


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    def __init__(self, settings: EchoSettings) -> None:
        self.max_sleep_ms = settings.max_sleep_ms

    def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext
    ) -> echo_pb2.EchoResponse:
        if request.sleep_ms > self.max_sleep_ms:
            raise InvalidArgument(
                "sleep_ms", f"must be <= {self.max_sleep_ms}, got {request.sleep_ms}"
            )
        if request.sleep_ms:
            time.sleep(request.sleep_ms / 1000)
        return echo_pb2.EchoResponse(message=request.message)


def build(settings: EchoSettings) -> ServiceParts:
    return ServiceParts(
        servicers=[(echo_pb2_grpc.add_EchoServiceServicer_to_server, EchoServicer(settings))],
        service_names=["coldstart.v1.EchoService"],
    )


APP = ServiceApp(name="echo", settings_type=EchoSettings, build=build)
