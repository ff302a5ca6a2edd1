from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from services.common import ann
from services.fusion.index import ItemIndex, ItemMeta, build_hnsw
from services.fusion.synthetic import clustered_vectors

# Every kind a version may ship; IVF searched with all its cells is exact, like flat.
KINDS = ["hnsw", "ivf", "flat"]


def make_ann(vectors: np.ndarray, kind: str) -> Any:
    if kind == "hnsw":
        return build_hnsw(vectors)
    index = ann.build(vectors, kind, nlist=8)
    if kind == "ivf":
        index.nprobe = 8
    return index


def make_index(
    n: int = 500, dim: int = 8, fold_threshold: int = 1_000, kind: str = "hnsw"
) -> ItemIndex:
    vectors, labels = clustered_vectors(n, dim, clusters=8, seed=1)
    metas = [
        ItemMeta(f"i{r}", f"Item {r}", {"colour": f"c{labels[r] % 3}"}, (f"t{r % 4}",))
        for r in range(n)
    ]
    popularity = np.arange(n, 0, -1, dtype=np.float32)
    return ItemIndex(
        metas,
        vectors,
        vectors.copy(),
        popularity,
        make_ann(vectors, kind),
        fold_threshold=fold_threshold,
    )


def exact_top(index: ItemIndex, query: np.ndarray, k: int) -> list[int]:
    scores = index.vectors(np.arange(len(index))) @ query
    return list(np.argsort(-scores)[:k])


@pytest.mark.parametrize("kind", KINDS)
def test_search_agrees_with_exact_search(kind: str) -> None:
    index = make_index(kind=kind)
    query = index.vectors(np.asarray([3]))[0]
    rows, scores = index.search(query, 20)
    assert list(rows) == exact_top(index, query, 20)
    assert np.all(np.diff(scores) <= 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_upserted_item_is_found_at_once_and_replacement_hides_old_row(kind: str) -> None:
    index = make_index(kind=kind)
    query = np.zeros(8, dtype=np.float32)
    query[0] = 1.0
    index.upsert([ItemMeta("new")], query[None, :], query[None, :])
    rows, _ = index.search(query, 1)
    assert index.meta(int(rows[0])).item_id == "new"
    old_row = index.row("new")
    # Replace "new" with the opposite direction: the old row must not come back.
    index.upsert([ItemMeta("new")], -query[None, :], -query[None, :])
    assert index.row("new") != old_row
    rows, _ = index.search(query, 50)
    assert old_row not in set(rows.tolist())
    assert len(index) == 501


@pytest.mark.parametrize("kind", KINDS)
def test_filters_and_exclusions(kind: str) -> None:
    index = make_index(kind=kind)
    query = index.vectors(np.asarray([10]))[0]
    eligible = index.eligible({"colour": "c1"}, ["t2"])
    assert eligible is not None and len(eligible) > 0
    rows, _ = index.search(query, 10, eligible=eligible, excluded=np.asarray([int(eligible[0])]))
    assert len(rows) == 10
    for row in rows:
        meta = index.meta(int(row))
        assert meta.attributes["colour"] == "c1" and "t2" in meta.tags
    assert int(eligible[0]) not in set(rows.tolist())
    assert index.eligible({"colour": "nope"}, []) is not None
    assert len(index.search(query, 5, eligible=index.eligible({"colour": "nope"}, []))[0]) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_side_buffer_folds_into_the_ann_index_without_losing_items(kind: str) -> None:
    index = make_index(kind=kind, fold_threshold=10)
    extra, _ = clustered_vectors(30, 8, clusters=4, seed=7)
    for i in range(30):
        index.upsert([ItemMeta(f"x{i}")], extra[i : i + 1], extra[i : i + 1])
    for _ in range(200):  # the fold runs in a background thread
        if index.side_count < 10:
            break
        time.sleep(0.01)
    assert index.side_count < 10
    for i in (0, 15, 29):
        rows, _ = index.search(extra[i], 1)
        assert index.meta(int(rows[0])).item_id == f"x{i}"


def test_popular_skips_replaced_items() -> None:
    index = make_index()
    assert list(index.popular(3)) == [0, 1, 2]
    index.upsert([ItemMeta("i0")], np.ones((1, 8), np.float32), np.ones((1, 8), np.float32))
    assert list(index.popular(3)) == [1, 2, 3]


def test_searches_run_on_one_openmp_thread_in_any_thread() -> None:
    # OpenMP's thread count is per thread: the batcher's and gRPC's threads must not
    # fork a team per search (idle team workers spin on the cores requests need).
    import threading

    import faiss

    index = make_index()
    query = index.vectors(np.asarray([3]))[0]
    seen: list[int] = []

    def run() -> None:
        index.search_batch(query[None, :], [5], eligibles=[None], excludeds=[np.empty(0, int)])
        seen.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_unfiltered_search_asks_the_index_for_what_can_be_dropped_only(kind: str) -> None:
    index = make_index(kind=kind)
    # k + exclusions + deleted rows: nothing else can be dropped without a filter.
    assert index._fetch(200, 5, False, 1.0) == 205
    assert index._fetch(200, 5, True, 0.5) > 410
    query = index.vectors(np.asarray([3]))[0]
    excluded = np.asarray(exact_top(index, query, 5), dtype=np.int64)
    rows, _ = index.search_batch(query[None, :], [20], eligibles=[None], excludeds=[excluded])[0]
    assert list(rows) == exact_top(index, query, 25)[5:]


def test_search_breadth_comes_from_the_index_unless_overridden() -> None:
    vectors, _ = clustered_vectors(500, 8, clusters=8, seed=1)
    hnsw = build_hnsw(vectors)
    hnsw.hnsw.efSearch = 70
    metas = [ItemMeta(f"i{r}") for r in range(500)]
    pop = np.ones(500, np.float32)
    own = ItemIndex(metas, vectors, vectors, pop, hnsw)

    def breadth(index: ItemIndex, fetch: int) -> int:
        return index._breadth(index._view, fetch)

    assert breadth(own, 20) == 70 and breadth(own, 90) == 90
    assert breadth(ItemIndex(metas, vectors, vectors, pop, hnsw, ef_search=30), 20) == 30
    ivf = make_ann(vectors, "ivf")
    assert breadth(ItemIndex(metas, vectors, vectors, pop, ivf), 20) == 8
    assert breadth(ItemIndex(metas, vectors, vectors, pop, ivf, nprobe=2), 20) == 2
    # Remembered per view (asking faiss costs microseconds a query); a new
    # view (an upsert, a fold) asks again.
    assert own._view.breadths == {20: 70, 90: 90}
    own.upsert([ItemMeta("new")], vectors[:1], vectors[:1])
    assert own._view.breadths == {}


def test_an_index_kind_it_cannot_search_is_refused() -> None:
    import faiss

    vectors, _ = clustered_vectors(50, 8, clusters=2, seed=1)
    lsh = faiss.IndexLSH(8, 16)
    lsh.add(vectors)
    with pytest.raises(ValueError, match="IndexLSH"):
        ItemIndex([ItemMeta(f"i{r}") for r in range(50)], vectors, vectors, np.ones(50), lsh)


@pytest.mark.parametrize(
    ("text", "title"),
    [
        ("Toy Story (1995) | Animation, Children's", "Toy Story (1995)"),
        ("The Rocket and the Moon | a book about comet | space", "The Rocket and the Moon"),
        ("A text with no parts", "A text with no parts"),
        ("", ""),
    ],
)
def test_an_items_title_is_its_text_up_to_the_first_part(text: str, title: str) -> None:
    assert ItemMeta("i1", text).title == title
