"""The gateway's domain logic, free of gRPC: validation, idempotent writes to
the events topic, calls to encoder and fusion, and the degraded fallback.

It works on the plain types of services/gateway/types.py: the servicer converts
the API's messages, the downstream clients fusion's. The events it produces are
protobuf by nature (``events_pb2.Event`` is what goes to the topic)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from coldstart.v1 import events_pb2
from prometheus_client import Counter

from services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.common.events import new_event
from services.gateway.downstream import Deadline
from services.gateway.fallback import FallbackCatalog, FallbackSource
from services.gateway.settings import GatewaySettings
from services.gateway.types import (
    Filters,
    ForgetUser,
    Forgotten,
    FusionRecommend,
    ItemRecord,
    ModelInfo,
    Recommendation,
    RecommendQuery,
    Recorded,
    RecordInteractions,
    Registered,
    RegisterUser,
    ScoredItem,
    SimilarItems,
    Upserted,
    UpsertItems,
    UserContext,
)

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


Answer = TypeVar("Answer")


class Encoder(Protocol):
    def embed(self, texts: list[str], deadline: Deadline) -> list[list[float]]:
        """One vector per text; Unavailable / DeadlineExceeded when the encoder is not there."""
        ...


class Fusion(Protocol):
    """Fusion in plain terms (``services.gateway.downstream.FusionClient``)."""

    def recommend(self, request: FusionRecommend, deadline: Deadline) -> Recommendation: ...

    def similar_items(
        self, item_id: str, k: int, include_display: bool, deadline: Deadline
    ) -> SimilarItems: ...

    def upsert_items(self, items: Sequence[ItemRecord], deadline: Deadline) -> int: ...

    def model_info(self, deadline: Deadline) -> ModelInfo: ...


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
    """Answers of applied writes, by (client, method, key); least recently used go first.

    The answers are frozen dataclasses, so a replay hands out the stored object itself."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str, str], tuple[str, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str], fingerprint: str) -> object | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        if entry[0] != fingerprint:
            raise InvalidArgument("idempotency_key", "already used for a different request")
        return entry[1]

    def put(self, key: tuple[str, str, str], fingerprint: str, answer: object) -> None:
        with self._lock:
            self._entries[key] = (fingerprint, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


def fingerprint(request: Any) -> str:
    """Hash of a write request (a dataclass) without its idempotency key."""
    fields = dataclasses.asdict(dataclasses.replace(request, idempotency_key=""))
    # Field names and sorted keys make it canonical; repr-exact floats survive JSON.
    text = json.dumps([type(request).__name__, fields], sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


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


def check_filters(filters: Filters, settings: GatewaySettings) -> None:
    check_attributes("filters.attribute_equals", filters.attribute_equals, settings.max_attributes)
    if len(filters.tags_any) > settings.max_attributes:
        raise InvalidArgument("filters.tags_any", f"at most {settings.max_attributes} tags")


@dataclass
class WriteContext:
    client: str
    deadline: Deadline


def _fallback_items(
    catalog: FallbackCatalog, ranked: Sequence[tuple[str, float, str]], include_display: bool
) -> list[ScoredItem]:
    return [
        ScoredItem(item, score, reason, catalog.display(item) if include_display else None)
        for item, score, reason in ranked
    ]


class GatewayCore:
    def __init__(
        self,
        settings: GatewaySettings,
        events: EventSink,
        encoder: Encoder,
        fusion: Fusion,
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
        request: Any,
        ctx: WriteContext,
        apply: Callable[[Callable[[int], str]], Answer],
    ) -> Answer:
        """Run ``apply`` once per (client, method, idempotency key); a repeat gets
        the first answer.

        ``apply`` receives ``event_id(i)``: ids derived from the key, so a
        retry that reaches another gateway replica produces the same event
        ids, which every consumer deduplicates.
        """
        key_value: str = request.idempotency_key
        if not key_value:
            return apply(lambda _i: str(uuid.uuid4()))
        if len(key_value.encode()) > MAX_KEY_BYTES:
            raise InvalidArgument("idempotency_key", f"must be at most {MAX_KEY_BYTES} bytes")
        key = (ctx.client, method, key_value)
        print_ = fingerprint(request)
        stored = self.idempotency.get(key, print_)
        if stored is not None:
            IDEMPOTENT_REPLAYS.labels(method).inc()
            return cast(Answer, stored)
        answer = apply(
            lambda i: str(
                uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{ctx.client}/{method}/{key_value}/{i}")
            )
        )
        self.idempotency.put(key, print_, answer)
        return answer

    def register_user(self, request: RegisterUser, ctx: WriteContext) -> Registered:
        if request.user_id:
            check_id("user_id", request.user_id)
        attributes = check_attributes(
            "attributes", request.attributes, self.settings.max_attributes
        )
        check_text("interest_text", request.interest_text, self.settings.max_text_bytes)

        def apply(event_id: Callable[[int], str]) -> Registered:
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
            return Registered(user_id=user_id, event_id=event.event_id)

        return self._idempotent("RegisterUser", request, ctx, apply)

    def record_interactions(self, request: RecordInteractions, ctx: WriteContext) -> Recorded:
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

        def apply(event_id: Callable[[int], str]) -> Recorded:
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
            return Recorded(recorded=len(events), event_ids=tuple(e.event_id for e in events))

        return self._idempotent("RecordInteractions", request, ctx, apply)

    def upsert_items(self, request: UpsertItems, ctx: WriteContext) -> Upserted:
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

        def apply(event_id: Callable[[int], str]) -> Upserted:
            vectors = self.encoder.embed([item.text for item in request.items], ctx.deadline)
            records = [
                ItemRecord(item.item_id, item.text, dict(item.attributes), list(item.tags), vector)
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
            return Upserted(upserted=len(records), event_ids=tuple(e.event_id for e in events))

        return self._idempotent("UpsertItems", request, ctx, apply)

    def forget_user(self, request: ForgetUser, ctx: WriteContext) -> Forgotten:
        check_id("user_id", request.user_id)

        def apply(event_id: Callable[[int], str]) -> Forgotten:
            event = new_event(
                "gateway",
                event_id=event_id(0),
                user_forgotten=events_pb2.UserForgotten(user_id=request.user_id),
            )
            self.events.publish([event])
            return Forgotten(event_id=event.event_id)

        return self._idempotent("ForgetUser", request, ctx, apply)

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

    def recommend(self, query: RecommendQuery, deadline: Deadline) -> Recommendation:
        """Fusion's answer; the registry's fallback (``degraded``) when fusion is down."""
        return self.recommend_via(query, deadline, self.fusion.recommend)

    def recommend_via(
        self,
        query: RecommendQuery,
        deadline: Deadline,
        ask: Callable[[FusionRecommend, Deadline], Answer],
    ) -> Answer | Recommendation:
        """``recommend`` with fusion asked through ``ask``, whose answer is returned
        as it is: the servicer passes a call that keeps fusion's reply in its wire form
        (``FusionClient.recommend_wire``). The fallback answers a ``Recommendation``."""
        fusion_request = self._fusion_request(query, deadline)
        try:
            return ask(fusion_request, deadline)
        except (Unavailable, DeadlineExceeded) as exc:
            return self._fallback_recommend(query, fusion_request.user, exc)

    def _fusion_request(self, query: RecommendQuery, deadline: Deadline) -> FusionRecommend:
        """Validate ``query``; fusion's request for it."""
        self._check_k(query.k)
        check_filters(query.filters, self.settings)
        if len(query.exclude_item_ids) > self.settings.max_batch:
            raise InvalidArgument("exclude_item_ids", f"at most {self.settings.max_batch} entries")
        if query.user_id is not None:
            user = UserContext(user_id=check_id("user_id", query.user_id))
        elif query.anonymous is not None:
            profile = query.anonymous
            attributes = check_attributes(
                "anonymous.attributes", profile.attributes, self.settings.max_attributes
            )
            check_text(
                "anonymous.interest_text", profile.interest_text, self.settings.max_text_bytes
            )
            if len(profile.recent_item_ids) > self.settings.max_batch:
                raise InvalidArgument(
                    "anonymous.recent_item_ids", f"at most {self.settings.max_batch} entries"
                )
            user = UserContext(
                attributes=attributes,
                interest_vector=self._embed_optional(profile.interest_text, deadline) or (),
                recent_item_ids=profile.recent_item_ids,
            )
        else:
            raise InvalidArgument("who", "set user_id or anonymous")
        filters = query.filters
        return FusionRecommend(
            user=user,
            k=query.k,
            exclude_item_ids=query.exclude_item_ids,
            filters=filters if filters.attribute_equals or filters.tags_any else None,
            include_display=query.include_display,
        )

    def _fallback_recommend(
        self, query: RecommendQuery, user: UserContext, cause: Exception
    ) -> Recommendation:
        catalog = self.fallback.get()
        if catalog is None:
            raise Unavailable(
                f"recommendations unavailable: {cause} and no fallback model in the registry"
            )
        DEGRADED.labels("Recommend").inc()
        exclude = set(query.exclude_item_ids) | set(user.recent_item_ids)
        ranked = catalog.recommend(
            query.k,
            exclude,
            query.filters.attribute_equals,
            list(query.filters.tags_any),
            list(user.interest_vector) or None,
        )
        return Recommendation(
            items=_fallback_items(catalog, ranked, query.include_display),
            model_version=catalog.version,
            new_user=not user.user_id,
            degraded=True,
        )

    def similar_items(
        self, item_id: str, k: int, deadline: Deadline, *, include_display: bool = False
    ) -> SimilarItems:
        check_id("item_id", item_id)
        self._check_k(k)
        try:
            return self.fusion.similar_items(item_id, k, include_display, deadline)
        except (Unavailable, DeadlineExceeded) as exc:
            catalog = self.fallback.get()
            similar = catalog.similar(item_id, k) if catalog else None
            if catalog is None or similar is None:
                raise Unavailable(f"similar items unavailable: {exc}") from None
            DEGRADED.labels("SimilarItems").inc()
            return SimilarItems(
                items=_fallback_items(catalog, similar, include_display),
                model_version=catalog.version,
                degraded=True,
            )

    def model_info(self, deadline: Deadline) -> ModelInfo:
        try:
            return self.fusion.model_info(deadline)
        except (Unavailable, DeadlineExceeded):
            catalog = self.fallback.get()
            if catalog is None:
                raise
            # What the registry holds; fusion would serve it once it is back.
            return ModelInfo(version=catalog.version, item_count=len(catalog.item_ids))
