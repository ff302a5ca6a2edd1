"""Feature building for the towers and the ranker, from a version's manifest.

Torch-free on purpose: training and serving must build identical inputs. This
module covers the provisional manifest format documented in docs/FUSION.md;
when the trainer's shared feature builder lands, the loader dispatches to it by
the manifest's ``format`` and this stays the fallback for the provisional one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Ranker features this builder knows how to compute, by manifest name.
KNOWN_RANKER_FEATURES = (
    "dot",  # user vector . item vector (the two-tower score)
    "interest_sim",  # cosine of the stated-interest vector and the item's content vector
    "history_sim",  # cosine of the mean content of recent items and the item's content
    "log_popularity",  # log1p of the item's interaction count in training
    "history_count",  # log1p of the number of recent items (how warm the user is)
)


def attribute_width(vocab: Mapping[str, Sequence[str]]) -> int:
    return sum(len(values) for values in vocab.values())


def multi_hot(
    values: Mapping[str, str | Sequence[str]], vocab: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """One row: the fields of ``vocab`` in manifest order, a 1 per known value.

    Unknown fields and values are dropped (a new region must not crash a
    request; it contributes nothing, like a missing value in training).
    """
    out = np.zeros(attribute_width(vocab), dtype=np.float32)
    offset = 0
    for field, field_vocab in vocab.items():
        raw = values.get(field)
        if raw is not None:
            wanted = [raw] if isinstance(raw, str) else list(raw)
            positions = {v: j for j, v in enumerate(field_vocab)}
            for value in wanted:
                j = positions.get(value)
                if j is not None:
                    out[offset + j] = 1.0
        offset += len(field_vocab)
    return out


class MultiHot:
    """``multi_hot`` for many rows at once, with the vocabulary's positions built once."""

    def __init__(self, vocab: Mapping[str, Sequence[str]]) -> None:
        self.width = attribute_width(vocab)
        self._fields: list[tuple[str, dict[str, int]]] = []
        offset = 0
        for name, field_vocab in vocab.items():
            positions: dict[str, int] = {}
            for j, value in enumerate(field_vocab):
                positions[value] = offset + j  # a repeated value: the last one, as multi_hot
            self._fields.append((name, positions))
            offset += len(field_vocab)

    def encode(self, rows: Sequence[Mapping[str, str | Sequence[str]]]) -> np.ndarray:
        """[len(rows), width] float32, row i = ``multi_hot(rows[i], vocab)``."""
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        for i, values in enumerate(rows):
            if not values:
                continue
            for name, positions in self._fields:
                raw = values.get(name)
                if raw is None:
                    continue
                for value in [raw] if isinstance(raw, str) else raw:
                    j = positions.get(value)
                    if j is not None:
                        out[i, j] = 1.0
        return out


def normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if norm < 1e-12:
        return np.zeros_like(vector)
    return (vector / norm).astype(np.float32, copy=False)


def ranker_features(
    names: Sequence[str],
    *,
    dot: np.ndarray,
    interest_sim: np.ndarray,
    history_sim: np.ndarray,
    log_popularity: np.ndarray,
    history_count: int | np.ndarray,
) -> np.ndarray:
    """[N, F] float32 in the manifest's feature order.

    ``history_count``: the number of recent items (one user), or per row the
    already log1p-transformed value (rows of several users in one batch).
    """
    n = dot.shape[0]
    if isinstance(history_count, np.ndarray):
        counts = history_count.astype(np.float32, copy=False)
    else:
        counts = np.full(n, np.log1p(history_count), dtype=np.float32)
    columns = {
        "dot": dot,
        "interest_sim": interest_sim,
        "history_sim": history_sim,
        "log_popularity": log_popularity,
        "history_count": counts,
    }
    out = np.empty((n, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        out[:, j] = columns[name]
    return out
