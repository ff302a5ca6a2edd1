"""Ranking metrics over full candidate lists.

Definitions (binary relevance, averaged over evaluated users):

- Recall@K  = hits in the top K / number of target items (not min(|T|, K)).
- NDCG@K    = sum over hits at rank r (1-based) of 1/log2(r+1), divided by the
  ideal DCG of min(|T|, K) hits.
- HitRate@K = 1 if any target is in the top K.
- Coverage@K = distinct items in all users' top K / number of candidates
  (catalog coverage; a popularity model scores low here).

Ties are broken at random (seeded) so a model that scores everything equal
gets the expected random score, not an artefact of the item order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

KS = (10, 20, 50)


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Column indices of the k best scores per row, best first; ties in random order.

    ``-inf`` marks excluded columns; they only appear when a row has fewer
    than k allowed columns, and callers drop them with ``allowed``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores[~np.isneginf(scores)]).all():
        raise ValueError("scores must be finite (or -inf for excluded)")
    k = min(k, scores.shape[1])
    tie = rng.random(scores.shape)
    # lexsort sorts by the last key first: score descending, then the random key.
    order = np.lexsort((tie, -scores), axis=1)
    return order[:, :k]


class MetricAccumulator:
    """Per-user metrics summed over batches, plus the items shown (for coverage)."""

    def __init__(self, n_candidates: int, ks: Sequence[int] = KS) -> None:
        self.ks = tuple(sorted(ks))
        self.n_candidates = n_candidates
        self.sums: dict[str, float] = {}
        self.users = 0
        self.shown = {k: np.zeros(n_candidates, dtype=bool) for k in self.ks}
        max_k = self.ks[-1]
        self._discount = 1.0 / np.log2(np.arange(2, max_k + 2))
        self._ideal = np.cumsum(self._discount)

    def add(self, ranked_cols: np.ndarray, allowed: np.ndarray, targets: list[np.ndarray]) -> None:
        """``ranked_cols`` (n, >= max k) columns best first; ``allowed`` (n, m) bool;
        ``targets[i]``: target column indices of user i (non-empty)."""
        for row, target in enumerate(targets):
            if len(target) == 0:
                raise ValueError("a user without targets cannot be evaluated")
            cols = ranked_cols[row]
            cols = cols[allowed[row, cols]]
            rel = np.isin(cols, target).astype(np.float64)
            self.users += 1
            for k in self.ks:
                top = rel[:k]
                hits = float(top.sum())
                self._add(f"recall@{k}", hits / len(target))
                self._add(f"hit_rate@{k}", 1.0 if hits > 0 else 0.0)
                dcg = float((top * self._discount[: len(top)]).sum())
                self._add(f"ndcg@{k}", dcg / float(self._ideal[min(len(target), k) - 1]))
                self.shown[k][cols[:k]] = True

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def result(self) -> dict[str, float]:
        if self.users == 0:
            raise ValueError("no users were evaluated")
        out = {key: value / self.users for key, value in sorted(self.sums.items())}
        for k in self.ks:
            out[f"coverage@{k}"] = float(self.shown[k].sum()) / self.n_candidates
        return out


def evaluate_ranking(
    scores: ArrayLike,
    targets: list[np.ndarray],
    excluded: list[np.ndarray] | None = None,
    ks: Sequence[int] = KS,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics for one score matrix (users x candidates) with column-index targets.

    The convenience entry point for tests and small cases; the harness uses
    :class:`MetricAccumulator` batch by batch.
    """
    scores = np.array(scores, dtype=np.float64)
    allowed = np.ones(scores.shape, dtype=bool)
    for row, cols in enumerate(excluded or []):
        allowed[row, cols] = False
    scores[~allowed] = -np.inf
    acc = MetricAccumulator(scores.shape[1], ks)
    ranked = top_k(scores, max(ks), np.random.default_rng(seed))
    acc.add(ranked, allowed, [np.asarray(t, dtype=np.int64) for t in targets])
    return acc.result()
