"""Small helpers the baselines share."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp

from services.trainer.baselines.base import ScoreRequest, TrainData


def history_matrix(request: ScoreRequest, n_items: int) -> sp.csr_matrix:
    """Binary (users x items) matrix of each request user's history."""
    lengths = [len(h) for h in request.history]
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(lengths)
    indices = (
        np.concatenate(request.history).astype(np.int64)
        if indptr[-1]
        else np.zeros(0, dtype=np.int64)
    )
    data = np.ones(len(indices), dtype=np.float32)
    m = sp.csr_matrix((data, indices, indptr), shape=(len(lengths), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def user_attribute_rows(
    attributes: Mapping[str, sp.csr_matrix], fields: list[str], n_rows: int
) -> sp.csr_matrix:
    """The named fields of the request's users side by side (missing field: no columns)."""
    blocks = [attributes[f] for f in fields if f in attributes]
    if not blocks:
        return sp.csr_matrix((n_rows, 0), dtype=np.float32)
    return sp.hstack(blocks, format="csr").astype(np.float32)


def popularity_scores(train: TrainData) -> np.ndarray:
    """Training positives per item, a fallback for users with nothing else to go on."""
    return train.item_train_counts().astype(np.float64)
