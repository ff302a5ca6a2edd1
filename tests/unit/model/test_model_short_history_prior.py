"""The short-history prior: a user with at most ``prior_max_history`` items gets their head
re-scored as standardised model score + weight x standardised segment popularity, computed
alike by the harness's torch model and the exported version (the fusion service's side:
tests/integration/test_fusion_recsys.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.recsys_features import (
    AttributeVocab,
    FeatureSpec,
    RankerTables,
    blend_standardised,
    has_stated_interest,
    prior_fields,
    segment_prior,
    short_history_prior_applies,
)
from services.trainer.model.bundle import load_bundle
from services.trainer.model.config import ModelConfig
from services.trainer.model.export import publish
from services.trainer.model.onnx_version import OnnxVersion
from services.trainer.model.recommender import ScoringModel
from services.trainer.model.train import TrainResult
from tests.unit.model.test_export_parity import saved_run


def _spec(fields: tuple[tuple[str, tuple[str, ...]], ...]) -> FeatureSpec:
    vocab = AttributeVocab(fields)
    return FeatureSpec(
        item_vocab=AttributeVocab(()),
        user_vocab=vocab,
        text_dim=2,
        item_vec_dim=3,
        max_history=5,
        segment_fields=tuple(name for name, _ in fields),
    )


def _tables(pop: np.ndarray, seg_counts: np.ndarray, seg_sizes: np.ndarray) -> RankerTables:
    n = len(pop)
    return RankerTables(
        content=np.zeros((n, 2), dtype=np.float32),
        item_attrs=np.ones((n, 1), dtype=np.float32),
        pop=pop.astype(np.float32),
        seg_counts=seg_counts.astype(np.float32),
        seg_sizes=seg_sizes.astype(np.float32),
        n_users=100,
    )


def test_the_rule_covers_short_histories_outside_new_item_heads() -> None:
    assert short_history_prior_applies(0, 1, False)
    assert short_history_prior_applies(1, 1, False)
    assert not short_history_prior_applies(2, 1, False)
    assert not short_history_prior_applies(0, 1, True)  # new items: the new-item blend's
    assert not short_history_prior_applies(0, -1, False)  # -1: off
    assert not short_history_prior_applies(0, 1, False, has_interest=True)  # the towers read it
    assert has_stated_interest(np.array([0.0, 0.2])) and not has_stated_interest(np.zeros(2))
    assert not has_stated_interest(None)
    assert ModelConfig().prior_weight == 1.0 and ModelConfig().prior_max_history == 1
    with pytest.raises(ValueError, match="prior_weight"):
        ModelConfig(prior_weight=-0.1)


def test_prior_fields_are_the_two_smallest_fields_of_at_most_twelve_values() -> None:
    spec = _spec(
        (
            ("occupation", tuple(f"o{i}" for i in range(21))),
            ("age", tuple(f"a{i}" for i in range(7))),
            ("gender", ("F", "M")),
            ("region", tuple(f"r{i}" for i in range(10))),
        )
    )
    assert prior_fields(spec) == ("gender", "age")
    assert prior_fields(_spec(())) == ()


def test_segment_prior_is_popularity_lifted_by_the_users_segment() -> None:
    # Columns: 0 always on, 1 gender=F, 2 gender=M. Item 0 is popular overall but mostly
    # with M; item 1 is what F users like.
    spec = _spec((("gender", ("F", "M")),))
    pop = np.array([60.0, 30.0, 5.0])
    seg_counts = np.array([[60.0, 30.0, 5.0], [5.0, 28.0, 2.0], [55.0, 2.0, 3.0]])
    tables = _tables(pop, seg_counts, np.array([100.0, 40.0, 60.0]))
    women = np.array([[1.0, 1.0, 0.0]], dtype=np.float32)
    men = np.array([[1.0, 0.0, 1.0]], dtype=np.float32)
    nobody = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    cands = np.array([[0, 1, 2]])
    f = segment_prior(spec, tables, women, cands, ("gender",))[0]
    m = segment_prior(spec, tables, men, cands, ("gender",))[0]
    overall = np.log((pop + 1.0) / (100 + 2.0))
    np.testing.assert_allclose(f, np.log((seg_counts[1] + 1.0) / (40 + 2.0)), rtol=1e-6)
    assert np.argmax(f) == 1 and np.argmax(m) == 0
    # No value for the field, or no fields: the overall share (plain popularity).
    np.testing.assert_allclose(segment_prior(spec, tables, nobody, cands)[0], overall, rtol=1e-6)
    np.testing.assert_allclose(segment_prior(spec, tables, women, cands, ())[0], overall)


def test_harness_and_exported_version_apply_the_prior_alike(
    tiny_trained: TrainResult, tmp_path: Path
) -> None:
    cfg = tiny_trained.config.with_options(prior_weight=1.0, prior_max_history=1)
    trained = TrainResult(**{**tiny_trained.__dict__, "config": cfg})
    data = trained.data
    _, path = publish(load_bundle(saved_run(trained, tmp_path, {})), tmp_path / "registry")
    served = OnnxVersion(path)
    short = served.manifest["ranker"]["short_history"]
    assert short["prior_weight"] == 1.0 and short["max_history"] == 1
    fields = prior_fields(data.spec)
    assert list(fields) == short["fields"]
    model = ScoringModel(trained)
    off = ScoringModel(
        TrainResult(**{**tiny_trained.__dict__, "config": cfg.with_options(prior_weight=0.0)})
    )
    users = np.arange(4)
    hists = [data.history(int(u))[:k] for u, k in zip(users, [0, 1, 3, 5], strict=True)]
    attrs = data.user_attrs[users]
    candidates = np.arange(data.n_items)
    scores = model.score(users, attrs, hists, candidates)
    before = off.score(users, attrs, hists, candidates)
    head, onnx_scores = served.rank(attrs, data.user_codes[users], hists, candidates)
    moved = 0
    for r in range(2):  # 0 and 1 items: the prior re-scores the head
        prior = segment_prior(data.spec, model.tables, attrs[r : r + 1], head[r][None], fields)
        want = blend_standardised(before[r, head[r]], prior[0], 1.0)
        np.testing.assert_allclose(scores[r, head[r]], want, atol=1e-4)
        np.testing.assert_allclose(onnx_scores[r], want, atol=1e-4)
        outside = np.setdiff1d(np.arange(data.n_items), np.concatenate([head[r], hists[r]]))
        assert scores[r, outside].max() < scores[r, head[r]].min()  # the tail stays below
        moved += not np.array_equal(np.argsort(-want), np.argsort(-before[r, head[r]]))
    assert moved  # the prior reordered a head: a real comparison
    np.testing.assert_array_equal(scores[2:], before[2:])  # 3 and 5 items: untouched


def test_a_stated_interest_keeps_the_model_order(tiny_trained: TrainResult, tmp_path: Path) -> None:
    """A new user who stated an interest gets the towers' (and ranker's) order, in the
    harness and in the exported version alike: the prior applies to the others only."""
    cfg = tiny_trained.config.with_options(prior_weight=1.0, prior_max_history=1)
    trained = TrainResult(**{**tiny_trained.__dict__, "config": cfg})
    data = trained.data
    _, path = publish(load_bundle(saved_run(trained, tmp_path, {})), tmp_path / "registry")
    served = OnnxVersion(path)
    model = ScoringModel(trained)
    off = ScoringModel(
        TrainResult(**{**tiny_trained.__dict__, "config": cfg.with_options(prior_weight=0.0)})
    )
    users = np.arange(2)
    hists = [np.zeros(0, dtype=np.int64)] * 2
    attrs = data.user_attrs[users]
    interest = np.zeros((2, data.content.shape[1]), dtype=np.float32)
    interest[1] = data.content[7]  # user 1 states one, user 0 none
    candidates = np.arange(data.n_items)
    scores = model.score(users, attrs, hists, candidates, interest=interest)
    before = off.score(users, attrs, hists, candidates, interest=interest)
    head, onnx_scores = served.rank(attrs, data.user_codes[users], hists, candidates, interest)
    np.testing.assert_array_equal(scores[1], before[1])
    np.testing.assert_allclose(onnx_scores[1], before[1, head[1]], atol=1e-4)
    assert not np.allclose(scores[0, head[0]], before[0, head[0]])  # user 0: the prior moved it
