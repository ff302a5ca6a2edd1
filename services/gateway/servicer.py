"""Thin gRPC layer: who is calling, how long they wait, then the core."""

from __future__ import annotations

from typing import Any, cast

import grpc
from coldstart.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from google.protobuf.message import Message

from services.gateway.auth import Authenticator
from services.gateway.core import GatewayCore, WriteContext
from services.gateway.downstream import Deadline

SERVICE_NAME = "coldstart.v1.GatewayService"


def deadline_of(context: grpc.ServicerContext) -> Deadline:
    return Deadline(context.time_remaining())


def _serialise(response: bytes | Message) -> bytes:
    """A message's bytes; bytes (an answer passed on from downstream) as they are."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class _Collect:
    """Stands in for a server to collect the generated handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, _service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = handlers


def add_gateway_servicer(servicer: GatewayServicer, server: grpc.Server) -> None:
    """``add_GatewayServiceServicer_to_server``, except that Recommend may answer
    with already serialised bytes."""
    collect = _Collect()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, cast(Any, collect))
    handlers = dict(collect.handlers)
    recommend = handlers["Recommend"]
    assert recommend.unary_unary is not None
    handlers["Recommend"] = grpc.unary_unary_rpc_method_handler(
        recommend.unary_unary,
        request_deserializer=recommend.request_deserializer,
        response_serializer=_serialise,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, core: GatewayCore, authenticator: Authenticator) -> None:
        self.core = core
        self.authenticator = authenticator

    def _write_context(self, context: grpc.ServicerContext) -> WriteContext:
        client = self.authenticator.identify(context.invocation_metadata())
        return WriteContext(client=client, deadline=deadline_of(context))

    def RegisterUser(
        self, request: gateway_pb2.RegisterUserRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.RegisterUserResponse:
        return self.core.register_user(request, self._write_context(context))

    def RecordInteractions(
        self, request: gateway_pb2.RecordInteractionsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.RecordInteractionsResponse:
        return self.core.record_interactions(request, self._write_context(context))

    def UpsertItems(
        self, request: gateway_pb2.GatewayUpsertItemsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GatewayUpsertItemsResponse:
        return self.core.upsert_items(request, self._write_context(context))

    def Recommend(  # type: ignore[override]
        self, request: gateway_pb2.GatewayRecommendRequest, context: grpc.ServicerContext
    ) -> bytes | gateway_pb2.GatewayRecommendResponse:
        # Fusion's reply goes out as the bytes fusion sent (see GatewayCore.recommend_wire);
        # add_gateway_servicer registers a serialiser that passes bytes through.
        return self.core.recommend_wire(request, deadline_of(context))

    def SimilarItems(
        self, request: gateway_pb2.GatewaySimilarItemsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GatewaySimilarItemsResponse:
        return self.core.similar_items(request, deadline_of(context))

    def ForgetUser(
        self, request: gateway_pb2.ForgetUserRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ForgetUserResponse:
        return self.core.forget_user(request, self._write_context(context))

    def GetModelInfo(
        self, request: gateway_pb2.GatewayGetModelInfoRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelInfo:
        return self.core.model_info(deadline_of(context))
