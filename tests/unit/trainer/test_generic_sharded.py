"""Sharded reads of a generic catalog: every worker parses only its range of the
interaction rows, and the Dataset the workers assemble from each other's compact rows
is the one ``load_generic`` reads whole (order, duplicates, unknown ids, skipped
counts, errors). The workers are simulated in-process: ``gather`` reads the other
ranks' ranges itself."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.trainer.data.errors import DataError
from services.trainer.data.generic import (
    Shard,
    ShardRows,
    load_generic,
    read_shard_rows,
    shard_range,
)
from services.trainer.data.model import Dataset
from services.trainer.data.synthetic import generate
from services.trainer.event_log import EventLog
from services.trainer.training_set import build_training_set, initial_from_dataset


def exported(tmp_path: Path) -> Path:
    initial = initial_from_dataset(generate(n_users=50, n_items=60, mean_interactions=8))
    log = EventLog(tmp_path / "log.sqlite")
    with log.reader() as conn:
        build_training_set(conn, initial, tmp_path / "data", topic="t",
                           holdout_fraction=0.0, holdout_max_events=0)  # fmt: skip
    return tmp_path / "data"


def messy(folder: Path, on_duplicate: str = "keep-last", on_unknown: str = "skip") -> Path:
    """The export's rows plus repeated pairs (some at the same second), unknown ids and
    time ties, in row groups of 37 rows so that shards cut through them."""
    path = folder / "interactions.parquet"
    frame = pd.read_parquet(path)
    rng = np.random.default_rng(3)
    extra = frame.sample(80, random_state=1).copy()
    extra["value"] = rng.integers(1, 6, size=len(extra)).astype(np.float64)
    # The first 20 repeat a pair at the same second (the later row wins), the rest move.
    extra.loc[extra.index[20:], "ts"] += rng.integers(-(10**6), 10**6, size=60)
    unknown = frame.head(5).copy()
    unknown["item_id"] = ["nope"] * 5
    ghost = frame.tail(3).copy()
    ghost["user_id"] = ["ghost"] * 3
    whole = pd.concat([frame, extra, unknown, ghost]).sample(frac=1.0, random_state=2)
    pq.write_table(pa.Table.from_pandas(whole, preserve_index=False), path, row_group_size=37)
    schema = json.loads((folder / "schema.json").read_text())
    schema["interactions"]["on_duplicate"] = on_duplicate
    schema["interactions"]["on_unknown"] = on_unknown
    (folder / "schema.json").write_text(json.dumps(schema))
    return folder


def sharded(folder: Path, rank: int, world: int) -> Dataset:
    schema = json.loads((folder / "schema.json").read_text())["interactions"]
    users = pd.read_parquet(folder / "users.parquet")["user_id"].tolist()
    items = pd.read_parquet(folder / "items.parquet")["item_id"].tolist()

    def gather(mine: ShardRows) -> list[ShardRows]:
        return [
            mine
            if r == rank
            else read_shard_rows(
                folder / "interactions.parquet",
                rank=r,
                world=world,
                user_col="user_id",
                item_col="item_id",
                value_col="value",
                time_col="ts",
                user_index={u: i for i, u in enumerate(users)},
                item_index={v: i for i, v in enumerate(items)},
                on_unknown=schema["on_unknown"],
                keep_lines=schema["on_duplicate"] == "error",
            )
            for r in range(world)
        ]

    return load_generic(folder, shard=Shard(rank, world, gather))


def assert_same(a: Dataset, b: Dataset) -> None:
    for name in ("user", "item", "value", "timestamp"):
        x, y = getattr(a.interactions, name), getattr(b.interactions, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert dict(a.skipped) == dict(b.skipped)
    assert list(a.skipped) == list(b.skipped)
    assert a.name == b.name and a.positive_threshold == b.positive_threshold
    assert a.items.ids.tolist() == b.items.ids.tolist()
    assert a.users.ids.tolist() == b.users.ids.tolist()


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_sharded_load_is_the_whole_load(tmp_path: Path, world: int) -> None:
    folder = messy(exported(tmp_path))
    whole = load_generic(folder)
    assert whole.skipped  # duplicates and unknown ids were there to handle
    for rank in range(world):
        assert_same(sharded(folder, rank, world), whole)


def test_a_worker_parses_only_its_range(tmp_path: Path) -> None:
    folder = messy(exported(tmp_path))
    n = pq.ParquetFile(folder / "interactions.parquet").metadata.num_rows
    lines = []
    for rank in range(3):
        rows = read_shard_rows(
            folder / "interactions.parquet", rank=rank, world=3, user_col="user_id",
            item_col="item_id", value_col="value", time_col="ts",
            user_index={}, item_index={}, on_unknown="skip",
        )  # fmt: skip
        lo, hi = shard_range(n, rank, 3)
        assert rows.unknown["user"] == hi - lo  # nothing known: every row of the range counted
        lines.append((lo, hi))
    assert lines[0][0] == 0 and lines[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(lines))


@pytest.mark.parametrize(
    ("on_duplicate", "on_unknown", "match"),
    [("error", "skip", "duplicate"), ("keep-last", "error", "unknown")],
)
def test_errors_are_the_whole_loads_on_every_worker(
    tmp_path: Path, on_duplicate: str, on_unknown: str, match: str
) -> None:
    folder = messy(exported(tmp_path), on_duplicate=on_duplicate, on_unknown=on_unknown)
    with pytest.raises(DataError, match=match) as whole:
        load_generic(folder)
    for rank in range(2):
        with pytest.raises(DataError, match=match) as part:
            sharded(folder, rank, 2)
        if match == "duplicate":
            assert str(part.value) == str(whole.value)


def test_untyped_files_fall_back_to_the_whole_read(tmp_path: Path) -> None:
    folder = exported(tmp_path)
    frame = pd.read_parquet(folder / "interactions.parquet").astype(str)
    frame.to_parquet(folder / "interactions.parquet", index=False)

    def never(mine: ShardRows) -> list[ShardRows]:
        raise AssertionError("a text-typed file is read whole")

    assert_same(load_generic(folder, shard=Shard(0, 2, never)), load_generic(folder))
