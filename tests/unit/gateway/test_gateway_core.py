"""The gateway's core on its plain types (services/gateway/types.py), its
servicer's conversions and the downstream client's messages to fusion."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from coldstart.v1 import common_pb2, events_pb2, fusion_pb2, gateway_pb2

from services.common.errors import InvalidArgument, Unavailable
from services.gateway.auth import Authenticator
from services.gateway.catalog import load_catalog
from services.gateway.core import GatewayCore, WriteContext
from services.gateway.downstream import Deadline, DownstreamCaller, FusionClient
from services.gateway.fallback import FallbackCatalog, FallbackSource
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.types import (
    AnonymousUser,
    Filters,
    ForgetUser,
    FusionRecommend,
    Interaction,
    ItemDisplay,
    ItemRecord,
    ModelInfo,
    NewItem,
    Recommendation,
    RecommendQuery,
    RecordInteractions,
    RegisterUser,
    ScoredItem,
    SimilarItems,
    UpsertItems,
)


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
        self.upserts: list[list[ItemRecord]] = []
        self.requests: list[FusionRecommend] = []
        self.similar: list[tuple[str, int, bool]] = []

    def recommend(self, request: FusionRecommend, deadline: Deadline) -> Recommendation:
        self.requests.append(request)
        if self.down:
            raise Unavailable("fusion unavailable (UNAVAILABLE)")
        return Recommendation([ScoredItem("i1", 1.0, "r")], "v1")

    def similar_items(
        self, item_id: str, k: int, include_display: bool, deadline: Deadline
    ) -> SimilarItems:
        self.similar.append((item_id, k, include_display))
        if self.down:
            raise Unavailable("fusion unavailable (UNAVAILABLE)")
        return SimilarItems([ScoredItem("i2", 0.9, "similar content")], "v1")

    def upsert_items(self, items: Sequence[ItemRecord], deadline: Deadline) -> int:
        if self.down:
            raise Unavailable("fusion unavailable (UNAVAILABLE)")
        self.upserts.append(list(items))
        return len(items)

    def model_info(self, deadline: Deadline) -> ModelInfo:
        if self.down:
            raise Unavailable("fusion unavailable (UNAVAILABLE)")
        return ModelInfo(version="v1", item_count=3)


def catalog() -> FallbackCatalog:
    return FallbackCatalog(
        "v7",
        ["a", "b", "c"],
        np.array([5.0, 50.0, 1.0]),
        np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32),
        [{"genre": "x"}, {"genre": "y"}, {"genre": "x"}],
        [["t1"], ["t2"], ["t1", "t2"]],
        ["Alpha", "Beta", ""],
    )


Parts = tuple[GatewayCore, FakeSink, FakeEncoder, FakeFusion]


@pytest.fixture
def parts() -> Parts:
    sink, encoder, fusion = FakeSink(), FakeEncoder(), FakeFusion()
    source = FallbackSource(catalog, lambda: "v7")
    core = GatewayCore(GatewaySettings(max_batch=3, max_k=100), sink, encoder, fusion, source)
    return core, sink, encoder, fusion


def ctx(client: str = "c1") -> WriteContext:
    return WriteContext(client=client, deadline=Deadline(5.0))


def test_register_user_produces_one_event_with_the_interest_vector(parts: Parts) -> None:
    core, sink, _encoder, _fusion = parts
    reply = core.register_user(
        RegisterUser(attributes={"age_band": "25-34"}, interest_text="space operas"), ctx()
    )
    assert reply.user_id.startswith("u-")
    (event,) = sink.events
    assert event.user_registered.user_id == reply.user_id
    assert list(event.user_registered.interest_vector) == [1.0, 0.0]
    assert event.event_id == reply.event_id


def test_registration_goes_on_without_a_vector_when_the_encoder_is_down(parts: Parts) -> None:
    core, sink, encoder, _fusion = parts
    encoder.down = True
    core.register_user(RegisterUser(user_id="u1", interest_text="jazz"), ctx())
    assert sink.events[0].user_registered.interest_text == "jazz"
    assert list(sink.events[0].user_registered.interest_vector) == []


def test_a_retried_write_with_the_same_key_is_applied_once(parts: Parts) -> None:
    core, sink, _encoder, _fusion = parts
    request = RecordInteractions([Interaction("u1", "i1", kind="click")], idempotency_key="k-1")
    first = core.record_interactions(request, ctx())
    # An equal request (not the same object) is a replay: the first answer comes back.
    again = RecordInteractions([Interaction("u1", "i1", kind="click")], idempotency_key="k-1")
    assert core.record_interactions(again, ctx()) is first
    assert len(sink.events) == 1
    # Another client's key space is separate, and its event ids differ.
    other = core.record_interactions(request, ctx("c2"))
    assert len(sink.events) == 2
    assert other.event_ids != first.event_ids


def test_idempotent_event_ids_are_derived_from_the_key(parts: Parts) -> None:
    # A retry that lands on another gateway replica (empty cache) produces the
    # same event ids, so consumers deduplicate it.
    core, sink, encoder, fusion = parts
    request = ForgetUser("u1", idempotency_key="forget-u1")
    first = core.forget_user(request, ctx())
    replica = GatewayCore(core.settings, sink, encoder, fusion, core.fallback)
    assert replica.forget_user(request, ctx()).event_id == first.event_id


def test_reusing_a_key_for_another_request_is_refused(parts: Parts) -> None:
    core, _sink, _encoder, _fusion = parts
    core.forget_user(ForgetUser("u1", idempotency_key="k"), ctx())
    with pytest.raises(
        InvalidArgument, match="idempotency_key: already used for a different request"
    ):
        core.forget_user(ForgetUser("u2", idempotency_key="k"), ctx())
    # The key is per method: the same key on another write is a request of its own.
    core.register_user(RegisterUser(user_id="u2", idempotency_key="k"), ctx())


def test_broker_down_fails_the_write_and_applies_nothing(parts: Parts) -> None:
    core, sink, _encoder, fusion = parts
    sink.down = True
    request = UpsertItems([NewItem("new", "A new film")], idempotency_key="up-1")
    with pytest.raises(Unavailable):
        core.upsert_items(request, ctx())
    assert fusion.upserts == []  # the live index did not get a half-applied item
    sink.down = False
    core.upsert_items(request, ctx())  # the retry is applied, not answered from cache
    assert len(sink.events) == 1
    assert [r.item_id for r in fusion.upserts[0]] == ["new"]


def test_upsert_survives_fusion_being_down_since_fusion_reads_the_topic(parts: Parts) -> None:
    core, sink, _encoder, fusion = parts
    fusion.down = True
    reply = core.upsert_items(UpsertItems([NewItem("n", "t", {"genre": "x"}, ["t1"])]), ctx())
    assert reply.upserted == 1
    upserted = sink.events[0].item_upserted
    assert list(upserted.content_vector) == [1.0, 0.0]
    assert dict(upserted.attributes) == {"genre": "x"} and list(upserted.tags) == ["t1"]


def test_recommend_asks_fusion_in_plain_terms(parts: Parts) -> None:
    core, _sink, _encoder, fusion = parts
    reply = core.recommend(
        RecommendQuery(
            k=5,
            anonymous=AnonymousUser({"age_band": "18-24"}, "space", ["i9"]),
            filters=Filters({"genre": "x"}, ["t1"]),
            exclude_item_ids=["i3"],
            include_display=True,
        ),
        Deadline(5.0),
    )
    assert reply == Recommendation([ScoredItem("i1", 1.0, "r")], "v1")
    (request,) = fusion.requests
    assert request.k == 5 and request.include_display
    assert request.user.user_id == "" and dict(request.user.attributes) == {"age_band": "18-24"}
    assert list(request.user.interest_vector) == [1.0, 0.0]
    assert list(request.user.recent_item_ids) == ["i9"]
    assert request.filters == Filters({"genre": "x"}, ["t1"])
    assert list(request.exclude_item_ids) == ["i3"]
    core.recommend(RecommendQuery(k=2, user_id="u1"), Deadline(5.0))
    assert fusion.requests[-1].filters is None  # no filter: none sent
    assert not fusion.requests[-1].include_display


def test_fusion_down_gives_a_degraded_popularity_answer(parts: Parts) -> None:
    core, _sink, _encoder, fusion = parts
    fusion.down = True
    reply = core.recommend(RecommendQuery(k=2, user_id="u1"), Deadline(5.0))
    assert reply.degraded
    assert [i.item_id for i in reply.items] == ["b", "a"]
    assert all(i.display is None for i in reply.items)  # not asked for
    assert reply.model_version == "v7"
    filtered = core.recommend(
        RecommendQuery(k=5, user_id="u1", filters=Filters({"genre": "x"}), exclude_item_ids=["a"]),
        Deadline(5.0),
    )
    assert [i.item_id for i in filtered.items] == ["c"]


def test_the_fallback_fills_display_fields_when_asked(parts: Parts) -> None:
    core, _sink, _encoder, fusion = parts
    fusion.down = True
    reply = core.recommend(RecommendQuery(k=3, user_id="u1", include_display=True), Deadline(5.0))
    assert reply.degraded
    assert [(i.item_id, i.display) for i in reply.items] == [
        ("b", ItemDisplay("Beta", {"genre": "y"}, ["t2"])),
        ("a", ItemDisplay("Alpha", {"genre": "x"}, ["t1"])),
        ("c", ItemDisplay("", {"genre": "x"}, ["t1", "t2"])),  # an item without text
    ]
    similar = core.similar_items("a", 1, Deadline(5.0), include_display=True)
    assert similar.degraded
    assert [(i.item_id, i.display) for i in similar.items] == [
        ("c", ItemDisplay("", {"genre": "x"}, ["t1", "t2"]))
    ]
    plain = core.similar_items("a", 1, Deadline(5.0))
    assert plain.items[0].display is None


def test_similar_items_forwards_include_display_to_fusion(parts: Parts) -> None:
    core, _sink, _encoder, fusion = parts
    reply = core.similar_items("i1", 4, Deadline(5.0), include_display=True)
    assert reply == SimilarItems([ScoredItem("i2", 0.9, "similar content")], "v1")
    core.similar_items("i1", 4, Deadline(5.0))
    assert fusion.similar == [("i1", 4, True), ("i1", 4, False)]


def test_degraded_answer_follows_stated_interests(parts: Parts) -> None:
    core, _sink, _encoder, fusion = parts
    fusion.down = True
    reply = core.recommend(
        RecommendQuery(k=1, anonymous=AnonymousUser(interest_text="x")), Deadline(5.0)
    )
    assert reply.degraded and reply.items[0].item_id == "a"  # vector [1, 0] is item a's content
    assert reply.items[0].reason == "matches your interests"
    assert reply.new_user


def test_fusion_down_and_no_model_is_unavailable(parts: Parts) -> None:
    core, _sink, _encoder, fusion = parts
    fusion.down = True
    core.fallback = FallbackSource(lambda: None, lambda: None)
    with pytest.raises(Unavailable, match="no fallback model"):
        core.recommend(RecommendQuery(k=2, user_id="u1"), Deadline(5.0))
    with pytest.raises(Unavailable, match="fusion unavailable"):
        core.model_info(Deadline(5.0))


def test_model_info_is_fusions_or_the_registrys(parts: Parts) -> None:
    core, _sink, _encoder, fusion = parts
    assert core.model_info(Deadline(5.0)) == ModelInfo(version="v1", item_count=3)
    fusion.down = True
    assert core.model_info(Deadline(5.0)) == ModelInfo(version="v7", item_count=3)


BadCall = Callable[[GatewayCore], object]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.recommend(RecommendQuery(k=0, user_id="u1"), Deadline(1)), "k"),
        (lambda c: c.recommend(RecommendQuery(k=101, user_id="u1"), Deadline(1)), "k"),
        (lambda c: c.recommend(RecommendQuery(k=5), Deadline(1)), "who"),
        (lambda c: c.recommend(RecommendQuery(k=5, user_id=""), Deadline(1)), "user_id"),
        (lambda c: c.recommend(RecommendQuery(k=5, user_id="bad id!"), Deadline(1)), "user_id"),
        (
            lambda c: c.recommend(
                RecommendQuery(k=5, user_id="u", exclude_item_ids=["a"] * 4), Deadline(1)
            ),
            "exclude_item_ids",
        ),
        (
            lambda c: c.recommend(
                RecommendQuery(k=5, anonymous=AnonymousUser(recent_item_ids=["a"] * 4)),
                Deadline(1),
            ),
            "anonymous.recent_item_ids",
        ),
        (lambda c: c.similar_items("", 5, Deadline(1)), "item_id"),
        (lambda c: c.record_interactions(RecordInteractions([]), ctx()), "interactions"),
        (
            lambda c: c.record_interactions(
                RecordInteractions([Interaction(user_id="u", item_id="i")] * 4), ctx()
            ),
            "interactions",
        ),
        (
            lambda c: c.record_interactions(
                RecordInteractions([Interaction(user_id="u", item_id="")]), ctx()
            ),
            "interactions[0].item_id",
        ),
        (
            lambda c: c.record_interactions(
                RecordInteractions([Interaction("u", "i", value=float("nan"))]), ctx()
            ),
            "interactions[0].value",
        ),
        (
            lambda c: c.record_interactions(
                RecordInteractions([Interaction("u", "i", kind="Bad Kind")]), ctx()
            ),
            "interactions[0].kind",
        ),
        (
            lambda c: c.register_user(RegisterUser(interest_text="x" * 9000), ctx()),
            "interest_text",
        ),
        (
            lambda c: c.upsert_items(UpsertItems([NewItem("i", " ")]), ctx()),
            "items[0].text",
        ),
        (lambda c: c.forget_user(ForgetUser(""), ctx()), "user_id"),
        (
            lambda c: c.forget_user(ForgetUser("u", idempotency_key="k" * 300), ctx()),
            "idempotency_key",
        ),
    ],
)
def test_bad_input_names_the_field_and_produces_nothing(
    parts: Parts, call: BadCall, field: str
) -> None:
    core, sink, _encoder, _fusion = parts
    with pytest.raises(InvalidArgument) as raised:
        call(core)
    assert raised.value.field == field
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sink.events == []


def test_recommend_via_returns_what_ask_answers_or_falls_back(parts: Parts) -> None:
    core, _sink, _encoder, _fusion = parts
    sent = fusion_pb2.RecommendResponse(model_version="v1").SerializeToString()
    asked: list[FusionRecommend] = []

    def wire(request: FusionRecommend, deadline: Deadline) -> bytes:
        asked.append(request)
        return sent

    query = RecommendQuery(k=2, user_id="u1", include_display=True)
    assert core.recommend_via(query, Deadline(5), wire) == sent
    assert asked[0].include_display and asked[0].user.user_id == "u1"

    def down(request: FusionRecommend, deadline: Deadline) -> bytes:
        raise Unavailable("fusion unavailable (UNAVAILABLE)")

    answer = core.recommend_via(query, Deadline(5), down)
    assert isinstance(answer, Recommendation) and answer.degraded


# --- the fallback catalog's files -------------------------------------------------


def test_load_catalog_takes_titles_from_the_items_text(tmp_path: Path) -> None:
    (tmp_path / "item_ids.json").write_text(json.dumps(["a", "b", "c"]))
    np.save(tmp_path / "popularity.npy", np.array([1.0, 2.0, 3.0]))
    records = [
        {"text": "Toy Story (1995) | Animation | Comedy", "attributes": {"g": "x"}, "tags": ["t"]},
        {"text": "Untitled", "attributes": {}, "tags": []},
        {"attributes": {"g": "y"}, "tags": []},  # no text: no title
    ]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_catalog("v1", tmp_path, {})
    assert loaded.display("a") == ItemDisplay("Toy Story (1995)", {"g": "x"}, ["t"])
    assert loaded.display("b").title == "Untitled"
    assert loaded.display("c") == ItemDisplay("", {"g": "y"}, [])
    (tmp_path / "items.jsonl").unlink()
    bare = load_catalog("v1", tmp_path, {})  # a version without items.jsonl
    assert bare.display("a") == ItemDisplay("", {}, [])


# --- the servicer and the fusion client: messages <-> plain --------------------------


def test_fusions_recommend_bytes_are_the_gateways_answer() -> None:
    # The gateway passes fusion's serialised reply on as its own: the two messages
    # must keep fields 1-4 alike (4: degraded, fusion's when its online state is
    # down), and degraded=false must be absent from the wire.
    fusion_fields = fusion_pb2.RecommendResponse.DESCRIPTOR.fields_by_number
    gateway_fields = gateway_pb2.GatewayRecommendResponse.DESCRIPTOR.fields_by_number
    assert set(fusion_fields) == {1, 2, 3, 4}
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
        items=[
            common_pb2.ScoredItem(
                item_id="i1",
                score=0.5,
                reason="because",
                display=common_pb2.ItemDisplay(title="One", tags=["t"]),
            )
        ],
        model_version="v1",
        new_user=True,
    )
    decoded = gateway_pb2.GatewayRecommendResponse.FromString(reply.SerializeToString())
    assert decoded == gateway_pb2.GatewayRecommendResponse(
        items=reply.items, model_version="v1", new_user=True, degraded=False
    )


class FakeChannel:
    """Answers each fusion method with a canned reply and records the requests."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.down = False
        self.requests: list[tuple[str, Any]] = []

    def unary_unary(
        self,
        path: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        **_options: Any,
    ) -> Callable[..., Any]:
        method = path.rsplit("/", 1)[-1]

        def call(request: Any, timeout: float | None = None) -> Any:
            assert request_serializer is not None
            request_serializer(request)
            self.requests.append((method, request))
            if self.down:
                raise FakeUnavailable()
            wire = self.replies[method].SerializeToString()
            return wire if response_deserializer is None else response_deserializer(wire)

        return call


class FakeUnavailable(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


class FakeContext:
    def time_remaining(self) -> float:
        return 5.0

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


FUSION_ITEMS = [
    common_pb2.ScoredItem(
        item_id="i1",
        score=0.5,
        reason="because",
        display=common_pb2.ItemDisplay(title="One", attributes={"genre": "x"}, tags=["t1"]),
    )
]


@pytest.fixture
def served() -> tuple[GatewayServicer, GatewayServicer, FakeChannel]:
    """(a servicer passing fusion's bytes on, one decoding them, the channel to fusion)."""
    channel = FakeChannel(
        {
            "Recommend": fusion_pb2.RecommendResponse(items=FUSION_ITEMS, model_version="v1"),
            "SimilarItems": fusion_pb2.SimilarItemsResponse(items=FUSION_ITEMS, model_version="v1"),
            "GetModelInfo": common_pb2.ModelInfo(version="v1", metrics={"ndcg": 0.5}),
        }
    )
    fusion = FusionClient(channel, DownstreamCaller("fusion", 1.0, retries=0))  # type: ignore[arg-type]
    core = GatewayCore(
        GatewaySettings(), FakeSink(), FakeEncoder(), fusion, FallbackSource(catalog, lambda: "v7")
    )
    auth = Authenticator({}, 0, 1)
    return GatewayServicer(core, auth, fusion.recommend_wire), GatewayServicer(core, auth), channel


def test_include_display_reaches_fusion_and_its_display_fields_come_back(
    served: tuple[GatewayServicer, GatewayServicer, FakeChannel],
) -> None:
    wire, decoding, channel = served
    context: Any = FakeContext()
    request = gateway_pb2.GatewayRecommendRequest(
        user_id="u1",
        k=3,
        include_display=True,
        filters=common_pb2.ItemFilters(tags_any=["t1"]),
        exclude_item_ids=["i9"],
    )
    answer = wire.Recommend(request, context)
    assert isinstance(answer, bytes)  # fusion's reply, as it came
    expected = gateway_pb2.GatewayRecommendResponse(items=FUSION_ITEMS, model_version="v1")
    assert gateway_pb2.GatewayRecommendResponse.FromString(answer) == expected
    assert decoding.Recommend(request, context) == expected  # decoded and encoded again
    for method, sent in channel.requests:
        assert method == "Recommend"
        assert sent == fusion_pb2.RecommendRequest(
            user=common_pb2.UserContext(user_id="u1"),
            k=3,
            exclude_item_ids=["i9"],
            filters=common_pb2.ItemFilters(tags_any=["t1"]),
            include_display=True,
        )
    similar = decoding.SimilarItems(
        gateway_pb2.GatewaySimilarItemsRequest(item_id="i1", k=2, include_display=True), context
    )
    assert channel.requests[-1] == (
        "SimilarItems",
        fusion_pb2.SimilarItemsRequest(item_id="i1", k=2, include_display=True),
    )
    assert similar == gateway_pb2.GatewaySimilarItemsResponse(
        items=FUSION_ITEMS, model_version="v1"
    )
    decoding.Recommend(gateway_pb2.GatewayRecommendRequest(user_id="u1", k=3), context)
    last: fusion_pb2.RecommendRequest = channel.requests.pop()[1]
    assert not last.include_display and not last.HasField("filters")


def test_the_servicer_answers_the_fallback_and_writes_as_messages(
    served: tuple[GatewayServicer, GatewayServicer, FakeChannel],
) -> None:
    wire, _decoding, channel = served
    context: Any = FakeContext()
    info = wire.GetModelInfo(gateway_pb2.GatewayGetModelInfoRequest(), context)
    assert info == common_pb2.ModelInfo(version="v1", metrics={"ndcg": 0.5})
    channel.down = True
    answer = wire.Recommend(
        gateway_pb2.GatewayRecommendRequest(user_id="u1", k=1, include_display=True), context
    )
    assert answer == gateway_pb2.GatewayRecommendResponse(
        items=[
            common_pb2.ScoredItem(
                item_id="b",
                score=1.0,
                reason="popular right now",
                display=common_pb2.ItemDisplay(
                    title="Beta", attributes={"genre": "y"}, tags=["t2"]
                ),
            )
        ],
        model_version="v7",
        degraded=True,
    )
    recorded = wire.RecordInteractions(
        gateway_pb2.RecordInteractionsRequest(
            interactions=[gateway_pb2.InteractionRecord(user_id="u1", item_id="i1")],
            idempotency_key="k",
        ),
        context,
    )
    assert recorded.recorded == 1 and len(recorded.event_ids) == 1
    registered = wire.RegisterUser(gateway_pb2.RegisterUserRequest(user_id="u1"), context)
    assert registered.user_id == "u1" and registered.event_id
    assert wire.ForgetUser(gateway_pb2.ForgetUserRequest(user_id="u1"), context).event_id
    upserted = wire.UpsertItems(
        gateway_pb2.GatewayUpsertItemsRequest(items=[gateway_pb2.ItemInput(item_id="n", text="t")]),
        context,
    )
    assert upserted.upserted == 1
