"""The trained model as the evaluation harness (and export) sees it.

Scoring is retrieval then ranking, as the fusion service does it: tower
scores over all candidates, the ranker re-scores each user's top
``ranker_candidates`` (history excluded), and everything else keeps its tower
order below them.
"""

from __future__ import annotations

import numpy as np
import torch

from services.common.recsys_features import (
    blend_standardised,
    content_map,
    content_thresholds,
    has_stated_interest,
    new_item_head,
    new_item_head_scores,
    prior_fields,
    ranker_applies,
    ranker_features,
    segment_prior,
    short_history_prior_applies,
)
from services.trainer.model.config import ModelConfig
from services.trainer.model.dataset import ModelData
from services.trainer.model.train import (
    TrainResult,
    _topk,
    item_vectors,
    ranker_tables,
    user_vectors,
)

# Scores outside the re-ranked head sit this far below it (finite, as the harness wants).
_TAIL_OFFSET = 1.0e4


class ScoringModel:
    """Inference over a TrainResult in torch (the ONNX graphs compute the same functions)."""

    def __init__(self, result: TrainResult) -> None:
        self.result = result
        self.data: ModelData = result.data
        self.cfg: ModelConfig = result.config
        self.item_vecs = item_vectors(result.towers, self.data)
        self.tables = ranker_tables(self.data, self.cfg.use_content)
        self.thresholds = content_thresholds(self.tables.content)
        self.content_map = content_map(self.tables.content, self.item_vecs, self.data.pop > 0)

    def user_vecs(
        self,
        users: np.ndarray | None,
        user_attrs: np.ndarray,
        histories: list[np.ndarray],
        interest: np.ndarray | None = None,
        unliked: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        codes = (
            np.zeros(len(histories), dtype=np.int64)
            if users is None
            else self.data.user_codes[users].astype(np.int64)
        )
        return user_vectors(
            self.result.towers,
            self.data,
            user_attrs,
            codes,
            histories,
            self.item_vecs,
            interest,
            unliked,
        )

    def score(
        self,
        users: np.ndarray | None,
        user_attrs: np.ndarray,
        histories: list[np.ndarray],
        candidates: np.ndarray,
        interest: np.ndarray | None = None,
        use_ranker: bool = True,
        unliked: list[np.ndarray] | None = None,
    ) -> np.ndarray:
        """(n_users, n_candidates) scores. ``histories``: each user's liked items;
        ``unliked``: the items they rated below the positive threshold (only the new-item
        blend reads them)."""
        uvecs = self.user_vecs(users, user_attrs, histories, interest, unliked)
        tower = uvecs @ self.item_vecs[candidates].T  # (n_users, n_candidates)
        ranker = self.result.ranker
        # The no-content ablation has no content for the blend either.
        weight = self.cfg.new_item_content_weight if self.cfg.use_content else 0.0
        map_weight = self.cfg.new_item_map_weight if self.cfg.use_content else 0.0
        unliked_weight = self.cfg.new_item_unliked_weight if self.cfg.use_content else 0.0
        prior_weight = self.cfg.prior_weight
        prior_on = prior_weight > 0 and self.cfg.prior_max_history >= 0
        blend_on = weight > 0 or map_weight > 0
        if not use_ranker or (ranker is None and not blend_on and not prior_on):
            return tower.astype(np.float64)
        n_head = min(self.cfg.ranker_candidates, len(candidates))
        masked = tower.copy()
        for r, hist in enumerate(histories):
            masked[r, np.isin(candidates, hist)] = -np.inf
        head = _topk(masked, n_head)  # positions into candidates
        out = tower.astype(np.float64) - _TAIL_OFFSET
        ranked = np.zeros(len(histories), dtype=bool)
        new_head = np.zeros(len(histories), dtype=bool)
        for r, hist in enumerate(histories):
            pops = self.data.pop[candidates[head[r]]]
            new_head[r] = new_item_head(pops, self.cfg.ranker_max_new_share)
            if new_head[r]:
                if blend_on and len(hist):
                    cands = candidates[head[r]]
                    out[r, head[r]] = new_item_head_scores(
                        self.data.content,
                        cands,
                        self.thresholds[cands],
                        tower[r, head[r]],
                        hist,
                        weight,
                        uvecs[r],
                        self.content_map,
                        map_weight,
                        None if unliked is None else unliked[r],
                        unliked_weight,
                    )
                else:
                    out[r] = tower[r]
            elif ranker is not None and ranker_applies(
                len(hist),
                pops,
                self.cfg.ranker_min_history,
                self.cfg.ranker_max_new_share,
                self.cfg.ranker_max_history,
            ):
                ranked[r] = True
            else:
                out[r] = tower[r]
        rows_all = np.flatnonzero(ranked)
        chunk = 128
        for start in range(0, len(rows_all), chunk):
            rows = rows_all[start : start + chunk]
            cand_rows = candidates[head[rows]]
            feats = ranker_features(
                self.data.spec,
                self.tables,
                np.take_along_axis(tower[rows], head[rows], axis=1),
                user_attrs[rows],
                [histories[r] for r in rows],
                cand_rows,
                interest=None if interest is None else interest[rows],
            )
            q, n, f = feats.shape
            assert ranker is not None
            with torch.no_grad():
                s = ranker(torch.from_numpy(feats.reshape(q * n, f))).numpy().reshape(q, n)
            for i in range(len(rows)):
                out[rows[i], head[rows[i]]] = s[i]
        if prior_on:
            self._blend_prior(
                out, tower, head, ranked, new_head, user_attrs, histories, candidates, interest
            )
        return out

    def _blend_prior(
        self,
        out: np.ndarray,
        tower: np.ndarray,
        head: np.ndarray,
        ranked: np.ndarray,
        new_head: np.ndarray,
        user_attrs: np.ndarray,
        histories: list[np.ndarray],
        candidates: np.ndarray,
        interest: np.ndarray | None,
    ) -> None:
        """The short-history prior, in place: each such user's head (ranker scores where
        the ranker ran, else tower scores) blended with the segment prior, the rest of
        the row kept below in tower order."""
        spec = self.data.spec
        fields = prior_fields(spec)
        for r, hist in enumerate(histories):
            stated = has_stated_interest(None if interest is None else interest[r])
            if not short_history_prior_applies(
                len(hist), self.cfg.prior_max_history, new_head[r], stated
            ):
                continue
            cands = candidates[head[r]]
            prior = segment_prior(spec, self.tables, user_attrs[r : r + 1], cands[None], fields)
            scores = out[r, head[r]] if ranked[r] else tower[r, head[r]]
            out[r] = tower[r] - _TAIL_OFFSET
            out[r, head[r]] = blend_standardised(scores, prior[0], self.cfg.prior_weight)
