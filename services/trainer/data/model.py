"""The dataset model every loader produces and every model consumes.

Entities are addressed by dense row indices (0..n-1); the external ids the
files use are kept alongside so splits and reports can be written back in the
catalog's own terms. Categorical attributes are multi-hot sparse matrices so a
single-valued field (gender) and a multi-valued one (genres) look the same to
the models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Categorical:
    """One categorical field: ``matrix[row, j] == 1`` when the row has value ``vocab[j]``.

    A row with no value (missing) has an empty row; a multi-valued field may
    have several ones per row.
    """

    name: str
    vocab: tuple[str, ...]
    matrix: sp.csr_matrix

    def __post_init__(self) -> None:
        if self.matrix.shape[1] != len(self.vocab):
            raise ValueError(
                f"categorical {self.name!r}: matrix has {self.matrix.shape[1]} columns "
                f"for {len(self.vocab)} values"
            )

    @classmethod
    def from_values(cls, name: str, values: Sequence[Sequence[str] | str | None]) -> Categorical:
        """Build from one value (or a list of values, or None) per row; vocab sorted."""
        rows: list[list[str]] = []
        for v in values:
            if v is None:
                rows.append([])
            elif isinstance(v, str):
                rows.append([v])
            else:
                rows.append(list(v))
        vocab = tuple(sorted({x for r in rows for x in r}))
        index = {v: j for j, v in enumerate(vocab)}
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indices: list[int] = []
        for i, r in enumerate(rows):
            cols = sorted({index[x] for x in r})
            indices.extend(cols)
            indptr[i + 1] = len(indices)
        data = np.ones(len(indices), dtype=np.float32)
        matrix = sp.csr_matrix(
            (data, np.asarray(indices, dtype=np.int64), indptr), shape=(len(rows), len(vocab))
        )
        return cls(name=name, vocab=vocab, matrix=matrix)

    def codes(self) -> np.ndarray:
        """First value index per row, -1 where missing (for single-valued fields)."""
        m = self.matrix
        out = np.full(m.shape[0], -1, dtype=np.int64)
        has = np.diff(m.indptr) > 0
        out[has] = m.indices[m.indptr[:-1][has]]
        return out


@dataclass(frozen=True)
class Entities:
    """Items or users: ids, categorical attributes and free text fields."""

    ids: np.ndarray  # external ids as str, unique
    categorical: Mapping[str, Categorical] = field(default_factory=dict)
    text_fields: Mapping[str, list[str]] = field(default_factory=dict)
    # The text the encoder sees (items: "title (year) | genre, genre"); empty strings when none.
    text: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name, cat in self.categorical.items():
            if cat.matrix.shape[0] != n:
                raise ValueError(f"categorical {name!r} has {cat.matrix.shape[0]} rows for {n}")
        for name, col in self.text_fields.items():
            if len(col) != n:
                raise ValueError(f"text field {name!r} has {len(col)} rows for {n}")
        if self.text and len(self.text) != n:
            raise ValueError(f"text has {len(self.text)} rows for {n}")

    def index(self) -> dict[str, int]:
        return {str(x): i for i, x in enumerate(self.ids.tolist())}

    def feature_matrix(self, fields: list[str] | None = None) -> sp.csr_matrix:
        """All (or the named) categorical fields side by side, as one multi-hot matrix."""
        names = list(self.categorical) if fields is None else fields
        if not names:
            return sp.csr_matrix((len(self), 0), dtype=np.float32)
        return sp.hstack([self.categorical[n].matrix for n in names], format="csr").astype(
            np.float32
        )

    def has_text(self) -> bool:
        return any(t for t in self.text)


@dataclass(frozen=True)
class Interactions:
    """Parallel arrays, one row per (user, item) event; indices into Entities rows."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    value: np.ndarray  # float32 (rating, or 1.0 for implicit data)
    timestamp: np.ndarray  # int64 (seconds; any monotone clock works)

    def __len__(self) -> int:
        return len(self.user)

    def __post_init__(self) -> None:
        n = len(self.user)
        if not (len(self.item) == len(self.value) == len(self.timestamp) == n):
            raise ValueError("interaction arrays differ in length")

    def take(self, rows: np.ndarray) -> Interactions:
        return Interactions(
            user=self.user[rows],
            item=self.item[rows],
            value=self.value[rows],
            timestamp=self.timestamp[rows],
        )


@dataclass(frozen=True)
class Dataset:
    """A catalog plus its interactions.

    ``positive_threshold``: an interaction counts as positive when ``value >=``
    it (4.0 for 1-5 star ratings; 1.0 for implicit data where every row is 1).
    """

    name: str
    items: Entities
    users: Entities
    interactions: Interactions
    positive_threshold: float = 4.0
    # What a loader skipped and why (e.g. {"duplicate rows": 3}); reported in the output.
    skipped: Mapping[str, int] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def positive_mask(self, interactions: Interactions | None = None) -> np.ndarray:
        inter = self.interactions if interactions is None else interactions
        return np.asarray(inter.value >= self.positive_threshold)

    def with_threshold(self, threshold: float) -> Dataset:
        return Dataset(
            name=self.name,
            items=self.items,
            users=self.users,
            interactions=self.interactions,
            positive_threshold=threshold,
            skipped=self.skipped,
        )

    def summary(self) -> str:
        pos = int(self.positive_mask().sum())
        return (
            f"{self.name}: {self.n_users} users, {self.n_items} items, "
            f"{len(self.interactions)} interactions "
            f"({pos} positive at >= {self.positive_threshold:g})"
        )
