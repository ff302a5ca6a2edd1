"""Reads the fallback catalog (item ids, popularity, content vectors, item
attributes, tags and titles) from the current version of the recommender registry."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from services.common.paths import run_dir
from services.common.recsys_features import item_title
from services.common.registry import ModelRegistry, RegistryError
from services.gateway.fallback import FallbackCatalog, FallbackSource

log = logging.getLogger("coldstart.gateway.catalog")


def default_registry_dir() -> Path:
    return run_dir() / "registry" / "recommender"


def load_catalog(version: str, folder: Path, manifest: dict[str, Any]) -> FallbackCatalog:
    files: dict[str, str] = manifest.get("files", {})
    item_ids = json.loads((folder / files.get("item_ids", "item_ids.json")).read_text())
    popularity = np.load(folder / files.get("popularity", "popularity.npy")).astype(np.float64)
    vectors_name = files.get("content_vectors", "content_vectors.npy")
    content = (
        np.load(folder / vectors_name).astype(np.float32)
        if (folder / vectors_name).exists()
        else None
    )
    attributes: list[dict[str, str]] = []
    tags: list[list[str]] = []
    titles: list[str] = []
    metadata_name = files.get("items", "items.jsonl")
    if (folder / metadata_name).exists():
        for line in (folder / metadata_name).read_text().splitlines():
            record = json.loads(line)
            attributes.append(record.get("attributes", {}))
            tags.append(record.get("tags", []))
            titles.append(item_title(record.get("text") or ""))
    return FallbackCatalog(
        version, list(map(str, item_ids)), popularity, content, attributes, tags, titles
    )


def registry_fallback(registry_dir: str) -> FallbackSource:
    registry = ModelRegistry(Path(registry_dir) if registry_dir else default_registry_dir())

    def load() -> FallbackCatalog | None:
        info = None
        try:
            info = registry.current_info()
            if info is None:
                return None
            return load_catalog(info.version, info.path, info.manifest)
        except (RegistryError, OSError, ValueError, KeyError) as exc:
            log.warning("fallback catalog unavailable", extra={"error": str(exc)})
            return None

    return FallbackSource(load, registry.current)
