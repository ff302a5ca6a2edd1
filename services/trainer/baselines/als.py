"""Matrix factorisation: implicit-feedback ALS (the ``implicit`` package).

Users in training use their learned factors. A user with no training rows
(user cold-start) is *folded in*: their factor is the least-squares solution
against the fixed item factors given the revealed history, the same update
ALS itself makes. With no history at all the model has nothing to go on and
falls back to popularity. Cold items have no factors: ALS cannot rank them
(their scores are flat, i.e. random after tie-breaking), as expected of a
purely collaborative model.
"""

from __future__ import annotations

import numpy as np

from services.trainer.baselines.base import ScoreRequest, TrainData
from services.trainer.baselines.common import popularity_scores


class ALS:
    name = "als"

    def __init__(
        self,
        seed: int = 0,
        factors: int = 64,
        regularization: float = 1.0,
        alpha: float = 5.0,
        iterations: int = 15,
        threads: int = 2,
    ) -> None:
        self.seed = seed
        self.factors = int(factors)
        self.regularization = float(regularization)
        self.alpha = float(alpha)
        self.iterations = int(iterations)
        self.threads = int(threads)
        self.user_factors = np.zeros((0, 0))
        self.item_factors = np.zeros((0, 0))
        self.known_users = np.zeros(0, dtype=bool)
        self.popularity = np.zeros(0)
        self._gram = np.zeros((0, 0))

    def fit(self, train: TrainData) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        # implicit parallelises itself; a multi-threaded BLAS underneath only contends
        # (and implicit warns about it when the model is built).
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
                num_threads=self.threads,
                calculate_training_loss=False,
            )
            model.fit(train.positives.tocsr().astype(np.float32), show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float64)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float64)
        self.known_users = train.user_train_counts() > 0
        item_seen = train.item_train_counts() > 0
        # Unseen items keep their random initial factors in implicit; zero them so
        # they score 0 (flat), not noise that looks like a preference.
        self.item_factors[~item_seen] = 0.0
        self.popularity = popularity_scores(train)
        self._gram = self.item_factors.T @ self.item_factors

    def fold_in(self, history: np.ndarray) -> np.ndarray:
        """argmin_x sum_i c_i (p_i - x.y_i)^2 + reg |x|^2, the user step of ALS.

        implicit's confidence is ``alpha * value`` on observed items and 1 elsewhere.
        """
        y = self.item_factors[history]
        a = self._gram + (self.alpha - 1.0) * (y.T @ y) + self.regularization * np.eye(self.factors)
        b = self.alpha * y.sum(axis=0)
        return np.linalg.solve(a, b)

    def score(self, request: ScoreRequest) -> np.ndarray:
        cand = self.item_factors[request.candidates]
        out = np.empty((len(request), len(request.candidates)))
        for row, (user, history) in enumerate(zip(request.users, request.history, strict=True)):
            if user < len(self.known_users) and self.known_users[user]:
                out[row] = cand @ self.user_factors[user]
            elif len(history):
                out[row] = cand @ self.fold_in(np.asarray(history))
            else:
                out[row] = self.popularity[request.candidates]
        return out
