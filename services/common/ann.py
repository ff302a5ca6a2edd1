"""Approximate nearest-neighbour indexes over item vectors (faiss, inner product).

The one place that knows the index kinds: the trainer's export and the
synthetic versions build and tune them here, fusion searches them through
``breadth`` / ``search_params``. A version's index file carries its own search
breadth (HNSW ``efSearch``, IVF ``nprobe``), chosen by ``tune`` when the
version was built; fusion uses it unless a setting overrides it.

Kinds:
- ``flat``: exact scan. Best for small catalogs (a few thousand items).
- ``ivf``: inverted lists (k-means cells); a search scans ``nprobe`` cells.
- ``hnsw``: a proximity graph; a search keeps ``efSearch`` candidates.

Which one is fastest at a given recall depends on the catalog and on where the
users' vectors fall: queries that mix several item clusters (a user who liked
things of several kinds) are hard for a graph walk and easy for IVF, whose
cells cover each cluster the query touches. ``tune`` therefore measures, on a
sample of the version's own user vectors, rather than assuming.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import faiss

# faiss's classes are SWIG wrappers whose stubs know only the base ``Index``; the
# functions here take and return ``Any`` and check the kind at run time (kind_of).
import numpy as np

KINDS = ("flat", "ivf", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
# Recall of the served fetch against exact search that ``tune`` must reach.
DEFAULT_RECALL_TARGET = 0.98
# faiss wants at least this many training points per IVF cell.
_IVF_MIN_PER_CELL = 39
_NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_EF_FACTORS = (1.0, 1.25, 1.6, 2.0, 2.5, 3.2, 4.0, 6.0, 8.0)
# Flat (exact) is kept unless an approximate kind is faster by more than this
# factor: on small catalogs the times are a few microseconds apart and noisy
# (600 items: flat 16.3 us, IVF 13.4 us at recall 0.983, with other jobs running).
EXACT_MARGIN = 1.5


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about 4 sqrt(n), at least 39 points per cell."""
    return max(1, min(int(4 * math.sqrt(max(n, 1))), n // _IVF_MIN_PER_CELL))


def build(
    vectors: np.ndarray,
    kind: str,
    *,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    nlist: int = 0,
) -> Any:
    """An inner-product index of ``kind`` over ``vectors`` (nlist 0: ``default_nlist``)."""
    d = vectors.shape[1]
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    elif kind == "ivf":
        cells = max(1, min(nlist or default_nlist(len(x)), max(len(x), 1)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        if len(x):
            index.train(x)
    else:
        raise ValueError(f"unknown index kind {kind!r} (want one of {', '.join(KINDS)})")
    if len(x):
        index.add(x)
    return index


def kind_of(index: Any) -> str | None:
    """``flat``, ``ivf``, ``hnsw``, or None for a kind this module cannot search."""
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    return None


def breadth(index: Any, fetch: int, *, ef_search: int = 0, nprobe: int = 0) -> int:
    """How widely a search for ``fetch`` rows looks: HNSW efSearch (never below
    ``fetch``), IVF nprobe (never fewer cells than hold ~2 ``fetch`` rows), 0 for flat. 0 overrides mean the index's own value.
    Searches with the same breadth may share one faiss call."""
    kind = kind_of(index)
    if kind == "hnsw":
        return max(ef_search or int(index.hnsw.efSearch), fetch)
    if kind == "ivf":
        # Like efSearch >= fetch: scan cells holding about twice ``fetch`` vectors at
        # least, so a large fetch (k = 1000, many exclusions) is not cut short.
        nlist = int(index.nlist)
        enough = math.ceil(2 * fetch * nlist / max(int(index.ntotal), 1))
        return min(max(nprobe or int(index.nprobe), enough), nlist)
    return 0


def search_params(index: Any, width: int) -> Any:
    """Per-call faiss parameters for a ``breadth`` (calls never share mutable state)."""
    kind = kind_of(index)
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=width)  # type: ignore[attr-defined]
    if kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=width)  # type: ignore[call-arg]
    return None


def describe(index: Any) -> dict[str, Any]:
    """The manifest's description of an index (its kind and search parameters)."""
    kind = kind_of(index)
    desc: dict[str, Any] = {"type": type(index).__name__, "kind": kind}
    if kind == "hnsw":
        desc.update(
            M=int(index.hnsw.nb_neighbors(1)),
            efConstruction=int(index.hnsw.efConstruction),
            efSearch=int(index.hnsw.efSearch),
        )
    elif kind == "ivf":
        desc.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
    desc.update(metric="inner_product", dimension=int(index.d), ntotal=int(index.ntotal))
    return desc


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] rows of the exact top ``k`` by inner product (blocks bound memory)."""
    k = min(k, len(vectors))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + 256] = np.take_along_axis(top, order, axis=1)
    return out


def recall(index: Any, queries: np.ndarray, truth: np.ndarray, width: int) -> float:
    """Recall@k (k = truth's width) of ``index`` at ``width`` against ``truth``."""
    k = truth.shape[1]
    _, found = index.search(queries, k, params=search_params(index, width))
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def _seconds_per_query(index: Any, queries: np.ndarray, k: int, width: int) -> float:
    """Best of 3 passes, in batches of 32 on one OpenMP thread (as fusion serves)."""
    params = search_params(index, width)
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, len(queries), 32):
            index.search(queries[start : start + 32], k, params=params)
        best = min(best, time.perf_counter() - started)
    return best / max(len(queries), 1)


def _set_breadth(index: Any, width: int) -> None:
    kind = kind_of(index)
    if kind == "hnsw":
        index.hnsw.efSearch = width
    elif kind == "ivf":
        index.nprobe = width


def tune(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    recall_target: float = DEFAULT_RECALL_TARGET,
    kinds: Sequence[str] = KINDS,
) -> tuple[Any, dict[str, Any]]:
    """The fastest index (of ``kinds``) whose recall@``k`` on ``queries`` reaches
    ``recall_target``, with its search breadth set in it, and its description
    with the tuning table (every kind tried: smallest breadth reaching the target,
    its recall and microseconds per query). Flat always reaches the target and is
    kept unless another kind is more than ``EXACT_MARGIN`` times faster; a kind
    whose widest breadth does not reach it is reported and never chosen."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, len(x)))
    truth = exact_top(x, q, k)
    previous_threads = faiss.omp_get_max_threads()
    tried: list[dict[str, Any]] = []
    best: tuple[float, Any] | None = None
    exact: tuple[float, Any] | None = None
    for kind in kinds:
        faiss.omp_set_num_threads(previous_threads)  # building may use every core
        index = build(x, kind)
        faiss.omp_set_num_threads(1)
        if kind == "hnsw":
            ladder = sorted({max(k, int(k * f)) for f in _EF_FACTORS})
        elif kind == "ivf":
            ladder = [p for p in _NPROBE_LADDER if p < index.nlist] + [int(index.nlist)]
        else:
            ladder = [0]
        width, reached = ladder[-1], 0.0
        for candidate in ladder:
            reached = recall(index, q, truth, candidate)
            if reached >= recall_target:
                width = candidate
                break
        row: dict[str, Any] = {"kind": kind, "recall": round(reached, 4)}
        if reached >= recall_target:
            seconds = _seconds_per_query(index, q, k, width)
            _set_breadth(index, width)
            row.update(breadth=width, us_per_query=round(seconds * 1e6, 1))
            if best is None or seconds < best[0]:
                best = (seconds, index)
            if kind == "flat":
                exact = (seconds, index)
        else:
            row.update(breadth=width, us_per_query=None, note="target not reached")
        tried.append(row)
    faiss.omp_set_num_threads(previous_threads)
    if best is None:  # only when flat was not among the kinds
        raise ValueError(f"no index kind reached recall {recall_target} (tried {tried})")
    chosen = best[1]
    if exact is not None and exact[0] <= best[0] * EXACT_MARGIN:
        chosen = exact[1]  # an approximate index has to pay for itself
    desc = describe(chosen)
    desc["recall"] = next(r["recall"] for r in tried if r["kind"] == desc["kind"])
    desc["tuning"] = {
        "recall_target": recall_target,
        "k": k,
        "queries": len(q),
        "tried": tried,
    }
    return chosen, desc
