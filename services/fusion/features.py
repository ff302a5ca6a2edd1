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
    history_count: int,
) -> np.ndarray:
    """[N, F] float32 in the manifest's feature order."""
    n = dot.shape[0]
    columns = {
        "dot": dot,
        "interest_sim": interest_sim,
        "history_sim": history_sim,
        "log_popularity": log_popularity,
        "history_count": np.full(n, np.log1p(history_count), dtype=np.float32),
    }
    return np.stack([columns[name] for name in names], axis=1).astype(np.float32, copy=False)
