"""Serving the trainer's export (manifest format ``coldstart.recommender/2``).

Written by ``services/trainer/model/export.py``; every input is built with the
shared, torch-free ``services.common.recsys_features`` (the functions training
used), so a served user vector or ranker score is the model's own:

    user_tower.onnx   user_attrs, user_id, interest, has_interest, hist_vec, hist_len -> [B, D]
    item_tower.onnx   content, item_attrs, item_id -> [B, D] (D = dim + 1: the item bias
                      rides in the last dimension, so inner-product search is unchanged)
    ranker.onnx       features [N, F] -> score [N]   (optional: ``ranker.enabled``)
    item_ids.json, item_vectors.npy, content_vectors.npy, item_attributes.npy,
    item_codes.npy, popularity.npy, segment_counts.npy, segment_sizes.npy,
    user_codes.json, items.faiss (built at load when absent), items.jsonl (optional)

Differences from the provisional format, handled here and nowhere else:

- A user's history pools **item vectors** (the index rows, upserted items
  included), not content; users seen in training get their id code from
  ``user_codes.json`` (0 = none, e.g. a new user).
- An upserted item's attributes are its own plus ``derived_item_attributes(text)``
  (the year band read off its text, as the trainer derives it).
- An upserted item gets the item tower with id 0 and, in the ranker, the
  features of an item without interaction data (popularity and segment counts
  0, ``item_is_new`` 1), as training showed new items to the ranker.
- Item metadata for filters comes from the multi-hot ``item_attributes`` and
  the vocabulary: a field with one value becomes ``attributes[field]``, every
  value of a field with several values set becomes a tag (``items.jsonl`` in
  the folder, when present, gives text, attributes and tags instead).
- SimilarItems searches with the item's direction and 0 in the bias dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort

from services.common import ann as ann_kinds
from services.common.recsys_features import (
    FeatureSpec,
    RankerTables,
    blend_standardised,
    derived_item_attributes,
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
from services.fusion.index import ItemIndex, ItemMeta, build_hnsw
from services.fusion.model_version import (
    RECSYS_FORMAT,
    ModelLoadError,
    ModelVersion,
    UserInputs,
    VersionFiles,
    declared_candidates,
    first_line,
    positive_threshold,
    read_manifest,
)

FORMAT = RECSYS_FORMAT
DEFAULT_FILES = {
    "user_tower": "user_tower.onnx",
    "item_tower": "item_tower.onnx",
    "ranker": "ranker.onnx",
    "item_ids": "item_ids.json",
    "user_codes": "user_codes.json",
    "item_codes": "item_codes.npy",
    "item_vectors": "item_vectors.npy",
    "content_vectors": "content_vectors.npy",
    "content_thresholds": "content_thresholds.npy",
    "content_map": "content_map.npy",
    "item_attributes": "item_attributes.npy",
    "popularity": "popularity.npy",
    "segment_counts": "segment_counts.npy",
    "segment_sizes": "segment_sizes.npy",
    "index": "items.faiss",
    "items": "items.jsonl",
}


class RecsysModelVersion(ModelVersion):
    """The ``ModelVersion`` serving interface over a format-2 version folder."""

    def __init__(
        self,
        version: str,
        manifest: Mapping[str, Any],
        spec: FeatureSpec,
        user_session: ort.InferenceSession,
        item_session: ort.InferenceSession,
        ranker_session: ort.InferenceSession | None,
        index: ItemIndex,
        tables: RankerTables,
        user_codes: Mapping[str, int],
        thresholds: np.ndarray | None = None,
        content_map: np.ndarray | None = None,
    ) -> None:
        # Not ModelVersion.__init__: that one reads the provisional manifest's sections.
        self.version = version
        self.manifest = manifest
        self.spec = spec
        self.dimension = int(manifest["dimension"])
        self.content_dimension = int(manifest["content_dimension"])
        self._user = user_session
        self._item = item_session
        self._ranker = ranker_session
        self._user_output = user_session.get_outputs()[0].name
        self._item_output = item_session.get_outputs()[0].name
        ranker = manifest.get("ranker", {})
        self.ranker_input = str(ranker.get("input", "features"))
        self.ranker_output = str(ranker.get("output", "score"))
        self.ranker_features = spec.ranker_feature_names()
        self.ranker_candidates = declared_candidates(version, manifest)
        self.positive_threshold = positive_threshold(version, manifest)
        self.index = index
        self.tables = tables
        self.user_codes = dict(user_codes)
        # The new-item blend: weight 0 (and no thresholds) in versions before it.
        new_items = ranker.get("new_items", {})
        self.new_item_weight = float(new_items.get("content_weight", 0.0))
        # Its content-map term: weight 0 (and no map) in versions before it.
        self.new_item_map_weight = (
            float(new_items.get("map_weight", 0.0)) if content_map is not None else 0.0
        )
        self.content_map = content_map
        # Its term for the items the user rated low: weight 0 in versions before it.
        self.new_item_unliked_weight = unliked_weight(version, manifest)
        self.max_new_share = float(ranker.get("gate", {}).get("max_new_share", 0.5))
        # The short-history prior: weight 0 (off) in versions before it.
        short = ranker.get("short_history", {})
        self.prior_weight = float(short.get("prior_weight", 0.0))
        self.prior_max_history = int(short.get("max_history", -1))
        self.prior_fields = tuple(str(f) for f in short.get("fields", ()))
        self.thresholds = np.zeros(0, dtype=np.float32) if thresholds is None else thresholds
        # An upserted item has no threshold of its own (until a retrain exports one): it
        # gets the catalog's median, a typical neighbourhood's size.
        self.upserted_threshold = (
            float(np.median(self.thresholds)) if len(self.thresholds) else float("inf")
        )

    # -- loading ----------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: Path,
        *,
        intra_op_threads: int = 1,
        ef_search: int = 0,
        nprobe: int = 0,
        fold_threshold: int = 5_000,
    ) -> RecsysModelVersion:
        path = Path(path)
        manifest = read_manifest(path)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ModelLoadError(f"{path}/manifest.json: not a {FORMAT} manifest")
        for key in ("dimension", "content_dimension"):
            if not isinstance(manifest.get(key), int) or manifest[key] <= 0:
                raise ModelLoadError(f"{path}/manifest.json: {key} must be a positive integer")
        try:
            spec = FeatureSpec.from_json(manifest["feature_spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"{path}/manifest.json: feature_spec unreadable ({first_line(exc)})"
            ) from None
        if spec.text_dim != manifest["content_dimension"]:
            raise ModelLoadError(
                f"{path}/manifest.json: feature_spec.text_dim {spec.text_dim} != "
                f"content_dimension {manifest['content_dimension']}"
            )
        # Checked before any file is read: a bad value names the manifest.
        positive_threshold(f"{path}/manifest.json", manifest)
        unliked = unliked_weight(f"{path}/manifest.json", manifest)
        files = {**DEFAULT_FILES, **(manifest.get("files") or {})}
        ranker_enabled = bool(manifest.get("ranker", {}).get("enabled", True))

        folder = VersionFiles(path, files, intra_op_threads)
        session, array, json_file = folder.session, folder.array, folder.json

        user_session = session("user_tower")
        item_session = session("item_tower")
        ranker_session = session("ranker") if ranker_enabled else None
        ids = json_file("item_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ModelLoadError(f"{path / files['item_ids']}: must be a list of strings")
        user_codes = json_file("user_codes")
        if not isinstance(user_codes, dict) or not all(
            isinstance(c, int) for c in user_codes.values()
        ):
            raise ModelLoadError(f"{path / files['user_codes']}: must map user ids to integers")
        n = len(ids)
        dimension, content_dimension = manifest["dimension"], manifest["content_dimension"]
        vectors = array("item_vectors").astype(np.float32, copy=False)
        content = array("content_vectors").astype(np.float32, copy=False)
        item_attrs = array("item_attributes").astype(np.float32, copy=False)
        popularity = array("popularity").astype(np.float32, copy=False)
        seg_counts = array("segment_counts").astype(np.float32, copy=False)
        seg_sizes = array("segment_sizes").astype(np.float32, copy=False)
        array("item_codes")  # present and readable; an item's code is its row + 1
        for role, got, want in (
            ("item_vectors", vectors.shape, (n, dimension)),
            ("content_vectors", content.shape, (n, content_dimension)),
            ("item_attributes", item_attrs.shape, (n, spec.item_vocab.width)),
            ("popularity", popularity.shape, (n,)),
            ("segment_counts", seg_counts.shape, (spec.user_vocab.width, n)),
            ("segment_sizes", seg_sizes.shape, (spec.user_vocab.width,)),
        ):
            if tuple(got) != want:
                raise ModelLoadError(f"{path / files[role]}: shape {tuple(got)}, expected {want}")
        items_path = path / files["items"]
        metas = (
            ModelVersion._read_items(items_path, ids)
            if items_path.is_file()
            else _metas_from_attributes(ids, item_attrs, spec)
        )
        index_path = path / files["index"]
        ann: faiss.Index
        if index_path.is_file():
            try:
                ann = faiss.read_index(str(index_path))
            except RuntimeError as exc:
                raise ModelLoadError(
                    f"{index_path}: cannot read faiss index ({first_line(exc)})"
                ) from None
            if ann.ntotal != n or ann.d != dimension:
                raise ModelLoadError(
                    f"{index_path}: holds {ann.ntotal} vectors of dimension {ann.d}, "
                    f"expected {n} of {dimension}"
                )
            if ann_kinds.kind_of(ann) is None:
                # A kind the search cannot pass parameters to: rebuilt as HNSW.
                ann = build_hnsw(vectors)
        else:
            ann = build_hnsw(vectors)
        index = ItemIndex(
            metas,
            vectors,
            content,
            popularity,
            ann,
            ef_search=ef_search,
            nprobe=nprobe,
            fold_threshold=fold_threshold,
        )
        tables = RankerTables(
            content=content,
            item_attrs=item_attrs,
            pop=popularity,
            seg_counts=seg_counts,
            seg_sizes=seg_sizes,
            n_users=int(manifest.get("ranker", {}).get("popularity_users", 0)),
        )
        thresholds = None
        new_items = manifest.get("ranker", {}).get("new_items", {})
        if (
            float(new_items.get("content_weight", 0)) > 0
            or float(new_items.get("map_weight", 0)) > 0
            or unliked > 0
        ):
            thresholds = array("content_thresholds").astype(np.float32, copy=False)
            if thresholds.shape != (n,):
                raise ModelLoadError(
                    f"{path / files['content_thresholds']}: shape {thresholds.shape}, "
                    f"expected {(n,)}"
                )
        cmap = None
        if float(new_items.get("map_weight", 0)) > 0:
            cmap = array("content_map").astype(np.float32, copy=False)
            if cmap.shape != (content_dimension, dimension):
                raise ModelLoadError(
                    f"{path / files['content_map']}: shape {cmap.shape}, "
                    f"expected {(content_dimension, dimension)}"
                )
        version = str(manifest.get("version") or path.name)
        model = cls(
            version,
            manifest,
            spec,
            user_session,
            item_session,
            ranker_session,
            index,
            tables,
            user_codes,
            thresholds,
            cmap,
        )
        model.check()
        return model

    def check(self) -> None:
        """Run every graph once on neutral inputs; shapes must match the manifest."""
        empty = UserInputs({}, None, np.empty(0, dtype=np.int64))
        try:
            user = self.user_vector_batch([empty])
            item = self.item_vectors(np.zeros((1, self.content_dimension), np.float32), [{}])
            scores = self.rank_batch([empty], [np.arange(min(3, self.index.base_count))], user)
        except Exception as exc:
            raise ModelLoadError(
                f"{self.version}: a graph does not match the manifest ({first_line(exc)})"
            ) from None
        if user.shape != (1, self.dimension) or item.shape != (1, self.dimension):
            raise ModelLoadError(
                f"{self.version}: towers output {user.shape} / {item.shape}, "
                f"manifest dimension {self.dimension}"
            )
        if scores[0].shape != (min(3, self.index.base_count),):
            raise ModelLoadError(f"{self.version}: ranker outputs {scores[0].shape} for 3 rows")

    # -- the serving interface ------------------------------------------------
    def user_vector_batch(self, users: Sequence[UserInputs]) -> np.ndarray:
        inputs = self.user_inputs(users)
        (out,) = self._user.run([self._user_output], inputs)
        return np.asarray(out, dtype=np.float32)

    def user_inputs(self, users: Sequence[UserInputs]) -> dict[str, np.ndarray]:
        """The user tower's ONNX inputs, built by the shared feature builder."""
        return user_tower_inputs(
            self.spec,
            self.spec.user_vocab.encode([u.attributes for u in users]),
            np.asarray([self.user_codes.get(u.user_id, 0) for u in users], dtype=np.int64),
            [u.history_rows for u in users],
            self.index.all_vectors(),
            self._interest(users),
        )

    def _interest(self, users: Sequence[UserInputs]) -> np.ndarray:
        interest = np.zeros((len(users), self.content_dimension), dtype=np.float32)
        for i, user in enumerate(users):
            if user.interest is not None:
                interest[i] = user.interest
        return interest

    def rank_batch(
        self,
        users: Sequence[UserInputs],
        rows: Sequence[np.ndarray],
        user_vecs: np.ndarray,
        dots: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """``dots``: the rows' tower scores when the caller has them (see ModelVersion)."""
        sizes = [len(r) for r in rows]
        width = max(sizes, default=0)
        if width == 0:
            return [np.empty(0, dtype=np.float32) for _ in rows]
        # Pad every user's candidates to one width with a repeat of its last candidate
        # (features are per candidate, so padding changes no real row) and build the
        # features of the whole batch in one call of the shared builder.
        live = [n for n, size in enumerate(sizes) if size]
        padded = _pad_rows([rows[n] for n in live], width, np.int64)
        if dots is not None:
            tower = _pad_rows([dots[n] for n in live], width, np.float32)
        else:
            tower = np.einsum("ncd,nd->nc", self.index.vectors(padded), user_vecs[live])
        scores = tower
        ranker = self._ranker
        # The trained gate: outside it the tower order stands (as in training's eval),
        # so features are built and the ranker run only for the users inside it.
        ranked = (
            [
                j
                for j, n in enumerate(live)
                if self._ranker_applies(len(users[n].history_rows), padded[j, : sizes[n]])
            ]
            if ranker is not None
            else []
        )
        if ranker is not None and ranked:
            ranked_users = [users[live[j]] for j in ranked]
            ranked_rows = padded[ranked]
            histories = [u.history_rows for u in ranked_users]
            tables, local = self._local_tables(ranked_rows, histories)
            feats = ranker_features(
                self.spec,
                tables,
                tower[ranked],
                self.spec.user_vocab.encode([u.attributes for u in ranked_users]),
                [local(h) for h in histories],
                local(ranked_rows),
                interest=self._interest(ranked_users),
            )
            count, cands, features = feats.shape
            (out,) = ranker.run(
                [self.ranker_output], {self.ranker_input: feats.reshape(count * cands, features)}
            )
            scores = np.array(tower, dtype=np.float32)
            scores[ranked] = np.asarray(out, dtype=np.float32).reshape(count, cands)
        blended = (
            [
                j
                for j, n in enumerate(live)
                if len(users[n].history_rows)
                and new_item_head(self._head_pop(padded[j, : sizes[n]]), self.max_new_share)
            ]
            if self.new_item_weight > 0
            or self.new_item_map_weight > 0
            or self.new_item_unliked_weight > 0
            else []
        )
        if blended:
            histories = [users[live[j]].history_rows for j in blended]
            # The unliked items' term only where it has a weight (else nothing to map).
            unliked_rows = [
                users[live[j]].unliked_rows
                if self.new_item_unliked_weight > 0
                else np.empty(0, dtype=np.int64)
                for j in blended
            ]
            tables, local = self._local_tables(padded[blended], [*histories, *unliked_rows])
            scores = np.array(scores, dtype=np.float32)
            for j, history, unliked in zip(blended, histories, unliked_rows, strict=True):
                rows_j = padded[j, : sizes[live[j]]]
                # The trainer's scorers call the same function (recsys_features), over
                # this batch's local tables: blend_new_items of the tower score, the
                # content-knn scores against the liked and the unliked items, the map term.
                scores[j, : len(rows_j)] = new_item_head_scores(
                    tables.content,
                    local(rows_j),
                    self._thresholds_of(rows_j),
                    tower[j, : len(rows_j)],
                    local(history),
                    self.new_item_weight,
                    user_vecs[live[j]],
                    self.content_map,
                    self.new_item_map_weight,
                    local(unliked),
                    self.new_item_unliked_weight,
                )
        if self.prior_weight > 0:
            scores = self._blend_prior(users, live, padded, sizes, scores)
        result = [np.empty(0, dtype=np.float32) for _ in rows]
        for j, n in enumerate(live):
            result[n] = np.ascontiguousarray(scores[j, : sizes[n]], dtype=np.float32)
        return result

    def _blend_prior(
        self,
        users: Sequence[UserInputs],
        live: list[int],
        padded: np.ndarray,
        sizes: list[int],
        scores: np.ndarray,
    ) -> np.ndarray:
        """The short-history prior (as the trainer's ScoringModel applies it): a short
        history's candidates re-scored as their standardised scores + prior_weight x
        standardised segment_prior. Upserted rows have no counts: the prior puts them low."""
        chosen = [
            j
            for j, n in enumerate(live)
            if short_history_prior_applies(
                len(users[n].history_rows),
                self.prior_max_history,
                new_item_head(self._head_pop(padded[j, : sizes[n]]), self.max_new_share),
                has_stated_interest(users[n].interest),
            )
        ]
        if not chosen:
            return scores
        tables, local = self._local_tables(padded[chosen], [], counts_only=True)
        attrs = self.spec.user_vocab.encode([users[live[j]].attributes for j in chosen])
        # One call for the batch: padding repeats a real candidate and is cut off below.
        prior = segment_prior(self.spec, tables, attrs, local(padded[chosen]), self.prior_fields)
        out = np.array(scores, dtype=np.float32)
        width = padded.shape[1]
        full = [i for i, j in enumerate(chosen) if sizes[live[j]] == width]
        if full:  # the usual case, every user given the same number of candidates: one call
            rows = [chosen[i] for i in full]
            out[rows] = blend_standardised(out[rows], prior[full], self.prior_weight)
        for i, j in enumerate(chosen):
            size = sizes[live[j]]
            if size < width:  # padded: standardise over the real candidates only
                out[j, :size] = blend_standardised(
                    out[j, :size], prior[i, :size], self.prior_weight
                )
        return out

    def _ranker_applies(self, history_len: int, candidate_rows: np.ndarray) -> bool:
        """``recsys_features.ranker_applies`` with the manifest's gate; an upserted row
        (past the base rows) is a new item, as is a base row without positives."""
        gate = self.manifest.get("ranker", {}).get("gate")
        if not gate:
            return True
        return ranker_applies(
            history_len,
            self._head_pop(candidate_rows),
            int(gate.get("min_history", 0)),
            float(gate.get("max_new_share", 1.0)),
            int(gate.get("max_history", -1)),
        )

    def _head_pop(self, candidate_rows: np.ndarray) -> np.ndarray:
        """Training positives of each candidate row; 0 for upserted rows (new items)."""
        rows = np.asarray(candidate_rows, dtype=np.int64)
        pop = np.zeros(len(rows), dtype=np.float32)
        old = rows < self.index.base_count
        pop[old] = self.tables.pop[rows[old]]
        return pop

    def _thresholds_of(self, candidate_rows: np.ndarray) -> np.ndarray:
        """Each row's content threshold; the catalog's median for upserted rows."""
        rows = np.asarray(candidate_rows, dtype=np.int64)
        out = np.full(len(rows), self.upserted_threshold, dtype=np.float32)
        old = rows < self.index.base_count
        out[old] = self.thresholds[rows[old]]
        return out

    def _local_tables(
        self, candidates: np.ndarray, histories: Sequence[np.ndarray], counts_only: bool = False
    ) -> tuple[RankerTables, Callable[[np.ndarray], np.ndarray]]:
        """Ranker tables over just the rows this batch touches (upserted rows included:
        content and attributes from the index, no interaction data), and the map from
        index rows to rows of those tables. ``counts_only``: just the counts (what the
        segment prior reads); content and attributes are left empty."""
        used = np.unique(np.concatenate([candidates.reshape(-1), *histories]).astype(np.int64))
        base = self.index.base_count
        old = used[used < base]
        new = used[used >= base]
        t = self.tables
        width = 0 if counts_only else t.item_attrs.shape[1]
        item_attrs = np.zeros((len(used), width), dtype=np.float32)
        pop = np.zeros(len(used), dtype=np.float32)
        pop[: len(old)] = t.pop[old]
        seg_counts = np.zeros((t.seg_counts.shape[0], len(used)), dtype=np.float32)
        seg_counts[:, : len(old)] = t.seg_counts[:, old]
        if not counts_only:
            item_attrs[: len(old)] = t.item_attrs[old]
        if len(new) and not counts_only:
            metas = [self.index.meta(int(r)) for r in new]
            item_attrs[len(old) :] = self.spec.item_vocab.encode(
                [item_attributes(m.attributes, m.text) for m in metas]
            )
        # ``used`` is sorted and old < new, so its order is the local order.
        content = (
            np.zeros((len(used), 0), dtype=np.float32) if counts_only else self.index.content(used)
        )
        tables = RankerTables(
            content=content,
            item_attrs=item_attrs,
            pop=pop,
            seg_counts=seg_counts,
            seg_sizes=t.seg_sizes,
            n_users=t.n_users,
        )

        def local(index_rows: np.ndarray) -> np.ndarray:
            return np.searchsorted(used, np.asarray(index_rows, dtype=np.int64))

        return tables, local

    def similarity_query(self, row: int) -> np.ndarray:
        """The item's direction with a 0 in the bias dimension: item-item scores are then
        the cosine of the item vectors (over the temperature), not cosine + bias product
        (which would make every item "similar" to the ones with the largest bias)."""
        vector = self.index.vectors(np.asarray([row]))[0].astype(np.float32, copy=True)
        direction = vector[:-1]
        norm = float(np.linalg.norm(direction))
        vector[:-1] = direction / norm if norm > 1e-12 else direction
        vector[-1] = 0.0
        return vector

    def item_vectors(
        self,
        content: np.ndarray,
        attributes: Sequence[Mapping[str, str]],
        texts: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Item tower outputs for new items: no id (code 0), as training's id-dropout."""
        texts = texts if texts is not None else [""] * len(attributes)
        inputs = item_tower_inputs(
            content,
            self.spec.item_vocab.encode(
                [item_attributes(a, t) for a, t in zip(attributes, texts, strict=True)]
            ),
            np.zeros(len(content), dtype=np.int64),
        )
        (out,) = self._item.run([self._item_output], inputs)
        return np.asarray(out, dtype=np.float32)

    def score(self, feature_rows: np.ndarray) -> np.ndarray:
        if self._ranker is None:
            raise RuntimeError(f"{self.version}: no ranker in this version")
        (out,) = self._ranker.run([self.ranker_output], {self.ranker_input: feature_rows})
        return np.asarray(out, dtype=np.float32).reshape(-1)


def unliked_weight(where: str, manifest: Mapping[str, Any]) -> float:
    """The manifest's ``ranker.new_items.unliked_weight`` (0.0 where absent): the new-item
    blend's weight for the content-knn score against the items the user rated low.
    ``where`` names the manifest in errors."""
    value = manifest.get("ranker", {}).get("new_items", {}).get("unliked_weight", 0.0)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not np.isfinite(value)
        or value < 0
    ):
        raise ModelLoadError(
            f"{where}: ranker.new_items.unliked_weight must be a number >= 0, got {value!r}"
        )
    return float(value)


def _pad_rows(parts: Sequence[np.ndarray], width: int, dtype: type) -> np.ndarray:
    """[len(parts), width]: each part, right-padded with its last value (``np.pad``'s
    "edge" mode without its per-call overhead)."""
    out: np.ndarray = np.empty((len(parts), width), dtype=dtype)
    for j, part in enumerate(parts):
        out[j, : len(part)] = part
        out[j, len(part) :] = part[-1]
    return out


def item_attributes(attributes: Mapping[str, str], text: str) -> dict[str, str]:
    """A new item's attributes as training saw them: its own plus those read off its text."""
    return {**attributes, **derived_item_attributes(text)}


def _metas_from_attributes(
    ids: Sequence[str], item_attrs: np.ndarray, spec: FeatureSpec
) -> list[ItemMeta]:
    """Versions written before items.jsonl: display fields from the attribute rows."""
    return [
        ItemMeta(item_id=item_id, attributes=attributes, tags=tags)
        for item_id, (attributes, tags) in zip(ids, spec.item_vocab.decode(item_attrs), strict=True)
    ]
