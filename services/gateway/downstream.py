"""Calls to encoder and fusion: one long-lived channel per target, a deadline
on every call derived from the caller's remaining time, and retries with
backoff only for idempotent calls that failed with UNAVAILABLE. The clients
speak the core's plain types (services/gateway/types.py) and convert to and
from the downstream messages here."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from coldstart.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc, fusion_pb2, fusion_pb2_grpc
from prometheus_client import Counter

from services.common.errors import (
    DeadlineExceeded,
    DomainError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.gateway.types import (
    FusionRecommend,
    ItemDisplay,
    ItemRecord,
    ModelInfo,
    Recommendation,
    ScoredItem,
    SimilarItems,
)

log = logging.getLogger("coldstart.gateway.downstream")

DOWNSTREAM_CALLS = Counter(
    "coldstart_gateway_downstream_calls",
    "Calls from the gateway to encoder and fusion, by target, method and status code.",
    ["target", "method", "code"],
)

Response = TypeVar("Response")

# Time kept back from the caller's deadline to answer it (fallback included).
RESERVE_S = 0.05


class Deadline:
    """An absolute deadline on the monotonic clock."""

    def __init__(self, seconds_from_now: float | None) -> None:
        self.at = None if seconds_from_now is None else time.monotonic() + seconds_from_now

    def remaining(self, cap: float) -> float:
        if self.at is None:
            return cap
        return min(cap, self.at - time.monotonic() - RESERVE_S)


def make_channel(
    address: str, ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.Channel:
    options = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        # Our own retry loop decides what is retried.
        ("grpc.enable_retries", 0),
        # Behind a headless Service the DNS name resolves to every pod: spread calls.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    if not ca_file:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
    return grpc.secure_channel(address, credentials, options=options)


class DownstreamCaller:
    def __init__(
        self,
        target: str,
        timeout_s: float,
        retries: int,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.sleep = sleep
        self._ok: dict[str, Any] = {}  # method -> its OK counter (labels() once)

    def call(
        self,
        method: str,
        rpc: Callable[..., Response],
        request: Any,
        deadline: Deadline,
        *,
        idempotent: bool,
    ) -> Response:
        attempt = 0
        while True:
            timeout = deadline.remaining(self.timeout_s)
            if timeout <= 0:
                raise DeadlineExceeded(f"no time left to call {self.target}.{method}")
            try:
                response = rpc(request, timeout=timeout)
                ok = self._ok.get(method)
                if ok is None:
                    ok = self._ok[method] = DOWNSTREAM_CALLS.labels(self.target, method, "OK")
                ok.inc()
                return response
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                DOWNSTREAM_CALLS.labels(self.target, method, code.name).inc()
                retryable = (
                    idempotent and code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries
                )
                if retryable:
                    backoff = min(0.5, 0.05 * 2**attempt) * (0.5 + random.random() / 2)
                    if deadline.remaining(self.timeout_s) > backoff:
                        attempt += 1
                        self.sleep(backoff)
                        continue
                raise _translate(self.target, method, exc, code) from None


def _translate(target: str, method: str, exc: grpc.RpcError, code: grpc.StatusCode) -> DomainError:
    details = exc.details() if isinstance(exc, grpc.Call) else ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The field names of the downstream request match ours: pass them on.
        field, _sep, problem = (details or "").partition(": ")
        return InvalidArgument(field or "request", problem or details or "invalid")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details or f"{target}.{method}: not found")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{target}.{method} did not answer in time")
    return Unavailable(f"{target} unavailable ({code.name})")


class EncoderClient:
    def __init__(self, channel: grpc.Channel, caller: DownstreamCaller) -> None:
        self.stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        self.caller = caller

    def embed(self, texts: list[str], deadline: Deadline) -> list[list[float]]:
        reply = self.caller.call(
            "Embed",
            self.stub.Embed,
            encoder_pb2.EmbedRequest(texts=texts),
            deadline,
            idempotent=True,
        )
        return [list(v.values) for v in reply.vectors]


def _display(item: common_pb2.ScoredItem) -> ItemDisplay | None:
    if not item.HasField("display"):
        return None
    shown = item.display
    return ItemDisplay(shown.title, dict(shown.attributes), list(shown.tags))


def scored_items(items: Iterable[common_pb2.ScoredItem]) -> list[ScoredItem]:
    """Fusion's scored items in plain terms."""
    return [ScoredItem(i.item_id, i.score, i.reason, _display(i)) for i in items]


def recommend_request(request: FusionRecommend) -> fusion_pb2.RecommendRequest:
    """Fusion's Recommend request for ``request``."""
    # Fields filled one by one, empty ones skipped: a known user (the common call)
    # then costs no container conversions.
    user = request.user
    message = fusion_pb2.RecommendRequest(k=request.k, include_display=request.include_display)
    context = message.user
    context.user_id = user.user_id
    if user.attributes:
        context.attributes.update(user.attributes)
    if user.interest_vector:
        context.interest_vector.extend(user.interest_vector)
    if user.recent_item_ids:
        context.recent_item_ids.extend(user.recent_item_ids)
    if request.exclude_item_ids:
        message.exclude_item_ids.extend(request.exclude_item_ids)
    if request.filters is not None:
        message.filters.attribute_equals.update(request.filters.attribute_equals)
        message.filters.tags_any.extend(request.filters.tags_any)
    return message


class FusionClient:
    """Fusion in the core's plain terms (``recommend_wire`` aside, see there)."""

    def __init__(self, channel: grpc.Channel, caller: DownstreamCaller) -> None:
        self.stub = fusion_pb2_grpc.FusionServiceStub(channel)
        self.caller = caller
        # Recommend with the reply left as bytes (see ``recommend_wire``).
        self._recommend_wire = channel.unary_unary(
            "/coldstart.v1.FusionService/Recommend",
            request_serializer=fusion_pb2.RecommendRequest.SerializeToString,
            response_deserializer=None,
        )

    def recommend(self, request: FusionRecommend, deadline: Deadline) -> Recommendation:
        reply: fusion_pb2.RecommendResponse = self.caller.call(
            "Recommend",
            self.stub.Recommend,
            recommend_request(request),
            deadline,
            idempotent=True,
        )
        return Recommendation(
            scored_items(reply.items), reply.model_version, reply.new_user, reply.degraded
        )

    def recommend_wire(self, request: FusionRecommend, deadline: Deadline) -> bytes:
        """``recommend`` with fusion's serialised reply, not decoded (same retries and
        deadline).

        The one place where the gateway keeps fusion's wire form: fusion's
        ``RecommendResponse`` bytes are the gateway's serialised
        ``GatewayRecommendResponse`` (fields 1-3 alike, ``degraded = false`` not on
        the wire), so the servicer answers them as they came, with no decode and
        re-encode per call (``GatewayServicer.Recommend``, ``add_gateway_servicer``;
        tests/unit/gateway checks the two messages stay compatible).
        """
        reply: bytes = self.caller.call(
            "Recommend", self._recommend_wire, recommend_request(request), deadline, idempotent=True
        )
        return reply

    def similar_items(
        self, item_id: str, k: int, include_display: bool, deadline: Deadline
    ) -> SimilarItems:
        reply: fusion_pb2.SimilarItemsResponse = self.caller.call(
            "SimilarItems",
            self.stub.SimilarItems,
            fusion_pb2.SimilarItemsRequest(item_id=item_id, k=k, include_display=include_display),
            deadline,
            idempotent=True,
        )
        return SimilarItems(scored_items(reply.items), reply.model_version)

    def upsert_items(self, items: Sequence[ItemRecord], deadline: Deadline) -> int:
        """Items upserted."""
        request = fusion_pb2.UpsertItemsRequest(
            items=[
                common_pb2.ItemRecord(
                    item_id=item.item_id,
                    text=item.text,
                    attributes=item.attributes,
                    tags=item.tags,
                    content_vector=item.content_vector,
                )
                for item in items
            ]
        )
        # An upsert of the same items is idempotent, so it may be retried.
        reply: fusion_pb2.UpsertItemsResponse = self.caller.call(
            "UpsertItems", self.stub.UpsertItems, request, deadline, idempotent=True
        )
        return reply.upserted

    def model_info(self, deadline: Deadline) -> ModelInfo:
        info: common_pb2.ModelInfo = self.caller.call(
            "GetModelInfo",
            self.stub.GetModelInfo,
            fusion_pb2.GetModelInfoRequest(),
            deadline,
            idempotent=True,
        )
        return ModelInfo(
            version=info.version,
            created_at=info.created_at,
            parent_version=info.parent_version,
            dimension=info.dimension,
            item_count=info.item_count,
            metrics=dict(info.metrics),
            encoder_model=info.encoder_model,
        )
