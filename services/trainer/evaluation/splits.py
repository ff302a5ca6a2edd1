"""Seeded, saveable evaluation splits.

A :class:`Split` is the training rows plus one or more :class:`EvalTask`
(a set of users, what each reveals, what each must find, and the candidates).
The protocol (defaults; see docs/EVALUATION.md):

- item-cold: 20% of the items with >= 1 positive are cold; every interaction
  with them leaves training; half are validation, half test. Each user with a
  positive among the test items ranks exactly the test items.
- user-cold: 20% of all users are cold; all their interactions leave
  training. Cold users with >= max(k)+1 positives are evaluated: for each k in
  {0, 1, 3, 5} their first k positives by time are revealed (history) and the
  rest are targets; candidates are all items except the revealed ones. The
  same users are evaluated at every k, so the k columns are comparable.
- warm: users with >= 5 positives keep their last 20% of positives by time
  (at least one) as test targets; everything else trains. Candidates: all
  items except the user's training positives.

Positives are interactions with ``value >= dataset.positive_threshold``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.data.build import interactions_from_table
from services.trainer.data.errors import DataError
from services.trainer.data.model import Dataset
from services.trainer.data.tables import read_table

SPLITS = ("item-cold", "user-cold", "warm")
REVEALED_KS = (0, 1, 3, 5)


@dataclass(frozen=True)
class EvalTask:
    """One ranking exercise: per user a history (shown to the model and masked
    from the ranking), targets, and extra exclusions; candidates shared."""

    split: str
    part: str  # "validation" or "test"
    k: int | None  # revealed interactions (user-cold), else None
    users: np.ndarray
    history: list[np.ndarray]
    targets: list[np.ndarray]
    exclude: list[np.ndarray]  # masked besides the history (other known positives)
    candidates: np.ndarray | None  # None: every item

    @property
    def key(self) -> str:
        return self.split if self.k is None else f"{self.split}/k={self.k}"


@dataclass(frozen=True)
class Split:
    name: str
    seed: int
    dataset: str
    train_rows: np.ndarray  # row indices into dataset.interactions
    tasks: list[EvalTask]
    info: dict[str, Any] = field(default_factory=dict)

    def test_tasks(self) -> list[EvalTask]:
        return [t for t in self.tasks if t.part == "test"]

    def tasks_for(self, part: str) -> list[EvalTask]:
        return [t for t in self.tasks if t.part == part]


def _by_user_positives(dataset: Dataset, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Positive items per user among ``rows``, oldest first (rows are time-sorted)."""
    inter = dataset.interactions
    rows = rows[dataset.positive_mask()[rows]]
    rows = rows[np.argsort(inter.timestamp[rows], kind="stable")]
    users = inter.user[rows]
    order = np.argsort(users, kind="stable")
    users_sorted, items_sorted = users[order], inter.item[rows][order]
    bounds = np.flatnonzero(np.diff(users_sorted)) + 1
    out: dict[int, np.ndarray] = {}
    for chunk_u, chunk_i in zip(
        np.split(users_sorted, bounds), np.split(items_sorted, bounds), strict=True
    ):
        if len(chunk_u):
            out[int(chunk_u[0])] = chunk_i.astype(np.int64)
    return out


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def item_cold(dataset: Dataset, seed: int, fraction: float = 0.2) -> Split:
    rng = np.random.default_rng([seed, 1])
    inter = dataset.interactions
    pos = dataset.positive_mask()
    eligible = np.unique(inter.item[pos])
    n_cold = round(fraction * len(eligible))
    cold = rng.permutation(eligible)[:n_cold]
    validation, test = np.sort(cold[: n_cold // 2]), np.sort(cold[n_cold // 2 :])
    is_cold = np.zeros(dataset.n_items, dtype=bool)
    is_cold[cold] = True
    all_rows = np.arange(len(inter))
    train_rows = all_rows[~is_cold[inter.item]]
    train_pos = _by_user_positives(dataset, train_rows)
    held_pos = _by_user_positives(dataset, all_rows[is_cold[inter.item]])
    tasks = []
    for part, items in (("validation", validation), ("test", test)):
        member = np.zeros(dataset.n_items, dtype=bool)
        member[items] = True
        users, history, targets = [], [], []
        for u in sorted(held_pos):
            t = held_pos[u][member[held_pos[u]]]
            if len(t):
                users.append(u)
                history.append(train_pos.get(u, _empty()))
                targets.append(t)
        tasks.append(
            EvalTask(
                split="item-cold",
                part=part,
                k=None,
                users=np.asarray(users, dtype=np.int64),
                history=history,
                targets=targets,
                exclude=[_empty() for _ in users],
                candidates=items,
            )
        )
    info = {"cold_items": int(n_cold), "validation_items": len(validation), "test_items": len(test)}
    return Split("item-cold", seed, dataset.name, train_rows, tasks, info)


def user_cold(
    dataset: Dataset, seed: int, fraction: float = 0.2, ks: tuple[int, ...] = REVEALED_KS
) -> Split:
    rng = np.random.default_rng([seed, 2])
    inter = dataset.interactions
    n_cold = round(fraction * dataset.n_users)
    cold = np.sort(rng.permutation(dataset.n_users)[:n_cold])
    is_cold = np.zeros(dataset.n_users, dtype=bool)
    is_cold[cold] = True
    all_rows = np.arange(len(inter))
    train_rows = all_rows[~is_cold[inter.user]]
    held = _by_user_positives(dataset, all_rows[is_cold[inter.user]])
    need = max(ks) + 1
    users = np.asarray([u for u in sorted(held) if len(held[u]) >= need], dtype=np.int64)
    tasks = []
    for k in ks:
        history = [held[int(u)][:k] for u in users]
        tasks.append(
            EvalTask(
                split="user-cold",
                part="test",
                k=k,
                users=users,
                history=history,
                targets=[held[int(u)][k:] for u in users],
                exclude=[_empty() for _ in users],
                candidates=None,
            )
        )
    info = {"cold_users": int(n_cold), "evaluated_users": len(users), "min_positives": need}
    return Split("user-cold", seed, dataset.name, train_rows, tasks, info)


def warm(dataset: Dataset, seed: int, fraction: float = 0.2, min_positives: int = 5) -> Split:
    inter = dataset.interactions
    all_rows = np.arange(len(inter))
    pos_rows = all_rows[dataset.positive_mask()]
    pos_rows = pos_rows[np.argsort(inter.timestamp[pos_rows], kind="stable")]
    by_user: dict[int, list[int]] = {}
    for r in pos_rows.tolist():
        by_user.setdefault(int(inter.user[r]), []).append(r)
    test_rows: list[int] = []
    for rows in by_user.values():
        if len(rows) >= min_positives:
            n_test = max(1, round(fraction * len(rows)))
            test_rows.extend(rows[-n_test:])
    is_test = np.zeros(len(inter), dtype=bool)
    is_test[test_rows] = True
    train_rows = all_rows[~is_test]
    train_pos = _by_user_positives(dataset, train_rows)
    test_pos = _by_user_positives(dataset, all_rows[is_test])
    users = np.asarray(sorted(test_pos), dtype=np.int64)
    task = EvalTask(
        split="warm",
        part="test",
        k=None,
        users=users,
        history=[train_pos.get(int(u), _empty()) for u in users],
        targets=[test_pos[int(u)] for u in users],
        exclude=[_empty() for _ in users],
        candidates=None,
    )
    # The seed does not change a time-based split; it is kept so files name it.
    info = {"evaluated_users": len(users), "test_interactions": len(test_rows)}
    return Split("warm", seed, dataset.name, train_rows, [task], info)


def make_split(name: str, dataset: Dataset, seed: int) -> Split:
    if name == "item-cold":
        return item_cold(dataset, seed)
    if name == "user-cold":
        return user_cold(dataset, seed)
    if name == "warm":
        return warm(dataset, seed)
    raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")


# --- files: save / load ------------------------------------------------------------------


def _pack(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate(arrays).astype(np.int64) if arrays else _empty()
    return flat, offsets


def _unpack(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def save_split(split: Split, path: Path) -> None:
    """One .npz with the arrays (item/user *row indices* of this dataset load)
    and a JSON header; reload with :func:`load_split` on the same dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"train_rows": split.train_rows}
    meta_tasks = []
    for i, task in enumerate(split.tasks):
        arrays[f"t{i}_users"] = task.users
        for name in ("history", "targets", "exclude"):
            flat, offsets = _pack(getattr(task, name))
            arrays[f"t{i}_{name}"], arrays[f"t{i}_{name}_off"] = flat, offsets
        if task.candidates is not None:
            arrays[f"t{i}_candidates"] = task.candidates
        meta_tasks.append({"split": task.split, "part": task.part, "k": task.k})
    meta = {
        "name": split.name,
        "seed": split.seed,
        "dataset": split.dataset,
        "info": split.info,
        "tasks": meta_tasks,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def load_split(path: Path, dataset: Dataset | None = None) -> Split:
    with np.load(Path(path)) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if dataset is not None and meta["dataset"] != dataset.name:
            raise DataError(path, f"split was made for {meta['dataset']}, not {dataset.name}")
        tasks = []
        for i, t in enumerate(meta["tasks"]):
            tasks.append(
                EvalTask(
                    split=t["split"],
                    part=t["part"],
                    k=t["k"],
                    users=z[f"t{i}_users"],
                    history=_unpack(z[f"t{i}_history"], z[f"t{i}_history_off"]),
                    targets=_unpack(z[f"t{i}_targets"], z[f"t{i}_targets_off"]),
                    exclude=_unpack(z[f"t{i}_exclude"], z[f"t{i}_exclude_off"]),
                    candidates=z.get(f"t{i}_candidates", None),
                )
            )
        return Split(
            meta["name"], int(meta["seed"]), meta["dataset"], z["train_rows"], tasks, meta["info"]
        )


def split_from_files(dataset: Dataset, folder: Path) -> Split:
    """A published split: ``train``, optional ``validation`` and ``test`` files
    (.csv or .parquet) listing (user, item) pairs by the catalog's own ids.

    Columns are named ``user`` and ``item`` (other columns are ignored). Every
    pair must be an interaction of the dataset (so values and timestamps come
    from one place); a pair in two files is an error. Only positive pairs
    become targets. If no test item occurs in the training file the task is
    item-cold style (rank the test items), otherwise all items are ranked with
    each user's training positives masked.
    """
    folder = Path(folder)
    inter = dataset.interactions
    pair_row = {
        (int(u), int(i)): r for r, (u, i) in enumerate(zip(inter.user, inter.item, strict=True))
    }
    owner = np.full(len(inter), -1, dtype=np.int64)
    parts = ("train", "validation", "test")
    found: dict[str, np.ndarray] = {}
    for p_i, part in enumerate(parts):
        path = next((folder / f"{part}{ext}" for ext in (".csv", ".parquet")
                     if (folder / f"{part}{ext}").is_file()), None)  # fmt: skip
        if path is None:
            if part != "validation":
                raise DataError(folder / f"{part}.csv", "split file not found")
            continue
        table = read_table(path)
        pairs = interactions_from_table(
            table,
            user_col="user",
            item_col="item",
            value_col=None,
            time_col=None,
            user_index=dataset.users.index(),
            item_index=dataset.items.index(),
            on_duplicate="error",
        )
        rows = np.empty(len(pairs), dtype=np.int64)
        for j, (u, i) in enumerate(zip(pairs.user, pairs.item, strict=True)):
            r = pair_row.get((int(u), int(i)))
            if r is None:
                line = int(table.lines[int(pairs.timestamp[j])])
                raise DataError(path, "pair is not an interaction of the dataset", line, "item")
            if owner[r] >= 0:
                line = int(table.lines[int(pairs.timestamp[j])])
                raise DataError(path, f"pair is also in {parts[owner[r]]}", line, "item")
            owner[r] = p_i
            rows[j] = r
        found[part] = rows
    train_rows = np.sort(found["train"])
    train_pos = _by_user_positives(dataset, train_rows)
    seen_items = np.zeros(dataset.n_items, dtype=bool)
    seen_items[inter.item[train_rows]] = True
    tasks = []
    for part in ("validation", "test"):
        if part not in found:
            continue
        held = _by_user_positives(dataset, np.sort(found[part]))
        held_items = np.unique(inter.item[found[part]])
        cold_items = not seen_items[held_items].any()
        users = np.asarray(sorted(held), dtype=np.int64)
        tasks.append(
            EvalTask(
                split="files",
                part=part,
                k=None,
                users=users,
                history=[train_pos.get(int(u), _empty()) for u in users],
                targets=[held[int(u)] for u in users],
                exclude=[_empty() for _ in users],
                candidates=held_items if cold_items else None,
            )
        )
    return Split("files", 0, dataset.name, train_rows, tasks, {"folder": str(folder)})
