"""auto_select: option sets chosen on an inner item-cold holdout inside training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.trainer.model.config import ModelConfig
from services.trainer.model.distributed import DistContext
from services.trainer.model.select import (
    holdout_folds,
    item_cold_recall,
    parse_candidate,
    user_folds,
    without_items,
    without_users,
)
from services.trainer.model.synthetic import small_config, synthetic_model_data
from services.trainer.model.train import RunOptions, train


def test_parse_candidate() -> None:
    assert parse_candidate("") == {}
    assert parse_candidate("content_dims=32, cold_joint=true,loss=bpr") == {
        "content_dims": 32,
        "cold_joint": True,
        "loss": "bpr",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_candidate("content_dims")


def test_config_checks_candidates() -> None:
    cfg = ModelConfig().with_options(auto_select=["content_dims=8", "content_dims=0"])
    assert cfg.auto_select == ("content_dims=8", "content_dims=0")  # a JSON list -> tuple
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown option"):
        ModelConfig(auto_select=("no_such_option=1",))
    with pytest.raises(ValueError, match="unknown option"):
        ModelConfig(auto_select=("auto_select_folds=2",))
    with pytest.raises(ValueError, match="auto_select_folds"):
        ModelConfig(auto_select_folds=6, auto_select_holdout=0.2)


def test_without_items_makes_them_new() -> None:
    data = synthetic_model_data()
    folds = holdout_folds(data, small_config(auto_select_folds=2))
    assert len(folds) == 2 and not set(folds[0]) & set(folds[1])
    held = folds[0]
    assert (data.pop[held] > 0).all()
    sub = without_items(data, held)
    assert (sub.pop[held] == 0).all() and (sub.item_codes[held] == 0).all()
    keep = np.setdiff1d(np.arange(data.n_items), held)
    np.testing.assert_array_equal(sub.pop[keep], data.pop[keep])
    assert sub.n_samples == data.n_samples - int(data.pop[held].sum())
    for u in range(data.n_users):  # each user's remaining positives, still oldest first
        h = data.history(u)
        np.testing.assert_array_equal(sub.history(u), h[~np.isin(h, held)])


def test_without_items_drops_their_low_ratings_too() -> None:
    """A held-out item plays new: no one's below-threshold rating of it stays either."""
    from services.trainer.model.dataset import with_unliked

    data = synthetic_model_data()
    held = holdout_folds(data, small_config())[0]
    rng = np.random.default_rng(0)
    users = rng.integers(0, data.n_users, size=300)
    items = rng.integers(0, data.n_items, size=300)
    data = with_unliked(data, users, items)
    for u in range(data.n_users):  # grouped by user, each user's in the given order
        np.testing.assert_array_equal(data.unliked(u), items[users == u])
    sub = without_items(data, held)
    for u in range(data.n_users):
        mine = items[users == u]
        np.testing.assert_array_equal(sub.unliked(u), mine[~np.isin(mine, held)])


def test_auto_select_picks_by_holdout_recall() -> None:
    torch.set_num_threads(1)
    data = synthetic_model_data()
    cfg = small_config(
        epochs=2,
        use_ranker=False,
        auto_select=["content_dims=4", "use_content=false"],
        auto_select_holdout=0.25,
    )
    result = train(data, cfg, DistContext.single(), RunOptions())
    scores = result.selection
    assert set(scores) == {"content_dims=4", "use_content=false"}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    best = max(scores, key=lambda k: scores[k])
    assert result.config.auto_select == ()
    if best == "content_dims=4":
        assert result.config.content_dims == 4 and result.config.use_content
    else:
        assert not result.config.use_content
    # Content predicts who likes an item in the synthetic data: the holdout should see it.
    assert scores["content_dims=4"] > scores["use_content=false"]


def test_item_cold_recall_is_the_harness_protocol() -> None:
    """Towers trained without the held-out items rank them (a recall in (0, 1])."""
    torch.set_num_threads(1)
    data = synthetic_model_data()
    held = holdout_folds(data, small_config())[0]
    sub = without_items(data, held)
    result = train(sub, small_config(epochs=1, use_ranker=False), DistContext.single())
    r = item_cold_recall(result.towers, data, sub, held)
    assert 0.0 < r <= 1.0


def test_without_users_makes_them_new() -> None:
    """A fold of users plays new: no id, no history, their positives and low ratings gone
    from every count; everyone else exactly as before."""
    from services.trainer.model.dataset import with_unliked

    data = synthetic_model_data()
    rng = np.random.default_rng(0)
    data = with_unliked(
        data, rng.integers(0, data.n_users, 300), rng.integers(0, data.n_items, 300)
    )
    folds = user_folds(data, 3, seed=5)
    with_positives = np.flatnonzero(np.diff(data.user_offsets) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(folds)), with_positives)
    again, other = user_folds(data, 3, seed=5), user_folds(data, 3, seed=6)
    assert all(np.array_equal(f, g) for f, g in zip(folds, again, strict=True))
    assert not np.array_equal(folds[0], other[0])
    held = folds[0]
    sub = without_users(data, held)
    assert (sub.user_codes[held] == 0).all()
    for u in range(data.n_users):
        if u in set(held.tolist()):
            assert len(sub.history(u)) == 0 and len(sub.unliked(u)) == 0
        else:
            np.testing.assert_array_equal(sub.history(u), data.history(u))
            np.testing.assert_array_equal(sub.unliked(u), data.unliked(u))
            assert sub.user_codes[u] == data.user_codes[u]
    gone = np.bincount(np.concatenate([data.history(int(u)) for u in held]), minlength=data.n_items)
    np.testing.assert_array_equal(sub.pop, data.pop - gone)
