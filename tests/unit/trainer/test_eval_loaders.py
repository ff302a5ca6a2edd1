"""Loaders on small files written here, including the bad-input cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.trainer.data.errors import DataError
from services.trainer.data.generic import load_generic
from services.trainer.data.movielens import load_ml100k, load_ml_latest
from services.trainer.data.registry import load_dataset

GENRE_FLAGS_DRAMA = "|".join("1" if g == 8 else "0" for g in range(19))
GENRE_FLAGS_COMEDY_ACTION = "|".join("1" if g in (1, 5) else "0" for g in range(19))


def write_ml100k(folder: Path, data_lines: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = [
        f"1|Misérables, Les (1995)|01-Jan-1995||http://x|{GENRE_FLAGS_DRAMA}",
        f"2|Heat (1995)|01-Jan-1995||http://y|{GENRE_FLAGS_COMEDY_ACTION}",
        f"3|unknown|||http://z|{'|'.join(['1'] + ['0'] * 18)}",
    ]
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    (folder / "u.user").write_text("1|24|M|student|12345\n2|61|F|writer|T8H1N\n")
    lines = data_lines or ["1\t1\t5\t100", "1\t2\t3\t200", "2\t2\t4\t150", "2\t3\t1\t50"]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    return folder


def test_ml100k(tmp_path: Path) -> None:
    d = load_ml100k(write_ml100k(tmp_path / "ml"))
    assert (d.n_users, d.n_items, len(d.interactions)) == (2, 3, 4)
    assert d.items.text[0] == "Misérables, Les (1995) | Drama"
    assert d.items.text[1] == "Heat (1995) | Action, Comedy"
    assert d.items.text[2] == "unknown"  # "unknown" genre flag is not a genre
    assert d.users.categorical["age_band"].vocab == ("18-24", "56+")
    assert list(d.items.categorical["decade"].codes()) == [0, 0, -1]
    # Interactions come out in time order.
    assert list(d.interactions.timestamp) == [50, 100, 150, 200]
    assert int(d.positive_mask().sum()) == 2
    assert load_dataset(str(tmp_path / "ml")).name == "ml-100k"


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (["1\t1\t5\t100", "1\t2\tfive\t200"], r"u\.data:2: column 'rating': not a finite number"),
        (["1\t1\t5\t100", "1\t9\t4\t200"], r"u\.data:2: column 'item_id': unknown item id '9'"),
        (["1\t1\t5\t100", "7\t2\t4\t200"], r"u\.data:2: column 'user_id': unknown user id '7'"),
        (["1\t1\t5\t100", "1\t2\t4"], r"u\.data:2: column 'timestamp': expected 4 fields"),
        (["1\t1\t5\tyesterday"], r"u\.data:1: column 'timestamp': not a timestamp"),
    ],
)
def test_ml100k_bad_input_names_file_line_column(
    tmp_path: Path, lines: list[str], pattern: str
) -> None:
    with pytest.raises(DataError, match=pattern):
        load_ml100k(write_ml100k(tmp_path / "ml", lines))


def test_ml100k_empty_file(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "ml")
    (folder / "u.data").write_text("")
    with pytest.raises(DataError, match=r"u\.data:1: file is empty"):
        load_ml100k(folder)


def test_ml100k_duplicate_pair_keeps_latest_and_counts(tmp_path: Path) -> None:
    lines = ["1\t1\t2\t100", "1\t1\t5\t300", "2\t2\t4\t150"]
    d = load_ml100k(write_ml100k(tmp_path / "ml", lines))
    assert len(d.interactions) == 2
    assert d.interactions.value[d.interactions.item == 0].tolist() == [5.0]
    assert d.skipped == {"duplicate (user, item) rows, earlier ones dropped": 1}


def write_ml_latest(folder: Path, ratings: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "movies.csv").write_bytes(
        b'movieId,title,genres\r\n1,"American President, The (1995)",Comedy|Drama|Romance\r\n'
        b"2,Caf\xc3\xa9 (2010),(no genres listed)\r\n"
    )
    (folder / "ratings.csv").write_text(
        ratings or "userId,movieId,rating,timestamp\r\n1,1,4.5,10\r\n1,2,3.5,20\r\n2,1,0.5,30\r\n"
    )
    (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\r\n1,1,politics,10\r\n")
    return folder


def test_ml_latest(tmp_path: Path) -> None:
    d = load_ml_latest(write_ml_latest(tmp_path / "mls"))
    assert d.items.text == [
        "American President, The (1995) | Comedy, Drama, Romance",
        "Café (2010)",
    ]
    assert d.items.text_fields["tags"] == ["politics", ""]
    assert d.items.categorical["decade"].vocab == ("1990s", "2010s")
    assert (d.n_users, len(d.interactions)) == (2, 3)
    assert d.interactions.value.tolist() == [4.5, 3.5, 0.5]


def test_ml_latest_bad_rating_and_missing_column(tmp_path: Path) -> None:
    bad = "userId,movieId,rating,timestamp\r\n1,1,4.5,10\r\n1,2,,20\r\n"
    with pytest.raises(DataError, match=r"ratings\.csv:3: column 'rating': empty value"):
        load_ml_latest(write_ml_latest(tmp_path / "a", bad))
    missing = "userId,movieId,timestamp\r\n1,1,10\r\n"
    with pytest.raises(DataError, match=r"ratings\.csv:1: column 'rating': missing column"):
        load_ml_latest(write_ml_latest(tmp_path / "b", missing))


SCHEMA = """
positive_threshold = 1.0
[interactions]
file = "interactions.csv"
user = "user"
item = "item"
timestamp = "ts"
{extra}
[items]
file = "items.csv"
id = "id"
text = ["title", "description"]
categorical = ["category", "tags"]
multi_value = {{ tags = ";" }}
[users]
file = "users.csv"
id = "id"
categorical = ["region"]
"""


def write_generic(folder: Path, interactions: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "schema.toml").write_text(SCHEMA.format(extra=extra))
    (folder / "items.csv").write_text(
        "id,title,description,category,tags\n"
        "a,Red shoes,Running shoes,shoes,sport;red\n"
        "b,Blue hat,,hats,\n"
    )
    (folder / "users.csv").write_text("id,region\nu1,north\nu2,\n")
    (folder / "interactions.csv").write_text(interactions)
    return folder


def test_generic_csv(tmp_path: Path) -> None:
    d = load_generic(write_generic(tmp_path / "g", "user,item,ts\nu1,a,2020-01-02\nu2,b,5\n"))
    assert d.items.text == ["Red shoes | Running shoes", "Blue hat"]
    assert d.items.categorical["tags"].vocab == ("red", "sport")
    assert d.items.categorical["tags"].matrix.toarray().tolist() == [[1, 1], [0, 0]]
    assert d.users.categorical["region"].codes().tolist() == [0, -1]
    assert d.positive_mask().all()  # no value column: every row is a positive
    assert d.interactions.timestamp.tolist() == [5, 1577923200]


def test_generic_parquet_and_json_schema(tmp_path: Path) -> None:
    folder = write_generic(tmp_path / "g", "user,item,ts\nu1,a,1\n")
    pd.DataFrame({"user": ["u1", "u2"], "item": ["a", "a"], "ts": [1, 2]}).to_parquet(
        folder / "inter.parquet"
    )
    (folder / "schema.toml").unlink()
    schema = {
        "interactions": {
            "file": "inter.parquet",
            "user": "user",
            "item": "item",
            "timestamp": "ts",
        },
        "items": {"file": "items.csv", "id": "id", "text": ["title"]},
    }
    (folder / "schema.json").write_text(json.dumps(schema))
    d = load_generic(folder)
    assert len(d.interactions) == 2
    assert d.users.ids.tolist() == ["u1", "u2"]  # users taken from the interactions


@pytest.mark.parametrize(
    ("rows", "extra", "pattern"),
    [
        ("user,item\nu1,a\n", "", r"interactions\.csv:1: column 'ts': missing column"),
        ("user,item,ts\nu1,zzz,1\n", "", r"interactions\.csv:2: column 'item': unknown item id"),
        ("user,item,ts\n", "", r"interactions\.csv:2: no data rows"),
        ("", "", r"interactions\.csv:1: file is empty"),
        (
            "user,item,ts\nu1,a,1\nu2,a,2\nu1,a,3\n",
            'on_duplicate = "error"',
            r"interactions\.csv:2: column 'item': duplicate \(user, item\) pair",
        ),
        ("user,item,ts\nu1,a,1\n", 'on_unknown = "maybe"', r"interactions\.on_unknown"),
    ],
)
def test_generic_bad_input(tmp_path: Path, rows: str, extra: str, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        load_generic(write_generic(tmp_path / "g", rows, extra))


def test_generic_documented_skips_are_counted(tmp_path: Path) -> None:
    rows = "user,item,ts\nu1,a,1\nu1,zzz,2\nu9,b,3\nu2,b,4\n"
    d = load_generic(write_generic(tmp_path / "g", rows, 'on_unknown = "skip"'))
    assert len(d.interactions) == 2
    assert d.skipped == {
        "interactions with unknown user ids": 1,
        "interactions with unknown item ids": 1,
    }


def test_generic_value_column_must_be_numeric(tmp_path: Path) -> None:
    folder = write_generic(tmp_path / "g", "user,item,ts,r\nu1,a,1,4\nu2,b,2,good\n", 'value = "r"')
    with pytest.raises(DataError, match=r"interactions\.csv:3: column 'r': not a finite number"):
        load_generic(folder)


def test_duplicate_item_ids_are_an_error(tmp_path: Path) -> None:
    folder = write_generic(tmp_path / "g", "user,item,ts\nu1,a,1\n")
    (folder / "items.csv").write_text("id,title,description,category,tags\na,x,,c,\na,y,,c,\n")
    with pytest.raises(DataError, match=r"items\.csv:3: column 'id': duplicate id 'a'"):
        load_generic(folder)


def test_unknown_folder_and_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data folder"):
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "nope"))


def test_synthetic_is_seeded() -> None:
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert np.array_equal(a.interactions.item, b.interactions.item)
    assert a.items.text == b.items.text


@pytest.mark.data
def test_real_movielens_counts(shared_data: Path) -> None:
    d = load_ml100k(shared_data / "ml-100k")
    assert (d.n_users, d.n_items, len(d.interactions)) == (943, 1682, 100_000)
    assert int(d.positive_mask().sum()) == 34_174 + 21_201
    assert "Misérables, Les (1995) | Drama, Musical" in d.items.text
    assert d.skipped == {}
    if (shared_data / "ml-latest-small").is_dir():
        s = load_ml_latest(shared_data / "ml-latest-small")
        assert (s.n_users, s.n_items, len(s.interactions)) == (610, 9742, 100_836)
        assert s.items.text[0].startswith("Toy Story (1995) | Adventure, Animation")
