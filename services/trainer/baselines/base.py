"""The one interface every model in the evaluation harness implements.

How a model plugs in
--------------------
A model is any object with::

    name: str
    def fit(self, train: TrainData) -> None
    def score(self, request: ScoreRequest) -> np.ndarray   # (len(users), len(candidates))

and a *factory* registered under the name ``--models`` uses::

    from services.trainer.baselines.base import register
    register("coldstart", lambda seed, options: MyModel(seed=seed, **options))

The harness imports the modules in ``PLUGIN_MODULES`` before it resolves names,
so a module there that calls ``register`` at import time is all another
package needs (``services.trainer.model`` is listed; a missing module is
skipped). Tests and notebooks can also call ``register`` directly.

What the harness guarantees
---------------------------
- ``fit`` is called once per (split, seed) with :class:`TrainData`: the whole
  catalog (every item with its content vector and attributes, including items
  held out as cold; every user with attributes, including cold users) and only
  the *training* interactions. A held-out item or user simply has no training
  rows; it is not hidden from the catalog, because in production its text and
  attributes are known the moment it appears.
- ``score`` is called many times after ``fit`` with batches of users. For each
  user the request carries the user's attributes and ``history``: every item
  the user is known to like at scoring time, oldest first (warm users: their
  training positives; cold users: the k revealed items, possibly none). The
  model returns a score per (user, candidate); higher is better. The harness
  masks what must not be recommended (history and other known positives)
  itself, breaks ties at random and computes the metrics, so a model never
  needs to filter anything.
- Scores must be finite float32/float64. ``-inf`` is allowed for "never".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from services.trainer.data.model import Dataset, Interactions

# Modules imported (if present) before names are resolved; each registers its models.
PLUGIN_MODULES: tuple[str, ...] = ("services.trainer.model",)

Options = Mapping[str, Any]


@dataclass(frozen=True)
class TrainData:
    """Everything a model may learn from.

    ``item_vectors`` are the pretrained text vectors of *all* items (row i =
    ``dataset.items`` row i), L2-normalised float32. ``train`` holds the
    training interactions only, including non-positive ones (value below
    ``dataset.positive_threshold``); ``positives`` is the binary user x item
    CSR matrix of the training positives, the input most baselines want.
    """

    dataset: Dataset
    item_vectors: np.ndarray
    train: Interactions
    positives: sp.csr_matrix
    seed: int
    # Free-form notes from the harness (split name, ...) for logging only.
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.dataset.n_users

    @property
    def n_items(self) -> int:
        return self.dataset.n_items

    def item_train_counts(self) -> np.ndarray:
        """Training positives per item (0 for cold items)."""
        return np.asarray(self.positives.sum(axis=0)).ravel()

    def user_train_counts(self) -> np.ndarray:
        return np.asarray(self.positives.sum(axis=1)).ravel()

    def unliked_by_user(self) -> dict[int, np.ndarray]:
        """user row -> the items of their non-positive training interactions (rated below
        the positive threshold), oldest first; users without any are absent."""
        tr = self.train
        low = np.flatnonzero(~self.dataset.positive_mask(tr))
        low = low[np.lexsort((tr.timestamp[low], tr.user[low]))]
        users, items = tr.user[low], tr.item[low].astype(np.int64)
        cuts = np.flatnonzero(np.diff(users)) + 1
        return {
            int(u[0]): i
            for u, i in zip(np.split(users, cuts), np.split(items, cuts), strict=True)
            if len(u)
        }


@dataclass(frozen=True)
class ScoreRequest:
    """A batch of users to score against one candidate list.

    ``users``: user row indices (cold users included; they have no training
    rows). ``user_attributes``: per categorical field, the multi-hot rows of
    these users (same as ``dataset.users.categorical[f].matrix[users]``; given
    here so an online caller can pass attributes of a user the dataset never
    saw). ``history[i]``: item indices user i is known to like, oldest first.
    ``candidates``: item indices to score, the columns of the result.
    """

    users: np.ndarray
    user_attributes: Mapping[str, sp.csr_matrix]
    history: list[np.ndarray]
    candidates: np.ndarray
    user_text: list[str] | None = None

    def __len__(self) -> int:
        return len(self.users)


@runtime_checkable
class Recommender(Protocol):
    name: str

    def fit(self, train: TrainData) -> None: ...

    def score(self, request: ScoreRequest) -> np.ndarray: ...


Factory = Callable[[int, Options], Recommender]
_REGISTRY: dict[str, Factory] = {}
_DESCRIPTIONS: dict[str, str] = {}
_plugins_loaded = False


def register(name: str, factory: Factory, description: str = "") -> None:
    """Make ``name`` usable in ``--models``; ``factory(seed, options)`` builds a fresh model."""
    _REGISTRY[name] = factory
    _DESCRIPTIONS[name] = description


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    # Built-in baselines register themselves on import.
    importlib.import_module("services.trainer.baselines.registry")
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only "this plugin is not there (yet)" is tolerated, not its broken imports.
            if exc.name is None or not module.startswith(exc.name):
                raise


def available() -> dict[str, str]:
    """Registered model names and their one-line descriptions."""
    _load_plugins()
    return dict(_DESCRIPTIONS)


def create(name: str, seed: int, options: Options | None = None) -> Recommender:
    _load_plugins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](seed, dict(options or {}))
