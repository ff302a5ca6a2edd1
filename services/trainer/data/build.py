"""Turning parsed tables into the dataset model: id indexing, duplicates, unknown ids."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from services.trainer.data.errors import DataError
from services.trainer.data.model import Interactions
from services.trainer.data.tables import Table

OnUnknown = Literal["error", "skip"]
OnDuplicate = Literal["error", "keep-last"]


def unique_ids(table: Table, column: str) -> list[str]:
    """The id column as text; a repeated id is an error (two rows would claim one entity)."""
    ids = table.non_empty(column)
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            raise DataError(
                table.path,
                f"duplicate id {v!r} (first on line {int(table.lines[seen[v]])})",
                line=int(table.lines[i]),
                column=column,
            )
        seen[v] = i
    return ids


def index_column(
    table: Table,
    column: str,
    *,
    index: dict[str, int],
    what: str,
    on_unknown: OnUnknown,
    skipped: dict[str, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Map external ids to rows; returns (rows, keep mask)."""
    values = table.non_empty(column)
    rows = np.fromiter((index.get(v, -1) for v in values), dtype=np.int64, count=len(values))
    unknown = rows < 0
    if unknown.any():
        i = int(np.argmax(unknown))
        if on_unknown == "error":
            raise DataError(
                table.path,
                f"unknown {what} id {values[i]!r} ({int(unknown.sum())} rows name unknown {what}s)",
                line=int(table.lines[i]),
                column=column,
            )
        skipped[f"interactions with unknown {what} ids"] = int(unknown.sum())
    return rows, ~unknown


def interactions_from_table(
    table: Table,
    *,
    user_col: str,
    item_col: str,
    value_col: str | None,
    time_col: str | None,
    user_index: dict[str, int],
    item_index: dict[str, int],
    on_unknown: OnUnknown = "error",
    on_duplicate: OnDuplicate = "keep-last",
    skipped: dict[str, int] | None = None,
) -> Interactions:
    """Interactions sorted by (timestamp, line); duplicates handled per ``on_duplicate``.

    A repeated (user, item) pair would count one item twice as a target (or as
    a target and a training positive at once), so it is either an error or
    collapsed to the latest event, with the count reported.
    """
    skipped = {} if skipped is None else skipped
    cols = [c for c in (user_col, item_col, value_col, time_col) if c is not None]
    table.require(*cols)
    users, keep_u = index_column(
        table, user_col, index=user_index, what="user", on_unknown=on_unknown, skipped=skipped
    )
    items, keep_i = index_column(
        table, item_col, index=item_index, what="item", on_unknown=on_unknown, skipped=skipped
    )
    n = len(table)
    value = table.numbers(value_col) if value_col else np.ones(n)
    # Without a time column the file order is the time order.
    stamp = table.timestamps(time_col) if time_col else np.arange(n, dtype=np.int64)
    keep = keep_u & keep_i
    frame = pd.DataFrame(
        {
            "user": users[keep],
            "item": items[keep],
            "value": value[keep],
            "ts": stamp[keep],
            "line": table.lines[keep],
        }
    ).sort_values(["ts", "line"], kind="stable")
    dup = frame.duplicated(["user", "item"], keep="last").to_numpy()
    if dup.any():
        if on_duplicate == "error":
            first = frame.loc[dup].sort_values("line").iloc[0]
            raise DataError(
                table.path,
                f"duplicate (user, item) pair ({int(dup.sum())} repeated rows)",
                line=int(first["line"]),
                column=item_col,
            )
        skipped["duplicate (user, item) rows, earlier ones dropped"] = int(dup.sum())
        frame = frame.loc[~dup]
    return Interactions(
        user=frame["user"].to_numpy(np.int64),
        item=frame["item"].to_numpy(np.int64),
        value=frame["value"].to_numpy(np.float32),
        timestamp=frame["ts"].to_numpy(np.int64),
    )
