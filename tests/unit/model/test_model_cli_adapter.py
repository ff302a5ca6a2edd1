"""`coldstart train` input checking, and the harness adapter's registration and contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from services.trainer.baselines.base import ScoreRequest, TrainData, available, create
from services.trainer.data.model import Categorical, Dataset, Entities, Interactions
from services.trainer.model import train_cli
from services.trainer.model.config import ModelConfig


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--data", "x", "--workers", "0"], "--workers"),
        (["--data", "x", "--epochs", "0"], "--epochs"),
        (["--data", "x", "--option", "colour=blue"], "--option"),
        (["--data", "x", "--option", "novalue"], "--option"),
        (["--data", "x", "--workers", "3", "--batch-size", "512"], "--batch-size"),
        (["--data", "x", "--resume"], "--resume"),
        (["--data", "x", "--loss", "hinge"], "--loss"),
        (["--data", "x", "--option", "rated_history=true"], "rated_history"),
        (["--data", "x", "--option", "unliked_pool=true"], "unliked_pool"),
        (["--workers", "2"], "--data"),
    ],
)
def test_bad_input_is_one_line_naming_the_option(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and option in err and "\n" not in err


def test_models_are_registered() -> None:
    names = available()
    for name in ("coldstart", "coldstart-no-content", "coldstart-no-iddrop", "coldstart-no-ranker"):
        assert name in names


def _tiny_dataset() -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 60
    genres = [[f"g{i % 4}"] for i in range(n_items)]
    items = Entities(
        ids=np.array([str(i) for i in range(n_items)], dtype=object),
        categorical={"genre": Categorical.from_values("genre", genres)},
        text=[f"Film {i} ({1990 + i % 8}) | g{i % 4}" for i in range(n_items)],
    )
    users = Entities(
        ids=np.array([str(u) for u in range(n_users)], dtype=object),
        categorical={"gender": Categorical.from_values("gender", ["F", "M"] * (n_users // 2))},
    )
    u = np.repeat(np.arange(n_users), 10)
    i = np.concatenate([rng.choice(n_items, 10, replace=False) for _ in range(n_users)])
    inter = Interactions(
        u, i, np.full(len(u), 5.0, np.float32), np.arange(len(u), dtype=np.int64) * 10
    )
    vectors = rng.normal(size=(n_items, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Dataset("tiny", items, users, inter), vectors


def test_adapter_fits_and_scores_cold_users_and_items() -> None:
    ds, vectors = _tiny_dataset()
    train_rows = np.flatnonzero(ds.interactions.user < 30)  # users 30.. are cold
    train = ds.interactions.take(train_rows)
    positives = sp.csr_matrix(
        (np.ones(len(train)), (train.user, train.item)), shape=(ds.n_users, ds.n_items)
    )
    data = TrainData(ds, vectors, train, positives, seed=1)
    options = {
        "epochs": 1,
        "dim": 8,
        "hidden": 16,
        "batch_size": 64,
        "n_negatives": 8,
        "ranker_epochs": 1,
        "ranker_candidates": 10,
        "ranker_queries_per_user": 1,
        # A fixed gate: the tiny data's held-out check could switch the ranker off.
        "ranker_auto_gate": False,
    }
    model = create("coldstart", 1, options)
    model.fit(data)
    users = np.array([0, 35, 36])
    request = ScoreRequest(
        users=users,
        user_attributes={"gender": ds.users.categorical["gender"].matrix[users]},
        history=[np.array([1, 2]), np.array([], dtype=np.int64), np.array([5])],
        candidates=np.arange(ds.n_items),
    )
    scores = model.score(request)
    assert scores.shape == (3, ds.n_items) and np.isfinite(scores).all()
    # The no-ranker ablation on the same data reuses the towers: its order is the towers'.
    plain = create("coldstart-no-ranker", 1, options)
    plain.fit(data)
    tower = plain.score(request)
    assert tower.shape == scores.shape and not np.allclose(tower, scores)


def test_unliked_by_user_is_each_users_low_ratings_oldest_first() -> None:
    ds, vectors = _tiny_dataset()
    # user 0: items rated 2 at t=30 and t=10 (out of order), 4 (liked) at t=20; user 1: 3.5.
    inter = Interactions(
        np.array([0, 0, 0, 1, 2]),
        np.array([7, 8, 9, 11, 12]),
        np.array([2.0, 4.0, 2.0, 3.5, 5.0], np.float32),
        np.array([30, 20, 10, 5, 5], dtype=np.int64),
    )
    positives = sp.csr_matrix((ds.n_users, ds.n_items))
    got = TrainData(ds, vectors, inter, positives, seed=1).unliked_by_user()
    assert sorted(got) == [0, 1]  # user 2 rated nothing low: absent
    np.testing.assert_array_equal(got[0], [9, 7])
    np.testing.assert_array_equal(got[1], [11])
    assert got[0].dtype == np.int64


def _with_low_ratings() -> TrainData:
    """The tiny dataset's interactions with every third one rated 2 (below the threshold
    of 4), the rest 5: training data for the experiments that read the low ratings."""
    ds, vectors = _tiny_dataset()
    values = np.where(np.arange(len(ds.interactions)) % 3 == 0, 2.0, 5.0).astype(np.float32)
    inter = Interactions(
        ds.interactions.user, ds.interactions.item, values, ds.interactions.timestamp
    )
    return TrainData(ds, vectors, inter, sp.csr_matrix((ds.n_users, ds.n_items)), seed=1)


def test_rated_history_trains_on_every_rated_item_and_is_not_exported(tmp_path: Path) -> None:
    """Run 9's experiment: the towers on liked and low-rated items alike (worse: kept off)."""
    from services.trainer.model.bundle import load_bundle
    from services.trainer.model.dataset import from_train_data
    from services.trainer.model.export import ExportError, publish
    from services.trainer.model.harness_adapter import ColdStartRecommender
    from tests.unit.model.test_export_parity import saved_run

    assert ModelConfig().rated_history is False
    data = _with_low_ratings()
    values = data.train.value
    liked = from_train_data(data, 9, 20)
    rated = from_train_data(data, 9, 20, rated=True)
    assert liked.n_samples == int((values >= 4).sum()) and rated.n_samples == len(values)
    model = create("coldstart", 1, {"epochs": 1, "dim": 8, "hidden": 16, "batch_size": 64,
                                     "n_negatives": 8, "use_ranker": False, "rated_history": True})  # fmt: skip
    model.fit(data)
    assert isinstance(model, ColdStartRecommender)
    result = model._model.result  # the adapter's fitted ScoringModel
    with pytest.raises(ExportError, match="rated_history"):
        publish(load_bundle(saved_run(result, tmp_path, {})), tmp_path / "registry")


def test_unliked_pool_reads_the_low_rated_items_and_is_not_exported(tmp_path: Path) -> None:
    """Run 10's experiment: the user tower's second pooled input, the items rated low."""
    from services.trainer.model.bundle import load_bundle
    from services.trainer.model.dataset import from_train_data
    from services.trainer.model.export import ExportError, publish
    from services.trainer.model.harness_adapter import ColdStartRecommender
    from tests.unit.model.test_export_parity import saved_run

    assert ModelConfig().unliked_pool is False
    data = _with_low_ratings()
    ds, values, inter = data.dataset, data.train.value, data.train
    md = from_train_data(data, 9, 20)
    low = values < 4
    for u in range(ds.n_users):  # every user's low-rated items, oldest first
        rows = np.flatnonzero(low & (inter.user == u))
        rows = rows[np.argsort(inter.timestamp[rows], kind="stable")]
        np.testing.assert_array_equal(md.unliked(u), inter.item[rows])
    model = create("coldstart", 1, {"epochs": 1, "dim": 8, "hidden": 16, "batch_size": 64,
                                     "n_negatives": 8, "use_ranker": False, "unliked_pool": True})  # fmt: skip
    model.fit(data)
    assert isinstance(model, ColdStartRecommender)
    sm = model._model
    user = int(np.argmax([len(md.unliked(u)) for u in range(ds.n_users)]))
    attrs, hist = sm.data.user_attrs[[user]], [sm.data.history(user)]
    with_low = sm.user_vecs(np.array([user]), attrs, hist, unliked=[md.unliked(user)])
    without = sm.user_vecs(np.array([user]), attrs, hist)
    assert not np.allclose(with_low, without)  # the tower reads the second pool
    with pytest.raises(ExportError, match="unliked_pool"):
        publish(load_bundle(saved_run(sm.result, tmp_path, {})), tmp_path / "registry")
