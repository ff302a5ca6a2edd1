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

import collections
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
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


# Rows per fetch from the log and per merged piece: bounds the export's memory
# (a few MB per piece) independently of the number of events.
CHUNK_ROWS = 65_536
# Rows per Parquet row group of interactions.parquet (what a reader holds at once).
ROW_GROUP_ROWS = 131_072
INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("value", pa.float64()),
        ("ts", pa.int64()),
    ]
)
# Whole seconds, floored as Python's // does (SQLite's "/" truncates towards zero).
_TS_SECONDS = "((ts_ms - ((ts_ms % 1000) + 1000) % 1000) / 1000)"


def _read_catalogs(
    conn: sqlite3.Connection, initial: InitialData
) -> tuple[Catalog, Catalog, set[str]]:
    """Items, users and forgotten users from one log snapshot (one entity per entry,
    the upserts and registrations streamed from the cursor in log order)."""
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
    return items, users, forgotten


def _log_interactions(conn: sqlite3.Connection, threshold: float) -> Iterator[pa.Table]:
    """The log's interactions in training order (time in seconds, then log order), in
    pieces of CHUNK_ROWS. SQLite's sorter spills to temporary files past its cache, so
    the ORDER BY holds a bounded part of the log in memory."""
    cursor = conn.execute(
        "SELECT user_id, item_id, CASE WHEN action = 'rating' THEN value ELSE ? END, "
        f"{_TS_SECONDS} FROM events WHERE kind = 'interaction' ORDER BY {_TS_SECONDS}, seq",
        (float(threshold),),
    )
    while rows := cursor.fetchmany(CHUNK_ROWS):
        user, item, value, ts = zip(*rows, strict=True)
        yield pa.table(
            [
                pa.array(user, pa.string()),
                pa.array(item, pa.string()),
                pa.array(value, pa.float64()),
                pa.array(ts, pa.int64()),
            ],
            schema=INTERACTIONS_SCHEMA,
        )


class _Source:
    """One time-ordered source of rows consumed in pieces: a list of tables (the log,
    fetched lazily) or a table with a sorted row order (the initial data)."""

    def __init__(self, pieces: Iterator[pa.Table]) -> None:
        self._pieces = pieces
        self._buffer = INTERACTIONS_SCHEMA.empty_table()
        self._done = False

    def head(self, n: int) -> pa.Table:
        while self._buffer.num_rows < n and not self._done:
            piece = next(self._pieces, None)
            if piece is None:
                self._done = True
            elif piece.num_rows:
                self._buffer = pa.concat_tables([self._buffer, piece]).combine_chunks()
        return self._buffer.slice(0, n)

    def drop(self, n: int) -> None:
        self._buffer = self._buffer.slice(n)


def _initial_pieces(frame: pd.DataFrame, forgotten: set[str]) -> Iterator[pa.Table]:
    """The initial interactions minus forgotten users, stably sorted by time, in pieces
    (only a row order is built over the whole frame; the caller already holds it)."""
    keep = np.flatnonzero(~frame["user_id"].isin(forgotten).to_numpy())
    order = keep[np.argsort(frame["ts"].to_numpy()[keep], kind="stable")]
    for start in range(0, len(order), CHUNK_ROWS):
        part = frame.iloc[order[start : start + CHUNK_ROWS]]
        yield pa.table(
            [
                pa.array(part["user_id"].tolist(), pa.string()),
                pa.array(part["item_id"].tolist(), pa.string()),
                pa.array(part["value"].to_numpy(np.float64), pa.float64()),
                pa.array(part["ts"].to_numpy(np.int64), pa.int64()),
            ],
            schema=INTERACTIONS_SCHEMA,
        )


def _merged(initial: _Source, log: _Source) -> Iterator[pa.Table]:
    """Both sources merged by (time, source) with the initial data first on equal
    times, each source in its own order: what a stable sort of "initial rows, then log
    rows" by time gives. Each step takes up to CHUNK_ROWS of each and emits every row up
    to the smaller of the two pieces' last keys, which empties at least one piece."""
    while True:
        a, b = initial.head(CHUNK_ROWS), log.head(CHUNK_ROWS)
        if not a.num_rows or not b.num_rows:
            rest, source = (a, initial) if a.num_rows else (b, log)
            if not rest.num_rows:
                return
            source.drop(rest.num_rows)
            yield rest
            continue
        ts_a = a.column("ts").to_numpy()
        ts_b = b.column("ts").to_numpy()
        if (int(ts_a[-1]), 0) <= (int(ts_b[-1]), 1):
            n_a, n_b = len(ts_a), int(np.searchsorted(ts_b, ts_a[-1], side="left"))
        else:
            n_a, n_b = int(np.searchsorted(ts_a, ts_b[-1], side="right")), len(ts_b)
        initial.drop(n_a)
        log.drop(n_b)
        both = pa.concat_tables([a.slice(0, n_a), b.slice(0, n_b)]).combine_chunks()
        source = np.r_[np.zeros(n_a, np.int8), np.ones(n_b, np.int8)]
        order = np.lexsort((source, np.r_[ts_a[:n_a], ts_b[:n_b]]))
        yield both.take(pa.array(order))


class _BufferedWriter:
    """interactions.parquet in row groups of ROW_GROUP_ROWS, whatever the pieces' sizes."""

    def __init__(self, path: Path) -> None:
        self._writer = pq.ParquetWriter(path, INTERACTIONS_SCHEMA)
        self._pending: list[pa.Table] = []
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table)
        self._rows += table.num_rows
        if self._rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            whole = pa.concat_tables(self._pending).combine_chunks()
            self._writer.write_table(whole, row_group_size=ROW_GROUP_ROWS)
        self._pending, self._rows = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


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
    one snapshot of the log. The rows stream from the log through a merge with the
    initial data into a Parquet writer: memory is bounded by CHUNK_ROWS pieces, the
    entity catalogs and the newest ``holdout_max_events`` rows (the candidates for the
    held-out slice, whose size is known only once every row has been counted).
    """
    items, users, forgotten = _read_catalogs(conn, initial)
    threshold = initial.positive_threshold
    known = pa.array(sorted(items.text), pa.string())
    folder.mkdir(parents=True, exist_ok=True)
    writer = _BufferedWriter(folder / "interactions.parquet")
    tail: collections.deque[pa.Table] = collections.deque()
    tail_rows = total = skipped_unknown = 0
    seen_users: set[str] = set()
    try:
        merged = _merged(
            _Source(_initial_pieces(initial.interactions, forgotten)),
            _Source(_log_interactions(conn, threshold)),
        )
        for piece in merged:
            ok = pc.is_in(piece.column("item_id"), value_set=known)
            kept = piece.filter(ok)
            skipped_unknown += piece.num_rows - kept.num_rows
            if not kept.num_rows:
                continue
            total += kept.num_rows
            seen_users.update(pc.unique(kept.column("user_id")).to_pylist())
            tail.append(kept)
            tail_rows += kept.num_rows
            # Keep at least holdout_max_events newest rows back; the rest is training data.
            while tail and tail_rows - tail[0].num_rows >= holdout_max_events:
                tail_rows -= tail[0].num_rows
                writer.write(tail.popleft())
        n_hold = 0
        if total >= 10:
            n_hold = min(holdout_max_events, max(1, int(total * holdout_fraction)))
        newest = pa.concat_tables([INTERACTIONS_SCHEMA.empty_table(), *tail]).combine_chunks()
        writer.write(newest.slice(0, newest.num_rows - n_hold))
        held = newest.slice(newest.num_rows - n_hold)
    finally:
        writer.close()
    # Users that only ever interacted still need a row in the users table.
    for user_id in seen_users:
        if user_id not in users:
            users.upsert(str(user_id), "", {})

    holdout = _holdout(
        folder / "interactions.parquet", held.to_pandas(), threshold, sorted(items.text)
    )
    item_cols = _write_entities(folder / "items.parquet", "item_id", "text", items)
    user_cols = _write_entities(folder / "users.parquet", "user_id", "interest_text", users)
    offsets = {
        int(p): int(o)
        for p, o in conn.execute(
            "SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,)
        )
    }
    (log_events,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
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
        log_events=int(log_events),
        training_rows=total - n_hold,
        held_out_rows=n_hold,
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
    train_path: Path, held: pd.DataFrame, threshold: float, candidates: list[str]
) -> HoldOut:
    positives = held[held["value"] >= threshold]
    if positives.empty:
        return HoldOut([], [], [], candidates)
    # The held-out users' training positives, read back from the written rows one row
    # group at a time (only theirs are kept).
    wanted = pa.array(sorted(set(positives["user_id"].tolist())), pa.string())
    parts = []
    for batch in pq.ParquetFile(train_path).iter_batches(
        batch_size=ROW_GROUP_ROWS, columns=["user_id", "item_id", "value"]
    ):
        mask = pc.and_(
            pc.is_in(batch.column("user_id"), value_set=wanted),
            pc.greater_equal(batch.column("value"), threshold),
        )
        parts.append(pa.Table.from_batches([batch]).filter(mask).select(["user_id", "item_id"]))
    train_pos = (
        pa.concat_tables(parts).to_pandas()
        if parts
        else pd.DataFrame({"user_id": pd.Series(dtype=object), "item_id": pd.Series(dtype=object)})
    )
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
