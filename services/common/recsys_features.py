"""Model inputs from plain data: the one feature builder training and serving share.

The trainer builds every ONNX input of the cold-start model (user tower, item
tower, ranker) through these functions, and the fusion service calls the same
functions on its online state, so a served score is computed from exactly the
features the model was trained on. Pure numpy on purpose: the fusion service
never imports torch (nor scipy).

Conventions (also written into each registry version's manifest.json):

- Attribute vectors are multi-hot float32 rows over a vocabulary of
  ``(field, value)`` columns. Column 0 is a constant 1 (``ALWAYS_ON``) so the
  width is never 0, even for a catalog without attributes; unknown values set
  no column.
- Id codes: ``row + 1`` for an entity the model has an id embedding for, ``0``
  for "no id" (a new user or item). The towers were trained with ids dropped,
  so 0 is a normal input, not an error.
- A user's history is a list of item rows (into the version's item table),
  oldest first; only the last ``max_history`` are pooled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ALWAYS_ON = ("", "")
# Ranker features that do not depend on the attribute vocabularies, in column order.
BASE_RANKER_FEATURES: tuple[str, ...] = (
    "tower_score",
    "content_max_sim",
    "content_mean_sim",
    "interest_sim",
    "attr_affinity",
    "log_pop",
    "pop_share",
    "item_is_new",
    "log_hist_len",
    "hist_empty",
    "has_interest",
)


_YEAR = re.compile(r"\((\d{4})\)")
# Derived attributes the model adds to an item's own ones (same name in the vocabulary).
DERIVED_YEAR_FIELD = "_year"


def year_band(year: int) -> str:
    """Fine bands where catalogs are dense: single years from 1990, 5-year bands 1950-89."""
    if year >= 1990:
        return str(year)
    if year >= 1950:
        return f"{year - year % 5}-{year - year % 5 + 4}"
    return f"{year - year % 10}s"


def item_title(text: str) -> str:
    """What a person calls an item: its text up to the first " | " (catalog texts are
    "title | genres | ...", e.g. "Toy Story (1995) | Animation"), the whole text when it
    has no such part. Fusion's display fields and the gateway's fallback both read it."""
    return text.split(" | ", 1)[0].strip()


def derived_item_attributes(text: str) -> dict[str, str]:
    """Attributes read off an item's text: the release year band of "Title (1997) | ...".

    Catalog attributes are often coarse (a decade); the year in the title is a strong
    hint of how popular a brand-new item will be, and it is there the moment the item
    appears. Serving must call this on the same text the encoder saw.
    """
    found = _YEAR.findall(text)
    if not found:
        return {}
    year = int(found[-1])
    return {DERIVED_YEAR_FIELD: year_band(year)} if 1800 <= year <= 2100 else {}


@dataclass(frozen=True)
class AttributeVocab:
    """Column layout of a multi-hot attribute vector: ``(field, value)`` per column."""

    fields: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def columns(self) -> list[tuple[str, str]]:
        cols = [ALWAYS_ON]
        for name, values in self.fields:
            cols.extend((name, v) for v in values)
        return cols

    @property
    def width(self) -> int:
        return 1 + sum(len(values) for _, values in self.fields)

    def field_slices(self) -> dict[str, slice]:
        out: dict[str, slice] = {}
        start = 1
        for name, values in self.fields:
            out[name] = slice(start, start + len(values))
            start += len(values)
        return out

    def index(self) -> dict[str, dict[str, int]]:
        """field -> value -> column (the JSON form in the manifest)."""
        out: dict[str, dict[str, int]] = {}
        start = 1
        for name, values in self.fields:
            out[name] = {v: start + j for j, v in enumerate(values)}
            start += len(values)
        return out

    def encode(self, rows: Sequence[Mapping[str, str | Sequence[str]]]) -> np.ndarray:
        """Multi-hot rows from ``{field: value or [values]}`` dicts (unknowns ignored)."""
        index = self.index()
        out = np.zeros((len(rows), self.width), dtype=np.float32)
        out[:, 0] = 1.0
        for r, attrs in enumerate(rows):
            for name, value in attrs.items():
                columns = index.get(name)
                if columns is None:
                    continue
                values = [value] if isinstance(value, str) else list(value)
                for v in values:
                    j = columns.get(v)
                    if j is not None:
                        out[r, j] = 1.0
        return out

    def decode(self, rows: np.ndarray) -> list[tuple[dict[str, str], tuple[str, ...]]]:
        """Per multi-hot row, what filters and display fields read: the fields with one
        value as attributes, the values of fields with several as tags."""
        columns = self.columns  # column 0: always on
        out = []
        for row in rows:
            values: dict[str, list[str]] = {}
            for j in np.flatnonzero(row[1:] > 0) + 1:
                name, value = columns[int(j)]
                values.setdefault(name, []).append(value)
            attributes = {name: vs[0] for name, vs in values.items() if len(vs) == 1}
            tags = tuple(v for vs in values.values() if len(vs) > 1 for v in vs)
            out.append((attributes, tags))
        return out

    def from_blocks(self, n: int, blocks: Mapping[str, Any]) -> np.ndarray:
        """Multi-hot rows from per-field 0/1 matrices (anything with ``toarray`` or an array).

        A field missing from ``blocks`` stays empty; a block must have the field's width.
        """
        out = np.zeros((n, self.width), dtype=np.float32)
        out[:, 0] = 1.0
        for name, sl in self.field_slices().items():
            block = blocks.get(name)
            if block is None:
                continue
            dense = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
            if dense.shape != (n, sl.stop - sl.start):
                raise ValueError(
                    f"attribute {name!r}: got shape {dense.shape}, want {(n, sl.stop - sl.start)}"
                )
            out[:, sl] = dense
        return out

    def to_json(self) -> list[dict[str, Any]]:
        return [{"field": name, "values": list(values)} for name, values in self.fields]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> AttributeVocab:
        return cls(tuple((str(f["field"]), tuple(str(v) for v in f["values"])) for f in data))


@dataclass(frozen=True)
class FeatureSpec:
    """Everything needed to turn raw user/item state into the model's inputs."""

    user_vocab: AttributeVocab
    item_vocab: AttributeVocab
    text_dim: int
    item_vec_dim: int
    max_history: int
    # User fields whose values define popularity segments (ranker features).
    segment_fields: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def ranker_feature_names(self) -> list[str]:
        names = list(BASE_RANKER_FEATURES)
        names += [f"seg_share:{f}" for f in self.segment_fields]
        names += [f"user:{f}={v}" for f, v in self.user_vocab.columns[1:]]
        names += [f"item:{f}={v}" for f, v in self.item_vocab.columns[1:]]
        return names

    def to_json(self) -> dict[str, Any]:
        return {
            "user_vocab": self.user_vocab.to_json(),
            "item_vocab": self.item_vocab.to_json(),
            "text_dim": self.text_dim,
            "item_vec_dim": self.item_vec_dim,
            "max_history": self.max_history,
            "segment_fields": list(self.segment_fields),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureSpec:
        return cls(
            user_vocab=AttributeVocab.from_json(data["user_vocab"]),
            item_vocab=AttributeVocab.from_json(data["item_vocab"]),
            text_dim=int(data["text_dim"]),
            item_vec_dim=int(data["item_vec_dim"]),
            max_history=int(data["max_history"]),
            segment_fields=tuple(data.get("segment_fields", ())),
            extra=dict(data.get("extra", {})),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def item_tower_inputs(
    content: np.ndarray, item_attrs: np.ndarray, item_codes: np.ndarray
) -> dict[str, np.ndarray]:
    """ONNX inputs of the item tower: content vectors, attribute rows, id codes (0 = none)."""
    return {
        "content": np.ascontiguousarray(content, dtype=np.float32),
        "item_attrs": np.ascontiguousarray(item_attrs, dtype=np.float32),
        "item_id": np.ascontiguousarray(item_codes, dtype=np.int64),
    }


def pool_history(
    histories: Sequence[np.ndarray], item_vectors: np.ndarray, max_history: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean item vector of each user's last ``max_history`` items, and the history lengths.

    Empty histories pool to zeros; the length input tells the tower which case it is.
    """
    n = len(histories)
    pooled = np.zeros((n, item_vectors.shape[1]), dtype=np.float32)
    lengths = np.zeros((n, 1), dtype=np.float32)
    for r, hist in enumerate(histories):
        h = np.asarray(hist, dtype=np.int64)
        lengths[r, 0] = len(h)
        if len(h):
            pooled[r] = item_vectors[h[-max_history:]].mean(axis=0)
    return pooled, lengths


def user_tower_inputs(
    spec: FeatureSpec,
    user_attrs: np.ndarray,
    user_codes: np.ndarray,
    histories: Sequence[np.ndarray],
    item_vectors: np.ndarray,
    interest: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """ONNX inputs of the user tower.

    ``interest``: (n, text_dim) stated-interest vectors; an all-zero row means none.
    ``item_vectors``: the version's item-tower outputs (the ANN index rows).
    """
    n = len(histories)
    hist_vec, hist_len = pool_history(histories, item_vectors, spec.max_history)
    if interest is None:
        interest = np.zeros((n, spec.text_dim), dtype=np.float32)
    has_interest = (np.abs(interest).sum(axis=1, keepdims=True) > 0).astype(np.float32)
    return {
        "user_attrs": np.ascontiguousarray(user_attrs, dtype=np.float32),
        "user_id": np.ascontiguousarray(user_codes, dtype=np.int64),
        "interest": np.ascontiguousarray(interest, dtype=np.float32),
        "has_interest": has_interest,
        "hist_vec": hist_vec,
        "hist_len": hist_len,
    }


@dataclass(frozen=True)
class RankerTables:
    """Per-item tables the ranker features read (all rows in the version's item order).

    ``pop``: training positives per item (0 for a new item). ``seg_counts[c, i]``:
    positives of item i among users having user-attribute column c;
    ``seg_sizes[c]``: users having column c. ``n_users``: users counted in ``pop``.
    """

    content: np.ndarray
    item_attrs: np.ndarray
    pop: np.ndarray
    seg_counts: np.ndarray
    seg_sizes: np.ndarray
    n_users: int


def ranker_applies(
    history_len: int,
    head_pop: np.ndarray,
    min_history: int,
    max_new_share: float,
    max_history: int = -1,
) -> bool:
    """Whether the ranker re-scores this user's head, or the tower order stands.

    The ranker applies to users with ``min_history <= history_len <= max_history``
    (``max_history`` < 0: no upper bound) whose head has fewer than ``max_new_share``
    new items. Training picks the history range on held-out ranker queries (the
    bands where the ranker beat the tower order; docs/MODEL.md): on ML-100K it
    helps short histories of new users, on ml-latest-small nowhere. Among brand-new
    items its training data (items that only play "new") is too unlike real new
    items, hence the new-item share. Serving must apply the same rule.
    """
    if history_len < min_history:
        return False
    if 0 <= max_history < history_len:
        return False
    return bool(len(head_pop) == 0 or np.mean(head_pop <= 0) < max_new_share)


def new_item_head(head_pop: np.ndarray, max_new_share: float) -> bool:
    """Whether a head counts as new items (``ranker_applies`` leaves such heads alone)."""
    return bool(len(head_pop)) and float(np.mean(head_pop <= 0)) >= max_new_share


# How many content neighbours each item keeps (content_thresholds) for the new-item
# blend: with its weight, chosen on both catalogs' item-cold validation halves
# (docs/experiments/model-runs.md, run 6: 200 and 0.7 beat 100 and 0.3 on both).
CONTENT_NEIGHBORS = 200


def content_thresholds(
    content: np.ndarray, neighbors: int = CONTENT_NEIGHBORS, sample: int = 20_000, seed: int = 0
) -> np.ndarray:
    """(n_items,) float32: each item's cosine to its ``neighbors``-th most similar other
    item, i.e. the least similarity at which another item is among its neighbours.

    Exact up to ``sample`` items; above, the rank is scaled onto a seeded sample of
    ``sample`` columns (the same quantile), so a 100k catalog costs 100k x 20k products.
    """
    vecs = np.asarray(content, dtype=np.float32)
    n = vecs.shape[0]
    if n < 2:
        return np.full(n, np.inf, dtype=np.float32)
    cols = np.arange(n)
    if n > sample:
        cols = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    k = max(1, min(len(cols) - 1, round(neighbors * len(cols) / n)))
    out = np.empty(n, dtype=np.float32)
    block = 1024
    for start in range(0, n, block):
        sims = vecs[start : start + block] @ vecs[cols].T
        own = np.flatnonzero((cols >= start) & (cols < start + block))
        sims[cols[own] - start, own] = -np.inf  # not its own neighbour
        out[start : start + block] = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return out


def content_knn_scores(
    content: np.ndarray,
    history: np.ndarray,
    candidates: np.ndarray,
    candidate_thresholds: np.ndarray,
) -> np.ndarray:
    """(n_candidates,) content-knn score of each candidate for one user: the sum of its
    cosines to the history items that are among its own nearest items by text (cosine
    >= the candidate's threshold, ``candidate_thresholds`` in candidate order; negative
    cosines count 0). The content-knn baseline's score (item-kNN: a candidate scores by
    how much of its neighbourhood the user liked), computed from the content vectors and
    one threshold per item (``content_thresholds``), so serving needs no neighbour lists."""
    hist = np.asarray(history, dtype=np.int64)
    if len(hist) == 0:
        return np.zeros(len(candidates), dtype=np.float32)
    sims = content[np.asarray(candidates, dtype=np.int64)] @ content[hist].T  # (c, h)
    keep = sims >= np.asarray(candidate_thresholds, dtype=np.float32)[:, None]
    out: np.ndarray = np.where(keep, np.maximum(sims, 0.0), 0.0).sum(axis=1)
    return out.astype(np.float32)


def _standardised(x: np.ndarray) -> np.ndarray:
    """Along the last axis; a constant row becomes all 0."""
    sd = x.std(axis=-1, keepdims=True)
    out: np.ndarray = np.where(
        sd > 1e-9, (x - x.mean(axis=-1, keepdims=True)) / np.maximum(sd, 1e-9), 0.0
    )
    return out


def blend_standardised(scores: np.ndarray, other: np.ndarray, weight: float) -> np.ndarray:
    """A user's head re-scored: standardised ``scores`` + ``weight`` x standardised
    ``other``, both standardised over the head (float32). 2-D: one head per row."""
    out: np.ndarray = _standardised(np.asarray(scores, dtype=np.float64)) + weight * (
        _standardised(np.asarray(other, dtype=np.float64))
    )
    return out.astype(np.float32)


def blend_new_items(
    tower_scores: np.ndarray,
    knn_scores: np.ndarray,
    weight: float,
    mapped_scores: np.ndarray | None = None,
    map_weight: float = 0.0,
    unliked_knn_scores: np.ndarray | None = None,
    unliked_weight: float = 0.0,
) -> np.ndarray:
    """One user's head of new items re-scored: standardised tower score + ``weight`` x
    standardised content-knn score (+ ``map_weight`` x standardised ``mapped_scores``,
    the user's tower vector against the candidates' ``content_map`` vectors, + ``unliked_weight``
    x standardised ``unliked_knn_scores``, the content-knn score against the items the user
    rated below the positive threshold), each standardised over the head.

    The towers see an item's text only through its top singular directions (which keeps
    them from memorising titles); the content-knn score brings back the whole text's
    similarity to what the user liked, for items that have nothing else (docs/MODEL.md,
    run 6), and the mapped score the whole text's guess at the item's collaborative
    vector (run 8). An item rated low was still chosen: for a new item, what the user
    picks to watch says more than what they liked alone (run 9). With no history the knn
    scores are all 0.
    """
    out = blend_standardised(tower_scores, knn_scores, weight).astype(np.float64)
    for extra, extra_weight in ((mapped_scores, map_weight), (unliked_knn_scores, unliked_weight)):
        if extra is not None and extra_weight > 0:
            out = out + extra_weight * _standardised(np.asarray(extra, dtype=np.float64))
    return out.astype(np.float32)


def new_item_head_scores(
    content: np.ndarray,
    candidates: np.ndarray,
    candidate_thresholds: np.ndarray,
    tower_scores: np.ndarray,
    history: np.ndarray,
    weight: float,
    user_vec: np.ndarray | None = None,
    cmap: np.ndarray | None = None,
    map_weight: float = 0.0,
    unliked: np.ndarray | None = None,
    unliked_weight: float = 0.0,
) -> np.ndarray:
    """One user's head of new items (``candidates``: rows of ``content``) re-scored by
    ``blend_new_items``: the knn terms over the liked ``history`` and the ``unliked`` rows,
    the map term from ``user_vec`` and ``cmap``. What the trainer's scorers and the fusion
    service share, so the three compute one function."""
    knn = content_knn_scores(content, history, candidates, candidate_thresholds)
    mapped = None
    if cmap is not None and user_vec is not None and map_weight > 0:
        # content . (W u): one [D] vector per user, not a [c, d] product.
        mapped = content[np.asarray(candidates, dtype=np.int64)] @ (cmap @ user_vec)
    unliked_knn = None
    if unliked is not None and len(unliked) and unliked_weight > 0:
        unliked_knn = content_knn_scores(content, unliked, candidates, candidate_thresholds)
    return blend_new_items(
        tower_scores, knn, weight, mapped, map_weight, unliked_knn, unliked_weight
    )


# The content map's ridge penalty, with blend weight ModelConfig.new_item_map_weight:
# chosen on both catalogs' item-cold validation halves (docs/experiments/model-runs.md, run 8).
CONTENT_MAP_PENALTY = 3.0


def content_map(
    content: np.ndarray,
    item_vecs: np.ndarray,
    warm: np.ndarray,
    penalty: float = CONTENT_MAP_PENALTY,
) -> np.ndarray:
    """(content_dim, dim) float32: the ridge map from an item's text vector to its tower
    vector, fitted on the ``warm`` items (bool mask), whose tower vectors carry what
    their ids and counts taught the towers. ``content[i] @ map`` is the collaborative
    vector a new item's whole text predicts; the towers' own content-only vector reads
    the text through a few directions only. All zeros with no warm item."""
    mask = np.asarray(warm, dtype=bool)
    x = np.asarray(content, dtype=np.float64)[mask]
    y = np.asarray(item_vecs, dtype=np.float64)[mask]
    if len(x) == 0:
        return np.zeros((x.shape[1], y.shape[1]), dtype=np.float32)
    w = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ y)
    return w.astype(np.float32)


def _content_sims(
    hist_content: list[np.ndarray], cand_content: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Max and mean cosine of each candidate to the user's history items (0 with none)."""
    n, c = cand_content.shape[:2]
    mx = np.zeros((n, c), dtype=np.float32)
    mean = np.zeros((n, c), dtype=np.float32)
    for r, hc in enumerate(hist_content):
        if len(hc) == 0:
            continue
        sims = cand_content[r] @ hc.T  # (c, h)
        mx[r] = sims.max(axis=1)
        mean[r] = sims.mean(axis=1)
    return mx, mean


def ranker_features(
    spec: FeatureSpec,
    tables: RankerTables,
    tower_scores: np.ndarray,
    user_attrs: np.ndarray,
    histories: Sequence[np.ndarray],
    candidates: np.ndarray,
    interest: np.ndarray | None = None,
    new_items: np.ndarray | None = None,
    exclude_self: np.ndarray | None = None,
) -> np.ndarray:
    """(n_users, n_candidates, n_features) float32, columns as ``spec.ranker_feature_names()``.

    ``candidates``: (n_users, n_candidates) item rows; ``tower_scores``: the
    user-vector . item-vector inner products of those pairs (what retrieval
    already computed; a new item's vector is its item-tower output with id 0).
    ``new_items``: optional bool
    mask of the same shape forcing "no interaction data" for those candidates
    (popularity features zeroed), which is how training shows the ranker new items.
    ``exclude_self``: optional (n_users, n_candidates) 0/1 counts of the user's own
    training positives, subtracted from the popularity counts so a training query
    never sees its own targets in the counts (serving passes nothing).
    """
    n, c = candidates.shape
    tower = np.asarray(tower_scores, dtype=np.float32)
    cand_content = tables.content[candidates]
    hist_rows = [np.asarray(h, dtype=np.int64)[-spec.max_history :] for h in histories]
    cmax, cmean = _content_sims([tables.content[h] for h in hist_rows], cand_content)
    if interest is None:
        interest = np.zeros((n, spec.text_dim), dtype=np.float32)
    has_interest = (np.abs(interest).sum(axis=1) > 0).astype(np.float32)
    interest_sim = np.einsum("ncd,nd->nc", cand_content, interest).astype(np.float32)

    cand_attrs = tables.item_attrs[candidates][:, :, 1:]  # drop the always-on column
    hist_attrs = np.zeros((n, cand_attrs.shape[2]), dtype=np.float32)
    for r, h in enumerate(hist_rows):
        if len(h):
            hist_attrs[r] = tables.item_attrs[h][:, 1:].mean(axis=0)
    n_on = np.maximum(cand_attrs.sum(axis=2), 1.0)
    affinity = np.einsum("nca,na->nc", cand_attrs, hist_attrs) / n_on

    pop = tables.pop[candidates].astype(np.float32)
    own = np.zeros((n, c), dtype=np.float32) if exclude_self is None else exclude_self
    pop = np.maximum(pop - own, 0.0)
    if new_items is not None:
        pop = np.where(new_items, 0.0, pop).astype(np.float32)
    is_new = (pop <= 0).astype(np.float32)
    log_pop = np.log1p(pop)
    pop_share = np.log((pop + 1.0) / (tables.n_users + 2.0))
    hist_len = np.array([len(h) for h in histories], dtype=np.float32)

    cols = [
        tower,
        cmax,
        cmean,
        interest_sim,
        affinity.astype(np.float32),
        log_pop,
        pop_share.astype(np.float32),
        is_new,
        np.broadcast_to(np.log1p(hist_len)[:, None], (n, c)),
        np.broadcast_to((hist_len == 0).astype(np.float32)[:, None], (n, c)),
        np.broadcast_to(has_interest[:, None], (n, c)),
    ]
    shares = segment_log_shares(spec, tables, user_attrs, candidates, pop_share, own, new_items)
    cols.extend(shares[name] for name in spec.segment_fields)
    user_cols = np.broadcast_to(user_attrs[:, None, 1:], (n, c, user_attrs.shape[1] - 1))
    parts = [np.stack(cols, axis=2), user_cols, cand_attrs]
    out = np.concatenate([p.astype(np.float32) for p in parts], axis=2)
    return np.ascontiguousarray(out, dtype=np.float32)


def segment_log_shares(
    spec: FeatureSpec,
    tables: RankerTables,
    user_attrs: np.ndarray,
    candidates: np.ndarray,
    pop_share: np.ndarray,
    own: np.ndarray | None = None,
    new_items: np.ndarray | None = None,
    fields: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per segment field (``fields``, default all), (n_users, n_candidates) log share of
    each candidate among the training users who share the user's value of that field (a
    user with no value gets ``pop_share``, the overall log share). ``own`` / ``new_items``
    as in ``ranker_features``.
    """
    slices = spec.user_vocab.field_slices()
    out: dict[str, np.ndarray] = {}
    for name in spec.segment_fields if fields is None else fields:
        sl = slices[name]
        member = user_attrs[:, sl]  # (n, v)
        counts = tables.seg_counts[sl][:, candidates]  # (v, n, c)
        if own is not None:
            counts = np.maximum(counts - own[None] * (member.T[:, :, None] > 0), 0.0)
        if new_items is not None:
            counts = np.where(new_items[None], 0.0, counts)
        sizes = tables.seg_sizes[sl]  # (v,)
        share = np.log((counts + 1.0) / (sizes[:, None, None] + 2.0))  # (v, n, c)
        weight = member.sum(axis=1)  # users with no value fall back to the overall share
        seg = np.einsum("vnc,nv->nc", share, member) / np.maximum(weight, 1.0)[:, None]
        out[name] = np.where(weight[:, None] > 0, seg, pop_share).astype(np.float32)
    return out


# The short-history prior's segment, as the popularity-segment baseline picks its own:
# the (up to two) user fields with the fewest values, each with at most this many
# (ML-100K: gender and age band; fields like occupation or region split users too thinly).
PRIOR_MAX_VALUES = 12


def prior_fields(spec: FeatureSpec) -> tuple[str, ...]:
    sizes = {name: len(values) for name, values in spec.user_vocab.fields}
    small = sorted((sizes[f], f) for f in spec.segment_fields if sizes[f] <= PRIOR_MAX_VALUES)
    return tuple(name for _, name in small[:2])


def short_history_prior_applies(
    history_len: int, max_history: int, head_is_new: bool, has_interest: bool = False
) -> bool:
    """Whether a user's head is re-scored with the segment prior (``blend_standardised``
    of the model's head scores and ``segment_prior``): a history of at most
    ``max_history`` items (< 0: never), not a head of new items (which have no counts;
    the new-item blend handles those), and not a user who stated an interest (the towers
    read it; the prior would pull their list back to what their segment takes:
    docs/experiments/model-runs.md, run 11). Serving must apply the same rule."""
    return max_history >= 0 and history_len <= max_history and not head_is_new and not has_interest


def has_stated_interest(interest: np.ndarray | None) -> bool:
    """Whether an interest vector says anything (None or all zeros: no stated interest)."""
    return interest is not None and bool(np.any(interest))


def segment_prior(
    spec: FeatureSpec,
    tables: RankerTables,
    user_attrs: np.ndarray,
    candidates: np.ndarray,
    fields: Sequence[str] | None = None,
) -> np.ndarray:
    """(n_users, n_candidates) log p(item | the user's attribute values), naive Bayes over
    the segment fields: the overall log share plus each field's lift over it. Without
    user attributes it is the overall log share, i.e. popularity."""
    pop = tables.pop[candidates].astype(np.float64)
    pop_share = np.log((pop + 1.0) / (tables.n_users + 2.0))
    out = pop_share.copy()
    shares = segment_log_shares(spec, tables, user_attrs, candidates, pop_share, fields=fields)
    for share in shares.values():
        out += share - pop_share
    return out


def segment_tables(
    user_attrs: np.ndarray, pos_users: np.ndarray, pos_items: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """``seg_counts`` (columns x items) and ``seg_sizes`` from positive (user, item) pairs.

    Sizes count the users that have any positive (the population the counts come from).
    """
    width = user_attrs.shape[1]
    counts = np.zeros((width, n_items), dtype=np.float32)
    # One pass per attribute column: each is a handful of users' rows summed.
    for col in range(width):
        members = user_attrs[pos_users, col] > 0
        if members.any():
            counts[col] = np.bincount(pos_items[members], minlength=n_items)
    sizes = user_attrs[np.unique(pos_users)].sum(axis=0).astype(np.float32)
    return counts, sizes
