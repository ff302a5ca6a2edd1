"""The gateway's domain logic, free of gRPC: validation, idempotent writes to
the events topic, calls to encoder and fusion, and the degraded fallback."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coldstart.v1 import common_pb2, events_pb2, fusion_pb2, gateway_pb2
from google.protobuf.message import Message
from prometheus_client import Counter

from services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.common.events import new_event
from services.gateway.downstream import Deadline, EncoderClient, FusionClient
from services.gateway.fallback import FallbackSource
from services.gateway.settings import GatewaySettings

log = logging.getLogger("coldstart.gateway")

DEGRADED = Counter(
    "coldstart_gateway_degraded_responses",
    "Answers served by the fallback because fusion was unavailable, by method.",
    ["method"],
)
IDEMPOTENT_REPLAYS = Counter(
    "coldstart_gateway_idempotent_replays",
    "Writes answered from the idempotency cache instead of being applied again.",
    ["method"],
)
EVENTS_PRODUCED = Counter(
    "coldstart_gateway_events_produced",
    "Events acknowledged by the broker (acks=all), by kind.",
    ["kind"],
)

ID_PATTERN = re.compile(r"^[\w.:@/+-]{1,256}$")
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_KEY_BYTES = 256
# uuid5 namespace for ids derived from idempotency keys.
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f1b1d3e-2f7c-4f55-9a59-0c6e4f6c2a11")


class EventSink(Protocol):
    def publish(self, events: Sequence[events_pb2.Event]) -> None:
        """Return once the broker acknowledged every event; raise Unavailable otherwise."""


class KafkaEventSink:
    """acks=all producer, created lazily so the gateway starts (and serves
    reads) while the broker is down; writes then fail with UNAVAILABLE."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self._producer: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        from kafka.errors import KafkaError

        from services.common.events import make_producer

        with self._lock:
            if self._producer is None:
                try:
                    self._producer = make_producer(
                        self.bootstrap,
                        client_id="gateway",
                        bootstrap_timeout_ms=int(min(self.timeout_s, 5.0) * 1000),
                    )
                except KafkaError as exc:
                    raise Unavailable(f"event broker unavailable: {type(exc).__name__}") from None
            return self._producer

    def publish(self, events: Sequence[events_pb2.Event]) -> None:
        from services.common.events import produce_and_wait

        producer = self._get()
        try:
            produce_and_wait(producer, self.topic, events, timeout_s=self.timeout_s)
        except Unavailable:
            # An idempotent producer that saw a failed request refuses every
            # later send; start the next write with a fresh one.
            with self._lock:
                if self._producer is producer:
                    self._producer = None
            producer.close(timeout=0)
            raise
        for event in events:
            EVENTS_PRODUCED.labels(event.WhichOneof("payload") or "none").inc()

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=5)
                self._producer = None


class IdempotencyCache:
    """Answers of applied writes, by (client, method, key); least recently used go first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str, str], tuple[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str], fingerprint: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        if entry[0] != fingerprint:
            raise InvalidArgument("idempotency_key", "already used for a different request")
        return entry[1]

    def put(self, key: tuple[str, str, str], fingerprint: str, answer: bytes) -> None:
        with self._lock:
            self._entries[key] = (fingerprint, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


def fingerprint(request: Message) -> str:
    """Hash of the request without its idempotency key."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("idempotency_key")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


# --- validation ---------------------------------------------------------------


def check_id(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not ID_PATTERN.match(value):
        raise InvalidArgument(
            field, "must be 1..256 characters of letters, digits and . : @ / + - _"
        )
    return value


def check_text(field: str, value: str, limit: int) -> str:
    size = len(value.encode())
    if size > limit:
        raise InvalidArgument(field, f"must be at most {limit} bytes, got {size}")
    return value


def check_attributes(field: str, attributes: Mapping[str, str], limit: int) -> dict[str, str]:
    if len(attributes) > limit:
        raise InvalidArgument(field, f"at most {limit} attributes, got {len(attributes)}")
    for key, value in attributes.items():
        if not key or len(key.encode()) > 128:
            raise InvalidArgument(f"{field}[{key!r}]", "keys must be 1..128 bytes")
        if len(value.encode()) > 256:
            raise InvalidArgument(f"{field}[{key!r}]", "values must be at most 256 bytes")
    return dict(attributes)


def check_count(field: str, count: int, limit: int) -> None:
    if count == 0:
        raise InvalidArgument(field, "must not be empty")
    if count > limit:
        raise InvalidArgument(field, f"at most {limit} entries per call, got {count}")


def check_filters(filters: common_pb2.ItemFilters, settings: GatewaySettings) -> None:
    check_attributes("filters.attribute_equals", filters.attribute_equals, settings.max_attributes)
    if len(filters.tags_any) > settings.max_attributes:
        raise InvalidArgument("filters.tags_any", f"at most {settings.max_attributes} tags")


@dataclass
class WriteContext:
    client: str
    deadline: Deadline


class GatewayCore:
    def __init__(
        self,
        settings: GatewaySettings,
        events: EventSink,
        encoder: EncoderClient,
        fusion: FusionClient,
        fallback: FallbackSource,
    ) -> None:
        self.settings = settings
        self.events = events
        self.encoder = encoder
        self.fusion = fusion
        self.fallback = fallback
        self.idempotency = IdempotencyCache(settings.idempotency_cache_size)

    # --- idempotent writes ----------------------------------------------------

    def _idempotent(
        self,
        method: str,
        request: Message,
        ctx: WriteContext,
        apply: Callable[[Callable[[int], str]], Message],
        response_type: type[Message],
    ) -> Any:
        """Run ``apply`` once per (client, method, idempotency key).

        ``apply`` receives ``event_id(i)``: ids derived from the key, so a
        retry that reaches another gateway replica produces the same event
        ids, which every consumer deduplicates.
        """
        key_value: str = getattr(request, "idempotency_key", "")
        if not key_value:
            return apply(lambda _i: str(uuid.uuid4()))
        if len(key_value.encode()) > MAX_KEY_BYTES:
            raise InvalidArgument("idempotency_key", f"must be at most {MAX_KEY_BYTES} bytes")
        key = (ctx.client, method, key_value)
        print_ = fingerprint(request)
        stored = self.idempotency.get(key, print_)
        if stored is not None:
            IDEMPOTENT_REPLAYS.labels(method).inc()
            answer = response_type()
            answer.ParseFromString(stored)
            return answer
        answer = apply(
            lambda i: str(
                uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{ctx.client}/{method}/{key_value}/{i}")
            )
        )
        self.idempotency.put(key, print_, answer.SerializeToString())
        return answer

    def register_user(
        self, request: gateway_pb2.RegisterUserRequest, ctx: WriteContext
    ) -> gateway_pb2.RegisterUserResponse:
        if request.user_id:
            check_id("user_id", request.user_id)
        attributes = check_attributes(
            "attributes", request.attributes, self.settings.max_attributes
        )
        check_text("interest_text", request.interest_text, self.settings.max_text_bytes)

        def apply(event_id: Callable[[int], str]) -> gateway_pb2.RegisterUserResponse:
            user_id = request.user_id or f"u-{event_id(1000)[:18]}"
            vector = self._embed_optional(request.interest_text, ctx.deadline)
            event = new_event(
                "gateway",
                event_id=event_id(0),
                user_registered=events_pb2.UserRegistered(
                    user_id=user_id,
                    attributes=attributes,
                    interest_text=request.interest_text,
                    interest_vector=vector or [],
                ),
            )
            self.events.publish([event])
            return gateway_pb2.RegisterUserResponse(user_id=user_id, event_id=event.event_id)

        result: gateway_pb2.RegisterUserResponse = self._idempotent(
            "RegisterUser", request, ctx, apply, gateway_pb2.RegisterUserResponse
        )
        return result

    def record_interactions(
        self, request: gateway_pb2.RecordInteractionsRequest, ctx: WriteContext
    ) -> gateway_pb2.RecordInteractionsResponse:
        check_count("interactions", len(request.interactions), self.settings.max_batch)
        for i, item in enumerate(request.interactions):
            check_id(f"interactions[{i}].user_id", item.user_id)
            check_id(f"interactions[{i}].item_id", item.item_id)
            kind = item.kind or "view"
            if not KIND_PATTERN.match(kind):
                raise InvalidArgument(f"interactions[{i}].kind", "must match [a-z][a-z0-9_]{0,31}")
            if not math.isfinite(item.value):
                raise InvalidArgument(f"interactions[{i}].value", "must be a finite number")
            if item.timestamp_ms < 0:
                raise InvalidArgument(f"interactions[{i}].timestamp_ms", "must be >= 0")

        def apply(event_id: Callable[[int], str]) -> gateway_pb2.RecordInteractionsResponse:
            events = [
                new_event(
                    "gateway",
                    event_id=event_id(i),
                    timestamp_ms=item.timestamp_ms or None,
                    interaction=events_pb2.Interaction(
                        user_id=item.user_id,
                        item_id=item.item_id,
                        kind=item.kind or "view",
                        value=item.value if item.value else 1.0,
                    ),
                )
                for i, item in enumerate(request.interactions)
            ]
            self.events.publish(events)
            return gateway_pb2.RecordInteractionsResponse(
                recorded=len(events), event_ids=[e.event_id for e in events]
            )

        result: gateway_pb2.RecordInteractionsResponse = self._idempotent(
            "RecordInteractions", request, ctx, apply, gateway_pb2.RecordInteractionsResponse
        )
        return result

    def upsert_items(
        self, request: gateway_pb2.GatewayUpsertItemsRequest, ctx: WriteContext
    ) -> gateway_pb2.GatewayUpsertItemsResponse:
        check_count("items", len(request.items), self.settings.max_batch)
        for i, item in enumerate(request.items):
            check_id(f"items[{i}].item_id", item.item_id)
            if not item.text.strip():
                raise InvalidArgument(
                    f"items[{i}].text", "must not be empty (it is what the encoder reads)"
                )
            check_text(f"items[{i}].text", item.text, self.settings.max_text_bytes)
            check_attributes(
                f"items[{i}].attributes", item.attributes, self.settings.max_attributes
            )

        def apply(event_id: Callable[[int], str]) -> gateway_pb2.GatewayUpsertItemsResponse:
            vectors = self.encoder.embed([item.text for item in request.items], ctx.deadline)
            records = [
                common_pb2.ItemRecord(
                    item_id=item.item_id,
                    text=item.text,
                    attributes=item.attributes,
                    tags=item.tags,
                    content_vector=vector,
                )
                for item, vector in zip(request.items, vectors, strict=True)
            ]
            events = [
                new_event(
                    "gateway",
                    event_id=event_id(i),
                    item_upserted=events_pb2.ItemUpserted(
                        item_id=r.item_id,
                        text=r.text,
                        attributes=r.attributes,
                        tags=r.tags,
                        content_vector=r.content_vector,
                    ),
                )
                for i, r in enumerate(records)
            ]
            # The event first: if the broker is down nothing is applied anywhere.
            self.events.publish(events)
            try:
                self.fusion.upsert_items(records, ctx.deadline)
            except (Unavailable, DeadlineExceeded) as exc:
                # Fusion also applies item events from the topic, so it catches up.
                log.warning("fusion upsert deferred to the events topic", extra={"error": str(exc)})
            return gateway_pb2.GatewayUpsertItemsResponse(
                upserted=len(records), event_ids=[e.event_id for e in events]
            )

        result: gateway_pb2.GatewayUpsertItemsResponse = self._idempotent(
            "UpsertItems", request, ctx, apply, gateway_pb2.GatewayUpsertItemsResponse
        )
        return result

    def forget_user(
        self, request: gateway_pb2.ForgetUserRequest, ctx: WriteContext
    ) -> gateway_pb2.ForgetUserResponse:
        check_id("user_id", request.user_id)

        def apply(event_id: Callable[[int], str]) -> gateway_pb2.ForgetUserResponse:
            event = new_event(
                "gateway",
                event_id=event_id(0),
                user_forgotten=events_pb2.UserForgotten(user_id=request.user_id),
            )
            self.events.publish([event])
            return gateway_pb2.ForgetUserResponse(event_id=event.event_id)

        result: gateway_pb2.ForgetUserResponse = self._idempotent(
            "ForgetUser", request, ctx, apply, gateway_pb2.ForgetUserResponse
        )
        return result

    # --- reads ------------------------------------------------------------

    def _embed_optional(self, text: str, deadline: Deadline) -> list[float] | None:
        """Interest vector, or None when there is no text or the encoder is down
        (fusion then asks the encoder itself when it applies the event)."""
        if not text.strip():
            return None
        try:
            return self.encoder.embed([text], deadline)[0]
        except (Unavailable, DeadlineExceeded) as exc:
            log.warning(
                "encoder unavailable; interest text sent without vector", extra={"error": str(exc)}
            )
            return None

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.settings.max_k:
            raise InvalidArgument("k", f"must be 1..{self.settings.max_k}, got {k}")

    def recommend(
        self, request: gateway_pb2.GatewayRecommendRequest, deadline: Deadline
    ) -> gateway_pb2.GatewayRecommendResponse:
        user, downstream = self._recommend_request(request, deadline)
        try:
            reply = self.fusion.recommend(downstream, deadline)
        except (Unavailable, DeadlineExceeded) as exc:
            return self._fallback_recommend(request, user, exc)
        return gateway_pb2.GatewayRecommendResponse(
            items=reply.items,
            model_version=reply.model_version,
            new_user=reply.new_user,
            degraded=False,
        )

    def recommend_wire(
        self, request: gateway_pb2.GatewayRecommendRequest, deadline: Deadline
    ) -> bytes | gateway_pb2.GatewayRecommendResponse:
        """``recommend``, with fusion's answer passed on as the bytes fusion sent.

        ``RecommendResponse`` and ``GatewayRecommendResponse`` share fields 1-3
        (items, model_version, new_user: same numbers and types) and
        ``degraded = false`` is not on the wire, so fusion's serialised reply is
        the serialised gateway answer: no decode and re-encode per call
        (tests/unit/gateway checks the two messages stay compatible). The
        fallback answer is a message as in ``recommend``.
        """
        user, downstream = self._recommend_request(request, deadline)
        try:
            return self.fusion.recommend_wire(downstream, deadline)
        except (Unavailable, DeadlineExceeded) as exc:
            return self._fallback_recommend(request, user, exc)

    def _recommend_request(
        self, request: gateway_pb2.GatewayRecommendRequest, deadline: Deadline
    ) -> tuple[common_pb2.UserContext, fusion_pb2.RecommendRequest]:
        """Validate ``request``; (the user, fusion's request)."""
        self._check_k(request.k)
        check_filters(request.filters, self.settings)
        if len(request.exclude_item_ids) > self.settings.max_batch:
            raise InvalidArgument("exclude_item_ids", f"at most {self.settings.max_batch} entries")
        who = request.WhichOneof("who")
        user = common_pb2.UserContext()
        if who == "user_id":
            user.user_id = check_id("user_id", request.user_id)
        elif who == "anonymous":
            profile = request.anonymous
            user.attributes.update(
                check_attributes(
                    "anonymous.attributes", profile.attributes, self.settings.max_attributes
                )
            )
            check_text(
                "anonymous.interest_text", profile.interest_text, self.settings.max_text_bytes
            )
            if len(profile.recent_item_ids) > self.settings.max_batch:
                raise InvalidArgument(
                    "anonymous.recent_item_ids", f"at most {self.settings.max_batch} entries"
                )
            user.recent_item_ids.extend(profile.recent_item_ids)
            vector = self._embed_optional(profile.interest_text, deadline)
            if vector:
                user.interest_vector.extend(vector)
        else:
            raise InvalidArgument("who", "set user_id or anonymous")
        downstream = fusion_pb2.RecommendRequest(
            user=user,
            k=request.k,
            exclude_item_ids=request.exclude_item_ids,
            filters=request.filters,
        )
        return user, downstream

    def _fallback_recommend(
        self,
        request: gateway_pb2.GatewayRecommendRequest,
        user: common_pb2.UserContext,
        cause: Exception,
    ) -> gateway_pb2.GatewayRecommendResponse:
        catalog = self.fallback.get()
        if catalog is None:
            raise Unavailable(
                f"recommendations unavailable: {cause} and no fallback model in the registry"
            )
        DEGRADED.labels("Recommend").inc()
        exclude = set(request.exclude_item_ids) | set(user.recent_item_ids)
        ranked = catalog.recommend(
            request.k,
            exclude,
            request.filters.attribute_equals,
            list(request.filters.tags_any),
            list(user.interest_vector) or None,
        )
        return gateway_pb2.GatewayRecommendResponse(
            items=[common_pb2.ScoredItem(item_id=i, score=s, reason=r) for i, s, r in ranked],
            model_version=catalog.version,
            new_user=not user.user_id,
            degraded=True,
        )

    def similar_items(
        self, request: gateway_pb2.GatewaySimilarItemsRequest, deadline: Deadline
    ) -> gateway_pb2.GatewaySimilarItemsResponse:
        check_id("item_id", request.item_id)
        self._check_k(request.k)
        downstream = fusion_pb2.SimilarItemsRequest(item_id=request.item_id, k=request.k)
        try:
            reply = self.fusion.similar_items(downstream, deadline)
        except (Unavailable, DeadlineExceeded) as exc:
            catalog = self.fallback.get()
            similar = catalog.similar(request.item_id, request.k) if catalog else None
            if catalog is None or similar is None:
                raise Unavailable(f"similar items unavailable: {exc}") from None
            DEGRADED.labels("SimilarItems").inc()
            return gateway_pb2.GatewaySimilarItemsResponse(
                items=[common_pb2.ScoredItem(item_id=i, score=s, reason=r) for i, s, r in similar],
                model_version=catalog.version,
                degraded=True,
            )
        return gateway_pb2.GatewaySimilarItemsResponse(
            items=reply.items, model_version=reply.model_version
        )

    def model_info(self, deadline: Deadline) -> common_pb2.ModelInfo:
        try:
            return self.fusion.model_info(deadline)
        except (Unavailable, DeadlineExceeded):
            catalog = self.fallback.get()
            if catalog is None:
                raise
            # What the registry holds; fusion would serve it once it is back.
            return common_pb2.ModelInfo(version=catalog.version, item_count=len(catalog.item_ids))
