"""Thin gRPC layer: who is calling, how long they wait, then the core."""

from __future__ import annotations

import grpc
from coldstart.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from services.gateway.auth import Authenticator
from services.gateway.core import GatewayCore, WriteContext
from services.gateway.downstream import Deadline


def deadline_of(context: grpc.ServicerContext) -> Deadline:
    return Deadline(context.time_remaining())


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

    def Recommend(
        self, request: gateway_pb2.GatewayRecommendRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GatewayRecommendResponse:
        return self.core.recommend(request, deadline_of(context))

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
