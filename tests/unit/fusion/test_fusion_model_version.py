from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from services.fusion.model_version import ModelLoadError, ModelVersion, UserInputs


def test_loads_a_version_and_towers_agree_with_stored_item_vectors(version_path: Path) -> None:
    model = ModelVersion.load(version_path)
    assert len(model.index) == 1_000
    assert model.dimension == 16 and model.content_dimension == 16
    rows = np.arange(5)
    attrs = [dict(model.index.meta(int(r)).attributes) for r in rows]
    recomputed = model.item_vectors(model.index.content(rows), attrs)
    np.testing.assert_allclose(recomputed, model.index.vectors(rows), atol=1e-5)
    assert model.info()["version"] == version_path.name


def _broken(tmp_path: Path, version_path: Path, change: Callable[[Path], None]) -> Path:
    target = tmp_path / "v"
    shutil.copytree(version_path, target)
    change(target)
    return target


def _set_ranker(path: Path, **values: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["ranker"] = {**manifest.get("ranker", {}), **values}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _set_manifest(path: Path, **values: object) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **values}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: (p / "ranker.onnx").unlink(), "ranker.onnx: missing (ranker)"),
        (
            lambda p: (p / "user_tower.onnx").write_bytes(b"not onnx"),
            "user_tower.onnx: cannot load ONNX model",
        ),
        (lambda p: (p / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
        (
            lambda p: np.save(p / "item_vectors.npy", np.zeros((3, 16), np.float32)),
            "item_vectors.npy: shape (3, 16), expected (1000, 16)",
        ),
        (
            lambda p: (p / "items.faiss").write_bytes(b"junk"),
            "items.faiss: cannot read faiss index",
        ),
        (
            lambda p: (p / "manifest.json").write_text(
                json.dumps({**json.loads((p / "manifest.json").read_text()), "dimension": 32})
            ),
            "expected (1000, 32)",
        ),
        (
            lambda p: _set_ranker(p, candidates=0),
            "ranker.candidates must be a positive integer, got 0",
        ),
        (
            lambda p: _set_ranker(p, candidates="100"),
            "ranker.candidates must be a positive integer, got '100'",
        ),
        (
            lambda p: _set_manifest(p, user_history={"positive_threshold": "4"}),
            "manifest.json: user_history.positive_threshold must be a number, got '4'",
        ),
        (
            lambda p: _set_manifest(p, user_history={"positive_threshold": True}),
            "manifest.json: user_history.positive_threshold must be a number, got True",
        ),
        (
            lambda p: _set_manifest(p, user_history=4.0),
            "manifest.json: user_history must be an object, got 4.0",
        ),
    ],
)
def test_bad_versions_fail_with_one_line_naming_the_file(
    tmp_path: Path, version_path: Path, change: Callable[[Path], None], message: str
) -> None:
    broken = _broken(tmp_path, version_path, change)
    with pytest.raises(ModelLoadError) as raised:
        ModelVersion.load(broken)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_index_is_built_at_load_when_the_version_has_none(
    tmp_path: Path, version_path: Path
) -> None:
    broken = _broken(tmp_path, version_path, lambda p: (p / "items.faiss").unlink())
    model = ModelVersion.load(broken)
    query = model.index.vectors(np.asarray([7]))[0]
    rows, _ = model.index.search(query, 1)
    assert rows[0] == 7


def test_ranker_scores_with_the_search_scores_equal_computed_ones(version_path: Path) -> None:
    # core passes the index search's inner products as the tower score ("dot").
    model = ModelVersion.load(version_path)
    users = [
        UserInputs({"age_band": "18-24"}, None, np.asarray([1, 2, 3], dtype=np.int64)),
        UserInputs({}, None, np.empty(0, dtype=np.int64)),
    ]
    vecs = model.user_vector_batch(users)
    found = model.index.search_batch(
        vecs, [50, 50], eligibles=[None, None], excludeds=[np.empty(0, np.int64)] * 2
    )
    rows = [r for r, _s in found]
    given = model.rank_batch(users, rows, vecs, [s for _r, s in found])
    computed = model.rank_batch(users, rows, vecs)
    for a, b in zip(given, computed, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_an_index_kind_the_search_cannot_use_is_rebuilt_as_hnsw(
    tmp_path: Path, version_path: Path
) -> None:
    import faiss

    from services.common import ann

    def write_lsh(path: Path) -> None:
        vectors = np.load(path / "item_vectors.npy")
        lsh = faiss.IndexLSH(vectors.shape[1], 32)
        lsh.add(vectors)
        faiss.write_index(lsh, str(path / "items.faiss"))

    model = ModelVersion.load(_broken(tmp_path, version_path, write_lsh))
    view = model.index._view
    assert view.ann is not None and ann.kind_of(view.ann) == "hnsw"
    assert view.ann.ntotal == len(model.index)
    # and the version keeps its own kind when it can be searched
    assert ann.kind_of(ModelVersion.load(version_path).index._view.ann) in ann.KINDS


def test_the_positive_threshold_comes_from_user_history_else_everything_is_liked(
    tmp_path: Path, version_path: Path
) -> None:
    # A version from before the section: every interaction is liked, as before.
    assert ModelVersion.load(version_path).positive_threshold == float("-inf")
    rated = _broken(
        tmp_path,
        version_path,
        lambda p: _set_manifest(p, user_history={"positive_threshold": 4, "rule": "..."}),
    )
    model = ModelVersion.load(rated)
    assert model.positive_threshold == 4.0 and isinstance(model.positive_threshold, float)
