"""Resolving ``--data`` values: a named dataset or a folder in any supported format."""

from __future__ import annotations

from pathlib import Path

from services.common.paths import shared_data_dir
from services.trainer.data.errors import DataError
from services.trainer.data.generic import find_schema, load_generic
from services.trainer.data.model import Dataset
from services.trainer.data.movielens import load_ml100k, load_ml_latest
from services.trainer.data.synthetic import generate

NAMED = ("synthetic", "ml-100k", "ml-latest-small")


def detect_format(folder: Path) -> str:
    if (folder / "u.data").is_file() and (folder / "u.item").is_file():
        return "ml-100k"
    if (folder / "ratings.csv").is_file() and (folder / "movies.csv").is_file():
        return "ml-latest"
    if find_schema(folder) is not None:
        return "generic"
    raise DataError(
        folder,
        "unknown data folder: expected u.data + u.item (MovieLens 100K), ratings.csv + "
        "movies.csv (MovieLens latest) or a schema.toml/schema.json (generic format)",
    )


def load_dataset(spec: str) -> Dataset:
    """``synthetic``, ``ml-100k``, ``ml-latest-small`` (from the shared data folder) or a path."""
    if spec == "synthetic":
        return generate()
    if spec in ("ml-100k", "ml-latest-small"):
        folder = shared_data_dir() / spec
        if not folder.is_dir():
            raise DataError(folder, f"dataset {spec} is not there (shared data folder)")
    else:
        folder = Path(spec)
        if not folder.exists():
            raise DataError(folder, "no such file or folder")
        if not folder.is_dir():
            raise DataError(folder, "--data wants a folder, or one of: " + ", ".join(NAMED))
    kind = detect_format(folder)
    if kind == "ml-100k":
        return load_ml100k(folder)
    if kind == "ml-latest":
        return load_ml_latest(folder, name=spec if spec in NAMED else folder.name)
    return load_generic(folder)
