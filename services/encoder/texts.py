"""Texts to check and measure the encoder with: MovieLens item texts when the
shared data is present, a generated set of the same shape otherwise."""

from __future__ import annotations

import random
from pathlib import Path

from services.common.paths import shared_data_dir

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

_WORD_TEXT = (
    "night day love war star return last first city dark king queen ghost river house "
    "dream man woman girl boy story secret game blood money island road heart fire ice "
    "sun moon shadow angel devil summer winter lost found little big great strange "
    "wild golden silent broken hidden American French Paris London café naïve über"
)
_WORDS = _WORD_TEXT.split()


def movielens_texts(path: Path | None = None, limit: int | None = None) -> list[str] | None:
    """'Title (year) | genre, genre' for each item of ml-100k's u.item, or None if absent."""
    path = path or shared_data_dir() / "ml-100k" / "u.item"
    if not path.is_file():
        return None
    texts: list[str] = []
    with path.open(encoding="latin-1") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("|")
            if len(parts) < 24:
                continue
            genres = [GENRES[i] for i, flag in enumerate(parts[5:24]) if flag == "1"]
            texts.append(f"{parts[1]} | {', '.join(genres)}")
            if limit is not None and len(texts) >= limit:
                break
    return texts


def generated_texts(count: int, seed: int = 7) -> list[str]:
    """Deterministic titles with genres, plus some longer sentences."""
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6))).title()
        genres = ", ".join(rng.sample(GENRES[1:], rng.randint(1, 3)))
        text = f"{words} ({rng.randint(1920, 2024)}) | {genres}"
        if i % 10 == 9:
            text += ". " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 60)))
        texts.append(text)
    return texts


def sample_texts(count: int = 1000) -> tuple[list[str], str]:
    """``count`` texts and where they came from ("movielens" or "generated")."""
    real = movielens_texts(limit=count)
    if real is not None and len(real) >= count:
        return real, "movielens-100k u.item"
    return generated_texts(count), "generated"
