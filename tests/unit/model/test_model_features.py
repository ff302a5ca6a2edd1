"""The shared feature builder: what training feeds the graphs is what serving feeds them."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.recsys_features import (
    AttributeVocab,
    FeatureSpec,
    RankerTables,
    pool_history,
    ranker_features,
    segment_tables,
    user_tower_inputs,
)
from services.trainer.model.dataset import ModelData
from services.trainer.model.synthetic import small_config
from services.trainer.model.train import TowerBatcher

VOCAB = AttributeVocab((("gender", ("F", "M")), ("genre", ("Action", "Drama", "War"))))


def test_vocab_columns_start_after_the_constant_column() -> None:
    assert VOCAB.width == 6
    assert VOCAB.index() == {
        "gender": {"F": 1, "M": 2},
        "genre": {"Action": 3, "Drama": 4, "War": 5},
    }
    rows = VOCAB.encode([{"gender": "M", "genre": ["Drama", "War"]}, {"genre": "Western"}, {}])
    np.testing.assert_array_equal(rows[0], [1, 0, 1, 0, 1, 1])
    # Unknown values and missing fields set nothing but the constant column.
    np.testing.assert_array_equal(rows[1], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[2], [1, 0, 0, 0, 0, 0])


def test_vocab_from_blocks_matches_encode_and_checks_widths() -> None:
    blocks = {"gender": np.array([[0, 1]]), "genre": np.array([[0, 1, 1]])}
    np.testing.assert_array_equal(
        VOCAB.from_blocks(1, blocks), VOCAB.encode([{"gender": "M", "genre": ["Drama", "War"]}])
    )
    with pytest.raises(ValueError, match="genre"):
        VOCAB.from_blocks(1, {"genre": np.array([[0, 1]])})
    assert AttributeVocab.from_json(VOCAB.to_json()) == VOCAB


def test_vocab_decode_inverts_encode_into_attributes_and_tags() -> None:
    rows = VOCAB.encode([{"gender": "F", "genre": ["Action", "War"]}, {"genre": "Drama"}, {}])
    assert VOCAB.decode(rows) == [
        ({"gender": "F"}, ("Action", "War")),  # a field with several values gives tags
        ({"genre": "Drama"}, ()),
        ({}, ()),
    ]


def test_pool_history_is_the_mean_of_the_last_items() -> None:
    vecs = np.arange(20, dtype=np.float32).reshape(10, 2)
    pooled, lengths = pool_history([np.array([], dtype=np.int64), np.array([1, 2, 3])], vecs, 2)
    np.testing.assert_array_equal(pooled[0], [0, 0])
    np.testing.assert_allclose(pooled[1], vecs[[2, 3]].mean(axis=0))
    # The length is the whole history (how warm the user is), not the pooled window.
    np.testing.assert_array_equal(lengths[:, 0], [0, 3])


@pytest.mark.parametrize("mode", ["set", "prefix"])
def test_training_batches_pool_exactly_like_serving(tiny_data: ModelData, mode: str) -> None:
    """The batcher's pooling matrix reproduces pool_history on the same histories."""
    cfg = small_config(history_mode=mode)
    batcher = TowerBatcher(tiny_data, cfg, rank=0, world=1)
    b = batcher.batch(epoch=0, step=0)
    plan = batcher.plan(0)
    local = np.arange(batcher.local_batch)  # step 0's rows of the plan
    positions, mask, _ = batcher.history_positions(local, plan)
    histories = []
    for r, u in enumerate(plan.users[local]):
        items = tiny_data.history(int(u))
        histories.append(items[positions[r][mask[r]]])
        # The target itself is never part of its own history.
        assert plan.pos[local[r]] not in positions[r][mask[r]]
    # Any item table works: compare both poolings through a random one.
    table = np.random.default_rng(0).normal(size=(tiny_data.n_items, 3)).astype(np.float32)
    expected, _ = pool_history(histories, table, cfg.max_history)
    got = b["hist_pool"] @ table[b["item_rows"]]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (b["hist_len"][:, 0] == mask.sum(axis=1)).all() or mode == "prefix"


def _spec(user_vocab: AttributeVocab, item_vocab: AttributeVocab) -> FeatureSpec:
    return FeatureSpec(
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        text_dim=4,
        item_vec_dim=3,
        max_history=5,
        segment_fields=tuple(n for n, _ in user_vocab.fields),
    )


def test_ranker_features_columns_and_semantics() -> None:
    user_vocab = AttributeVocab((("gender", ("F", "M")),))
    item_vocab = AttributeVocab((("genre", ("Action", "Drama")),))
    spec = _spec(user_vocab, item_vocab)
    content = np.eye(4, dtype=np.float32)
    item_attrs = item_vocab.encode([{"genre": "Action"}, {"genre": "Drama"}, {}, {}])
    user_attrs = user_vocab.encode([{"gender": "F"}, {"gender": "M"}])
    pos_users = np.array([0, 0, 1])
    pos_items = np.array([0, 1, 1])
    seg_counts, seg_sizes = segment_tables(user_attrs, pos_users, pos_items, 4)
    tables = RankerTables(
        content, item_attrs, np.array([1, 2, 0, 0], np.float32), seg_counts, seg_sizes, n_users=2
    )
    cands = np.array([[0, 1, 2], [0, 1, 3]])
    feats = ranker_features(
        spec, tables, np.ones((2, 3), np.float32), user_attrs, [np.array([0]), np.array([])], cands
    )
    names = spec.ranker_feature_names()
    assert feats.shape == (2, 3, len(names))
    col = {n: i for i, n in enumerate(names)}
    # History = item 0: the same item has content similarity 1, others 0; no history -> 0.
    np.testing.assert_array_equal(feats[0, :, col["content_max_sim"]], [1, 0, 0])
    np.testing.assert_array_equal(feats[1, :, col["content_max_sim"]], [0, 0, 0])
    np.testing.assert_array_equal(feats[:, :, col["item_is_new"]], [[0, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(feats[0, :, col["attr_affinity"]], [1, 0, 0])
    assert feats[1, 0, col["hist_empty"]] == 1 and feats[0, 0, col["hist_empty"]] == 0
    # Segment share: item 1 is liked by the one M user -> higher share for M than item 0.
    seg = col["seg_share:gender"]
    assert feats[1, 1, seg] > feats[1, 0, seg]
    # exclude_self removes the user's own positives from the counts.
    own = np.array([[1, 1, 0], [0, 1, 0]], np.float32)
    feats_x = ranker_features(
        spec,
        tables,
        np.ones((2, 3), np.float32),
        user_attrs,
        [np.array([0]), np.array([])],
        cands,
        exclude_self=own,
    )
    np.testing.assert_allclose(feats_x[0, :, col["log_pop"]], np.log1p([0, 1, 0]))
    assert feats_x[1, 1, seg] < feats[1, 1, seg]
    # new_items zeroes every popularity signal of the marked candidates.
    feats_n = ranker_features(
        spec,
        tables,
        np.ones((2, 3), np.float32),
        user_attrs,
        [np.array([0]), np.array([])],
        cands,
        new_items=np.ones((2, 3), bool),
    )
    assert (feats_n[:, :, col["log_pop"]] == 0).all()
    assert (feats_n[:, :, col["item_is_new"]] == 1).all()


def test_user_inputs_mark_missing_interest() -> None:
    spec = _spec(AttributeVocab(), AttributeVocab())
    vecs = np.ones((3, 3), np.float32)
    interest = np.zeros((2, 4), np.float32)
    interest[1, 0] = 1.0
    inputs = user_tower_inputs(
        spec,
        np.ones((2, 1), np.float32),
        np.array([0, 2]),
        [np.array([0]), np.array([1, 2])],
        vecs,
        interest,
    )
    np.testing.assert_array_equal(inputs["has_interest"][:, 0], [0, 1])
    assert inputs["user_id"].dtype == np.int64
    assert set(inputs) == {
        "user_attrs",
        "user_id",
        "interest",
        "has_interest",
        "hist_vec",
        "hist_len",
    }
