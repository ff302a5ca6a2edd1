"""The gRPC layer: who is calling, how long they wait, the API's messages
converted to the core's plain types (services/gateway/types.py) and back.

One exception, for speed: Recommend answers fusion's reply as the bytes fusion
sent (``FusionClient.recommend_wire``, registered by ``add_gateway_servicer``
with a serialiser that passes bytes through). Only the fallback's answer is
converted from a ``Recommendation``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import grpc
from coldstart.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from google.protobuf.message import Message

from services.gateway.auth import Authenticator
from services.gateway.core import GatewayCore, WriteContext
from services.gateway.downstream import Deadline
from services.gateway.types import (
    NO_FILTERS,
    AnonymousUser,
    Filters,
    ForgetUser,
    FusionRecommend,
    Interaction,
    ModelInfo,
    NewItem,
    Recommendation,
    RecommendQuery,
    RecordInteractions,
    RegisterUser,
    ScoredItem,
    UpsertItems,
)

SERVICE_NAME = "coldstart.v1.GatewayService"

RecommendWire = Callable[[FusionRecommend, Deadline], bytes]


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


# --- messages -> plain ----------------------------------------------------------


def _filters(filters: common_pb2.ItemFilters) -> Filters:
    return Filters(dict(filters.attribute_equals), list(filters.tags_any))


def recommend_query(request: gateway_pb2.GatewayRecommendRequest) -> RecommendQuery:
    who = request.WhichOneof("who")
    anonymous = None
    if who == "anonymous":
        profile = request.anonymous
        anonymous = AnonymousUser(
            dict(profile.attributes), profile.interest_text, list(profile.recent_item_ids)
        )
    return RecommendQuery(
        k=request.k,
        user_id=request.user_id if who == "user_id" else None,
        anonymous=anonymous,
        filters=_filters(request.filters) if request.HasField("filters") else NO_FILTERS,
        exclude_item_ids=list(request.exclude_item_ids) if request.exclude_item_ids else (),
        include_display=request.include_display,
    )


# --- plain -> messages ----------------------------------------------------------


def scored_items(items: Iterable[ScoredItem]) -> list[common_pb2.ScoredItem]:
    out = []
    for item in items:
        message = common_pb2.ScoredItem(item_id=item.item_id, score=item.score, reason=item.reason)
        if item.display is not None:
            shown = item.display
            message.display.title = shown.title
            message.display.attributes.update(shown.attributes)
            message.display.tags.extend(shown.tags)
        out.append(message)
    return out


def recommend_response(answer: Recommendation) -> gateway_pb2.GatewayRecommendResponse:
    return gateway_pb2.GatewayRecommendResponse(
        items=scored_items(answer.items),
        model_version=answer.model_version,
        new_user=answer.new_user,
        degraded=answer.degraded,
    )


def model_info_message(info: ModelInfo) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        version=info.version,
        created_at=info.created_at,
        parent_version=info.parent_version,
        dimension=info.dimension,
        item_count=info.item_count,
        metrics=info.metrics,
        encoder_model=info.encoder_model,
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """``recommend_wire``: fusion's Recommend returning its reply's bytes (see the
    module); without it Recommend decodes fusion's reply and encodes its own."""

    def __init__(
        self,
        core: GatewayCore,
        authenticator: Authenticator,
        recommend_wire: RecommendWire | None = None,
    ) -> None:
        self.core = core
        self.authenticator = authenticator
        self.recommend_wire = recommend_wire

    def _write_context(self, context: grpc.ServicerContext) -> WriteContext:
        client = self.authenticator.identify(context.invocation_metadata())
        return WriteContext(client=client, deadline=deadline_of(context))

    def RegisterUser(
        self, request: gateway_pb2.RegisterUserRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.RegisterUserResponse:
        answer = self.core.register_user(
            RegisterUser(
                user_id=request.user_id,
                attributes=dict(request.attributes),
                interest_text=request.interest_text,
                idempotency_key=request.idempotency_key,
            ),
            self._write_context(context),
        )
        return gateway_pb2.RegisterUserResponse(user_id=answer.user_id, event_id=answer.event_id)

    def RecordInteractions(
        self, request: gateway_pb2.RecordInteractionsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.RecordInteractionsResponse:
        interactions = [
            Interaction(i.user_id, i.item_id, i.kind, i.value, i.timestamp_ms)
            for i in request.interactions
        ]
        answer = self.core.record_interactions(
            RecordInteractions(interactions, request.idempotency_key),
            self._write_context(context),
        )
        return gateway_pb2.RecordInteractionsResponse(
            recorded=answer.recorded, event_ids=answer.event_ids
        )

    def UpsertItems(
        self, request: gateway_pb2.GatewayUpsertItemsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GatewayUpsertItemsResponse:
        items = [
            NewItem(i.item_id, i.text, dict(i.attributes), list(i.tags)) for i in request.items
        ]
        answer = self.core.upsert_items(
            UpsertItems(items, request.idempotency_key), self._write_context(context)
        )
        return gateway_pb2.GatewayUpsertItemsResponse(
            upserted=answer.upserted, event_ids=answer.event_ids
        )

    def Recommend(  # type: ignore[override]
        self, request: gateway_pb2.GatewayRecommendRequest, context: grpc.ServicerContext
    ) -> bytes | gateway_pb2.GatewayRecommendResponse:
        query = recommend_query(request)
        deadline = deadline_of(context)
        if self.recommend_wire is None:
            return recommend_response(self.core.recommend(query, deadline))
        # Fusion's reply goes out as the bytes fusion sent (see the module docstring).
        answer = self.core.recommend_via(query, deadline, self.recommend_wire)
        return answer if isinstance(answer, bytes) else recommend_response(answer)

    def SimilarItems(
        self, request: gateway_pb2.GatewaySimilarItemsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GatewaySimilarItemsResponse:
        answer = self.core.similar_items(
            request.item_id,
            request.k,
            deadline_of(context),
            include_display=request.include_display,
        )
        return gateway_pb2.GatewaySimilarItemsResponse(
            items=scored_items(answer.items),
            model_version=answer.model_version,
            degraded=answer.degraded,
        )

    def ForgetUser(
        self, request: gateway_pb2.ForgetUserRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ForgetUserResponse:
        answer = self.core.forget_user(
            ForgetUser(request.user_id, request.idempotency_key), self._write_context(context)
        )
        return gateway_pb2.ForgetUserResponse(event_id=answer.event_id)

    def GetModelInfo(
        self, request: gateway_pb2.GatewayGetModelInfoRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelInfo:
        return model_info_message(self.core.model_info(deadline_of(context)))
