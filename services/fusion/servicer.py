"""gRPC surface of the fusion service: convert protos, call the core, convert back."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from coldstart.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc

from services.fusion.core import Filters, ItemInput, Recommender, Result, Scored, UserQuery


def _query(user: common_pb2.UserContext) -> UserQuery:
    return UserQuery(
        user_id=user.user_id,
        attributes=dict(user.attributes),
        interest_vector=list(user.interest_vector),
        recent_item_ids=list(user.recent_item_ids),
    )


def _display(item: Scored) -> common_pb2.ItemDisplay:
    meta = item.meta
    if meta is None:
        return common_pb2.ItemDisplay()
    return common_pb2.ItemDisplay(title=meta.title, attributes=meta.attributes, tags=meta.tags)


def _items(items: Sequence[Scored], include_display: bool = False) -> list[common_pb2.ScoredItem]:
    return [
        common_pb2.ScoredItem(
            item_id=i.item_id,
            score=i.score,
            reason=i.reason,
            display=_display(i) if include_display else None,
        )
        for i in items
    ]


def _recommend_response(result: Result, include_display: bool) -> fusion_pb2.RecommendResponse:
    # Items added in place: no intermediate ScoredItem messages copied into the list.
    response = fusion_pb2.RecommendResponse(
        model_version=result.model_version, new_user=result.new_user, degraded=result.degraded
    )
    add = response.items.add
    if include_display:
        for item in result.items:
            add(item_id=item.item_id, score=item.score, reason=item.reason, display=_display(item))
    else:
        for item in result.items:
            add(item_id=item.item_id, score=item.score, reason=item.reason)
    return response


_NO_FILTERS = Filters()


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    def __init__(self, core: Recommender) -> None:
        self.core = core

    def Recommend(
        self, request: fusion_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.RecommendResponse:
        remaining = context.time_remaining()
        filters = (
            Filters(dict(request.filters.attribute_equals), list(request.filters.tags_any))
            if request.HasField("filters")
            else _NO_FILTERS
        )
        result = self.core.recommend(
            _query(request.user),
            request.k,
            list(request.exclude_item_ids),
            filters,
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        return _recommend_response(result, request.include_display)

    def Rank(
        self, request: fusion_pb2.RankRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.RankResponse:
        result = self.core.rank(_query(request.user), list(request.candidate_item_ids))
        return fusion_pb2.RankResponse(
            items=_items(result.items),
            model_version=result.model_version,
            new_user=result.new_user,
            unknown_item_ids=result.unknown_item_ids,
        )

    def SimilarItems(
        self, request: fusion_pb2.SimilarItemsRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.SimilarItemsResponse:
        result = self.core.similar_items(request.item_id, request.k)
        return fusion_pb2.SimilarItemsResponse(
            items=_items(result.items, request.include_display),
            model_version=result.model_version,
        )

    def UpsertItems(
        self, request: fusion_pb2.UpsertItemsRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.UpsertItemsResponse:
        items = [
            ItemInput(
                item_id=i.item_id,
                content_vector=list(i.content_vector),
                text=i.text,
                attributes=dict(i.attributes),
                tags=list(i.tags),
            )
            for i in request.items
        ]
        upserted, version = self.core.upsert_items(items)
        return fusion_pb2.UpsertItemsResponse(upserted=upserted, model_version=version)

    def GetModelInfo(
        self, request: fusion_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(**self.core.holder.current.info())
