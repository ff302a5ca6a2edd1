"""Every baseline on tiny synthetic data through the real harness, plus the registry."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.trainer.baselines.base import (
    Recommender,
    ScoreRequest,
    TrainData,
    available,
    create,
    register,
)
from services.trainer.data.model import Dataset
from services.trainer.data.synthetic import generate
from services.trainer.data.vectors import HashingEmbedder
from services.trainer.evaluation.runner import RunConfig, evaluate_task, run_split, train_data
from services.trainer.evaluation.splits import item_cold, user_cold, warm

FAST: dict[str, dict[str, Any]] = {
    "lightfm": {"epochs": 3, "components": 16},
    "dropoutnet": {"epochs": 2, "dim": 16, "hidden": 32, "batch_size": 256},
    "als": {"iterations": 3, "factors": 16},
}


@pytest.fixture(scope="module")
def data() -> Dataset:
    return generate(n_users=120, n_items=150, mean_interactions=15, seed=2)


@pytest.fixture(scope="module")
def vectors(data: Dataset) -> np.ndarray:
    return HashingEmbedder(32)(data.items.text)


def test_builtins_are_registered() -> None:
    names = available()
    for name in ("random", "popularity", "popularity-segment", "content-knn", "als", "lightfm",
                 "dropoutnet"):  # fmt: skip
        assert name in names
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        create("nope", seed=0)


@pytest.mark.parametrize("model", sorted(["random", "popularity", "popularity-segment",
                                          "content-knn", "als", "lightfm", "dropoutnet"]))  # fmt: skip
def test_every_baseline_runs_every_split(data: Dataset, vectors: np.ndarray, model: str) -> None:
    config = RunConfig(ks=(10, 20), options=FAST)
    for split in (item_cold(data, 1), user_cold(data, 1), warm(data, 1)):
        results = run_split([model], data, split, vectors, config)
        assert len(results) == len(split.test_tasks())
        for r in results:
            assert 0.0 <= r.metrics["recall@20"] <= 1.0
            assert 0.0 <= r.metrics["ndcg@20"] <= 1.0
            assert r.fit.seconds >= 0.0
            assert r.users > 0


def test_informed_baselines_beat_random(data: Dataset, vectors: np.ndarray) -> None:
    split = warm(data, 1)
    config = RunConfig(ks=(20,), options=FAST)
    r = {x.model: x.metrics["recall@20"] for x in run_split(
        ["random", "popularity", "als"], data, split, vectors, config)}  # fmt: skip
    assert r["popularity"] > r["random"] + 0.05
    assert r["als"] > r["random"] + 0.05
    # Item cold (15 candidates, so K=5): text that names the topic should beat chance.
    split = item_cold(data, 1)
    r = {x.model: x.metrics["recall@5"] for x in run_split(
        ["random", "content-knn"], data, split, vectors, RunConfig(ks=(5,)))}  # fmt: skip
    assert r["content-knn"] > r["random"] + 0.05


def test_segment_popularity_differs_by_attributes(data: Dataset, vectors: np.ndarray) -> None:
    split = user_cold(data, 1)
    model = create("popularity-segment", seed=0)
    model.fit(train_data(data, split, vectors))
    task = split.tasks[0]
    users = task.users
    req = ScoreRequest(
        users=users,
        user_attributes={f: c.matrix[users] for f, c in data.users.categorical.items()},
        history=[np.zeros(0, dtype=np.int64)] * len(users),
        candidates=np.arange(data.n_items),
    )
    scores = model.score(req)
    assert len({tuple(np.argsort(-row)[:10]) for row in scores}) > 1


def test_als_folds_in_a_new_users_history(data: Dataset, vectors: np.ndarray) -> None:
    split = user_cold(data, 1)
    model = create("als", seed=0, options=FAST["als"])
    model.fit(train_data(data, split, vectors))
    task = next(t for t in split.tasks if t.k == 5)
    users = task.users[:2]
    req = ScoreRequest(
        users=users,
        user_attributes={f: c.matrix[users] for f, c in data.users.categorical.items()},
        history=task.history[:2],
        candidates=np.arange(data.n_items),
    )
    scores = model.score(req)
    assert not np.allclose(scores[0], scores[1])  # different histories, different lists


class ConstantModel:
    """A plug-in stand-in: proves a registered outside model runs in the harness."""

    name = "constant"

    def __init__(self, shape_bug: bool = False) -> None:
        self.shape_bug = shape_bug

    def fit(self, train: TrainData) -> None:
        self.n_items = train.n_items

    def score(self, request: ScoreRequest) -> np.ndarray:
        cols = len(request.candidates) + (1 if self.shape_bug else 0)
        return np.zeros((len(request), cols))


def test_registered_plugin_runs_and_bad_shapes_are_caught(
    data: Dataset, vectors: np.ndarray
) -> None:
    register("constant", lambda seed, options: ConstantModel(**options))
    model = create("constant", seed=0)
    assert isinstance(model, Recommender)
    split = warm(data, 1)
    (res,) = run_split(["constant"], data, split, vectors, RunConfig(ks=(20,)))
    assert res.metrics["recall@20"] < 0.5
    bad = create("constant", seed=0, options={"shape_bug": True})
    bad.fit(train_data(data, split, vectors))
    with pytest.raises(ValueError, match="shape"):
        evaluate_task(bad, data, split.tasks[0], seed=0, ks=(20,))
