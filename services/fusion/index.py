"""The live item catalog and its retrieval index.

Rows 0..n_base-1 are the model version's items; UpsertItems and item events
append rows. A replaced id gets a new row and its old row is marked deleted, so
a row's vector never changes once written and concurrent readers need no lock:
writers append into spare capacity and then publish a new immutable ``_View``
(count, arrays, ANN index) with one reference assignment.

Search = the version's ANN index (faiss, inner product: HNSW, IVF or flat, see
``services.common.ann``) over the rows folded into it + an exact scan of the
rows appended since (the side buffer), merged. When the
side buffer passes ``fold_threshold`` a background thread clones the ANN index,
adds the side rows and publishes the clone; until then searches stay exact over
the side rows, so an upserted item is retrievable at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from services.common import ann as ann_kinds
from services.common.recsys_features import item_title

log = logging.getLogger("coldstart.fusion.index")

# Filtered searches scan exactly when at most this many rows pass the filter:
# exact is then cheaper than over-fetching from the ANN index, and complete.
EXACT_FILTER_LIMIT = 20_000
# efSearch of an HNSW index built at load (a version without an index file).
DEFAULT_EF_SEARCH = 160

_omp = threading.local()


def one_omp_thread() -> None:
    """Run this thread's faiss calls on one OpenMP thread.

    OpenMP's thread count is a per-thread setting: ``faiss.omp_set_num_threads(1)``
    in the main thread leaves every other thread (the batcher's, gRPC's) at one
    OpenMP thread per core, so each batched search forked a team whose idle
    workers spin-waited on the cores the request threads need (measured: ~0.3 ms
    of CPU per Recommend at 64 clients on 2 cores). Parallelism comes from the
    batcher's workers and the gRPC threads instead. Set once per thread.
    """
    if not getattr(_omp, "done", False):
        faiss.omp_set_num_threads(1)
        _omp.done = True


def contained(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.isin(keys, values)`` for a few values among many keys, by binary search.

    The batch code asks it of (query, row) keys spread over millions: there
    ``np.isin`` picks its lookup-table method and clears a table of that size
    per call (~2 ms; this is ~50 us).
    """
    if len(values) == 0:
        return np.zeros(np.shape(keys), dtype=bool)
    values = np.sort(values)
    at = np.minimum(np.searchsorted(values, keys), len(values) - 1)
    found: np.ndarray = values[at] == keys
    return found


def build_hnsw(vectors: np.ndarray, m: int = 32, ef_construction: int = 80) -> Any:
    """The index built here when a version ships none (graph build kept cheap: it
    runs at load); its efSearch is ``DEFAULT_EF_SEARCH``."""
    index = ann_kinds.build(vectors, "hnsw", m=m, ef_construction=ef_construction)
    index.hnsw.efSearch = DEFAULT_EF_SEARCH
    return index


@dataclass(frozen=True)
class ItemMeta:
    item_id: str
    text: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return item_title(self.text)


@dataclass(frozen=True)
class _View:
    count: int
    vectors: np.ndarray  # [capacity, D]; rows < count are valid
    content: np.ndarray  # [capacity, C]
    log_popularity: np.ndarray  # [capacity]
    ann: faiss.Index | None
    ann_count: int  # rows 0..ann_count-1 are in ann
    # fetch -> search breadth for this view's ann (asking faiss costs ~3 us a query)
    breadths: dict[int, int] = field(default_factory=dict, compare=False)


def _grow(array: np.ndarray, needed: int) -> np.ndarray:
    if needed <= array.shape[0]:
        return array
    capacity = max(needed, int(array.shape[0] * 1.5) + 64)
    grown = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


class ItemIndex:
    def __init__(
        self,
        metas: Sequence[ItemMeta],
        vectors: np.ndarray,
        content: np.ndarray,
        popularity: np.ndarray,
        ann: faiss.Index | None,
        *,
        ef_search: int = 0,
        nprobe: int = 0,
        fold_threshold: int = 5_000,
    ) -> None:
        n = len(metas)
        if not (vectors.shape[0] == content.shape[0] == popularity.shape[0] == n):
            raise ValueError("metas, vectors, content and popularity must have the same rows")
        if ann is not None and ann.ntotal != n:
            raise ValueError(f"index holds {ann.ntotal} vectors for {n} items")
        if ann is not None and ann_kinds.kind_of(ann) is None:
            raise ValueError(f"cannot search a faiss {type(ann).__name__}")
        self.base_count = n
        self.dimension = int(vectors.shape[1])
        self.content_dimension = int(content.shape[1])
        # Search breadth overrides; 0 = the index's own (as the version was tuned).
        self.ef_search = ef_search
        self.nprobe = nprobe
        self.fold_threshold = fold_threshold
        self._lock = threading.Lock()
        self._folding = False
        self._metas: list[ItemMeta] = list(metas)
        self._row_of: dict[str, int] = {}
        self._deleted = np.zeros(n, dtype=bool)
        self._deleted_count = 0
        self._by_attribute: dict[tuple[str, str], list[int]] = {}
        self._by_tag: dict[str, list[int]] = {}
        for row, meta in enumerate(self._metas):
            self._register(row, meta)
        self._view = _View(
            count=n,
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            content=np.ascontiguousarray(content, dtype=np.float32),
            log_popularity=np.log1p(np.maximum(popularity, 0)).astype(np.float32),
            ann=ann if n else None,
            ann_count=n if ann is not None else 0,
        )
        # Popular rows first: the candidates every request gets besides the ANN ones.
        self._popular_order = np.argsort(-self._view.log_popularity[:n], kind="stable")

    # -- metadata -------------------------------------------------------
    def _register(self, row: int, meta: ItemMeta) -> None:
        old = self._row_of.get(meta.item_id)
        if old is not None:
            self._deleted[old] = True
            self._deleted_count += 1
        self._row_of[meta.item_id] = row
        for pair in meta.attributes.items():
            self._by_attribute.setdefault(pair, []).append(row)
        for tag in meta.tags:
            self._by_tag.setdefault(tag, []).append(row)

    def __len__(self) -> int:
        return len(self._row_of)

    def row(self, item_id: str) -> int | None:
        return self._row_of.get(item_id)

    def meta(self, row: int) -> ItemMeta:
        return self._metas[row]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return self._view.vectors[rows]

    def all_vectors(self) -> np.ndarray:
        """[row_count, D] every row's vector (a view: rows never change once written)."""
        view = self._view
        return view.vectors[: view.count]

    def content(self, rows: np.ndarray) -> np.ndarray:
        return self._view.content[rows]

    def content_products(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[Q, W]: ``queries[q] . content(rows[q, w])``; -inf where ``rows[q, w] < 0``.

        One faiss call reads the rows where they are: no gathered copy of
        [Q, W, C] floats, and the GIL is released meanwhile (it is what a busy
        server runs short of, not cores).
        """
        one_omp_thread()
        view = self._view
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        out = np.empty(rows.shape, dtype=np.float32)
        if rows.size == 0:
            return out
        if rows.ndim != 2 or queries.shape != (rows.shape[0], view.content.shape[1]):
            raise ValueError(f"queries {queries.shape} do not fit rows {rows.shape}")
        if int(rows.max()) >= view.count:  # faiss would read past the table
            raise IndexError(f"row {int(rows.max())} of {view.count}")
        faiss.fvec_inner_products_by_idx(  # type: ignore[attr-defined]
            faiss.swig_ptr(out),
            faiss.swig_ptr(queries),
            faiss.swig_ptr(view.content),
            faiss.swig_ptr(rows),
            view.content.shape[1],
            rows.shape[0],
            rows.shape[1],
        )
        return out

    def log_popularity(self, rows: np.ndarray) -> np.ndarray:
        return self._view.log_popularity[rows]

    @property
    def row_count(self) -> int:
        """Rows written so far (replaced ones included): every row number is below it."""
        return self._view.count

    @property
    def side_count(self) -> int:
        view = self._view
        return view.count - view.ann_count

    def eligible(
        self, attribute_equals: Mapping[str, str], tags_any: Sequence[str]
    ) -> np.ndarray | None:
        """Rows passing the filters (deleted ones included; search drops them), or None."""
        if not attribute_equals and not tags_any:
            return None
        rows: np.ndarray | None = None
        for pair in attribute_equals.items():
            matched = np.asarray(self._by_attribute.get(pair, ()), dtype=np.int64)
            rows = matched if rows is None else np.intersect1d(rows, matched)
        if tags_any:
            tagged = np.unique(
                np.concatenate(
                    [np.asarray(self._by_tag.get(t, ()), dtype=np.int64) for t in tags_any]
                )
            )
            rows = tagged if rows is None else np.intersect1d(rows, tagged)
        assert rows is not None
        return rows

    def popular(self, count: int) -> np.ndarray:
        """The most popular live base rows (upserted items have no popularity yet)."""
        head = self._popular_order[: count + self._deleted_count]
        return head[~self._deleted[head]][:count]

    # -- writing ----------------------------------------------------------
    def upsert(self, metas: Sequence[ItemMeta], vectors: np.ndarray, content: np.ndarray) -> None:
        """Add or replace items; visible to the next search."""
        if not metas:
            return
        with self._lock:
            view = self._view
            start, end = view.count, view.count + len(metas)
            vecs = _grow(view.vectors, end)
            cont = _grow(view.content, end)
            pop = _grow(view.log_popularity, end)
            vecs[start:end] = vectors
            cont[start:end] = content
            pop[start:end] = 0.0
            if self._deleted.shape[0] < end:
                self._deleted = _grow(self._deleted, end)
            self._metas.extend(metas)
            # Publish the rows before the ids point at them.
            self._view = _View(end, vecs, cont, pop, view.ann, view.ann_count)
            for offset, meta in enumerate(metas):
                self._register(start + offset, meta)
            fold = end - view.ann_count > self.fold_threshold and not self._folding
            if fold:
                self._folding = True
        if fold:
            threading.Thread(target=self._fold, name="fusion-index-fold", daemon=True).start()

    def _fold(self) -> None:
        # Loops because upserts that arrive during a fold start none of their own.
        one_omp_thread()
        try:
            while True:
                view = self._view
                if view.count - view.ann_count <= self.fold_threshold:
                    return
                rows = view.vectors[view.ann_count : view.count]
                if view.ann is None:
                    ann = build_hnsw(view.vectors[: view.count])
                else:
                    ann = faiss.clone_index(view.ann)
                    ann.add(np.ascontiguousarray(rows))
                with self._lock:
                    current = self._view
                    self._view = _View(
                        current.count,
                        current.vectors,
                        current.content,
                        current.log_popularity,
                        ann,
                        view.count,
                    )
                log.info("folded side buffer into the ANN index", extra={"rows": len(rows)})
        finally:
            self._folding = False

    # -- searching ----------------------------------------------------------
    def _breadth(self, view: _View, fetch: int) -> int:
        breadth = view.breadths.get(fetch)
        if breadth is None:
            breadth = ann_kinds.breadth(
                view.ann, fetch, ef_search=self.ef_search, nprobe=self.nprobe
            )
            view.breadths[fetch] = breadth
        return breadth

    def _fetch(self, k: int, excluded: int, filtered: bool, fraction: float) -> int:
        """Rows to ask the ANN index for so that ``k`` are left after dropping the
        excluded and deleted ones (at most that many) and, with a filter, those it
        rejects (estimated: over-fetch by 1/fraction with a margin; a short answer
        retries wider)."""
        dropped = k + excluded + self._deleted_count
        return int(dropped / fraction * 1.2) + 16 if filtered else dropped

    def search(
        self,
        query: np.ndarray,
        k: int,
        *,
        eligible: np.ndarray | None = None,
        excluded: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` live rows by inner product: (rows, scores), best first."""
        one_omp_thread()
        view = self._view
        if excluded is None:
            excluded = np.empty(0, dtype=np.int64)
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if eligible is not None:
            eligible = eligible[eligible < view.count]
            if len(eligible) <= EXACT_FILTER_LIMIT:
                return self._exact(view, query, eligible, k, excluded)
        mask: np.ndarray | None = None
        fraction = 1.0
        if eligible is not None:
            mask = np.zeros(view.count, dtype=bool)
            mask[eligible] = True
            fraction = max(len(eligible) / max(view.count, 1), 1e-3)
        side_rows = np.arange(view.ann_count, view.count)
        if mask is not None:
            side_rows = side_rows[mask[side_rows]]
        side = self._exact(view, query, side_rows, k, excluded)
        if view.ann is None or view.ann_count == 0:
            return side
        fetch = self._fetch(k, len(excluded), mask is not None, fraction)
        for _attempt in range(3):
            fetch = min(fetch, view.ann_count)
            params = ann_kinds.search_params(view.ann, self._breadth(view, fetch))
            scores, rows = view.ann.search(query, fetch, params=params)
            rows, scores = rows[0], scores[0]
            keep = rows >= 0
            keep &= ~self._deleted[np.maximum(rows, 0)]
            if mask is not None:
                keep &= mask[np.maximum(rows, 0)]
            if len(excluded):
                keep &= ~np.isin(rows, excluded)
            rows, scores = rows[keep], scores[keep]
            if len(rows) >= k or fetch >= view.ann_count:
                break
            fetch *= 4
        all_rows = np.concatenate([rows.astype(np.int64), side[0]])
        all_scores = np.concatenate([scores, side[1]])
        order = np.argsort(-all_scores, kind="stable")[:k]
        return all_rows[order], all_scores[order]

    def search_batch(
        self,
        queries: np.ndarray,
        ks: Sequence[int],
        *,
        eligibles: Sequence[np.ndarray | None],
        excludeds: Sequence[np.ndarray],
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``search`` for several queries at once, with the same answers.

        The unfiltered (or broadly filtered) queries share one faiss call per
        distinct search breadth (HNSW efSearch, IVF nprobe): faiss releases the
        GIL and amortises its set-up over the batch. A query's top ``fetch`` of a
        search for more rows at the same breadth are the rows a search for
        ``fetch`` finds (HNSW visits nodes by efSearch alone, IVF scans the same
        cells), so batching does not change any answer. Exact
        scans (narrow filters, the side buffer) and the rare retry with a
        larger fetch go through ``search`` one query at a time.
        """
        one_omp_thread()
        view = self._view
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(ks)
        # breadth -> [(query number, fetch, mask)]
        groups: dict[int, list[tuple[int, int, np.ndarray | None]]] = {}
        for i, (k, wanted, excluded) in enumerate(zip(ks, eligibles, excludeds, strict=True)):
            eligible = None if wanted is None else wanted[wanted < view.count]
            if (
                view.ann is None
                or view.ann_count == 0
                or (eligible is not None and len(eligible) <= EXACT_FILTER_LIMIT)
            ):
                # Exact paths: the one-query code.
                results[i] = self.search(queries[i], k, eligible=eligible, excluded=excluded)
                continue
            mask: np.ndarray | None = None
            fraction = 1.0
            if eligible is not None:
                mask = np.zeros(view.count, dtype=bool)
                mask[eligible] = True
                fraction = max(len(eligible) / max(view.count, 1), 1e-3)
            fetch = min(self._fetch(k, len(excluded), mask is not None, fraction), view.ann_count)
            groups.setdefault(self._breadth(view, fetch), []).append((i, fetch, mask))
        side = view.ann_count < view.count
        for breadth, jobs in groups.items():
            assert view.ann is not None
            width = max(fetch for _i, fetch, _m in jobs)
            params = ann_kinds.search_params(view.ann, breadth)
            numbers = [i for i, _f, _m in jobs]
            all_scores, all_rows = view.ann.search(queries[numbers], width, params=params)
            keep = self._keep(
                view,
                all_rows,
                [fetch for _i, fetch, _m in jobs],
                [mask for _i, _f, mask in jobs],
                [excludeds[i] for i in numbers],
            )
            # The kept rows of every query, in order, and where each query's start.
            counts = keep.sum(axis=1).tolist()
            kept_rows, kept_scores = all_rows[keep], all_scores[keep]
            start = 0
            for (i, fetch, mask), count in zip(jobs, counts, strict=True):
                rows = kept_rows[start : start + count]
                scores = kept_scores[start : start + count]
                start += count
                k = ks[i]
                if count < k and fetch < view.ann_count:
                    # Too much was dropped: the one-query path retries wider.
                    results[i] = self.search(
                        queries[i], k, eligible=eligibles[i], excluded=excludeds[i]
                    )
                    continue
                if not side:
                    # faiss returns each query's rows best first: the top k are a prefix.
                    results[i] = (rows[:k], scores[:k])
                    continue
                side_rows = np.arange(view.ann_count, view.count)
                if mask is not None:
                    side_rows = side_rows[mask[side_rows]]
                extra = self._exact(view, queries[i : i + 1], side_rows, k, excludeds[i])
                rows = np.concatenate([rows, extra[0]])
                scores = np.concatenate([scores, extra[1]])
                order = np.argsort(-scores, kind="stable")[:k]
                results[i] = (rows[order], scores[order])
        done = [r for r in results if r is not None]
        assert len(done) == len(results)
        return done

    def _keep(
        self,
        view: _View,
        rows: np.ndarray,
        fetches: Sequence[int],
        masks: Sequence[np.ndarray | None],
        excludeds: Sequence[np.ndarray],
    ) -> np.ndarray:
        """[Q, width] which of a batched search's rows each query keeps: within
        its own fetch, found, not deleted, passing its filter, not excluded.
        Whole-batch array operations: per-query ones cost ~1 us of GIL each."""
        safe = np.maximum(rows, 0)
        keep = rows >= 0
        keep &= np.arange(rows.shape[1])[None, :] < np.asarray(fetches)[:, None]
        if self._deleted_count:
            keep &= ~self._deleted[safe]
        for j, mask in enumerate(masks):
            if mask is not None:
                keep[j] &= mask[safe[j]]
        blocked = [(j, e) for j, e in enumerate(excludeds) if len(e)]
        if blocked:
            # (query, row) pairs as one key each: one isin for the whole batch.
            stride = np.int64(view.count)
            keys = safe + np.arange(len(rows), dtype=np.int64)[:, None] * stride
            excluded_keys = np.concatenate([e.astype(np.int64) + j * stride for j, e in blocked])
            keep &= ~contained(keys, excluded_keys)
        return keep

    def _exact(
        self,
        view: _View,
        query: np.ndarray,
        rows: np.ndarray,
        k: int,
        excluded: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = rows[~self._deleted[rows]]
        if len(excluded) and len(rows):
            rows = rows[~np.isin(rows, excluded)]
        if len(rows) == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        scores = view.vectors[rows] @ query[0]
        if len(rows) > k:
            top = np.argpartition(-scores, k - 1)[:k]
            rows, scores = rows[top], scores[top]
        order = np.argsort(-scores, kind="stable")
        return rows[order].astype(np.int64), scores[order].astype(np.float32)
