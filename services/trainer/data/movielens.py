"""MovieLens loaders: the 100K release (u.data, u.item, u.user) and the "latest"
CSV release (ratings.csv, movies.csv, tags.csv).

Item text follows the baseline reference: "title (year) | genre, genre" (the
MovieLens title already carries the year). Item attributes: genre (multi) and
release decade; ML-100K users: gender, age band, occupation.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from services.trainer.data.build import interactions_from_table, unique_ids
from services.trainer.data.errors import DataError
from services.trainer.data.model import Categorical, Dataset, Entities
from services.trainer.data.tables import read_table

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_YEAR = re.compile(r"\((\d{4})\)\s*$")
# The MovieLens-1M age bands; the reference segments popularity by gender x these.
AGE_BANDS = ((0, "under 18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"),
             (50, "50-55"), (56, "56+"))  # fmt: skip


def age_band(age: int) -> str:
    band = AGE_BANDS[0][1]
    for start, name in AGE_BANDS:
        if age >= start:
            band = name
    return band


def decade(year: int | None) -> str | None:
    return None if year is None else f"{year // 10 * 10}s"


def title_year(title: str) -> int | None:
    found = _YEAR.search(title)
    return int(found.group(1)) if found else None


def item_text(title: str, genres: list[str]) -> str:
    return f"{title} | {', '.join(genres)}" if genres else title


def load_ml100k(folder: Path) -> Dataset:
    folder = Path(folder)
    item_names = ["movie_id", "title", "release_date", "video_release_date", "imdb_url"]
    item_names += [f"genre:{g}" for g in ML100K_GENRES]
    items_t = read_table(folder / "u.item", sep="|", names=item_names, encoding="latin-1")
    item_ids = unique_ids(items_t, "movie_id")
    titles = items_t.text("title")
    flags = np.stack([items_t.numbers(f"genre:{g}", integer=True) for g in ML100K_GENRES], axis=1)
    genres = [[g for g, f in zip(ML100K_GENRES, row, strict=True) if f] for row in flags]
    years: list[int | None] = []
    for title, date in zip(titles, items_t.text("release_date"), strict=True):
        year = title_year(title)
        if year is None and date.strip():
            year = int(date.strip()[-4:]) if date.strip()[-4:].isdigit() else None
        years.append(year)
    # "unknown" is the dataset's flag for "no genre known", not a genre to match on.
    named = [[g for g in gs if g != "unknown"] for gs in genres]
    items = Entities(
        ids=np.asarray(item_ids, dtype=object),
        categorical={
            "genre": Categorical.from_values("genre", named),
            "decade": Categorical.from_values("decade", [decade(y) for y in years]),
        },
        text_fields={"title": titles},
        text=[item_text(t, g) for t, g in zip(titles, named, strict=True)],
    )

    users_t = read_table(
        folder / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip"]
    )
    user_ids = unique_ids(users_t, "user_id")
    ages = users_t.numbers("age", integer=True)
    users = Entities(
        ids=np.asarray(user_ids, dtype=object),
        categorical={
            "gender": Categorical.from_values("gender", users_t.non_empty("gender")),
            "age_band": Categorical.from_values("age_band", [age_band(int(a)) for a in ages]),
            "occupation": Categorical.from_values("occupation", users_t.non_empty("occupation")),
        },
    )

    data_t = read_table(
        folder / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"]
    )
    skipped: dict[str, int] = {}
    inter = interactions_from_table(
        data_t,
        user_col="user_id",
        item_col="item_id",
        value_col="rating",
        time_col="timestamp",
        user_index=users.index(),
        item_index=items.index(),
        skipped=skipped,
    )
    return Dataset("ml-100k", items, users, inter, positive_threshold=4.0, skipped=skipped)


def load_ml_latest(folder: Path, name: str = "ml-latest-small") -> Dataset:
    folder = Path(folder)
    movies = read_table(folder / "movies.csv")
    movies.require("movieId", "title", "genres")
    item_ids = unique_ids(movies, "movieId")
    titles = movies.text("title")
    genres = [
        [] if g.strip() in ("", "(no genres listed)") else g.split("|")
        for g in movies.text("genres")
    ]
    tags_text = [""] * len(item_ids)
    index = {v: i for i, v in enumerate(item_ids)}
    tags_path = folder / "tags.csv"
    if tags_path.is_file():
        tags = read_table(tags_path)
        tags.require("movieId", "tag")
        per_item: dict[int, list[str]] = {}
        rows = zip(tags.lines, tags.text("movieId"), tags.text("tag"), strict=True)
        for line, movie, tag in rows:
            if movie.strip() not in index:
                raise DataError(tags_path, f"unknown movie id {movie!r}", int(line), "movieId")
            bucket = per_item.setdefault(index[movie.strip()], [])
            if tag.strip() and tag.strip().lower() not in (t.lower() for t in bucket):
                bucket.append(tag.strip())
        for i, bucket in per_item.items():
            tags_text[i] = ", ".join(bucket)
    items = Entities(
        ids=np.asarray(item_ids, dtype=object),
        categorical={
            "genre": Categorical.from_values("genre", genres),
            "decade": Categorical.from_values("decade", [decade(title_year(t)) for t in titles]),
        },
        # Tags are kept as a field but left out of the encoder text: they are user
        # events, and a cold item has none when it appears.
        text_fields={"title": titles, "tags": tags_text},
        text=[item_text(t, g) for t, g in zip(titles, genres, strict=True)],
    )
    ratings = read_table(folder / "ratings.csv")
    ratings.require("userId", "movieId", "rating", "timestamp")
    raw_users = ratings.non_empty("userId")
    # The release has no user file: users are whoever rated, ordered numerically when possible.
    distinct = sorted(set(raw_users), key=lambda v: (0, int(v), v) if v.isdigit() else (1, 0, v))
    users = Entities(ids=np.asarray(distinct, dtype=object))
    skipped: dict[str, int] = {}
    inter = interactions_from_table(
        ratings,
        user_col="userId",
        item_col="movieId",
        value_col="rating",
        time_col="timestamp",
        user_index=users.index(),
        item_index=items.index(),
        skipped=skipped,
    )
    return Dataset(name, items, users, inter, positive_threshold=4.0, skipped=skipped)
