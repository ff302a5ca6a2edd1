"""The generic catalog format: a folder of CSV or Parquet files plus a schema.

Layout (see docs/EVALUATION.md for the full description)::

    my-catalog/
      schema.toml          (or schema.json, same keys)
      interactions.csv     user, item, optional value and timestamp
      items.csv            id, text columns, categorical columns
      users.csv            optional: id, categorical columns, optional text

``schema.toml``::

    positive_threshold = 4.0        # default 4.0 with a value column, else 1.0

    [interactions]
    file = "interactions.csv"
    user = "user_id"
    item = "item_id"
    value = "rating"                # optional: without it every row is a positive
    timestamp = "ts"                # optional: without it file order is time order
    on_unknown = "error"            # or "skip": drop rows naming unknown ids (count reported)
    on_duplicate = "keep-last"      # or "error": repeated (user, item) pairs

    [items]
    file = "items.csv"
    id = "item_id"
    text = ["title", "description"] # joined with " | " into the encoder text
    categorical = ["category", "tags"]
    multi_value = { tags = "|" }    # separator of multi-valued categorical columns

    [users]                         # optional section; without it users come from interactions
    file = "users.csv"
    id = "user_id"
    categorical = ["age_band", "region"]
    text = ["interests"]
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.trainer.data.build import (
    OnDuplicate,
    OnUnknown,
    interactions_from_table,
    unique_ids,
)
from services.trainer.data.errors import DataError
from services.trainer.data.model import Categorical, Dataset, Entities, Interactions
from services.trainer.data.tables import Table, read_table

SCHEMA_NAMES = ("schema.toml", "schema.json")


def find_schema(folder: Path) -> Path | None:
    for name in SCHEMA_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def read_schema(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".toml":
            with path.open("rb") as fh:
                return tomllib.load(fh)
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(path, f"not valid TOML: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON: {exc.msg}", line=exc.lineno) from exc
    if not isinstance(loaded, dict):
        raise DataError(path, "the schema must be an object")
    return loaded


class _Section:
    """One schema table with typed, blame-carrying accessors."""

    def __init__(self, path: Path, name: str, body: Any) -> None:
        if not isinstance(body, dict):
            raise DataError(path, f"[{name}] must be a table", column=name)
        self.path, self.name, self.body = path, name, body

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.body.get(key, default)
        if value is not None and not isinstance(value, str):
            raise DataError(self.path, "must be a string", column=f"{self.name}.{key}")
        return value

    def required(self, key: str) -> str:
        value = self.string(key)
        if not value:
            raise DataError(self.path, "is required", column=f"{self.name}.{key}")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.body.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(self.path, "must be a list of strings", column=f"{self.name}.{key}")
        return list(value)

    def mapping(self, key: str) -> Mapping[str, str]:
        value = self.body.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise DataError(self.path, "must map column to separator", column=f"{self.name}.{key}")
        return cast(Mapping[str, str], value)

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(key, default) or default
        if value not in allowed:
            raise DataError(
                self.path, f"must be one of {', '.join(allowed)}", column=f"{self.name}.{key}"
            )
        return value


def _entities(folder: Path, section: _Section) -> Entities:
    table = read_table(folder / section.required("file"))
    ids = unique_ids(table, section.required("id"))
    text_cols = section.strings("text")
    cat_cols = section.strings("categorical")
    separators = section.mapping("multi_value")
    table.require(*text_cols, *cat_cols)
    categorical = {c: _categorical(table, c, separators.get(c)) for c in cat_cols}
    fields = {c: [v.strip() for v in table.text(c)] for c in text_cols}
    text = [" | ".join(v for v in row if v) for row in zip(*fields.values(), strict=True)]
    return Entities(
        ids=np.asarray(ids, dtype=object),
        categorical=categorical,
        text_fields=fields,
        text=text if text_cols else [""] * len(ids),
    )


def _categorical(table: Table, column: str, separator: str | None) -> Categorical:
    raw = [v.strip() for v in table.text(column)]
    if separator:
        parts = [[p.strip() for p in v.split(separator) if p.strip()] for v in raw]
        return Categorical.from_values(column, parts)
    return Categorical.from_values(column, [v or None for v in raw])


@dataclass(frozen=True)
class ShardRows:
    """One worker's share of the interaction rows (a contiguous range of the file's
    rows), sorted by (timestamp, row), as row indices into the users and items tables:
    what the workers exchange, 20 bytes a row instead of the strings."""

    user: np.ndarray  # int32
    item: np.ndarray  # int32
    value: np.ndarray  # float32 (what Interactions keeps)
    ts: np.ndarray  # int64
    # 1-based rows of the file; only with on_duplicate "error" (to name the first repeat).
    line: np.ndarray
    unknown: dict[str, int] = field(default_factory=dict)  # what -> rows skipped
    # (problem, line, column) of the first bad row: raised on every worker alike.
    error: tuple[str, int | None, str | None] | None = None


SHARD_FIELDS = ("user", "item", "value", "ts", "line")


@dataclass(frozen=True)
class Shard:
    """Which rows a worker reads (``rank`` of ``world`` contiguous ranges) and how the
    workers see each other's rows: ``gather`` returns every worker's ShardRows in rank
    order (an all-gather; ``services.trainer.model.distributed.gather_shard_rows``)."""

    rank: int
    world: int
    gather: Callable[[ShardRows], list[ShardRows]]


def shard_range(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    return n_rows * rank // world, n_rows * (rank + 1) // world


def _typed_parquet(path: Path, columns: list[str]) -> bool:
    """A Parquet file with string id columns and numeric value/time columns (what the
    retraining export writes): rows can be read as typed values, a range at a time."""
    if path.suffix.lower() not in (".parquet", ".pq") or not path.is_file():
        return False
    try:
        schema = pq.read_schema(path)
    except Exception:  # pyarrow raises several unrelated types for a bad file
        return False
    if any(c not in schema.names for c in columns):
        return False
    ids, numbers = columns[:2], columns[2:]
    text = (pa.types.is_string, pa.types.is_large_string)
    return all(any(t(schema.field(c).type) for t in text) for c in ids) and all(
        pa.types.is_integer(schema.field(c).type) or pa.types.is_floating(schema.field(c).type)
        for c in numbers
    )


def read_shard_rows(
    path: Path,
    *,
    rank: int,
    world: int,
    user_col: str,
    item_col: str,
    value_col: str | None,
    time_col: str | None,
    user_index: dict[str, int],
    item_index: dict[str, int],
    on_unknown: OnUnknown,
    keep_lines: bool = False,
) -> ShardRows:
    """Rows ``shard_range(rank, world)`` of a typed Parquet interactions file, one row
    group at a time, with the checks and values ``interactions_from_table`` applies
    (ids stripped, unknown ids skipped or an error, values finite, timestamps integral)."""
    file = pq.ParquetFile(path)
    n_rows = file.metadata.num_rows
    lo, hi = shard_range(n_rows, rank, world)
    columns = [c for c in (user_col, item_col, value_col, time_col) if c is not None]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SHARD_FIELDS}
    unknown = {"user": 0, "item": 0}
    first_unknown: dict[str, tuple[int, str]] = {}
    start = 0
    for group in range(file.metadata.num_row_groups):
        size = file.metadata.row_group(group).num_rows
        g_lo, g_hi = max(lo, start), min(hi, start + size)
        if g_lo < g_hi:
            table = file.read_row_group(group, columns=columns).slice(g_lo - start, g_hi - g_lo)
            lines = np.arange(g_lo + 1, g_hi + 1, dtype=np.int64)
            codes: dict[str, np.ndarray] = {}
            for what, col, index in (
                ("user", user_col, user_index),
                ("item", item_col, item_index),
            ):
                values = table.column(col).to_pylist()
                rows = np.empty(len(values), dtype=np.int64)
                for i, raw in enumerate(values):
                    v = "" if raw is None else raw.strip()
                    if not v:
                        return _failed("empty value", int(lines[i]), col)
                    rows[i] = index.get(v, -1)
                del values
                bad = rows < 0
                if bad.any():
                    unknown[what] += int(bad.sum())
                    i = int(np.argmax(bad))
                    name = table.column(col)[i].as_py()
                    first_unknown.setdefault(what, (int(lines[i]), str(name).strip()))
                codes[what] = rows
            n = table.num_rows
            value = np.ones(n)
            if value_col is not None:
                value = table.column(value_col).to_numpy().astype(np.float64)
                if not np.isfinite(value).all():
                    i = int(np.argmax(~np.isfinite(value)))
                    return _failed(f"not a finite number: {str(value[i])!r}", int(lines[i]),
                                   value_col)  # fmt: skip
            # Without a time column the file order is the time order.
            stamp = lines - 1
            if time_col is not None:
                # As Table.timestamps: through float64 (integral seconds are exact).
                seconds = table.column(time_col).to_numpy().astype(np.float64)
                if not np.isfinite(seconds).all():
                    i = int(np.argmax(~np.isfinite(seconds)))
                    problem = f"not a timestamp (Unix seconds or ISO date): {str(seconds[i])!r}"
                    return _failed(problem, int(lines[i]), time_col)
                stamp = seconds.astype(np.int64)
            keep = (codes["user"] >= 0) & (codes["item"] >= 0)
            parts["user"].append(codes["user"][keep].astype(np.int32))
            parts["item"].append(codes["item"][keep].astype(np.int32))
            parts["value"].append(value[keep].astype(np.float32))
            parts["ts"].append(stamp[keep])
            parts["line"].append(lines[keep])
        start += size
    if on_unknown == "error":
        for what in ("user", "item"):
            if what in first_unknown:
                line, name = first_unknown[what]
                problem = f"unknown {what} id {name!r} ({unknown[what]} rows name unknown {what}s)"
                col = user_col if what == "user" else item_col
                return _failed(problem, line, col)
    dtypes = dict(zip(SHARD_FIELDS, (np.int32, np.int32, np.float32, np.int64, np.int64),
                      strict=True))  # fmt: skip
    a = {k: np.concatenate(v) if v else np.zeros(0, dtype=dtypes[k]) for k, v in parts.items()}
    # Rows are in file order, so a stable sort by time is the (time, row) order.
    order = np.argsort(a["ts"], kind="stable")
    return ShardRows(
        a["user"][order], a["item"][order], a["value"][order], a["ts"][order],
        a["line"][order] if keep_lines else np.zeros(0, dtype=np.int64),
        unknown={k: v for k, v in unknown.items() if v},
    )  # fmt: skip


def _failed(problem: str, line: int | None, column: str | None) -> ShardRows:
    none = np.zeros(0, dtype=np.int64)
    return ShardRows(none.astype(np.int32), none.astype(np.int32), none.astype(np.float32),
                     none, none, error=(problem, line, column))  # fmt: skip


def combine_shard_rows(
    parts: list[ShardRows],
    *,
    path: Path,
    item_col: str,
    n_items: int,
    on_duplicate: OnDuplicate,
    skipped: dict[str, int],
) -> Interactions:
    """Every worker's rows (rank order; ``parts`` is emptied as they are used) -> the
    Interactions ``interactions_from_table`` gives for the whole file: sorted by
    (timestamp, row), repeated (user, item) pairs collapsed to the latest or an error,
    the skipped counts in ``skipped``."""
    for part in parts:
        if part.error is not None:
            problem, where, column = part.error
            raise DataError(path, problem, line=where, column=column)
    for what in ("user", "item"):
        total = sum(p.unknown.get(what, 0) for p in parts)
        if total:
            skipped[f"interactions with unknown {what} ids"] = total
    # Each part is in (time, row) order and the parts are consecutive row ranges: a
    # stable sort by time of their concatenation is the whole file's (time, row) order.
    ts = np.concatenate([p.ts for p in parts])
    order = np.argsort(ts, kind="stable")
    ts = ts[order]
    columns = {}
    for name in ("user", "item", "value", "line"):
        columns[name] = np.concatenate([getattr(p, name) for p in parts])
        if len(columns[name]):
            columns[name] = columns[name][order]
    parts.clear()  # the received arrays go; the sorted copies stay
    user = columns["user"].astype(np.int64)
    item = columns["item"].astype(np.int64)
    key = user * max(1, n_items) + item
    # The last occurrence of each pair in time order is the one kept.
    _, from_end = np.unique(key[::-1], return_index=True)
    del key
    keep = np.zeros(len(ts), dtype=bool)
    keep[len(ts) - 1 - from_end] = True
    if not keep.all():
        n_dup = int((~keep).sum())
        if on_duplicate == "error":
            raise DataError(
                path,
                f"duplicate (user, item) pair ({n_dup} repeated rows)",
                line=int(columns["line"][~keep].min()),
                column=item_col,
            )
        skipped["duplicate (user, item) rows, earlier ones dropped"] = n_dup
    return Interactions(
        user=user[keep], item=item[keep], value=columns["value"][keep], timestamp=ts[keep]
    )


def load_generic(folder: Path, name: str | None = None, shard: Shard | None = None) -> Dataset:
    """The catalog in ``folder``. With ``shard`` (a distributed run), a worker parses only
    its range of the interaction rows when the file allows it (a typed Parquet file, a
    [users] section) and the workers exchange them as compact row indices; the Dataset
    is the same as without ``shard``, on every worker."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    schema_path = find_schema(folder)
    if schema_path is None:
        raise DataError(folder, f"no {' or '.join(SCHEMA_NAMES)} in the folder")
    schema = read_schema(schema_path)
    for required in ("interactions", "items"):
        if required not in schema:
            raise DataError(schema_path, "section is required", column=required)
    inter_s = _Section(schema_path, "interactions", schema["interactions"])
    items = _entities(folder, _Section(schema_path, "items", schema["items"]))
    inter_path = folder / inter_s.required("file")
    user_col, item_col = inter_s.required("user"), inter_s.required("item")
    value_col = inter_s.string("value")
    time_col = inter_s.string("timestamp")
    named = [c for c in (user_col, item_col, value_col, time_col) if c is not None]
    if shard is not None and not ("users" in schema and _typed_parquet(inter_path, named)):
        shard = None
    inter_t = read_table(inter_path) if shard is None else None
    if "users" in schema:
        users = _entities(folder, _Section(schema_path, "users", schema["users"]))
    else:
        assert inter_t is not None
        inter_t.require(user_col)
        distinct = sorted(set(inter_t.non_empty(user_col)))
        users = Entities(ids=np.asarray(distinct, dtype=object))
    threshold = schema.get("positive_threshold", 4.0 if value_col else 1.0)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        raise DataError(schema_path, "must be a number", column="positive_threshold")
    skipped: dict[str, int] = {}
    on_unknown = cast(OnUnknown, inter_s.choice("on_unknown", "error", ("error", "skip")))
    on_duplicate = cast(
        OnDuplicate, inter_s.choice("on_duplicate", "keep-last", ("error", "keep-last"))
    )
    if shard is None:
        assert inter_t is not None
        inter = interactions_from_table(
            inter_t,
            user_col=user_col,
            item_col=item_col,
            value_col=value_col,
            time_col=time_col,
            user_index=users.index(),
            item_index=items.index(),
            on_unknown=on_unknown,
            on_duplicate=on_duplicate,
            skipped=skipped,
        )
    else:
        if pq.ParquetFile(inter_path).metadata.num_rows == 0:
            raise DataError(inter_path, "no data rows", line=1)
        mine = read_shard_rows(
            inter_path,
            rank=shard.rank,
            world=shard.world,
            user_col=user_col,
            item_col=item_col,
            value_col=value_col,
            time_col=time_col,
            user_index=users.index(),
            item_index=items.index(),
            on_unknown=on_unknown,
            keep_lines=on_duplicate == "error",
        )
        inter = combine_shard_rows(
            shard.gather(mine),
            path=inter_path,
            item_col=item_col,
            n_items=len(items),
            on_duplicate=on_duplicate,
            skipped=skipped,
        )
    return Dataset(
        name or folder.name,
        items,
        users,
        inter,
        positive_threshold=float(threshold),
        skipped=skipped,
    )
