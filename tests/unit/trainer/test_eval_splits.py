"""Split properties on synthetic data: what leaves training, who is evaluated, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.trainer.data.errors import DataError
from services.trainer.data.model import Dataset
from services.trainer.data.synthetic import generate
from services.trainer.evaluation.splits import (
    item_cold,
    load_split,
    make_split,
    save_split,
    split_from_files,
    user_cold,
    warm,
)


@pytest.fixture(scope="module")
def data() -> Dataset:
    return generate(n_users=150, n_items=200, mean_interactions=20, seed=5)


def test_item_cold_holds_out_items_with_all_their_interactions(data: Dataset) -> None:
    split = item_cold(data, seed=1)
    val, test = split.tasks_for("validation")[0], split.tasks_for("test")[0]
    assert val.candidates is not None and test.candidates is not None
    cold = np.concatenate([val.candidates, test.candidates])
    eligible = np.unique(data.interactions.item[data.positive_mask()])
    assert len(cold) == round(0.2 * len(eligible))
    assert len(np.intersect1d(val.candidates, test.candidates)) == 0
    assert abs(len(val.candidates) - len(test.candidates)) <= 1
    train_items = data.interactions.item[split.train_rows]
    assert not np.isin(train_items, cold).any()
    # Every other interaction stays in training.
    assert len(split.train_rows) == int((~np.isin(data.interactions.item, cold)).sum())
    for targets in test.targets:
        assert len(targets) > 0
        assert np.isin(targets, test.candidates).all()


def test_user_cold_reveals_the_first_k_positives(data: Dataset) -> None:
    split = user_cold(data, seed=1)
    tasks = {t.k or 0: t for t in split.tasks}
    assert sorted(tasks) == [0, 1, 3, 5]
    users = tasks[0].users
    for t in tasks.values():
        assert np.array_equal(t.users, users)  # same users at every k
    cold = np.unique(users)
    assert not np.isin(data.interactions.user[split.train_rows], cold).any()
    inter = data.interactions
    pos = data.positive_mask()
    for row, u in enumerate(users[:20]):
        rows = np.flatnonzero((inter.user == u) & pos)
        in_time = inter.item[rows[np.argsort(inter.timestamp[rows], kind="stable")]]
        for k, t in tasks.items():
            assert len(t.history[row]) == k
            assert np.array_equal(np.concatenate([t.history[row], t.targets[row]]), in_time)
    assert split.info["cold_users"] == round(0.2 * data.n_users)


def test_warm_targets_are_each_users_latest_positives(data: Dataset) -> None:
    split = warm(data, seed=1)
    task = split.tasks[0]
    inter = data.interactions
    train_mask = np.zeros(len(inter), dtype=bool)
    train_mask[split.train_rows] = True
    pos = data.positive_mask()
    for row, u in enumerate(task.users):
        n_pos = int(((inter.user == u) & pos).sum())
        assert n_pos >= 5
        assert len(task.targets[row]) == max(1, round(0.2 * n_pos))
        train_ts = inter.timestamp[(inter.user == u) & pos & train_mask]
        test_ts = inter.timestamp[(inter.user == u) & pos & ~train_mask]
        assert train_ts.max() <= test_ts.min()
        assert not np.isin(task.targets[row], task.history[row]).any()
    few = [u for u in range(data.n_users) if ((inter.user == u) & pos).sum() < 5]
    assert not np.isin(few, task.users).any()


def test_splits_are_seeded(data: Dataset) -> None:
    a, b, c = item_cold(data, 7), item_cold(data, 7), item_cold(data, 8)
    assert np.array_equal(a.train_rows, b.train_rows)
    assert not np.array_equal(a.train_rows, c.train_rows)


def test_save_and_load_round_trip(data: Dataset, tmp_path: Path) -> None:
    for name in ("item-cold", "user-cold", "warm"):
        split = make_split(name, data, 3)
        save_split(split, tmp_path / f"{name}.npz")
        back = load_split(tmp_path / f"{name}.npz", data)
        assert np.array_equal(back.train_rows, split.train_rows)
        assert back.info == split.info
        for t1, t2 in zip(split.tasks, back.tasks, strict=True):
            assert (t1.key, t1.part) == (t2.key, t2.part)
            assert all(np.array_equal(x, y) for x, y in zip(t1.targets, t2.targets, strict=True))
            assert all(np.array_equal(x, y) for x, y in zip(t1.history, t2.history, strict=True))


def test_split_from_files(data: Dataset, tmp_path: Path) -> None:
    inter = data.interactions
    uid, iid = data.users.ids, data.items.ids
    held = inter.item == inter.item[0]  # one item, all its rows: an item-cold test set

    def write(name: str, mask: np.ndarray) -> None:
        lines = ["user,item"] + [f"{uid[u]},{iid[i]}" for u, i in zip(inter.user[mask],
                                                                     inter.item[mask], strict=True)]  # fmt: skip
        (tmp_path / name).write_text("\n".join(lines) + "\n")

    write("train.csv", ~held)
    write("test.csv", held)
    split = split_from_files(data, tmp_path)
    assert len(split.train_rows) == int((~held).sum())
    test = split.tasks_for("test")[0]
    assert test.candidates is not None and list(test.candidates) == [int(inter.item[0])]

    (tmp_path / "test.csv").write_text(f"user,item\n{uid[0]},{iid[0]}\nu_nobody,{iid[0]}\n")
    with pytest.raises(DataError, match=r"test\.csv:3: column 'user': unknown user id"):
        split_from_files(data, tmp_path)
