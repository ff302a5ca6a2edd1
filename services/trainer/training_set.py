"""Building a retraining run's data: the initial dataset plus the event log,
minus forgotten users, split into training rows and a held-out slice of the
newest interactions.

The training rows are written as a generic catalog folder (Parquet tables and
``schema.json``, see services/trainer/data/generic.py), so any trainer that
takes ``--data <folder>`` reads them with ``load_dataset``. Values: a "rating"
interaction keeps its rating; every other kind (view, click, like...) is an
implicit positive and is written with the dataset's positive threshold.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from coldstart.v1 import events_pb2

from services.trainer.data.model import Dataset, Entities

# Columns the exported tables use themselves; attributes with these names are renamed.
RESERVED = frozenset({"user_id", "item_id", "text", "interest_text", "value", "ts"})
MULTI_SEP = "|"
DEFAULT_THRESHOLD = 4.0


@dataclass
class Catalog:
    """Entities by external id: attributes (multi-values joined by "|") and text."""

    text: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)

    def upsert(
        self,
        entity_id: str,
        text: str,
        attributes: Mapping[str, str],
        multi: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        values = {_column(k): _clean(v) for k, v in attributes.items()}
        for key, many in (multi or {}).items():
            if many:
                values[_column(key)] = MULTI_SEP.join(_clean(v) for v in many)
        self.text[entity_id] = text
        self.attributes[entity_id] = values

    def drop(self, ids: set[str]) -> None:
        for entity_id in ids:
            self.text.pop(entity_id, None)
            self.attributes.pop(entity_id, None)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self.text

    def __len__(self) -> int:
        return len(self.text)


@dataclass(frozen=True)
class InitialData:
    """The initial dataset in external-id terms (what the export needs of it)."""

    items: Catalog
    users: Catalog
    # user_id, item_id, value, ts (seconds)
    interactions: pd.DataFrame
    positive_threshold: float


@dataclass(frozen=True)
class HoldOut:
    """Held-out users: their training positives (history) and held-out positives (targets)."""

    users: list[str]
    histories: list[list[str]]
    targets: list[list[str]]
    candidates: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "histories": self.histories,
            "targets": self.targets,
            "candidates": self.candidates,
        }


@dataclass(frozen=True)
class ExportedData:
    folder: Path
    holdout: HoldOut
    log_offsets: dict[int, int]
    log_events: int
    training_rows: int
    held_out_rows: int
    forgotten_users: int
    skipped_unknown_items: int


def _clean(value: str) -> str:
    # "|" separates multi-values in the exported tables.
    return str(value).replace(MULTI_SEP, "/").strip()


def _column(name: str) -> str:
    return f"attr_{name}" if name in RESERVED else name


def _entity_catalog(entities: Entities, id_prefix: str = "") -> Catalog:
    catalog = Catalog()
    ids = [str(x) for x in entities.ids.tolist()]
    per_row: list[dict[str, str]] = [{} for _ in ids]
    for name, cat in entities.categorical.items():
        matrix = cat.matrix.tocsr()
        for row in range(matrix.shape[0]):
            cols = matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]]
            if len(cols):
                per_row[row][_column(name)] = MULTI_SEP.join(
                    _clean(cat.vocab[j]) for j in sorted(cols)
                )
    texts = entities.text if entities.text else [""] * len(ids)
    for entity_id, text, attrs in zip(ids, texts, per_row, strict=True):
        catalog.text[id_prefix + entity_id] = text
        catalog.attributes[id_prefix + entity_id] = attrs
    return catalog


def initial_from_dataset(dataset: Dataset) -> InitialData:
    """Turn a loaded dataset (row indices) into external-id tables."""
    items = _entity_catalog(dataset.items)
    users = _entity_catalog(dataset.users)
    item_ids = np.asarray([str(x) for x in dataset.items.ids.tolist()], dtype=object)
    user_ids = np.asarray([str(x) for x in dataset.users.ids.tolist()], dtype=object)
    inter = dataset.interactions
    frame = pd.DataFrame(
        {
            "user_id": user_ids[inter.user],
            "item_id": item_ids[inter.item],
            "value": inter.value.astype(np.float64),
            "ts": inter.timestamp.astype(np.int64),
        }
    )
    return InitialData(items, users, frame, float(dataset.positive_threshold))


def empty_initial() -> InitialData:
    return InitialData(
        Catalog(),
        Catalog(),
        pd.DataFrame(
            {
                "user_id": pd.Series(dtype=object),
                "item_id": pd.Series(dtype=object),
                "value": pd.Series(dtype=np.float64),
                "ts": pd.Series(dtype=np.int64),
            }
        ),
        DEFAULT_THRESHOLD,
    )


def _read_log(
    conn: sqlite3.Connection, initial: InitialData, topic: str
) -> tuple[Catalog, Catalog, pd.DataFrame, set[str], dict[int, int], int]:
    """Items, users, interactions, forgotten users and offsets from one log snapshot."""
    items = Catalog(dict(initial.items.text), dict(initial.items.attributes))
    users = Catalog(dict(initial.users.text), dict(initial.users.attributes))
    forgotten = {str(u) for (u,) in conn.execute("SELECT user_id FROM forgotten")}
    # Newer registrations of a forgotten user are a new consent: they come back below.
    users.drop(forgotten)
    for (payload,) in conn.execute(
        "SELECT payload FROM events WHERE kind = 'item_upserted' ORDER BY seq"
    ):
        event = events_pb2.Event.FromString(payload)
        item = event.item_upserted
        items.upsert(item.item_id, item.text, dict(item.attributes), {"tags": list(item.tags)})
    for (payload,) in conn.execute(
        "SELECT payload FROM events WHERE kind = 'user_registered' ORDER BY seq"
    ):
        event = events_pb2.Event.FromString(payload)
        user = event.user_registered
        users.upsert(user.user_id, user.interest_text, dict(user.attributes))
    rows = conn.execute(
        "SELECT user_id, item_id, action, value, ts_ms FROM events "
        "WHERE kind = 'interaction' ORDER BY seq"
    ).fetchall()
    threshold = initial.positive_threshold
    log_frame = pd.DataFrame(
        {
            "user_id": pd.Series([r[0] for r in rows], dtype=object),
            "item_id": pd.Series([r[1] for r in rows], dtype=object),
            "value": pd.Series(
                [float(r[3]) if r[2] == "rating" else threshold for r in rows], dtype=np.float64
            ),
            "ts": pd.Series([int(r[4]) // 1000 for r in rows], dtype=np.int64),
        }
    )
    offsets = {
        int(p): int(o)
        for p, o in conn.execute(
            "SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,)
        )
    }
    (log_events,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
    return items, users, log_frame, forgotten, offsets, int(log_events)


def build_training_set(
    conn: sqlite3.Connection,
    initial: InitialData,
    folder: Path,
    *,
    topic: str,
    holdout_fraction: float,
    holdout_max_events: int,
) -> ExportedData:
    """Export the training rows to ``folder`` and return the held-out slice.

    ``conn`` must be inside a read transaction so that everything comes from
    one snapshot of the log.
    """
    items, users, log_frame, forgotten, offsets, log_events = _read_log(conn, initial, topic)
    base = initial.interactions
    base = base[~base["user_id"].isin(forgotten)]
    frame = pd.concat([base, log_frame], ignore_index=True)
    frame["order"] = np.arange(len(frame))
    known = frame["item_id"].isin(set(items.text))
    skipped_unknown = int((~known).sum())
    frame = frame[known].sort_values(["ts", "order"], kind="stable").reset_index(drop=True)
    # Users that only ever interacted still need a row in the users table.
    for user_id in frame["user_id"].unique().tolist():
        if user_id not in users:
            users.upsert(str(user_id), "", {})

    threshold = initial.positive_threshold
    n_hold = 0
    if len(frame) >= 10:
        n_hold = min(holdout_max_events, max(1, int(len(frame) * holdout_fraction)))
    train = frame.iloc[: len(frame) - n_hold]
    held = frame.iloc[len(frame) - n_hold :]
    holdout = _holdout(train, held, threshold, sorted(items.text))

    folder.mkdir(parents=True, exist_ok=True)
    item_cols = _write_entities(folder / "items.parquet", "item_id", "text", items)
    user_cols = _write_entities(folder / "users.parquet", "user_id", "interest_text", users)
    train[["user_id", "item_id", "value", "ts"]].to_parquet(
        folder / "interactions.parquet", index=False
    )
    schema = {
        "positive_threshold": threshold,
        "interactions": {
            "file": "interactions.parquet",
            "user": "user_id",
            "item": "item_id",
            "value": "value",
            "timestamp": "ts",
            "on_unknown": "skip",
            "on_duplicate": "keep-last",
        },
        "items": {
            "file": "items.parquet",
            "id": "item_id",
            "text": ["text"],
            "categorical": item_cols,
            "multi_value": dict.fromkeys(item_cols, MULTI_SEP),
        },
        "users": {
            "file": "users.parquet",
            "id": "user_id",
            "text": ["interest_text"],
            "categorical": user_cols,
            "multi_value": dict.fromkeys(user_cols, MULTI_SEP),
        },
    }
    (folder / "schema.json").write_text(json.dumps(schema, indent=2, sort_keys=True))
    return ExportedData(
        folder=folder,
        holdout=holdout,
        log_offsets=offsets,
        log_events=log_events,
        training_rows=len(train),
        held_out_rows=len(held),
        forgotten_users=len(forgotten),
        skipped_unknown_items=skipped_unknown,
    )


def _write_entities(path: Path, id_col: str, text_col: str, catalog: Catalog) -> list[str]:
    ids = sorted(catalog.text)
    columns = sorted({k for attrs in catalog.attributes.values() for k in attrs})
    data: dict[str, list[str]] = {
        id_col: ids,
        text_col: [catalog.text[i] for i in ids],
    }
    for column in columns:
        data[column] = [catalog.attributes.get(i, {}).get(column, "") for i in ids]
    pd.DataFrame(data, dtype=object).to_parquet(path, index=False)
    return columns


def _holdout(
    train: pd.DataFrame, held: pd.DataFrame, threshold: float, candidates: list[str]
) -> HoldOut:
    positives = held[held["value"] >= threshold]
    if positives.empty:
        return HoldOut([], [], [], candidates)
    train_pos = train[train["value"] >= threshold]
    history = train_pos.groupby("user_id", sort=False)["item_id"].agg(list).to_dict()
    targets = positives.groupby("user_id", sort=True)["item_id"].agg(
        lambda s: list(dict.fromkeys(s))
    )
    users = [str(u) for u in targets.index.tolist()]
    histories = [[str(i) for i in history.get(u, [])] for u in users]
    # A target the user already had in training is no test of the model.
    cleaned = [
        [str(i) for i in t if i not in set(h)]
        for t, h in zip(targets.tolist(), histories, strict=True)
    ]
    keep = [k for k, t in enumerate(cleaned) if t]
    return HoldOut(
        users=[users[k] for k in keep],
        histories=[histories[k] for k in keep],
        targets=[cleaned[k] for k in keep],
        candidates=candidates,
    )
