"""Choosing option sets on an inner item-cold holdout, inside training (``auto_select``).

Some choices help item cold-start on one catalog and hurt it on another (docs/MODEL.md,
runs 3-4: more content directions help ml-latest-small's 9,742 items and let the MLP
memorise ML-100K's 1,682 titles). Instead of a per-dataset constant, training decides on
its own data: a seeded ``auto_select_holdout`` share of the items with training positives
plays "new" (every positive on them leaves a copy of the training data), one set of
towers per candidate option set is trained on the rest, and each is scored the way the
harness scores item cold-start: every user with a positive among the held-out items ranks
exactly those items from the towers (item vectors with no id), targets are those
positives, Recall@20 averaged over users. ``auto_select_folds`` disjoint holdouts sum
their recalls. The best candidate's options are applied to the real run's config. Only
training data are used, so this is tuning on validation, done the same way on every
catalog.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from services.trainer.model.config import ModelConfig
from services.trainer.model.dataset import ModelData, build_model_data, with_unliked

log = logging.getLogger("coldstart.trainer.model")


def parse_candidate(text: str) -> dict[str, Any]:
    """Options from "k=v,k2=v2" (values JSON, else strings); "" is the config unchanged."""
    out: dict[str, Any] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"auto_select: {part!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def without_items(data: ModelData, items: np.ndarray) -> ModelData:
    """The training data with every positive on ``items`` removed (they become new items:
    no id code, no popularity), everything else as it was."""
    drop = np.zeros(data.n_items, dtype=bool)
    drop[items] = True
    return _without(data, drop_items=drop)


def without_users(data: ModelData, users: np.ndarray) -> ModelData:
    """The training data with every positive of ``users`` removed (they become new users:
    no id code, no history), everything else as it was."""
    drop = np.zeros(data.n_users, dtype=bool)
    drop[users] = True
    return _without(data, drop_users=drop)


def _without(
    data: ModelData,
    drop_users: np.ndarray | None = None,
    drop_items: np.ndarray | None = None,
) -> ModelData:
    """``data`` less every positive and low rating of the users / on the items the bool
    masks mark (a new user or item has no interactions at all)."""

    def kept(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keep = np.ones(len(users), dtype=bool)
        if drop_users is not None:
            keep &= ~drop_users[users]
        if drop_items is not None:
            keep &= ~drop_items[items]
        return keep

    users = np.repeat(np.arange(data.n_users), np.diff(data.user_offsets))
    keep = kept(users, data.user_items)
    # user_items is each user's positives oldest first: the position is a valid time.
    order = np.arange(len(data.user_items), dtype=np.int64)
    sub = build_model_data(
        content=data.content,
        item_vocab=data.spec.item_vocab,
        item_attrs=data.item_attrs,
        user_vocab=data.spec.user_vocab,
        user_attrs=data.user_attrs,
        pos_users=users[keep],
        pos_items=data.user_items[keep],
        pos_times=order[keep],
        item_vec_dim=data.spec.item_vec_dim,
        max_history=data.spec.max_history,
        interest=data.interest,
    )
    if data.unliked_items is None or data.unliked_offsets is None:
        return sub
    low_users = np.repeat(np.arange(data.n_users), np.diff(data.unliked_offsets))
    low_keep = kept(low_users, data.unliked_items)
    return with_unliked(sub, low_users[low_keep], data.unliked_items[low_keep])


def user_folds(data: ModelData, n_folds: int, seed: int) -> list[np.ndarray]:
    """``n_folds`` disjoint, seeded sets of the users with training positives, together
    all of them."""
    eligible = np.flatnonzero(np.diff(data.user_offsets) > 0)
    order = np.random.default_rng([abs(seed), 78]).permutation(eligible)
    return [np.sort(f) for f in np.array_split(order, n_folds) if len(f)]


def holdout_folds(data: ModelData, cfg: ModelConfig) -> list[np.ndarray]:
    """``auto_select_folds`` disjoint, seeded sets of items with training positives."""
    eligible = np.flatnonzero(data.pop > 0)
    rng = np.random.default_rng([abs(cfg.seed), 77])
    order = rng.permutation(eligible)
    size = max(1, round(cfg.auto_select_holdout * len(eligible)))
    folds = [np.sort(order[f * size : (f + 1) * size]) for f in range(cfg.auto_select_folds)]
    return [f for f in folds if len(f)]


def item_cold_recall(towers: Any, full: ModelData, sub: ModelData, held: np.ndarray) -> float:
    """Mean Recall@20 of users with a positive among ``held`` ranking exactly ``held``
    (the harness's item cold-start protocol), their ``sub`` positives as history."""
    from services.trainer.model.train import _topk, item_vectors, user_vectors

    is_held = np.zeros(full.n_items, dtype=bool)
    is_held[held] = True
    users, targets = [], []
    for u in range(full.n_users):
        t = full.history(u)
        t = t[is_held[t]]
        if len(t):
            users.append(u)
            targets.append(t)
    if not users:
        return 0.0
    ivecs = item_vectors(towers, sub)  # held-out items have no id code in sub
    ua = np.asarray(users)
    uvecs = user_vectors(
        towers,
        sub,
        sub.user_attrs[ua],
        sub.user_codes[ua].astype(np.int64),
        [sub.history(u) for u in users],
        ivecs,
        sub.interest[ua],
    )
    scores = uvecs @ ivecs[held].T
    top = held[_topk(scores, 20)]
    recall = [np.isin(t, top[r]).sum() / len(t) for r, t in enumerate(targets)]
    return float(np.mean(recall))


def auto_select(data: ModelData, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, float]]:
    """(the config with the best candidate's options, candidate -> summed holdout recall).

    Every candidate is trained in-process on one CPU worker (``DistContext.single``), the
    same on every worker of a distributed run (pure function of data and config)."""
    from services.trainer.model.distributed import DistContext
    from services.trainer.model.train import train

    base = cfg.with_options(auto_select=())
    candidates = [(c, parse_candidate(c)) for c in cfg.auto_select]
    scores: dict[str, float] = {c: 0.0 for c, _ in candidates}
    for held in holdout_folds(data, cfg):
        sub = without_items(data, held)
        for text, options in candidates:
            trial = base.with_options(**{**options, "use_ranker": False})
            result = train(sub, trial, DistContext.single())
            scores[text] += item_cold_recall(result.towers, data, sub, held)
    best = max(candidates, key=lambda c: scores[c[0]])  # first of equals: list order
    log.info("auto_select: %s (holdout Recall@20 %s)", best[0], scores)
    return base.with_options(**best[1]), scores
