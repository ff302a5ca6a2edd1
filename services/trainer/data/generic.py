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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from services.trainer.data.build import (
    OnDuplicate,
    OnUnknown,
    interactions_from_table,
    unique_ids,
)
from services.trainer.data.errors import DataError
from services.trainer.data.model import Categorical, Dataset, Entities
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


def load_generic(folder: Path, name: str | None = None) -> Dataset:
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
    inter_t = read_table(folder / inter_s.required("file"))
    user_col, item_col = inter_s.required("user"), inter_s.required("item")
    if "users" in schema:
        users = _entities(folder, _Section(schema_path, "users", schema["users"]))
    else:
        inter_t.require(user_col)
        distinct = sorted(set(inter_t.non_empty(user_col)))
        users = Entities(ids=np.asarray(distinct, dtype=object))
    value_col = inter_s.string("value")
    threshold = schema.get("positive_threshold", 4.0 if value_col else 1.0)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        raise DataError(schema_path, "must be a number", column="positive_threshold")
    skipped: dict[str, int] = {}
    inter = interactions_from_table(
        inter_t,
        user_col=user_col,
        item_col=item_col,
        value_col=value_col,
        time_col=inter_s.string("timestamp"),
        user_index=users.index(),
        item_index=items.index(),
        on_unknown=cast(OnUnknown, inter_s.choice("on_unknown", "error", ("error", "skip"))),
        on_duplicate=cast(
            OnDuplicate, inter_s.choice("on_duplicate", "keep-last", ("error", "keep-last"))
        ),
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
