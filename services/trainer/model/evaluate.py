"""Validation metrics a training run writes into its manifest.

The evaluation harness (services/trainer/evaluation) is where models are
compared; this is the small in-run check: each user's latest positive is held
out, the model ranks every item but the user's training positives, and
Recall@20 / NDCG@20 (one target: NDCG = 1/log2(rank + 1)) are averaged.
"""

from __future__ import annotations

import numpy as np

from services.trainer.model.recommender import ScoringModel
from services.trainer.model.train import TrainResult

K = 20


def holdout_last(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, min_positives: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]:
    """Remove each user's latest positive (users with >= min_positives); returns the rest
    and {user: held-out item}."""
    order = np.lexsort((np.arange(len(users)), times, users))
    u, i, t = users[order], items[order], times[order]
    last = np.r_[u[1:] != u[:-1], True]
    counts = np.bincount(u, minlength=int(u.max()) + 1 if len(u) else 0)
    take = last & (counts[u] >= min_positives)
    held = {int(a): int(b) for a, b in zip(u[take], i[take], strict=True)}
    return u[~take], i[~take], t[~take], held


def validation_metrics(result: TrainResult, held: dict[int, int]) -> dict[str, float]:
    model = ScoringModel(result)
    data = result.data
    users = np.array(sorted(held), dtype=np.int64)
    candidates = np.arange(data.n_items)
    recall, ndcg = [], []
    for start in range(0, len(users), 256):
        batch = users[start : start + 256]
        hists = [data.history(int(u)) for u in batch]
        scores = model.score(batch, data.user_attrs[batch], hists, candidates)
        for r, u in enumerate(batch):
            scores[r, hists[r]] = -np.inf
            target = held[int(u)]
            rank = int((scores[r] > scores[r, target]).sum())
            hit = rank < K
            recall.append(float(hit))
            ndcg.append(1.0 / np.log2(rank + 2) if hit else 0.0)
    return {
        f"recall@{K}": round(float(np.mean(recall)), 4),
        f"ndcg@{K}": round(float(np.mean(ndcg)), 4),
        "users": len(users),
    }
