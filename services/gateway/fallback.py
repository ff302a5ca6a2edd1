"""What the gateway answers when fusion is down: the most popular items of the
current model version, re-ordered by content similarity when the request
carries an interest vector. Answers are flagged ``degraded``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.gateway.types import ItemDisplay

REASON_POPULAR = "popular right now"
REASON_INTERESTS = "matches your interests"


@dataclass
class FallbackCatalog:
    version: str
    item_ids: list[str]
    popularity: np.ndarray  # (n,) interaction counts
    content_vectors: np.ndarray | None = None  # (n, d), unit rows
    attributes: Sequence[Mapping[str, str]] = field(default_factory=list)
    tags: Sequence[Sequence[str]] = field(default_factory=list)
    # Per item its title ("" when the version's items carry no text).
    titles: Sequence[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.order = np.argsort(-self.popularity, kind="stable")
        self.position = {item: i for i, item in enumerate(self.item_ids)}
        scale = float(self.popularity.max()) if len(self.popularity) else 1.0
        self.normalised = np.log1p(self.popularity) / np.log1p(max(scale, 1.0))

    def display(self, item_id: str) -> ItemDisplay:
        """An item's display fields, as far as the version's files hold them."""
        index = self.position.get(item_id)
        if index is None:
            return ItemDisplay()
        return ItemDisplay(
            title=self.titles[index] if index < len(self.titles) else "",
            attributes=dict(self.attributes[index]) if index < len(self.attributes) else {},
            tags=list(self.tags[index]) if index < len(self.tags) else [],
        )

    def allowed(
        self, index: int, attribute_equals: Mapping[str, str], tags_any: Sequence[str]
    ) -> bool:
        if attribute_equals:
            attributes = self.attributes[index] if index < len(self.attributes) else {}
            if any(attributes.get(k) != v for k, v in attribute_equals.items()):
                return False
        if tags_any:
            tags = self.tags[index] if index < len(self.tags) else ()
            if not set(tags) & set(tags_any):
                return False
        return True

    def recommend(
        self,
        k: int,
        exclude: set[str],
        attribute_equals: Mapping[str, str],
        tags_any: Sequence[str],
        interest_vector: Sequence[float] | None = None,
    ) -> list[tuple[str, float, str]]:
        if (
            interest_vector is not None
            and self.content_vectors is not None
            and len(interest_vector) == self.content_vectors.shape[1]
        ):
            similarity = self.content_vectors @ np.asarray(interest_vector, dtype=np.float32)
            scores = 0.7 * similarity + 0.3 * self.normalised
            order = np.argsort(-scores, kind="stable")
            reason = REASON_INTERESTS
        else:
            scores = self.normalised
            order = self.order
            reason = REASON_POPULAR
        results: list[tuple[str, float, str]] = []
        for index in order:
            item = self.item_ids[int(index)]
            if item in exclude or not self.allowed(int(index), attribute_equals, tags_any):
                continue
            results.append((item, float(scores[int(index)]), reason))
            if len(results) == k:
                break
        return results

    def similar(self, item_id: str, k: int) -> list[tuple[str, float, str]] | None:
        """Content neighbours of a known item; None when the item is unknown."""
        index = self.position.get(item_id)
        if index is None or self.content_vectors is None:
            return None
        similarity = self.content_vectors @ self.content_vectors[index]
        similarity[index] = -np.inf
        top = np.argsort(-similarity, kind="stable")[:k]
        return [(self.item_ids[int(i)], float(similarity[int(i)]), "similar content") for i in top]


class FallbackSource:
    """Loads the catalog lazily and reloads it when the registry's current version moves."""

    def __init__(
        self,
        load_current: Callable[[], FallbackCatalog | None],
        current_version: Callable[[], str | None],
    ) -> None:
        self._load = load_current
        self._current_version = current_version
        self._catalog: FallbackCatalog | None = None
        self._lock = threading.Lock()

    def get(self) -> FallbackCatalog | None:
        version = self._current_version()
        catalog = self._catalog
        if catalog is not None and catalog.version == version:
            return catalog
        with self._lock:
            if self._catalog is None or self._catalog.version != version:
                self._catalog = self._load()
            return self._catalog
