"""`coldstart bench retrieval`: the fusion service's ANN index against exact
search, same vectors, same queries, same run.

Item vectors: ``--items`` (default 1M) L2-normalised synthetic vectors of the
serving model's dimension (read from the registry's current manifest, else
``--dim``), drawn around cluster centres the way embedding catalogs look.
Queries come from the same distribution. Both searches answer one query per
call on one thread, as a request does in the service (faiss OpenMP off). Pass:
recall@k >= 0.98 at >= 10x the exact queries per second, for some efSearch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import faiss
import numpy as np

from bench.runner import write_results
from services.common.paths import run_dir
from services.fusion.synthetic import clustered_vectors


def model_dimension(default: int) -> tuple[int, str]:
    from services.common.registry import ModelRegistry

    registry = ModelRegistry(run_dir() / "registry" / "recommender")
    try:
        info = registry.current_info()
    except Exception:
        info = None
    if info is not None and isinstance(info.manifest.get("dimension"), int):
        return int(info.manifest["dimension"]), f"registry version {info.version}"
    return default, "default (no model in the registry)"


def timed_search(
    index: faiss.Index, queries: np.ndarray, k: int, params: Any = None
) -> tuple[np.ndarray, float]:
    """Rows of the top-k per query, and queries per second, one query per call."""
    out = np.empty((len(queries), k), dtype=np.int64)
    started = time.perf_counter()
    for i in range(len(queries)):
        _, rows = index.search(queries[i : i + 1], k, params=params)
        out[i] = rows[0]
    return out, len(queries) / (time.perf_counter() - started)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coldstart bench retrieval")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64, help="used when no model is in the registry")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--m", type=int, default=32, help="HNSW links per node (as served)")
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", default="256,400,600,800")
    args = parser.parse_args(argv)

    dim, dim_source = model_dimension(args.dim)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building may use every core
    started = time.perf_counter()
    vectors, _ = clustered_vectors(args.items, dim, clusters=args.clusters, seed=0)
    queries, _ = clustered_vectors(args.queries, dim, clusters=args.clusters, seed=0)
    # Same centres (same seed), fresh noise: queries near, not on, catalog items.
    noise = np.random.default_rng(1).standard_normal(queries.shape).astype(np.float32)
    queries = queries + noise * (0.35 / np.sqrt(dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    generated_s = time.perf_counter() - started

    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, args.m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = args.ef_construction
    hnsw.add(vectors)
    build_s = time.perf_counter() - started
    print(f"built HNSW over {args.items} x {dim} in {build_s:.1f}s", flush=True)

    faiss.omp_set_num_threads(1)  # searching: one thread per query, as served
    truth, exact_qps = timed_search(exact, queries, args.k)
    rows: list[dict[str, Any]] = [
        {
            "method": "exact (IndexFlatIP)",
            "ef_search": None,
            f"recall@{args.k}": 1.0,
            "qps": round(exact_qps, 1),
            "speedup": 1.0,
            "mean_ms": round(1000 / exact_qps, 3),
        }
    ]
    best: dict[str, Any] | None = None
    for ef in (int(x) for x in args.ef_search.split(",")):
        params = faiss.SearchParametersHNSW(efSearch=max(ef, args.k))  # type: ignore[attr-defined]
        found, qps = timed_search(hnsw, queries, args.k, params)
        row = {
            "method": f"HNSW M={args.m}",
            "ef_search": max(ef, args.k),
            f"recall@{args.k}": round(recall(found, truth), 4),
            "qps": round(qps, 1),
            "speedup": round(qps / exact_qps, 1),
            "mean_ms": round(1000 / qps, 3),
        }
        rows.append(row)
        ok = row[f"recall@{args.k}"] >= 0.98 and row["speedup"] >= 10
        if ok and (best is None or row["qps"] > best["qps"]):
            best = row
    meta = {
        "items": args.items,
        "dimension": dim,
        "dimension_source": dim_source,
        "queries": args.queries,
        "k": args.k,
        "clusters": args.clusters,
        "build_seconds": round(build_s, 1),
        "generate_seconds": round(generated_s, 1),
        "cpu_count": os.cpu_count(),
        "target": "recall@200 >= 0.98 at >= 10x exact qps",
        "passed": best is not None,
        "best": best,
    }
    write_results("retrieval", rows, meta)
    print(json.dumps({"passed": best is not None, "best": best}))
    return 0 if best is not None else 1
