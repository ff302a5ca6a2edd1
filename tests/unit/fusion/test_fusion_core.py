from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.common.errors import InvalidArgument, NotFound
from services.common.registry import ModelRegistry
from services.fusion.core import Filters, ItemInput, ModelHolder, Recommender, UserQuery
from services.fusion.model_version import ModelVersion
from services.fusion.online_state import UserStore
from services.fusion.synthetic import publish_version


@pytest.fixture()
def registry(tmp_path: Path, version_path: Path) -> ModelRegistry:
    """A private registry holding a copy of the shared synthetic version."""
    import shutil

    registry = ModelRegistry(tmp_path / "registry")
    registry.versions_dir.mkdir(parents=True)
    shutil.copytree(version_path, registry.path(version_path.name))
    registry.set_current(version_path.name)
    return registry


@pytest.fixture()
def core(registry: ModelRegistry) -> Recommender:
    holder = ModelHolder(registry, ModelVersion.load)
    core = Recommender(holder, UserStore(), candidates=100)
    holder.warm = core.warm
    holder.load_initial()
    return core


@pytest.fixture()
def rated_core(registry: ModelRegistry) -> Recommender:
    """``core`` over a version whose manifest has ``user_history`` (ratings below 4 are
    unliked), as the trainer's exports do."""
    import json

    version = registry.current()
    assert version is not None
    manifest_path = registry.path(version) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["user_history"] = {"positive_threshold": 4.0, "rule": "ratings below are unliked"}
    manifest_path.write_text(json.dumps(manifest))
    holder = ModelHolder(registry, ModelVersion.load)
    core = Recommender(holder, UserStore(), candidates=100)
    holder.load_initial()
    assert core.holder.current.positive_threshold == 4.0
    return core


def interact(core: Recommender, user: str, item: str, kind: str = "view", value: float = 1) -> None:
    from coldstart.v1 import events_pb2

    from services.common.events import new_event

    interaction = events_pb2.Interaction(user_id=user, item_id=item, kind=kind, value=value)
    assert core.store.apply(new_event("t", interaction=interaction))


def rows_of(core: Recommender, *item_ids: str) -> list[int]:
    index = core.holder.current.index
    return [index.row(i) for i in item_ids]  # type: ignore[misc]


def content_of(core: Recommender, item_id: str) -> np.ndarray:
    index = core.holder.current.index
    row = index.row(item_id)
    assert row is not None
    return index.content(np.asarray([row]))[0]


def test_unknown_user_is_served_as_new_and_history_changes_the_answer(core: Recommender) -> None:
    cold = core.recommend(UserQuery(user_id="nobody"), 10)
    assert cold.new_user
    assert len(cold.items) == 10
    assert cold.model_version == core.holder.current.version
    assert all(i.reason.startswith("popular with") for i in cold.items)

    warm = core.recommend(UserQuery(user_id="nobody", recent_item_ids=["item-5"]), 10)
    assert {i.item_id for i in warm.items} != {i.item_id for i in cold.items}
    assert "item-5" not in {i.item_id for i in warm.items}  # seen items are not recommended
    assert any(
        i.reason == "similar to Item 5 (c5)" or i.reason.startswith("similar to Item 5")
        for i in warm.items
    )
    assert [i.score for i in warm.items] == sorted((i.score for i in warm.items), reverse=True)


def test_stated_interest_is_used_and_explained(core: Recommender) -> None:
    interest = content_of(core, "item-42")
    result = core.recommend(UserQuery(interest_vector=interest.tolist()), 5)
    assert "matches your interests" in {i.reason for i in result.items}
    assert "item-42" in {i.item_id for i in result.items}


def test_online_state_is_merged(core: Recommender) -> None:
    from coldstart.v1 import events_pb2

    from services.common.events import new_event

    core.store.apply(
        new_event(
            "t", interaction=events_pb2.Interaction(user_id="u", item_id="item-9", kind="view")
        )
    )
    result = core.recommend(UserQuery(user_id="u"), 10)
    assert not result.new_user
    assert "item-9" not in {i.item_id for i in result.items}
    assert any(i.reason.startswith("similar to Item 9") for i in result.items)


@pytest.mark.parametrize("k", [0, -1, 1001])
def test_k_out_of_range_is_invalid(core: Recommender, k: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        core.recommend(UserQuery(), k)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.field == "k"


@pytest.mark.parametrize(
    ("vector", "problem"),
    [
        ([0.1] * 15, "must have 16 values, got 15"),
        ([float("nan")] * 16, "finite"),
        ([float("inf")] + [0.0] * 15, "finite"),
    ],
)
def test_bad_interest_vectors_are_invalid(
    core: Recommender, vector: list[float], problem: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        core.recommend(UserQuery(interest_vector=vector), 5)
    assert raised.value.field == "user.interest_vector"
    assert problem in raised.value.message


def test_exclusions_filters_and_unknown_ids(core: Recommender) -> None:
    first = core.recommend(UserQuery(recent_item_ids=["item-1"]), 5)
    excluded = [first.items[0].item_id, "no-such-item"]
    again = core.recommend(UserQuery(recent_item_ids=["item-1"]), 5, exclude_item_ids=excluded)
    assert first.items[0].item_id not in {i.item_id for i in again.items}
    assert len(again.items) == 5  # the unknown id is ignored, not an error

    filtered = core.recommend(UserQuery(), 20, filters=Filters({"category": "c3"}, ["t1"]))
    index = core.holder.current.index
    eligible = index.eligible({"category": "c3"}, ["t1"])
    assert eligible is not None
    # Every matching item is reachable: the answer is only short when the catalog is.
    assert len(filtered.items) == min(20, len(eligible))
    assert len(filtered.items) >= 10
    for item in filtered.items:
        meta = index.meta(index.row(item.item_id))  # type: ignore[arg-type]
        assert meta.attributes["category"] == "c3" and "t1" in meta.tags
    assert core.recommend(UserQuery(), 5, filters=Filters({"category": "none"})).items == []


def test_rank_reports_unknown_candidates_and_orders_known_ones(core: Recommender) -> None:
    result = core.rank(
        UserQuery(recent_item_ids=["item-3"]), ["item-3", "ghost", "item-800", "item-3"]
    )
    assert result.unknown_item_ids == ["ghost"]
    assert sorted(i.item_id for i in result.items) == ["item-3", "item-800"]
    assert result.items[0].score >= result.items[1].score


def test_similar_items(core: Recommender) -> None:
    result = core.similar_items("item-7", 5)
    assert len(result.items) == 5 and "item-7" not in {i.item_id for i in result.items}
    assert all(i.reason == "similar to Item 7 (c" + i.reason.split("(c")[1] for i in result.items)
    with pytest.raises(NotFound):
        core.similar_items("ghost", 5)


def test_upserted_item_is_recommended_by_the_next_call(core: Recommender) -> None:
    vector = content_of(core, "item-11")
    upserted, version = core.upsert_items(
        [ItemInput("fresh", vector.tolist(), "Fresh", {"category": "c0"})]
    )
    assert (upserted, version) == (1, core.holder.current.version)
    result = core.similar_items("item-11", 3)
    assert result.items[0].item_id == "fresh"
    with pytest.raises(InvalidArgument) as raised:
        core.upsert_items([ItemInput("bad", [float("nan")] * 16)])
    assert raised.value.field == "items[0].content_vector"
    with pytest.raises(InvalidArgument):
        core.upsert_items([ItemInput("", vector.tolist())])


def test_swap_keeps_upserts_and_in_flight_calls_finish_on_the_old_version(
    core: Recommender, registry: ModelRegistry
) -> None:
    old = core.holder.current
    core.upsert_items([ItemInput("fresh", content_of(core, "item-11").tolist(), "Fresh")])
    new_version = publish_version(registry, n_items=300, seed=3)
    assert core.holder.poll_once()
    assert core.holder.current.version == new_version != old.version
    # An upserted item survives the swap.
    assert core.holder.current.index.row("fresh") is not None
    assert core.recommend(UserQuery(), 3).model_version == new_version
    # A call holding the old reference still works on it.
    assert old.index.row("item-999") is not None
    assert core.holder.poll_once() is False


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(
    core: Recommender, registry: ModelRegistry
) -> None:
    old = core.holder.current.version
    bad = publish_version(registry, n_items=50, seed=4)
    (registry.path(bad) / "ranker.onnx").write_bytes(b"corrupt")
    before = (
        REGISTRY.get_sample_value("coldstart_fusion_model_load_failures_total", {"version": bad})
        or 0
    )
    assert not core.holder.poll_once()
    assert core.holder.current.version == old
    after = REGISTRY.get_sample_value(
        "coldstart_fusion_model_load_failures_total", {"version": bad}
    )
    assert after == before + 1
    assert not core.holder.poll_once()  # not retried every poll
    assert REGISTRY.get_sample_value("coldstart_fusion_model_info", {"version": old}) == 1


def test_no_current_version_is_a_clear_error(tmp_path: Path) -> None:
    from services.fusion.model_version import ModelLoadError

    holder = ModelHolder(ModelRegistry(tmp_path / "empty"), ModelVersion.load)
    with pytest.raises(ModelLoadError, match=r"no model in registry .*run `coldstart train` first"):
        holder.load_initial()


def test_concurrent_calls_during_swaps_never_fail(
    core: Recommender, registry: ModelRegistry
) -> None:
    errors: list[BaseException] = []
    versions: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                versions.add(
                    core.recommend(UserQuery(recent_item_ids=["item-2"]), 10).model_version
                )
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for seed in (5, 6):
            publish_version(registry, n_items=200, seed=seed)
            assert core.holder.poll_once()
        for _ in range(500):  # until a client call was served by the last version
            if core.holder.current.version in versions:
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert core.holder.current.version in versions
    assert len(versions) >= 2


def test_candidates_follow_the_model_unless_the_setting_overrides(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    # The ranker was trained to order the top ranker.candidates tower candidates:
    # serving hands it as many, unless an operator sets `candidates`.
    holder = ModelHolder(registry, ModelVersion.load)
    holder.load_initial()
    model = holder.current
    assert model.ranker_candidates == 100  # what the synthetic version declares
    searched: list[list[int]] = []
    search = model.index.search_batch

    def spy(queries: np.ndarray, fetches: list[int], **kw: object) -> object:
        searched.append(list(fetches))
        return search(queries, fetches, **kw)  # type: ignore[arg-type]

    model.index.search_batch = spy  # type: ignore[method-assign,assignment]
    Recommender(holder, UserStore()).recommend(UserQuery(user_id="u"), 10)
    Recommender(holder, UserStore(), candidates=150).recommend(UserQuery(user_id="u"), 10)
    Recommender(holder, UserStore()).recommend(UserQuery(user_id="u"), 300)  # k above it
    assert searched == [[100], [150], [300]]

    model.ranker_candidates = None  # a version that does not say
    assert Recommender(holder, UserStore()).candidates_for(model) == 200


def test_candidates_setting_zero_means_the_models_and_negative_is_refused() -> None:
    from services.common.settings import SettingsError, load_settings
    from services.fusion.settings import FusionSettings

    assert load_settings(FusionSettings, "fusion", environ={}).candidates == 0
    with pytest.raises(SettingsError, match="candidates: must be >= 0"):
        load_settings(FusionSettings, "fusion", environ={}, overrides=["candidates=-1"])


@pytest.mark.parametrize("name", ["ef_search", "nprobe"])
def test_search_breadth_settings_zero_means_the_versions_and_negative_is_refused(
    name: str,
) -> None:
    from services.common.settings import SettingsError, load_settings
    from services.fusion.settings import FusionSettings

    assert getattr(load_settings(FusionSettings, "fusion", environ={}), name) == 0
    with pytest.raises(SettingsError, match=f"{name}: must be >= 0"):
        load_settings(FusionSettings, "fusion", environ={}, overrides=[f"{name}=-1"])


def test_low_ratings_are_not_history_but_are_never_recommended_again(
    rated_core: Recommender,
) -> None:
    core = rated_core
    liked = ["item-9", "item-12"]
    # The item this history would put first: the user then rates it 1 star.
    top = core.recommend(UserQuery(recent_item_ids=liked), 10).items[0].item_id
    interact(core, "u", "item-9")  # an implicit positive
    interact(core, "u", "item-12", "rating", 4.0)  # at the threshold: liked
    interact(core, "u", top, "rating", 1.0)
    interact(core, "u", "no-such-item", "rating", 1.0)  # unknown ids are ignored

    request = core._request(UserQuery(user_id="u"), 10)
    assert request.user.history_rows.tolist() == rows_of(core, *liked)
    assert request.user.unliked_rows.tolist() == rows_of(core, top)
    assert set(rows_of(core, *liked, top)) <= set(request.excluded.tolist())
    result = core.recommend(UserQuery(user_id="u"), 10)
    assert top not in {i.item_id for i in result.items}
    # Served exactly as the liked history alone with the rated item excluded: the low
    # rating neither moves the user vector nor the ranker nor the reasons.
    alone = core.recommend(UserQuery(recent_item_ids=liked), 10, exclude_item_ids=[top])
    assert [(i.item_id, i.score, i.reason) for i in result.items] == [
        (i.item_id, i.score, i.reason) for i in alone.items
    ]

    # A later view of the item rated low makes it liked (the latest interaction decides).
    interact(core, "u", top, "view")
    request = core._request(UserQuery(user_id="u"), 10)
    assert request.user.history_rows.tolist() == rows_of(core, *liked, top)
    assert request.user.unliked_rows.tolist() == []


def test_request_ids_are_liked_and_each_list_is_capped(rated_core: Recommender) -> None:
    core = rated_core
    core.store.history_length = 3
    interact(core, "u", "item-1", "rating", 2.0)
    interact(core, "u", "item-2", "rating", 3.5)
    # The request's own ids carry no value: liked, also one the state holds as rated low.
    request = core._request(UserQuery(user_id="u", recent_item_ids=["item-2"]), 5)
    # (state then request ids, a repeat kept as before: only the split is new)
    assert request.user.history_rows.tolist() == rows_of(core, "item-2", "item-2")
    assert request.user.unliked_rows.tolist() == rows_of(core, "item-1")
    many = [f"item-{i}" for i in range(20, 25)]
    request = core._request(UserQuery(user_id="u", recent_item_ids=many), 5)
    assert request.user.history_rows.tolist() == rows_of(core, *many[-3:])
    assert request.user.unliked_rows.tolist() == rows_of(core, "item-1", "item-2")


def test_a_version_without_user_history_treats_every_interaction_as_liked(
    core: Recommender,
) -> None:
    assert core.holder.current.positive_threshold == float("-inf")
    interact(core, "u", "item-5", "rating", 1.0)
    request = core._request(UserQuery(user_id="u"), 10)
    assert request.user.history_rows.tolist() == rows_of(core, "item-5")
    assert request.user.unliked_rows.tolist() == []
    result = core.recommend(UserQuery(user_id="u"), 10)
    assert any(i.reason.startswith("similar to Item 5") for i in result.items)
