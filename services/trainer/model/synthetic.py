"""A small synthetic catalog for tests, the DDP parity check and the benchmark.

Items belong to latent "tastes"; an item's content vector is its taste
direction plus noise and its genre attribute is its taste, so content really
predicts who likes an item (a cold item is learnable). Users have a favourite
taste, drawn partly from their segment (an attribute), so segment popularity
is informative too.
"""

from __future__ import annotations

import numpy as np

from services.common.recsys_features import AttributeVocab
from services.trainer.model.config import ModelConfig
from services.trainer.model.dataset import ModelData, build_model_data


def small_config(**overrides: object) -> ModelConfig:
    """A configuration sized for the synthetic data: seconds to train on one core."""
    base = ModelConfig(
        dim=16,
        hidden=32,
        batch_size=128,
        epochs=2,
        n_negatives=32,
        max_history=20,
        ranker_epochs=1,
        ranker_candidates=20,
        ranker_queries_per_user=2,
        ranker_batch_size=64,
        # The fixed gate (ranker for every user with a history): tests exercise the ranker.
        ranker_auto_gate=False,
    )
    return base.with_options(**overrides)


def synthetic_model_data(
    n_users: int = 120,
    n_items: int = 200,
    text_dim: int = 32,
    per_user: int = 15,
    n_tastes: int = 6,
    seed: int = 0,
    dim: int = 16,
    max_history: int = 20,
) -> ModelData:
    rng = np.random.default_rng(seed)
    tastes = rng.normal(size=(n_tastes, text_dim))
    item_taste = rng.integers(0, n_tastes, size=n_items)
    content = tastes[item_taste] + 0.7 * rng.normal(size=(n_items, text_dim))
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    quality = rng.gamma(1.0, size=n_items)  # some items are liked by everyone more
    item_vocab = AttributeVocab((("genre", tuple(f"g{t}" for t in range(n_tastes))),))
    item_attrs = item_vocab.encode([{"genre": f"g{t}"} for t in item_taste])
    segments = rng.integers(0, 3, size=n_users)
    user_vocab = AttributeVocab((("segment", ("a", "b", "c")),))
    user_attrs = user_vocab.encode([{"segment": "abc"[s]} for s in segments])
    users, items, times = [], [], []
    for u in range(n_users):
        fav = (segments[u] * 2 + rng.integers(0, 2)) % n_tastes
        weight = quality * np.where(item_taste == fav, 8.0, 1.0)
        chosen = rng.choice(n_items, size=per_user, replace=False, p=weight / weight.sum())
        users += [u] * per_user
        items += chosen.tolist()
        times += (np.arange(per_user) + 1000 * u).tolist()
    return build_model_data(
        content=content.astype(np.float32),
        item_vocab=item_vocab,
        item_attrs=item_attrs,
        user_vocab=user_vocab,
        user_attrs=user_attrs,
        pos_users=np.array(users),
        pos_items=np.array(items),
        pos_times=np.array(times),
        item_vec_dim=dim + 1,
        max_history=max_history,
    )
