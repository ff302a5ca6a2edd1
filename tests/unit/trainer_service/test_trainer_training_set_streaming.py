"""The streaming export against the in-memory export it replaced.

``legacy_export`` is the previous implementation (the whole log and the initial
data in one DataFrame, sorted, split), kept here only as the oracle: on a seeded
log with time ties between the initial data and the log, ratings and implicit
events, unknown items, an erased and a re-registered user, the streaming export
must write the same rows in the same order, the same catalogs, and hold out the
same slice. Small piece and row-group sizes make the merge cross many pieces.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from coldstart.v1 import events_pb2

from services.common.events import encode_event, new_event
from services.trainer import training_set
from services.trainer.data.synthetic import generate
from services.trainer.event_log import EventLog, Incoming
from services.trainer.training_set import (
    Catalog,
    HoldOut,
    InitialData,
    _write_entities,
    build_training_set,
    initial_from_dataset,
)

TOPIC = "events"


def _legacy_holdout(
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
    cleaned = [
        [str(i) for i in t if i not in set(h)]
        for t, h in zip(targets.tolist(), histories, strict=True)
    ]
    keep = [k for k, t in enumerate(cleaned) if t]
    return HoldOut(
        [users[k] for k in keep], [histories[k] for k in keep], [cleaned[k] for k in keep],
        candidates,
    )  # fmt: skip


def legacy_export(
    conn: sqlite3.Connection,
    initial: InitialData,
    folder: Path,
    holdout_fraction: float,
    holdout_max_events: int,
) -> dict[str, Any]:
    """The previous build_training_set, reduced to what it wrote and returned."""
    items = Catalog(dict(initial.items.text), dict(initial.items.attributes))
    users = Catalog(dict(initial.users.text), dict(initial.users.attributes))
    forgotten = {str(u) for (u,) in conn.execute("SELECT user_id FROM forgotten")}
    users.drop(forgotten)
    for (payload,) in conn.execute(
        "SELECT payload FROM events WHERE kind = 'item_upserted' ORDER BY seq"
    ):
        item = events_pb2.Event.FromString(payload).item_upserted
        items.upsert(item.item_id, item.text, dict(item.attributes), {"tags": list(item.tags)})
    for (payload,) in conn.execute(
        "SELECT payload FROM events WHERE kind = 'user_registered' ORDER BY seq"
    ):
        user = events_pb2.Event.FromString(payload).user_registered
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
    base = initial.interactions
    base = base[~base["user_id"].isin(forgotten)]
    frame = pd.concat([base, log_frame], ignore_index=True)
    frame["order"] = np.arange(len(frame))
    known = frame["item_id"].isin(set(items.text))
    frame = frame[known].sort_values(["ts", "order"], kind="stable").reset_index(drop=True)
    for user_id in frame["user_id"].unique().tolist():
        if user_id not in users:
            users.upsert(str(user_id), "", {})
    n_hold = 0
    if len(frame) >= 10:
        n_hold = min(holdout_max_events, max(1, int(len(frame) * holdout_fraction)))
    train = frame.iloc[: len(frame) - n_hold]
    held = frame.iloc[len(frame) - n_hold :]
    folder.mkdir(parents=True)
    _write_entities(folder / "items.parquet", "item_id", "text", items)
    _write_entities(folder / "users.parquet", "user_id", "interest_text", users)
    return {
        "train": train[["user_id", "item_id", "value", "ts"]].reset_index(drop=True),
        "holdout": _legacy_holdout(train, held, threshold, sorted(items.text)),
        "skipped": int((~known).sum()),
        "held_rows": len(held),
    }


def seeded_log(path: Path, initial: InitialData, seed: int) -> EventLog:
    rng = np.random.default_rng(seed)
    base = initial.interactions
    base_items = sorted(set(base["item_id"]))
    base_users = sorted(set(base["user_id"]))
    base_ts = base["ts"].to_numpy()
    events: list[events_pb2.Event] = []
    for k in range(12):  # some new items, some replacing the initial data's
        item_id = f"new{k}" if k % 2 else base_items[k]
        events.append(
            new_event(
                "test",
                timestamp_ms=1,
                item_upserted=events_pb2.ItemUpserted(
                    item_id=item_id, text=f"text {k}", attributes={"category": f"c{k % 3}"}
                ),
            )
        )
    events.append(
        new_event(
            "test",
            timestamp_ms=2,
            user_registered=events_pb2.UserRegistered(
                user_id="fresh", attributes={"region": "east"}, interest_text="things"
            ),
        )
    )
    items = [*base_items[:40], *(f"new{k}" for k in range(1, 12, 2)), "ghost-item"]
    users = [*base_users[:30], "fresh", "only-acts"]
    for _ in range(600):
        # Half the events share a second with an initial row: the tie rule matters.
        if rng.random() < 0.5:
            ts_ms = int(rng.choice(base_ts)) * 1000 + int(rng.integers(0, 1000))
        else:
            ts_ms = int(rng.integers(base_ts.min(), base_ts.max() + 10**6)) * 1000
        kind = "rating" if rng.random() < 0.5 else str(rng.choice(["view", "like", "click"]))
        events.append(
            new_event(
                "test",
                timestamp_ms=ts_ms,
                interaction=events_pb2.Interaction(
                    user_id=str(rng.choice(users)),
                    item_id=str(rng.choice(items)),
                    kind=kind,
                    value=float(rng.integers(1, 6)),
                ),
            )
        )
    log = EventLog(path)
    log.apply(TOPIC, [Incoming(0, i, e, encode_event(e)) for i, e in enumerate(events)],
              {0: len(events)})  # fmt: skip
    erase = new_event(
        "test",
        timestamp_ms=4_000_000_000_000,
        user_forgotten=events_pb2.UserForgotten(user_id=base_users[0]),
    )
    back = new_event(
        "test",
        timestamp_ms=4_000_000_000_001,
        user_registered=events_pb2.UserRegistered(user_id=base_users[1]),
    )
    again = new_event(
        "test",
        timestamp_ms=4_000_000_000_002,
        interaction=events_pb2.Interaction(user_id=base_users[0], item_id=items[0], kind="view"),
    )
    later = [erase, back, again]
    log.apply(TOPIC, [Incoming(0, len(events) + i, e, encode_event(e)) for i, e in
                      enumerate(later)], {0: len(events) + 3})  # fmt: skip
    return log


@pytest.mark.parametrize(
    ("seed", "fraction", "max_events"), [(0, 0.1, 50), (1, 0.5, 10_000), (2, 0.01, 3)]
)
def test_streaming_export_matches_the_in_memory_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, fraction: float, max_events: int
) -> None:
    monkeypatch.setattr(training_set, "CHUNK_ROWS", 7)
    monkeypatch.setattr(training_set, "ROW_GROUP_ROWS", 5)
    initial = initial_from_dataset(generate(n_users=60, n_items=80, mean_interactions=6))
    log = seeded_log(tmp_path / "log.sqlite", initial, seed)
    with log.reader() as conn:
        old = legacy_export(conn, initial, tmp_path / "old", fraction, max_events)
        new = build_training_set(
            conn, initial, tmp_path / "new", topic=TOPIC,
            holdout_fraction=fraction, holdout_max_events=max_events,
        )  # fmt: skip
    written = pd.read_parquet(tmp_path / "new" / "interactions.parquet")
    written = written.astype({"user_id": object, "item_id": object})
    pd.testing.assert_frame_equal(written, old["train"].astype({"user_id": object,
                                                              "item_id": object}))  # fmt: skip
    assert len(written) > 100
    assert new.training_rows == len(old["train"])
    assert new.held_out_rows == old["held_rows"] > 0
    assert new.skipped_unknown_items == old["skipped"] > 0
    assert new.holdout == old["holdout"]
    assert new.holdout.users or max_events < 10  # 3 newest rows may hold no new positive
    for name in ("items.parquet", "users.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "new" / name), pd.read_parquet(tmp_path / "old" / name)
        )
    assert json.loads((tmp_path / "new" / "schema.json").read_text())["interactions"]["file"]
    # Row groups of at most ROW_GROUP_ROWS: what a sharded reader reads at a time.
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(tmp_path / "new" / "interactions.parquet").metadata
    assert meta.num_row_groups > 1
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 5
