"""Popularity baselines (global and per user-attribute segment) and the random floor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.trainer.baselines.base import ScoreRequest, TrainData
from services.trainer.baselines.common import popularity_scores


class RandomScores:
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def fit(self, train: TrainData) -> None:
        pass

    def score(self, request: ScoreRequest) -> np.ndarray:
        return self.rng.random((len(request), len(request.candidates)))


class Popularity:
    """Items ranked by training positives, the same list for everyone."""

    name = "popularity"

    def __init__(self, seed: int = 0) -> None:
        self.counts = np.zeros(0)

    def fit(self, train: TrainData) -> None:
        self.counts = popularity_scores(train)

    def score(self, request: ScoreRequest) -> np.ndarray:
        return np.tile(self.counts[request.candidates], (len(request), 1))


def default_segment_fields(train: TrainData, max_values: int = 12) -> list[str]:
    """The (up to two) user attributes with the fewest values, each with <= max_values.

    ML-100K gives gender x age band, the segmentation of the reference; a
    dataset without user attributes gives none (plain popularity).
    """
    cats = train.dataset.users.categorical
    small = sorted((len(c.vocab), name) for name, c in cats.items() if len(c.vocab) <= max_values)
    return [name for _, name in small[:2]]


class SegmentPopularity:
    """Popularity within the user's attribute segment, shrunk toward global popularity.

    p(i | segment) = (count_seg(i) + shrinkage * p_global(i)) / (n_seg + shrinkage):
    a small segment borrows from the global list instead of ranking by noise.
    """

    name = "popularity-segment"

    def __init__(
        self, seed: int = 0, fields: Sequence[str] | None = None, shrinkage: float = 200.0
    ) -> None:
        self.fields = list(fields) if fields is not None else None
        self.shrinkage = float(shrinkage)
        self.table: dict[tuple[int, ...], np.ndarray] = {}
        self.global_share = np.zeros(0)

    def _keys(self, attributes: dict[str, np.ndarray], n: int) -> list[tuple[int, ...]]:
        cols = [attributes[f] for f in self.fields or []]
        return [tuple(int(c[i]) for c in cols) for i in range(n)]

    def fit(self, train: TrainData) -> None:
        if self.fields is None:
            self.fields = default_segment_fields(train)
        counts = popularity_scores(train)
        self.global_share = counts / max(counts.sum(), 1.0)
        users = train.dataset.users
        codes = {f: users.categorical[f].codes() for f in self.fields}
        keys = self._keys(codes, train.n_users)
        positives = train.positives.tocsr()
        groups: dict[tuple[int, ...], list[int]] = {}
        for u, key in enumerate(keys):
            groups.setdefault(key, []).append(u)
        self.table = {}
        for key, members in groups.items():
            seg = np.asarray(positives[members].sum(axis=0)).ravel()
            self.table[key] = (seg + self.shrinkage * self.global_share) / (
                seg.sum() + self.shrinkage
            )

    def score(self, request: ScoreRequest) -> np.ndarray:
        codes = {}
        for f in self.fields or []:
            m = request.user_attributes[f].tocsr()
            c = np.full(m.shape[0], -1, dtype=np.int64)
            has = np.diff(m.indptr) > 0
            c[has] = m.indices[m.indptr[:-1][has]]
            codes[f] = c
        keys = self._keys(codes, len(request))
        out = np.empty((len(request), len(request.candidates)))
        for row, key in enumerate(keys):
            out[row] = self.table.get(key, self.global_share)[request.candidates]
        return out
