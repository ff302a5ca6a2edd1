"""Scoring a registry version of the cold-start model (format
``coldstart.recommender/2``) for the retrainer's gate, through ONNX Runtime as
the fusion service serves it: tower scores over every candidate, the ranker's
scores for each user's head on top (the same order a Recommend call gives).

The held-out comparison knows user ids and histories, not profile attributes,
so every user gets only the always-on attribute column; both versions are
scored the same way, which is what the gate needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Tower-only scores sit this far below the ranker's head (finite, as recall needs).
_TAIL_OFFSET = 1.0e4


class OnnxScorer:
    def __init__(self, version_dir: Path) -> None:
        from services.trainer.model.onnx_version import OnnxVersion

        self.version = OnnxVersion(version_dir)
        self.rows = {item: i for i, item in enumerate(self.version.item_ids)}

    def score(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], candidates: Sequence[str]
    ) -> np.ndarray:
        n = len(user_ids)
        out = np.full((n, len(candidates)), -np.inf)
        cand_rows = np.asarray([self.rows.get(c, -1) for c in candidates], dtype=np.int64)
        known_cols = np.flatnonzero(cand_rows >= 0)
        if n == 0 or len(known_cols) == 0:
            return out  # a version that knows none of the items recommends none of them
        rows = cand_rows[known_cols]
        column_of_row = {int(r): int(c) for r, c in zip(rows, known_cols, strict=True)}
        hist = [
            np.asarray([self.rows[i] for i in h if i in self.rows], dtype=np.int64)
            for h in histories
        ]
        attrs = np.zeros((n, self.version.spec.user_vocab.width), dtype=np.float32)
        attrs[:, 0] = 1.0  # the always-on column
        codes = np.asarray([self.version.user_codes.get(u, 0) for u in user_ids], dtype=np.int64)
        tower = self.version.user_vecs(attrs, codes, hist) @ self.version.item_vectors[rows].T
        out[:, known_cols] = tower - _TAIL_OFFSET
        head_items, head_scores = self.version.rank(attrs, codes, hist, rows)
        for r in range(n):
            cols = [column_of_row[int(i)] for i in head_items[r]]
            out[r, cols] = head_scores[r]
        return out


def load_scorer(version_dir: Path) -> OnnxScorer:
    return OnnxScorer(version_dir)
