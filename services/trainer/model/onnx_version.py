"""A registry version served the way the fusion service serves it: ONNX Runtime,
numpy and the shared feature builder, no torch.

Used by export (to check the exported version end to end against the torch
model) and by tests; it is also the reference for how to read a version's
manifest (format ``coldstart.recommender/2``, see docs/MODEL.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.recsys_features import (
    FeatureSpec,
    RankerTables,
    blend_standardised,
    has_stated_interest,
    item_tower_inputs,
    new_item_head,
    new_item_head_scores,
    ranker_applies,
    ranker_features,
    segment_prior,
    short_history_prior_applies,
    user_tower_inputs,
)

FORMAT = "coldstart.recommender/2"


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxVersion:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = json.loads((self.folder / "manifest.json").read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: manifest format is not {FORMAT}")
        m = self.manifest
        files = m["files"]
        self.spec = FeatureSpec.from_json(m["feature_spec"])
        self.user = _session(self.folder / files["user_tower"])
        self.item = _session(self.folder / files["item_tower"])
        self.ranker = (
            _session(self.folder / files["ranker"]) if m["ranker"].get("enabled") else None
        )
        self.item_ids: list[str] = json.loads((self.folder / files["item_ids"]).read_text())
        self.item_vectors = np.load(self.folder / files["item_vectors"])
        self.item_codes = np.load(self.folder / files["item_codes"])
        self.user_codes: dict[str, int] = json.loads(
            (self.folder / files["user_codes"]).read_text()
        )
        self.tables = RankerTables(
            content=np.load(self.folder / files["content_vectors"]),
            item_attrs=np.load(self.folder / files["item_attributes"]),
            pop=np.load(self.folder / files["popularity"]),
            seg_counts=np.load(self.folder / files["segment_counts"]),
            seg_sizes=np.load(self.folder / files["segment_sizes"]),
            n_users=int(m["ranker"]["popularity_users"]),
        )
        self.n_candidates = int(m["ranker"]["candidates"])
        # The new-item blend (absent from versions before it: the tower order stands).
        new_items = m["ranker"].get("new_items", {})
        self.new_item_weight = float(new_items.get("content_weight", 0))
        self.new_item_map_weight = float(new_items.get("map_weight", 0))
        self.new_item_unliked_weight = float(new_items.get("unliked_weight", 0))
        # The short-history prior (absent from versions before it: weight 0, off).
        short = m["ranker"].get("short_history", {})
        self.prior_weight = float(short.get("prior_weight", 0.0))
        self.prior_max_history = int(short.get("max_history", -1))
        self.prior_fields = tuple(short.get("fields", ()))
        self.thresholds = (
            np.load(self.folder / files["content_thresholds"])
            if self.new_item_weight > 0 or self.new_item_map_weight > 0
            else np.zeros(0, dtype=np.float32)
        )
        self.content_map = (
            np.load(self.folder / files["content_map"]) if self.new_item_map_weight > 0 else None
        )
        self.item_row = {item: r for r, item in enumerate(self.item_ids)}
        self.user_attributes: dict[str, np.ndarray] = {}
        if "user_ids" in files and (self.folder / files["user_ids"]).is_file():
            ids = json.loads((self.folder / files["user_ids"]).read_text())
            rows = np.load(self.folder / files["user_attributes"])
            self.user_attributes = {str(u): rows[i] for i, u in enumerate(ids)}

    def item_vecs(
        self, content: np.ndarray, item_attrs: np.ndarray, item_codes: np.ndarray
    ) -> np.ndarray:
        out: np.ndarray = self.item.run(None, item_tower_inputs(content, item_attrs, item_codes))[0]
        return out

    def user_vecs(
        self,
        user_attrs: np.ndarray,
        user_codes: np.ndarray,
        histories: Sequence[np.ndarray],
        interest: np.ndarray | None = None,
    ) -> np.ndarray:
        inputs = user_tower_inputs(
            self.spec, user_attrs, user_codes, histories, self.item_vectors, interest
        )
        out: np.ndarray = self.user.run(None, inputs)[0]
        return out

    def rank(
        self,
        user_attrs: np.ndarray,
        user_codes: np.ndarray,
        histories: Sequence[np.ndarray],
        candidates: np.ndarray,
        interest: np.ndarray | None = None,
        unliked: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tower scores over ``candidates`` (item rows) and ranker scores of each user's head.
        ``histories``: liked items; ``unliked``: rated below the positive threshold (the
        new-item blend's unliked term reads them).

        Returns (head candidates (n, h) as item rows, ranker scores (n, h)), the head
        being each user's top ``n_candidates`` by tower score, history excluded.
        """
        uvecs = self.user_vecs(user_attrs, user_codes, histories, interest)
        tower = uvecs @ self.item_vectors[candidates].T
        for r, hist in enumerate(histories):
            tower[r, np.isin(candidates, hist)] = -np.inf
        h = min(self.n_candidates, len(candidates))
        part = np.argpartition(-tower, h - 1, axis=1)[:, :h]
        order = np.argsort(-np.take_along_axis(tower, part, axis=1), axis=1, kind="stable")
        head = np.take_along_axis(part, order, axis=1)
        head_items = candidates[head]
        head_scores = np.take_along_axis(tower, head, axis=1)
        scores = np.array(head_scores, dtype=np.float32)
        ranker_section = self.manifest["ranker"]
        gate = ranker_section.get("gate", {})
        max_new_share = float(gate.get("max_new_share", 0.5))
        ranked = []
        new_head = np.zeros(len(histories), dtype=bool)
        for r, hist in enumerate(histories):
            pops = self.tables.pop[head_items[r]]
            new_head[r] = new_item_head(pops, max_new_share)
            if new_head[r]:
                if (self.new_item_weight > 0 or self.new_item_map_weight > 0) and len(hist):
                    scores[r] = new_item_head_scores(
                        self.tables.content,
                        head_items[r],
                        self.thresholds[head_items[r]],
                        head_scores[r],
                        hist,
                        self.new_item_weight,
                        uvecs[r],
                        self.content_map,
                        self.new_item_map_weight,
                        None if unliked is None else unliked[r],
                        self.new_item_unliked_weight,
                    )
            elif self.ranker is not None and ranker_applies(
                len(hist),
                pops,
                gate["min_history"],
                max_new_share,
                gate.get("max_history", -1),
            ):
                ranked.append(r)
        if ranked and self.ranker is not None:
            rows = np.asarray(ranked)
            feats = ranker_features(
                self.spec,
                self.tables,
                head_scores[rows],
                user_attrs[rows],
                [histories[r] for r in ranked],
                head_items[rows],
                interest=None if interest is None else interest[rows],
            )
            n, c, f = feats.shape
            out = self.ranker.run(None, {"features": feats.reshape(n * c, f)})[0]
            scores[rows] = out.reshape(n, c)
        if self.prior_weight > 0:
            for r, hist in enumerate(histories):
                stated = has_stated_interest(None if interest is None else interest[r])
                if short_history_prior_applies(
                    len(hist), self.prior_max_history, new_head[r], stated
                ):
                    prior = segment_prior(
                        self.spec,
                        self.tables,
                        user_attrs[r : r + 1],
                        head_items[r : r + 1],
                        self.prior_fields,
                    )
                    scores[r] = blend_standardised(scores[r], prior[0], self.prior_weight)
        return head_items, scores


# Scores outside each user's re-ranked head sit this far below it (finite).
TAIL_OFFSET = 1.0e4


class VersionScorer(OnnxVersion):
    """The trainer's gate interface (``services.trainer.retrain.Scorer``) over a version:
    external ids in, (users x candidates) scores out, ranker order on each user's head."""

    def score(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        candidates: Sequence[str],
    ) -> np.ndarray:
        width = self.spec.user_vocab.width
        blank = np.zeros(width, dtype=np.float32)
        blank[0] = 1.0
        attrs = np.stack([self.user_attributes.get(str(u), blank) for u in user_ids])
        codes = np.array([self.user_codes.get(str(u), 0) for u in user_ids], dtype=np.int64)
        hists = [
            np.array([self.item_row[i] for i in h if i in self.item_row], dtype=np.int64)
            for h in histories
        ]
        known = np.array([c in self.item_row for c in candidates])
        rows = np.array([self.item_row.get(c, 0) for c in candidates], dtype=np.int64)
        uvecs = self.user_vecs(attrs, codes, hists)
        tower = (uvecs @ self.item_vectors[rows].T).astype(np.float64)
        out = tower - TAIL_OFFSET
        head, scores = self.rank(attrs, codes, hists, rows[known])
        position = {int(r): j for j, r in enumerate(rows)}
        for u in range(len(user_ids)):
            # Heads the ranker or the blend left alone hold tower scores: same order.
            for item, value in zip(head[u], scores[u], strict=True):
                out[u, position[int(item)]] = float(value)
        out[:, ~known] = -np.inf  # an id this version has never seen cannot be scored
        return out


def scorer(folder: Path) -> VersionScorer:
    """``module:function`` named by the manifest's "scorer" key."""
    return VersionScorer(Path(folder))
