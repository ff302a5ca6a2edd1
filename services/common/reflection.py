"""Server reflection that also resolves method names.

grpc_reflection answers ``file_containing_symbol`` with the descriptor pool's
``FindFileContainingSymbol``. Protobuf's upb backend (the default) finds
messages, fields, enums, extensions and services there, but not methods, so
``grpcurl describe pkg.Service.Method`` and ``ghz --call pkg.Service/Method``
without ``--proto`` (which asks for ``pkg.Service.Method``) get NOT_FOUND. The
servicer here falls back to the method's service file; everything else is
grpc_reflection's own answer. It overrides grpc_reflection's (private) lookup
hook, so tests/unit/common/test_reflection.py pins the behaviour it relies on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

SERVICE_NAME: str = reflection.SERVICE_NAME


class MethodAwareReflectionServicer(reflection.ReflectionServicer):
    """``ReflectionServicer`` whose symbol lookup also knows ``pkg.Service.Method``."""

    def __init__(
        self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None
    ) -> None:
        super().__init__(service_names, pool=pool)
        self._methods_pool = descriptor_pool.Default() if pool is None else pool

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        answer: reflection_pb2.ServerReflectionResponse = super()._file_containing_symbol(
            request, fully_qualified_name
        )
        if not answer.HasField("error_response"):
            return answer
        try:
            method: Any = self._methods_pool.FindMethodByName(fully_qualified_name)
        except KeyError:
            return answer
        found: reflection_pb2.ServerReflectionResponse = self._file_by_filename(
            request, method.containing_service.file.name
        )
        return found


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """``grpc_reflection``'s function of that name, with method names resolved."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        MethodAwareReflectionServicer(service_names), server
    )
