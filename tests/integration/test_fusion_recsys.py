"""Fusion serving the trainer's real export (format ``coldstart.recommender/2``).

A tiny model is trained on the model engineer's synthetic data (one epoch,
seconds) and published with their export; fusion must load it, serve every RPC,
and compute exactly what the model computes: the user vector and the ranker
score of fusion (ONNX Runtime + the shared numpy feature builder, inputs built
from ids, attribute dicts and item ids the way requests arrive) must equal the
torch model's on the same user (<= 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from coldstart.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc

from services.common.registry import ModelRegistry
from services.fusion.core import ModelHolder, Recommender, UserQuery
from services.fusion.model_version import ModelVersion
from services.fusion.online_state import UserStore
from services.fusion.recsys_version import RecsysModelVersion
from tests.support.processes import running_service

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")

TOLERANCE = 1e-4


@dataclass
class Trained:
    registry: ModelRegistry
    path: Path
    bundle: object  # services.trainer.model.bundle.Bundle
    histories: list[np.ndarray]  # training history (item rows) per user


def item_id(row: int) -> str:
    return f"item-{row}"


def user_id(row: int) -> str:
    return f"user-{row}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from services.trainer.model.bundle import load_bundle, save_bundle
    from services.trainer.model.distributed import DistContext
    from services.trainer.model.export import publish
    from services.trainer.model.synthetic import small_config, synthetic_model_data
    from services.trainer.model.train import RunOptions, train

    torch.set_num_threads(1)
    data = synthetic_model_data()
    result = train(data, small_config(epochs=1), DistContext.single(), RunOptions())
    folder = tmp_path_factory.mktemp("recsys")
    save_bundle(
        folder / "model",
        result,
        [item_id(i) for i in range(data.n_items)],
        [user_id(u) for u in range(data.n_users)],
        {},
    )
    bundle = load_bundle(folder / "model")
    _version, path = publish(bundle, folder / "registry")
    return Trained(
        ModelRegistry(folder / "registry"),
        path,
        bundle,
        [data.history(u) for u in range(data.n_users)],
    )


@pytest.fixture(scope="module")
def core(trained: Trained) -> Iterator[Recommender]:
    holder = ModelHolder(trained.registry, ModelVersion.load)
    core = Recommender(holder, UserStore(), candidates=50)
    holder.warm = core.warm
    holder.load_initial()
    yield core
    core.close()


def attributes_of(multi_hot: np.ndarray, columns: list[tuple[str, str]]) -> dict[str, str]:
    """The request-side attribute dict of a training user's multi-hot row."""
    return {columns[j][0]: columns[j][1] for j in np.flatnonzero(multi_hot[1:] > 0) + 1}


# (user row, use its id, how many of its history items, with its stated interest)
CASES = [(0, True, 0, False), (1, True, 3, True), (2, False, 5, False), (3, True, 40, True)]


def test_the_loader_is_chosen_by_the_manifest(trained: Trained, core: Recommender) -> None:
    from services.trainer.model.bundle import Bundle

    assert isinstance(trained.bundle, Bundle)
    model = core.holder.current
    assert isinstance(model, RecsysModelVersion)
    assert model.version == trained.path.name
    assert model.dimension == trained.bundle.config.dim + 1  # the item bias dimension
    assert len(model.index) == len(trained.bundle.item_ids)


def test_user_vector_and_ranker_scores_equal_the_torch_model(
    trained: Trained, core: Recommender
) -> None:
    from services.common.recsys_features import (
        blend_standardised,
        has_stated_interest,
        prior_fields,
        ranker_applies,
        ranker_features,
        segment_prior,
        short_history_prior_applies,
        user_tower_inputs,
    )
    from services.trainer.model.bundle import Bundle

    bundle = trained.bundle
    assert isinstance(bundle, Bundle)
    tables = bundle.tables
    columns = bundle.spec.user_vocab.columns
    model = core.holder.current
    assert isinstance(model, RecsysModelVersion)
    with torch.no_grad():
        item_vecs = (
            bundle.towers.item(
                torch.from_numpy(tables["content"].astype(np.float32)),
                torch.from_numpy(tables["item_attrs"].astype(np.float32)),
                torch.from_numpy(tables["item_codes"].astype(np.int64)),
            )
            .numpy()
            .astype(np.float32)
        )
    vectors: list[np.ndarray] = []
    prior_cases = 0
    for row, with_id, n_history, with_interest in CASES:
        history = trained.histories[row][-n_history:] if n_history else np.empty(0, np.int64)
        assert len(history) == min(n_history, len(trained.histories[row])) and (
            not n_history or len(history)
        )
        interest = tables["interest"][row] if with_interest else np.zeros(0, np.float32)
        if with_interest and not np.abs(interest).sum():
            interest = tables["content"][7]  # this user stated none: give one
        query = UserQuery(
            user_id=user_id(row) if with_id else "",
            attributes=attributes_of(tables["user_attrs"][row], columns),
            interest_vector=interest.tolist(),
            recent_item_ids=[item_id(int(i)) for i in history],
        )
        request = core._request(query, 10)
        served = model.user_vector_batch([request.user])[0]

        # The model engineer's side: torch towers on the training tables.
        inputs = user_tower_inputs(
            bundle.spec,
            tables["user_attrs"][row : row + 1],
            np.asarray([tables["user_codes"][row] if with_id else 0], dtype=np.int64),
            [history],
            item_vecs,
            interest[None, :].astype(np.float32) if len(interest) else None,
        )
        with torch.no_grad():
            expected = bundle.towers.user(
                **{k: torch.from_numpy(v) for k, v in inputs.items()}
            ).numpy()[0]
        assert served.shape == expected.shape
        assert np.max(np.abs(served - expected)) <= TOLERANCE, (row, with_id, n_history)
        vectors.append(served)

        candidates = np.arange(0, len(bundle.item_ids), 9)
        scores = model.rank(request.user, candidates, served)
        feats = ranker_features(
            bundle.spec,
            bundle.ranker_tables(),
            (expected @ item_vecs[candidates].T)[None, :],
            tables["user_attrs"][row : row + 1],
            [history],
            candidates[None, :],
            interest=interest[None, :].astype(np.float32) if len(interest) else None,
        )
        assert bundle.ranker is not None
        with torch.no_grad():
            torch_scores = bundle.ranker(torch.from_numpy(feats.reshape(-1, feats.shape[2])))
        want = torch_scores.numpy().reshape(-1)
        cfg = bundle.config
        if not ranker_applies(
            len(history),
            tables["pop"][candidates],
            cfg.ranker_min_history,
            cfg.ranker_max_new_share,
            cfg.ranker_max_history,
        ):
            want = feats[0, :, 0]  # outside the trained gate the tower scores stand
        stated = has_stated_interest(interest if len(interest) else None)
        if short_history_prior_applies(len(history), cfg.prior_max_history, False, stated):
            prior = segment_prior(
                bundle.spec,
                bundle.ranker_tables(),
                tables["user_attrs"][row : row + 1],
                candidates[None, :],
                prior_fields(bundle.spec),
            )
            want = blend_standardised(want, prior[0], cfg.prior_weight)
            prior_cases += 1
        assert np.max(np.abs(scores - want)) <= TOLERANCE
    assert prior_cases == 1  # the user without history got the short-history prior
    # The cases differ (ids, history, interest reach the vector): a real comparison.
    assert (
        min(np.max(np.abs(a - b)) for n, a in enumerate(vectors) for b in vectors[n + 1 :]) > 1e-3
    )


def test_an_upserted_items_vector_is_the_item_tower_without_id(
    trained: Trained, core: Recommender
) -> None:
    from services.trainer.model.bundle import Bundle

    bundle = trained.bundle
    assert isinstance(bundle, Bundle)
    content = bundle.tables["content"][:4].astype(np.float32)
    from services.common.recsys_features import derived_item_attributes

    attributes = [{"genre": "g1"}, {"genre": "g4"}, {}, {"genre": "unknown"}]
    texts = ["One (1997)", "", "Three", "Four (2031) | x"]
    served = core.holder.current.item_vectors(content, attributes, texts)
    # The trainer's side: its attribute rows add what it derives from the text.
    rows = [{**a, **derived_item_attributes(t)} for a, t in zip(attributes, texts, strict=True)]
    with torch.no_grad():
        expected = bundle.towers.item(
            torch.from_numpy(content),
            torch.from_numpy(bundle.spec.item_vocab.encode(rows)),
            torch.zeros(4, dtype=torch.int64),
        ).numpy()
    assert np.max(np.abs(served - expected)) <= TOLERANCE


def test_the_service_serves_the_export(tmp_path: Path, trained: Trained) -> None:
    version = trained.path.name
    with (
        running_service(
            "fusion", tmp_path, settings={"registry_dir": trained.registry.root}
        ) as fusion,
        grpc.insecure_channel(fusion.address) as channel,
    ):
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=10)
        assert info.version == version and info.item_count == 200

        user = common_pb2.UserContext(
            user_id=user_id(3),
            attributes={"segment": "b"},
            recent_item_ids=[item_id(int(i)) for i in trained.histories[3][-5:]],
        )
        reply = stub.Recommend(fusion_pb2.RecommendRequest(user=user, k=10), timeout=10)
        assert reply.model_version == version and len(reply.items) == 10
        seen = set(user.recent_item_ids)
        assert not seen & {i.item_id for i in reply.items}
        assert [i.score for i in reply.items] == sorted(
            (i.score for i in reply.items), reverse=True
        )

        ranked = stub.Rank(
            fusion_pb2.RankRequest(user=user, candidate_item_ids=["item-1", "ghost", "item-9"]),
            timeout=10,
        )
        assert list(ranked.unknown_item_ids) == ["ghost"]
        assert sorted(i.item_id for i in ranked.items) == ["item-1", "item-9"]

        similar = stub.SimilarItems(
            fusion_pb2.SimilarItemsRequest(item_id="item-4", k=5), timeout=10
        )
        assert len(similar.items) == 5 and "item-4" not in {i.item_id for i in similar.items}

        from services.trainer.model.bundle import Bundle

        bundle = trained.bundle
        assert isinstance(bundle, Bundle)
        upserted = stub.UpsertItems(
            fusion_pb2.UpsertItemsRequest(
                items=[
                    common_pb2.ItemRecord(
                        item_id="brand-new",
                        content_vector=bundle.tables["content"][5].tolist(),
                        text="Brand new",
                        attributes={"genre": "g5"},
                    )
                ]
            ),
            timeout=10,
        )
        assert upserted.upserted == 1
        g5 = [m for m in range(200) if bundle.tables["item_attrs"][m][1 + 5] > 0]
        filtered = stub.Recommend(
            fusion_pb2.RecommendRequest(
                user=user,
                k=len(g5) + 1,
                filters=common_pb2.ItemFilters(attribute_equals={"genre": "g5"}),
            ),
            timeout=10,
        )
        returned = [i.item_id for i in filtered.items]
        assert "brand-new" in returned
        assert set(returned) <= {item_id(m) for m in g5} | {"brand-new"}


def test_a_mixed_batch_ranks_each_user_as_alone_and_skips_gated_out_users(
    trained: Trained,
) -> None:
    from services.common.recsys_features import blend_standardised, segment_prior

    # Its own copy of the version: the test swaps the gate and the ranker session.
    holder = ModelHolder(trained.registry, ModelVersion.load)
    core = Recommender(holder, UserStore())
    holder.load_initial()
    model = holder.current
    assert isinstance(model, RecsysModelVersion) and model._ranker is not None
    # A gate that only users with 2-4 history items pass: one batch mixes both sides.
    model.manifest = {
        **model.manifest,
        "ranker": {**model.manifest["ranker"], "gate": {"min_history": 2, "max_history": 4}},
    }
    lengths = (0, 1, 3, 8)
    users = [
        core._request(UserQuery(recent_item_ids=[item_id(i) for i in range(n)]), 10).user
        for n in lengths
    ]
    vecs = model.user_vector_batch(users)
    candidates = [np.arange(n, len(model.index), 7) for n in range(len(users))]

    runs: list[int] = []
    session = model._ranker

    class Counting:
        def run(self, *args: object, **kwargs: object) -> object:
            runs.append(1)
            return session.run(*args, **kwargs)

    model._ranker = Counting()
    batch = model.rank_batch(users, candidates, vecs)
    assert len(runs) == 1  # one ranker run for the batch, for the user inside the gate
    for n, (user, vec, rows) in enumerate(zip(users, vecs, candidates, strict=True)):
        alone = model.rank(user, rows, vec)
        np.testing.assert_allclose(batch[n], alone, atol=1e-6)
        tower = model.index.vectors(rows) @ vec
        if lengths[n] == 3:
            assert np.max(np.abs(batch[n] - tower)) > 1e-3  # the ranker re-scored it
        elif lengths[n] <= model.prior_max_history:  # 0 and 1 items: the segment prior
            attrs = model.spec.user_vocab.encode([user.attributes])
            prior = segment_prior(model.spec, model.tables, attrs, rows[None], model.prior_fields)
            want = blend_standardised(tower, prior[0], model.prior_weight)
            np.testing.assert_allclose(batch[n], want, atol=1e-5)
        else:
            np.testing.assert_allclose(batch[n], tower, atol=1e-5)  # the tower order stands

    runs.clear()
    model.rank_batch(users[:1] + users[3:], [candidates[0], candidates[3]], vecs[[0, 3]])
    assert runs == []  # nobody inside the gate: no features built, no ranker run


def test_a_served_trainer_version_is_freed_without_the_collector(trained: Trained) -> None:
    """Fusion freezes the heap after a swap (services/common/heap.py): a swapped-out
    version must then be freed by reference counting alone (no cycles in it)."""
    import gc
    import weakref
    from types import SimpleNamespace

    gc.collect()
    gc.disable()
    try:
        model = ModelVersion.load(trained.path)
        holder = SimpleNamespace(current=model)
        core = Recommender(holder, UserStore(), candidates=50)  # type: ignore[arg-type]
        history = [item_id(int(r)) for r in trained.histories[0][:3]]
        core.recommend(UserQuery(user_id="u", recent_item_ids=history), 5)
        version, index = weakref.ref(model), weakref.ref(model.index)
        del holder, core, model
        assert version() is None and index() is None
    finally:
        gc.enable()


def test_a_head_of_new_items_is_blended_with_content_like_the_trainer(trained: Trained) -> None:
    from services.common.recsys_features import blend_new_items, content_knn_scores

    # Its own copy of the version: the test empties the counts (every item is new).
    holder = ModelHolder(trained.registry, ModelVersion.load)
    core = Recommender(holder, UserStore())
    holder.load_initial()
    model = holder.current
    assert isinstance(model, RecsysModelVersion)
    cfg = trained.bundle.config  # type: ignore[attr-defined]
    weight, map_weight = cfg.new_item_content_weight, cfg.new_item_map_weight
    assert weight > 0 and model.new_item_weight == weight
    assert map_weight > 0 and model.new_item_map_weight == map_weight
    # The content map was fitted at export, on the items that had counts then.
    content_map = np.load(trained.path / "content_map.npy")
    assert model.content_map is not None and np.abs(content_map).max() > 0
    model.tables.pop[:] = 0
    lengths = (0, 3)
    users = [
        core._request(UserQuery(recent_item_ids=[item_id(i) for i in range(n)]), 10).user
        for n in lengths
    ]
    vecs = model.user_vector_batch(users)
    rows = np.arange(10, len(model.index), 3)
    batch = model.rank_batch(users, [rows, rows], vecs)
    content = model.index.content(np.arange(len(model.index)))
    thresholds = np.load(trained.path / "content_thresholds.npy")
    for n, (user, vec) in enumerate(zip(users, vecs, strict=True)):
        tower = model.index.vectors(rows) @ vec
        hist = user.history_rows
        if lengths[n]:
            knn = content_knn_scores(content, hist, rows, thresholds[rows])
            mapped = (content[rows] @ content_map) @ vec
            want = blend_new_items(tower, knn, weight, mapped, map_weight)
            assert np.argsort(-want).tolist() != np.argsort(-tower).tolist()  # content moved it
            without_map = blend_new_items(tower, knn, weight)
            assert np.argsort(-want).tolist() != np.argsort(-without_map).tolist()
        else:
            want = tower  # no history: the tower scores stand
        np.testing.assert_allclose(batch[n], want, atol=1e-5)
        np.testing.assert_allclose(model.rank(user, rows, vec), want, atol=1e-5)

    # An upserted item (no threshold of its own) gets the catalog's median one.
    upserted = model.index.base_count
    assert model._thresholds_of(np.array([0, upserted])).tolist() == [
        thresholds[0],
        np.float32(np.median(thresholds)),
    ]


def test_a_bad_content_map_is_a_load_error_and_a_version_without_one_serves_without(
    trained: Trained, tmp_path: Path
) -> None:
    import json
    import shutil

    from services.fusion.model_version import ModelLoadError

    bad = tmp_path / "bad"
    shutil.copytree(trained.path, bad)
    np.save(bad / "content_map.npy", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ModelLoadError, match=r"content_map\.npy: shape \(3, 2\), expected \("):
        RecsysModelVersion.load(bad)

    # A version exported before the map: no map_weight in its manifest, no file.
    older = tmp_path / "older"
    shutil.copytree(trained.path, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["ranker"]["new_items"]["map_weight"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    (older / "content_map.npy").unlink()
    model = RecsysModelVersion.load(older)
    assert model.content_map is None and model.new_item_map_weight == 0.0
    assert model.new_item_weight == trained.bundle.config.new_item_content_weight  # type: ignore[attr-defined]


def _copy_with(trained: Trained, target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the trained version with its manifest changed by ``change``."""
    import json
    import shutil

    shutil.copytree(trained.path, target)
    manifest = json.loads((target / "manifest.json").read_text())
    change(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_the_head_blend_reads_the_unliked_items_like_the_trainer(
    trained: Trained, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from coldstart.v1 import events_pb2

    from services.common.events import new_event
    from services.common.recsys_features import blend_new_items, content_knn_scores
    from services.fusion.model_version import UserInputs

    weight_u = 0.5

    def rated(manifest: dict[str, Any]) -> None:
        manifest["user_history"] = {"positive_threshold": 4.0, "rule": "..."}
        manifest["ranker"]["new_items"]["unliked_weight"] = weight_u

    model = RecsysModelVersion.load(_copy_with(trained, tmp_path / "v", rated))
    assert model.positive_threshold == 4.0 and model.new_item_unliked_weight == weight_u
    weight, map_weight = model.new_item_weight, model.new_item_map_weight
    assert weight > 0 and model.content_map is not None

    # The online state's low ratings become the user's unliked rows, out of history.
    core = Recommender(SimpleNamespace(current=model), UserStore())  # type: ignore[arg-type]
    for item, kind, value in (
        (0, "view", 1),
        (40, "rating", 1),
        (1, "rating", 5),
        (41, "rating", 2),
    ):
        interaction = events_pb2.Interaction(
            user_id="u", item_id=item_id(item), kind=kind, value=value
        )
        core.store.apply(new_event("t", interaction=interaction))
    user = core._request(UserQuery(user_id="u"), 10).user
    assert user.history_rows.tolist() == [0, 1] and user.unliked_rows.tolist() == [40, 41]
    plain = UserInputs({}, None, user.history_rows, "u")  # the same user, no unliked rows

    model.tables.pop[:] = 0  # every item is new: users with history get the blend
    vecs = model.user_vector_batch([user, plain])
    np.testing.assert_array_equal(vecs[0], vecs[1])  # unliked rows never reach the towers
    rows = np.arange(10, len(model.index), 3)
    batch = model.rank_batch([user, plain], [rows, rows], vecs)
    content = model.index.content(np.arange(len(model.index)))
    thresholds = np.load(trained.path / "content_thresholds.npy")[rows]
    tower = model.index.vectors(rows) @ vecs[0]
    knn = content_knn_scores(content, user.history_rows, rows, thresholds)
    unliked_knn = content_knn_scores(content, user.unliked_rows, rows, thresholds)
    assert unliked_knn.std() > 0
    mapped = (content[rows] @ model.content_map) @ vecs[0]
    want = blend_new_items(tower, knn, weight, mapped, map_weight, unliked_knn, weight_u)
    without = blend_new_items(tower, knn, weight, mapped, map_weight)
    np.testing.assert_allclose(batch[0], want, atol=1e-5)
    np.testing.assert_allclose(batch[1], without, atol=1e-5)  # no unliked rows: no term
    assert np.max(np.abs(want - without)) > 1e-3  # the term moved the head
    np.testing.assert_allclose(model.rank(user, rows, vecs[0]), want, atol=1e-5)

    model.new_item_unliked_weight = 0.0  # weight 0: the unliked rows change nothing
    np.testing.assert_allclose(model.rank(user, rows, vecs[0]), without, atol=1e-5)


def test_user_history_and_unliked_weight_are_checked_and_optional(
    trained: Trained, tmp_path: Path
) -> None:
    from services.fusion.model_version import ModelLoadError

    def older(manifest: dict[str, Any]) -> None:
        manifest.pop("user_history", None)
        manifest["ranker"]["new_items"].pop("unliked_weight", None)

    # A version from before both: every interaction liked, no unliked term.
    model = RecsysModelVersion.load(_copy_with(trained, tmp_path / "older", older))
    assert model.positive_threshold == float("-inf") and model.new_item_unliked_weight == 0.0

    def setting(key: str, value: object) -> Callable[[dict[str, Any]], None]:
        def change(manifest: dict[str, Any]) -> None:
            if key == "positive_threshold":
                manifest["user_history"] = {"positive_threshold": value}
            else:
                manifest["ranker"]["new_items"]["unliked_weight"] = value

        return change

    for n, (key, value, message) in enumerate(
        [
            ("unliked_weight", -0.1, "ranker.new_items.unliked_weight must be a number >= 0"),
            ("unliked_weight", "0.2", "ranker.new_items.unliked_weight must be a number >= 0"),
            ("positive_threshold", None, "user_history.positive_threshold must be a number"),
        ]
    ):
        bad = _copy_with(trained, tmp_path / f"bad{n}", setting(key, value))
        with pytest.raises(ModelLoadError) as raised:
            ModelVersion.load(bad)
        assert f"{bad}/manifest.json: {message}, got {value!r}" == str(raised.value)
