"""services.common.ann: index kinds, their search breadth, and the tuner that
picks the fastest kind reaching a recall target on a version's own users."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from services.common import ann
from services.fusion.synthetic import clustered_vectors, sample_user_vectors


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, np.ndarray]:
    vectors, _ = clustered_vectors(3_000, 16, clusters=16, seed=3)
    return vectors, sample_user_vectors(vectors, users=120, seed=3)


def test_exact_top_is_the_sorted_exhaustive_answer(catalog: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = catalog
    top = ann.exact_top(vectors, queries[:5], 10)
    expected = np.argsort(-(queries[:5] @ vectors.T), axis=1)[:, :10]
    np.testing.assert_array_equal(top, expected)


@pytest.mark.parametrize("kind", ann.KINDS)
def test_each_kind_builds_searches_and_describes_itself(
    kind: str, catalog: tuple[np.ndarray, np.ndarray]
) -> None:
    vectors, queries = catalog
    index = ann.build(vectors, kind)
    assert ann.kind_of(index) == kind and index.ntotal == len(vectors)
    desc = ann.describe(index)
    assert desc["kind"] == kind and desc["dimension"] == 16 and desc["ntotal"] == 3_000
    truth = ann.exact_top(vectors, queries, 20)
    widest = {"flat": 0, "ivf": int(getattr(index, "nlist", 0)), "hnsw": 400}[kind]
    # At its widest every kind finds (almost) everything the exact search does.
    assert ann.recall(index, queries, truth, widest) >= 0.99


def test_breadth_is_the_index_own_unless_overridden(catalog: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, _ = catalog
    hnsw = ann.build(vectors, "hnsw")
    hnsw.hnsw.efSearch = 50
    assert ann.breadth(hnsw, 20) == 50
    assert ann.breadth(hnsw, 80) == 80  # efSearch never below the fetch
    assert ann.breadth(hnsw, 20, ef_search=30) == 30
    ivf = ann.build(vectors, "ivf", nlist=40)
    ivf.nprobe = 6
    assert ann.breadth(ivf, 20) == 6 and ann.breadth(ivf, 20, nprobe=9) == 9
    assert ann.breadth(ivf, 20, nprobe=1000) == 40  # never more cells than there are
    # A large fetch widens the scan to cells holding about twice as many rows.
    assert ann.breadth(ivf, 750) == 20 and ann.breadth(ivf, 3_000) == 40
    assert ann.breadth(ann.build(vectors, "flat"), 20) == 0
    assert ann.search_params(ann.build(vectors, "flat"), 0) is None


def test_default_nlist_keeps_enough_points_per_cell() -> None:
    assert ann.default_nlist(100_000) == int(4 * 100_000**0.5)
    assert ann.default_nlist(1_000) == 1_000 // 39
    assert ann.default_nlist(10) == 1


def test_unknown_kind_is_refused(catalog: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        ann.build(catalog[0], "lsh")
    assert ann.kind_of(faiss.IndexLSH(16, 8)) is None


def test_tune_picks_a_kind_that_reaches_the_target_and_stores_its_breadth(
    catalog: tuple[np.ndarray, np.ndarray],
) -> None:
    vectors, queries = catalog
    index, desc = ann.tune(vectors, queries, 50, recall_target=0.95)
    assert desc["kind"] == ann.kind_of(index)
    assert desc["recall"] >= 0.95 and desc["tuning"]["k"] == 50
    tried = {row["kind"]: row for row in desc["tuning"]["tried"]}
    assert set(tried) == set(ann.KINDS)
    chosen = tried[desc["kind"]]
    # The chosen one is the fastest of those that reached the target, or flat
    # (exact) when nothing beats it by the margin ...
    fastest = min(
        (r for r in tried.values() if r["us_per_query"] is not None),
        key=lambda r: r["us_per_query"],
    )
    if tried["flat"]["us_per_query"] <= fastest["us_per_query"] * ann.EXACT_MARGIN:
        assert chosen is tried["flat"]
    else:
        assert chosen is fastest
    # ... and its breadth travels in the index itself (the file fusion reads).
    truth = ann.exact_top(vectors, queries, 50)
    width = ann.breadth(index, 50)
    assert width == chosen["breadth"]
    assert ann.recall(index, queries, truth, width) == pytest.approx(desc["recall"], abs=1e-4)


def test_tune_never_chooses_a_kind_below_the_target(catalog: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = catalog
    with pytest.raises(ValueError, match="no index kind reached"):
        ann.tune(vectors, queries, 50, recall_target=1.01, kinds=("hnsw",))
    _index, desc = ann.tune(vectors, queries, 50, recall_target=1.0, kinds=("flat", "hnsw"))
    assert desc["recall"] == 1.0
