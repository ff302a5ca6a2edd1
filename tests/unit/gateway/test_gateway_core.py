from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import pytest
from coldstart.v1 import common_pb2, events_pb2, fusion_pb2, gateway_pb2

from services.common.errors import InvalidArgument, Unavailable
from services.gateway.core import GatewayCore, WriteContext
from services.gateway.downstream import Deadline
from services.gateway.fallback import FallbackCatalog, FallbackSource
from services.gateway.settings import GatewaySettings


class FakeSink:
    def __init__(self) -> None:
        self.events: list[events_pb2.Event] = []
        self.down = False

    def publish(self, events: Sequence[events_pb2.Event]) -> None:
        if self.down:
            raise Unavailable("event broker unavailable: NoBrokersAvailable")
        self.events.extend(events)


class FakeEncoder:
    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    def embed(self, texts: list[str], deadline: Deadline) -> list[list[float]]:
        self.calls += 1
        if self.down:
            raise Unavailable("encoder unavailable (UNAVAILABLE)")
        return [[1.0, 0.0] for _ in texts]


class FakeFusion:
    def __init__(self) -> None:
        self.down = False
        self.upserts: list[list[common_pb2.ItemRecord]] = []
        self.requests: list[fusion_pb2.RecommendRequest] = []

    def recommend(
        self, request: fusion_pb2.RecommendRequest, deadline: Deadline
    ) -> fusion_pb2.RecommendResponse:
        self.requests.append(request)
        if self.down:
            raise Unavailable("fusion unavailable (UNAVAILABLE)")
        return fusion_pb2.RecommendResponse(
            items=[common_pb2.ScoredItem(item_id="i1", score=1.0, reason="r")], model_version="v1"
        )

    def upsert_items(self, items: list[common_pb2.ItemRecord], deadline: Deadline) -> Any:
        if self.down:
            raise Unavailable("fusion unavailable (UNAVAILABLE)")
        self.upserts.append(items)

    def similar_items(self, request: Any, deadline: Deadline) -> Any:
        raise Unavailable("fusion unavailable (UNAVAILABLE)")


def catalog() -> FallbackCatalog:
    return FallbackCatalog(
        "v7",
        ["a", "b", "c"],
        np.array([5.0, 50.0, 1.0]),
        np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32),
        [{"genre": "x"}, {"genre": "y"}, {"genre": "x"}],
        [["t1"], ["t2"], ["t1", "t2"]],
    )


@pytest.fixture
def parts() -> tuple[GatewayCore, FakeSink, FakeEncoder, FakeFusion]:
    sink, encoder, fusion = FakeSink(), FakeEncoder(), FakeFusion()
    source = FallbackSource(catalog, lambda: "v7")
    core = GatewayCore(GatewaySettings(max_batch=3, max_k=100), sink, encoder, fusion, source)  # type: ignore[arg-type]
    return core, sink, encoder, fusion


def ctx(client: str = "c1") -> WriteContext:
    return WriteContext(client=client, deadline=Deadline(5.0))


def test_register_user_produces_one_event_with_the_interest_vector(parts: Any) -> None:
    core, sink, _encoder, _fusion = parts
    reply = core.register_user(
        gateway_pb2.RegisterUserRequest(
            attributes={"age_band": "25-34"}, interest_text="space operas"
        ),
        ctx(),
    )
    assert reply.user_id.startswith("u-")
    (event,) = sink.events
    assert event.user_registered.user_id == reply.user_id
    assert list(event.user_registered.interest_vector) == [1.0, 0.0]
    assert event.event_id == reply.event_id


def test_registration_goes_on_without_a_vector_when_the_encoder_is_down(parts: Any) -> None:
    core, sink, encoder, _fusion = parts
    encoder.down = True
    core.register_user(gateway_pb2.RegisterUserRequest(user_id="u1", interest_text="jazz"), ctx())
    assert sink.events[0].user_registered.interest_text == "jazz"
    assert list(sink.events[0].user_registered.interest_vector) == []


def test_a_retried_write_with_the_same_key_is_applied_once(parts: Any) -> None:
    core, sink, _encoder, _fusion = parts
    request = gateway_pb2.RecordInteractionsRequest(
        interactions=[gateway_pb2.InteractionRecord(user_id="u1", item_id="i1", kind="click")],
        idempotency_key="k-1",
    )
    first = core.record_interactions(request, ctx())
    second = core.record_interactions(request, ctx())
    assert first == second
    assert len(sink.events) == 1
    # Another client's key space is separate, and its event ids differ.
    other = core.record_interactions(request, ctx("c2"))
    assert len(sink.events) == 2
    assert other.event_ids != first.event_ids


def test_idempotent_event_ids_are_derived_from_the_key(parts: Any) -> None:
    # A retry that lands on another gateway replica (empty cache) produces the
    # same event ids, so consumers deduplicate it.
    core, sink, encoder, fusion = parts
    request = gateway_pb2.ForgetUserRequest(user_id="u1", idempotency_key="forget-u1")
    first = core.forget_user(request, ctx())
    replica = GatewayCore(core.settings, sink, encoder, fusion, core.fallback)
    assert replica.forget_user(request, ctx()).event_id == first.event_id


def test_reusing_a_key_for_another_request_is_refused(parts: Any) -> None:
    core, _sink, _encoder, _fusion = parts
    core.forget_user(gateway_pb2.ForgetUserRequest(user_id="u1", idempotency_key="k"), ctx())
    with pytest.raises(
        InvalidArgument, match="idempotency_key: already used for a different request"
    ):
        core.forget_user(gateway_pb2.ForgetUserRequest(user_id="u2", idempotency_key="k"), ctx())


def test_broker_down_fails_the_write_and_applies_nothing(parts: Any) -> None:
    core, sink, _encoder, fusion = parts
    sink.down = True
    request = gateway_pb2.GatewayUpsertItemsRequest(
        items=[gateway_pb2.ItemInput(item_id="new", text="A new film")], idempotency_key="up-1"
    )
    with pytest.raises(Unavailable):
        core.upsert_items(request, ctx())
    assert fusion.upserts == []  # the live index did not get a half-applied item
    sink.down = False
    core.upsert_items(request, ctx())  # the retry is applied, not answered from cache
    assert len(sink.events) == 1
    assert [r.item_id for r in fusion.upserts[0]] == ["new"]


def test_upsert_survives_fusion_being_down_since_fusion_reads_the_topic(parts: Any) -> None:
    core, sink, _encoder, fusion = parts
    fusion.down = True
    reply = core.upsert_items(
        gateway_pb2.GatewayUpsertItemsRequest(items=[gateway_pb2.ItemInput(item_id="n", text="t")]),
        ctx(),
    )
    assert reply.upserted == 1
    assert list(sink.events[0].item_upserted.content_vector) == [1.0, 0.0]


def test_fusion_down_gives_a_degraded_popularity_answer(parts: Any) -> None:
    core, _sink, _encoder, fusion = parts
    fusion.down = True
    reply = core.recommend(gateway_pb2.GatewayRecommendRequest(user_id="u1", k=2), Deadline(5.0))
    assert reply.degraded
    assert [i.item_id for i in reply.items] == ["b", "a"]
    assert reply.model_version == "v7"
    filtered = core.recommend(
        gateway_pb2.GatewayRecommendRequest(
            user_id="u1",
            k=5,
            filters=common_pb2.ItemFilters(attribute_equals={"genre": "x"}),
            exclude_item_ids=["a"],
        ),
        Deadline(5.0),
    )
    assert [i.item_id for i in filtered.items] == ["c"]


def test_degraded_answer_follows_stated_interests(parts: Any) -> None:
    core, _sink, _encoder, fusion = parts
    fusion.down = True
    reply = core.recommend(
        gateway_pb2.GatewayRecommendRequest(
            anonymous=gateway_pb2.AnonymousProfile(interest_text="x"), k=1
        ),
        Deadline(5.0),
    )
    assert reply.degraded and reply.items[0].item_id == "a"  # vector [1, 0] is item a's content
    assert reply.items[0].reason == "matches your interests"


def test_fusion_down_and_no_model_is_unavailable(parts: Any) -> None:
    core, _sink, _encoder, fusion = parts
    fusion.down = True
    core.fallback = FallbackSource(lambda: None, lambda: None)
    with pytest.raises(Unavailable, match="no fallback model"):
        core.recommend(gateway_pb2.GatewayRecommendRequest(user_id="u1", k=2), Deadline(5.0))


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (
            lambda c: c.recommend(
                gateway_pb2.GatewayRecommendRequest(user_id="u1", k=0), Deadline(1)
            ),
            "k",
        ),
        (
            lambda c: c.recommend(
                gateway_pb2.GatewayRecommendRequest(user_id="u1", k=101), Deadline(1)
            ),
            "k",
        ),
        (lambda c: c.recommend(gateway_pb2.GatewayRecommendRequest(k=5), Deadline(1)), "who"),
        (
            lambda c: c.recommend(
                gateway_pb2.GatewayRecommendRequest(user_id="bad id!", k=5), Deadline(1)
            ),
            "user_id",
        ),
        (
            lambda c: c.record_interactions(gateway_pb2.RecordInteractionsRequest(), ctx()),
            "interactions",
        ),
        (
            lambda c: c.record_interactions(
                gateway_pb2.RecordInteractionsRequest(
                    interactions=[gateway_pb2.InteractionRecord(user_id="u", item_id="i")] * 4
                ),
                ctx(),
            ),
            "interactions",
        ),
        (
            lambda c: c.record_interactions(
                gateway_pb2.RecordInteractionsRequest(
                    interactions=[gateway_pb2.InteractionRecord(user_id="u", item_id="")]
                ),
                ctx(),
            ),
            "interactions[0].item_id",
        ),
        (
            lambda c: c.record_interactions(
                gateway_pb2.RecordInteractionsRequest(
                    interactions=[
                        gateway_pb2.InteractionRecord(user_id="u", item_id="i", value=float("nan"))
                    ]
                ),
                ctx(),
            ),
            "interactions[0].value",
        ),
        (
            lambda c: c.record_interactions(
                gateway_pb2.RecordInteractionsRequest(
                    interactions=[
                        gateway_pb2.InteractionRecord(user_id="u", item_id="i", kind="Bad Kind")
                    ]
                ),
                ctx(),
            ),
            "interactions[0].kind",
        ),
        (
            lambda c: c.register_user(
                gateway_pb2.RegisterUserRequest(interest_text="x" * 9000), ctx()
            ),
            "interest_text",
        ),
        (
            lambda c: c.upsert_items(
                gateway_pb2.GatewayUpsertItemsRequest(
                    items=[gateway_pb2.ItemInput(item_id="i", text=" ")]
                ),
                ctx(),
            ),
            "items[0].text",
        ),
        (lambda c: c.forget_user(gateway_pb2.ForgetUserRequest(), ctx()), "user_id"),
        (
            lambda c: c.forget_user(
                gateway_pb2.ForgetUserRequest(user_id="u", idempotency_key="k" * 300), ctx()
            ),
            "idempotency_key",
        ),
    ],
)
def test_bad_input_names_the_field_and_produces_nothing(parts: Any, call: Any, field: str) -> None:
    core, sink, _encoder, _fusion = parts
    with pytest.raises(InvalidArgument) as raised:
        call(core)
    assert raised.value.field == field
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sink.events == []


def test_fusions_recommend_bytes_are_the_gateways_answer() -> None:
    # The gateway passes fusion's serialised reply on as its own: the two messages
    # must keep fields 1-3 alike, and degraded=false must be absent from the wire.
    fusion_fields = fusion_pb2.RecommendResponse.DESCRIPTOR.fields_by_number
    gateway_fields = gateway_pb2.GatewayRecommendResponse.DESCRIPTOR.fields_by_number
    assert set(fusion_fields) == {1, 2, 3}
    for number, field in fusion_fields.items():
        other = gateway_fields[number]
        assert (field.name, field.type, field.is_repeated) == (
            other.name,
            other.type,
            other.is_repeated,
        )
        assert (field.message_type and field.message_type.full_name) == (
            other.message_type and other.message_type.full_name
        )
    reply = fusion_pb2.RecommendResponse(
        items=[common_pb2.ScoredItem(item_id="i1", score=0.5, reason="because")],
        model_version="v1",
        new_user=True,
    )
    decoded = gateway_pb2.GatewayRecommendResponse.FromString(reply.SerializeToString())
    assert decoded == gateway_pb2.GatewayRecommendResponse(
        items=reply.items, model_version="v1", new_user=True, degraded=False
    )


def test_recommend_wire_passes_fusions_bytes_or_falls_back(parts: Any) -> None:
    core, _sink, _encoder, fusion = parts
    sent = fusion_pb2.RecommendResponse(model_version="v1").SerializeToString()
    fusion.recommend_wire = lambda request, deadline: sent
    request = gateway_pb2.GatewayRecommendRequest(user_id="u1", k=2)
    assert core.recommend_wire(request, Deadline(5)) == sent

    def down(request: Any, deadline: Deadline) -> bytes:
        raise Unavailable("fusion unavailable (UNAVAILABLE)")

    fusion.recommend_wire = down
    answer = core.recommend_wire(request, Deadline(5))
    assert isinstance(answer, gateway_pb2.GatewayRecommendResponse) and answer.degraded
