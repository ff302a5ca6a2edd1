"""The cold-start model in the evaluation harness: ``--models coldstart`` and its ablations.

- ``coldstart``: towers (content + attributes + ids with dropout) and the ranker;
- ``coldstart-no-content``: the content vectors gated to zero (towers and ranker);
- ``coldstart-no-iddrop``: ids never dropped in training;
- ``coldstart-no-ranker``: the towers' scores alone.

``coldstart-no-ranker`` is the full model with its last stage left out, so when
the harness fits it on the same training data and seed right after
``coldstart``, the towers are reused rather than trained again (same weights
by construction; this only saves time).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from services.trainer.baselines.base import Options, Recommender, ScoreRequest, TrainData, register

_VARIANTS: dict[str, dict[str, Any]] = {
    "coldstart": {},
    "coldstart-no-content": {"use_content": False},
    "coldstart-no-iddrop": {"item_id_dropout": 0.0, "user_id_dropout": 0.0},
    "coldstart-no-ranker": {"use_ranker": False},
}
_DESCRIPTIONS = {
    "coldstart": "two-tower (content, attributes, ids with dropout) + fusion ranker",
    "coldstart-no-content": "ablation: coldstart without content (text) vectors",
    "coldstart-no-iddrop": "ablation: coldstart without id dropout",
    "coldstart-no-ranker": "ablation: coldstart towers only, no ranker",
}
# One trained model kept per (training data, config) so the no-ranker ablation reuses it.
_CACHE: dict[str, Any] = {}


def _fingerprint(train: TrainData, config: dict[str, Any]) -> str:
    h = hashlib.sha256(repr(sorted(config.items())).encode())
    h.update(train.dataset.name.encode())
    for arr in (train.train.user, train.train.item, train.train.timestamp):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(str(train.seed).encode())
    return h.hexdigest()


class ColdStartRecommender:
    def __init__(self, name: str, seed: int, options: Options) -> None:
        from services.trainer.model.config import ModelConfig

        self.name = name
        self.seed = seed
        merged = {**_VARIANTS[name], **dict(options)}
        self.config = ModelConfig().with_options(seed=seed, **merged)
        self._model: Any = None
        self._unliked: dict[int, np.ndarray] = {}

    def fit(self, train: TrainData) -> None:
        import torch

        # One thread: on the shared 2-core machine a second OpenMP thread mostly spins
        # (measured 2-5x slower steps under load); restored after the fit.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._fit(train)
        finally:
            torch.set_num_threads(threads)

    def _fit(self, train: TrainData) -> None:
        from services.trainer.model.dataset import from_train_data
        from services.trainer.model.distributed import DistContext
        from services.trainer.model.recommender import ScoringModel
        from services.trainer.model.train import train as train_model

        cfg = self.config
        # The towers do not depend on use_ranker: key them on everything else.
        tower_key = _fingerprint(train, {**cfg.to_dict(), "use_ranker": True})
        # The new-item blend's unliked term: what each user rated low in training.
        self._unliked = train.unliked_by_user()
        cached = _CACHE.get(tower_key)
        if cached is not None and (not cfg.use_ranker or cached.result.ranker is not None):
            self._model = cached
            return
        data = from_train_data(
            train,
            cfg.dim + 1,
            cfg.max_history,
            derive_year=cfg.derive_year,
            rated=cfg.rated_history,
        )
        result = train_model(data, cfg, DistContext.single())
        self._model = ScoringModel(result)
        _CACHE.clear()  # one entry: the next fit is on other data
        _CACHE[tower_key] = self._model

    def score(self, request: ScoreRequest) -> np.ndarray:
        if self._model is None:
            raise RuntimeError(f"{self.name}: score() before fit()")
        model = self._model
        spec = model.data.spec
        user_attrs = spec.user_vocab.from_blocks(len(request), request.user_attributes)
        interest = None
        if request.user_text and any(request.user_text):
            from services.trainer.model.dataset import user_interest_vectors

            interest = user_interest_vectors(list(request.user_text))
        users = np.asarray(request.users, dtype=np.int64)
        none = np.zeros(0, dtype=np.int64)
        unliked = [self._unliked.get(int(u), none) for u in users]
        histories = [np.asarray(h, dtype=np.int64) for h in request.history]
        if self.config.rated_history:  # the towers learned from every rated item: pool them all
            histories = [np.concatenate([h, u]) for h, u in zip(histories, unliked, strict=True)]
            unliked = [none] * len(histories)
        scores: np.ndarray = model.score(
            users,
            user_attrs,
            histories,
            np.asarray(request.candidates, dtype=np.int64),
            interest=interest,
            use_ranker=self.config.use_ranker,
            unliked=unliked,
        )
        return scores


def _factory(name: str) -> Any:
    def make(seed: int, options: Options) -> Recommender:
        return ColdStartRecommender(name, seed, options)

    return make


for _name in _VARIANTS:
    register(_name, _factory(_name), _DESCRIPTIONS[_name])
