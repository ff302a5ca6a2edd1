"""The new-item blend: a head of new items re-scored as standardised tower score + weight x
standardised content-knn score + map weight x standardised content-map score + unliked weight
x standardised content-knn score against the items rated low, computed alike by the harness's
torch model and the exported version (the fusion service's side: tests/integration/test_fusion_recsys.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.recsys_features import (
    blend_new_items,
    content_knn_scores,
    content_map,
    content_thresholds,
    new_item_head,
)
from services.trainer.baselines.content_knn import knn_graph
from services.trainer.model.bundle import load_bundle
from services.trainer.model.config import ModelConfig
from services.trainer.model.export import publish
from services.trainer.model.onnx_version import OnnxVersion
from services.trainer.model.recommender import ScoringModel
from services.trainer.model.train import TrainResult
from tests.unit.model.test_export_parity import saved_run


def _unit(rows: np.ndarray) -> np.ndarray:
    out: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


def test_new_item_head_is_a_share_of_items_without_positives() -> None:
    assert new_item_head(np.array([0.0, 0.0, 3.0]), 0.5)
    assert not new_item_head(np.array([0.0, 2.0, 3.0]), 0.5)
    assert new_item_head(np.array([0.0, 2.0]), 0.5)  # exactly the share counts
    assert not new_item_head(np.zeros(0), 0.5)  # an empty head is nobody's


def test_knn_scores_equal_the_content_knn_baselines() -> None:
    """Thresholds + cosines give exactly the baseline's neighbour-list scores."""
    content = _unit(np.random.default_rng(0).normal(size=(300, 16)))
    graph = knn_graph(content, 20).toarray()  # row c: c's 20 neighbours' cosines (>= 0)
    thresholds = content_thresholds(content, neighbors=20)
    history, candidates = np.array([3, 40, 41, 299]), np.arange(100, 200)
    want = graph[candidates][:, history].sum(axis=1)
    got = content_knn_scores(content, history, candidates, thresholds[candidates])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got > 0).sum() > 5  # some candidates are neighbours: a real comparison
    empty = np.zeros(0, dtype=np.int64)
    none = content_knn_scores(content, empty, candidates, thresholds[candidates])
    np.testing.assert_array_equal(none, 0.0)
    # The baseline's own scoring path (history rows times the graph's transpose) agrees.
    from services.trainer.baselines.base import ScoreRequest
    from services.trainer.baselines.content_knn import ContentKNN

    baseline = ContentKNN(neighbors=20)
    baseline.graph_t, baseline.n_items = knn_graph(content, 20).T.tocsr(), len(content)
    request = ScoreRequest(np.zeros(1, np.int64), {}, [history], candidates)
    np.testing.assert_allclose(baseline.score(request)[0], got, rtol=1e-5, atol=1e-6)


def test_sampled_thresholds_approximate_the_exact_ones() -> None:
    content = _unit(np.random.default_rng(1).normal(size=(3000, 16)))
    exact = content_thresholds(content, neighbors=100)
    sampled = content_thresholds(content, neighbors=100, sample=1000)
    assert sampled.shape == exact.shape
    assert np.median(np.abs(sampled - exact)) < 0.03


def test_blend_standardises_both_scores() -> None:
    tower = np.array([3.0, 2.0, 1.0, 0.0])
    knn = np.array([0.0, 0.0, 0.0, 2.0])
    z = (tower - tower.mean()) / tower.std()
    zk = (knn - knn.mean()) / knn.std()
    np.testing.assert_allclose(blend_new_items(tower, knn, 0.5), z + 0.5 * zk, rtol=1e-6)
    # No content signal (no history): the tower order stands; weight 0 likewise.
    np.testing.assert_allclose(blend_new_items(tower, np.zeros(4), 0.5), z, rtol=1e-6)
    np.testing.assert_allclose(blend_new_items(tower, knn, 0.0), z, rtol=1e-6)
    mapped = np.array([0.0, 1.0, 0.0, 3.0])
    zm = (mapped - mapped.mean()) / mapped.std()
    np.testing.assert_allclose(
        blend_new_items(tower, knn, 0.5, mapped, 0.7), z + 0.5 * zk + 0.7 * zm, rtol=1e-6
    )
    # The map term off (weight 0, or no map in an older version): as without it.
    np.testing.assert_allclose(blend_new_items(tower, knn, 0.5, mapped, 0.0), z + 0.5 * zk)
    np.testing.assert_allclose(blend_new_items(tower, knn, 0.5, None, 0.7), z + 0.5 * zk)
    unliked = np.array([1.0, 0.0, 0.0, 0.0])
    zu = (unliked - unliked.mean()) / unliked.std()
    np.testing.assert_allclose(
        blend_new_items(tower, knn, 0.5, mapped, 0.7, unliked, 0.2),
        z + 0.5 * zk + 0.7 * zm + 0.2 * zu,
        rtol=1e-6,
    )
    # Without a map the unliked term still counts; at weight 0 or absent it is off.
    np.testing.assert_allclose(
        blend_new_items(tower, knn, 0.5, None, 0.0, unliked, 0.2), z + 0.5 * zk + 0.2 * zu
    )
    np.testing.assert_allclose(
        blend_new_items(tower, knn, 0.5, None, 0.0, unliked, 0.0), z + 0.5 * zk
    )
    assert ModelConfig().new_item_content_weight == 0.7
    assert ModelConfig().new_item_unliked_weight == 0.2
    with pytest.raises(ValueError, match="new_item_unliked_weight"):
        ModelConfig(new_item_unliked_weight=-0.1)
    assert ModelConfig().new_item_map_weight == 0.7
    with pytest.raises(ValueError, match="new_item_content_weight"):
        ModelConfig(new_item_content_weight=-1.0)
    with pytest.raises(ValueError, match="new_item_map_weight"):
        ModelConfig(new_item_map_weight=-0.1)


def test_content_map_is_a_ridge_fit_on_the_warm_items_only() -> None:
    rng = np.random.default_rng(2)
    content = _unit(rng.normal(size=(400, 12)))
    truth = rng.normal(size=(12, 5))
    vecs = content @ truth
    warm = np.arange(400) % 4 != 0
    vecs[~warm] = 100.0  # a cold item's vector is its content-only guess: never a target
    got = content_map(content, vecs, warm, penalty=1e-6)
    assert got.shape == (12, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, truth, atol=1e-3)
    # The penalty shrinks it towards 0; no warm item, no map.
    assert np.linalg.norm(content_map(content, vecs, warm, penalty=100.0)) < np.linalg.norm(got)
    none = content_map(content, vecs, np.zeros(400, dtype=bool))
    assert none.shape == (12, 5) and not none.any()


@pytest.mark.parametrize(
    ("knn_weight", "map_weight", "unliked_weight"),
    [(0.5, 0.6, 0.0), (0.0, 0.6, 0.0), (0.5, 0.6, 0.8)],
)
def test_harness_and_exported_version_blend_new_items_alike(
    tiny_trained: TrainResult,
    tmp_path: Path,
    knn_weight: float,
    map_weight: float,
    unliked_weight: float,
) -> None:
    cfg = tiny_trained.config.with_options(
        new_item_content_weight=knn_weight,
        new_item_map_weight=map_weight,
        new_item_unliked_weight=unliked_weight,
    )
    blended = TrainResult(**{**tiny_trained.__dict__, "config": cfg})
    data = blended.data
    saved = data.pop.copy()
    try:
        new = np.arange(data.n_items) % 3 == 0
        data.pop[new] = 0  # a third of the items are new: the candidates; the rest fit the map
        _, path = publish(load_bundle(saved_run(blended, tmp_path, {})), tmp_path / "registry")
        served = OnnxVersion(path)
        section = served.manifest["ranker"]["new_items"]
        assert section["content_weight"] == knn_weight and section["map_weight"] == map_weight
        assert section["unliked_weight"] == unliked_weight
        assert served.manifest["user_history"]["positive_threshold"] == 4.0
        thresholds = content_thresholds(data.content)
        np.testing.assert_allclose(served.thresholds, thresholds)
        model = ScoringModel(blended)
        # The exported map is the harness's, fitted on the ONNX item vectors.
        assert served.content_map is not None and np.abs(model.content_map).max() > 0
        np.testing.assert_allclose(served.content_map, model.content_map, atol=1e-3)
        users = np.arange(4)
        hists = [
            data.history(int(u))[:k][~new[data.history(int(u))[:k]]]
            for u, k in zip(users, [0, 1, 3, 5], strict=True)
        ]
        # What each user rated low: some warm items of the next user's history.
        unliked = [
            data.history((int(u) + 1) % data.n_users)[:4][
                ~new[data.history((int(u) + 1) % data.n_users)[:4]]
            ]
            for u in users
        ]
        candidates = np.flatnonzero(new)
        uvecs = model.user_vecs(users, data.user_attrs[users], hists)
        scores = model.score(users, data.user_attrs[users], hists, candidates, unliked=unliked)
        tower = model.score(users, data.user_attrs[users], hists, candidates, use_ranker=False)
        head, onnx_scores = served.rank(
            data.user_attrs[users], data.user_codes[users], hists, candidates, unliked=unliked
        )
        np.testing.assert_array_equal(scores[0], tower[0])  # no history: the tower order
        moved = moved_by_map = moved_by_unliked = 0
        for r in range(1, len(users)):
            cols = np.searchsorted(candidates, head[r])  # head items -> score columns
            knn = content_knn_scores(data.content, hists[r], head[r], thresholds[head[r]])
            mapped = (data.content[head[r]] @ model.content_map) @ uvecs[r]
            low = content_knn_scores(data.content, unliked[r], head[r], thresholds[head[r]])
            want = blend_new_items(
                tower[r, cols], knn, knn_weight, mapped, map_weight, low, unliked_weight
            )
            np.testing.assert_allclose(scores[r, cols], want, atol=1e-4)
            np.testing.assert_allclose(onnx_scores[r], want, atol=1e-4)
            moved += not np.array_equal(np.argsort(-want), np.argsort(-tower[r, cols]))
            without_map = blend_new_items(
                tower[r, cols], knn, knn_weight, None, 0.0, low, unliked_weight
            )
            moved_by_map += not np.array_equal(np.argsort(-want), np.argsort(-without_map))
            without_low = blend_new_items(tower[r, cols], knn, knn_weight, mapped, map_weight)
            moved_by_unliked += not np.array_equal(np.argsort(-want), np.argsort(-without_low))
        assert moved and moved_by_map  # both terms reordered some head: a real comparison
        assert bool(moved_by_unliked) == (unliked_weight > 0)
    finally:
        data.pop[:] = saved


def test_the_no_content_ablation_has_no_content_in_the_ranker_or_the_blend(
    tiny_trained: TrainResult,
) -> None:
    cfg = tiny_trained.config.with_options(use_content=False)
    model = ScoringModel(TrainResult(**{**tiny_trained.__dict__, "config": cfg}))
    assert not model.tables.content.any()
    data = model.data
    saved = data.pop.copy()
    try:
        data.pop[:] = 0
        users = np.arange(3)
        hists = [data.history(int(u))[:5] for u in users]
        candidates = np.arange(data.n_items)
        scores = model.score(users, data.user_attrs[users], hists, candidates)
        tower = model.score(users, data.user_attrs[users], hists, candidates, use_ranker=False)
        np.testing.assert_array_equal(scores, tower)
    finally:
        data.pop[:] = saved
