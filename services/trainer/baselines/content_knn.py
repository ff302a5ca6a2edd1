"""Item k-NN on the pretrained text vectors: no training at all.

Each item keeps its ``neighbors`` most similar items (cosine of the text
vectors); a candidate's score is the sum of its similarities to the user's
history items among those neighbours (classic item-kNN, with content instead
of co-occurrence similarity). A user with no history gets training
popularity, the only thing known about them.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from services.trainer.baselines.base import ScoreRequest, TrainData
from services.trainer.baselines.common import history_matrix, popularity_scores


def knn_graph(vectors: np.ndarray, neighbors: int, block: int = 1024) -> sp.csr_matrix:
    """Row i holds the cosine similarity of item i to its top ``neighbors`` items (not itself)."""
    n = vectors.shape[0]
    k = min(neighbors, n - 1)
    rows, cols, vals = [], [], []
    for start in range(0, n, block):
        sims = vectors[start : start + block] @ vectors.T
        idx = np.arange(sims.shape[0])
        sims[idx, start + idx] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        rows.append(np.repeat(start + idx, k))
        cols.append(top.ravel())
        vals.append(sims[idx[:, None], top].ravel())
    data = np.maximum(np.concatenate(vals), 0.0).astype(np.float32)
    return sp.csr_matrix(
        (data, (np.concatenate(rows), np.concatenate(cols))), shape=(n, n), dtype=np.float32
    )


class ContentKNN:
    name = "content-knn"

    # 400: the best single value on both catalogs' item-cold validation halves (100 until
    # session 6, which was 2-7% worse there; docs/EVALUATION.md, "content-knn's neighbours").
    def __init__(self, seed: int = 0, neighbors: int = 400, power: float = 1.0) -> None:
        self.neighbors = int(neighbors)
        self.power = float(power)
        self.graph_t = sp.csr_matrix((0, 0))
        self.popularity = np.zeros(0)
        self.n_items = 0

    def fit(self, train: TrainData) -> None:
        graph = knn_graph(train.item_vectors.astype(np.float32), self.neighbors)
        if self.power != 1.0:
            graph.data **= self.power
        # Scoring multiplies histories by the transpose: column j of graph_t = item j's row.
        self.graph_t = graph.T.tocsr()
        self.popularity = popularity_scores(train)
        self.n_items = train.n_items

    def score(self, request: ScoreRequest) -> np.ndarray:
        hist = history_matrix(request, self.n_items)
        scores = np.asarray(
            (hist @ self.graph_t)[:, request.candidates].todense(), dtype=np.float64
        )
        empty = np.diff(hist.indptr) == 0
        if empty.any():
            scores[empty] = self.popularity[request.candidates]
        return scores
