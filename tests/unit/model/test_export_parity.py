"""Export: ONNX graphs match torch (<= 1e-4), the version is complete and servable
without torch, and serving through the manifest ranks like the trained model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.registry import ModelRegistry
from services.trainer.model.bundle import load_bundle, save_bundle
from services.trainer.model.export import PARITY_TOLERANCE, main, publish
from services.trainer.model.onnx_version import FORMAT, OnnxVersion
from services.trainer.model.recommender import ScoringModel
from services.trainer.model.train import TrainResult


def saved_run(
    trained: TrainResult,
    root: Path,
    meta: dict[str, object],
    item_texts: list[str] | None = None,
) -> Path:
    """The trained model saved as a training run's bundle under ``root``; its folder."""
    data = trained.data
    folder = root / "run" / "model"
    save_bundle(
        folder,
        trained,
        [f"i{i}" for i in range(data.n_items)],
        [f"u{u}" for u in range(data.n_users)],
        meta,
        item_texts=item_texts,
    )
    return folder


@pytest.fixture(scope="module")
def version(tiny_trained: TrainResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    meta = {"metrics": {"recall@20": 0.5}, "data": {"offsets": {"0": 12}}}
    _, path = publish(load_bundle(saved_run(tiny_trained, root, meta)), root / "registry")
    return path


def test_parity_and_manifest(version: Path) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["format"] == FORMAT
    parity = manifest["parity_max_abs_diff"]
    for graph in ("user_tower", "item_tower", "ranker"):
        assert parity[graph] <= PARITY_TOLERANCE
    for name in manifest["files"].values():
        assert (version / name).is_file(), name
    inputs = {i["name"]: i for i in manifest["towers"]["user"]["inputs"]}
    assert inputs["user_id"]["dtype"] == "int64"
    assert inputs["hist_vec"]["shape"] == ["batch", manifest["dimension"]]
    assert manifest["towers"]["item"]["outputs"][0]["shape"] == ["batch", manifest["dimension"]]
    assert len(manifest["ranker"]["features"]) == manifest["ranker"]["io"]["inputs"][0]["shape"][1]
    # "auto": the kind and breadth were chosen on sampled users at the ranker's fetch.
    index = manifest["index"]
    assert index["kind"] in ("flat", "ivf", "hnsw")
    assert index["recall"] >= index["tuning"]["recall_target"] == 0.98
    assert index["recall_k"] == min(manifest["ranker"]["candidates"], manifest["n_items"])
    assert {row["kind"] for row in index["tuning"]["tried"]} == {"flat", "ivf", "hnsw"}
    assert manifest["metrics"] == {"recall@20": 0.5}
    assert manifest["data"]["offsets"] == {"0": 12}
    assert "parent_version" in manifest
    registry = ModelRegistry(version.parents[1])
    assert registry.current() == version.name


def test_dynamic_batch(version: Path) -> None:
    served = OnnxVersion(version)
    n = served.item_vectors.shape[0]
    for rows in (np.array([0]), np.arange(min(n, 7))):
        out = served.item_vecs(
            served.tables.content[rows], served.tables.item_attrs[rows], served.item_codes[rows]
        )
        np.testing.assert_allclose(out, served.item_vectors[rows], atol=PARITY_TOLERANCE)


def test_serving_ranks_like_training(tiny_trained: TrainResult, version: Path) -> None:
    served = OnnxVersion(version)
    model = ScoringModel(tiny_trained)
    data = tiny_trained.data
    users = np.arange(6)
    hists = [
        data.history(int(u))[: int(k)] for u, k in zip(users, [0, 1, 3, 5, 8, 15], strict=True)
    ]
    candidates = np.arange(data.n_items)
    head, onnx_scores = served.rank(
        data.user_attrs[users], data.user_codes[users], hists, candidates
    )
    torch_scores = model.score(users, data.user_attrs[users], hists, candidates)
    for r in range(len(users)):
        np.testing.assert_allclose(onnx_scores[r], torch_scores[r, head[r]], atol=1e-4)
        if len(hists[r]):  # the ranker's head; without history the tower order stands
            assert set(head[r]) == set(np.flatnonzero(torch_scores[r] > -1000))


def test_new_item_vector_from_the_item_tower(version: Path) -> None:
    """A brand-new item (id 0) gets a vector from content + attributes; the index takes it."""
    import faiss

    served = OnnxVersion(version)
    vec = served.item_vecs(
        served.tables.content[:1], served.tables.item_attrs[:1], np.zeros(1, np.int64)
    )
    assert vec.shape == (1, served.item_vectors.shape[1]) and np.isfinite(vec).all()
    index = faiss.read_index(str(version / "items.faiss"))
    index.add(vec.astype(np.float32))
    assert index.ntotal == served.item_vectors.shape[0] + 1


def test_fixed_index_kind(tiny_trained: TrainResult, tmp_path: Path) -> None:
    """--index hnsw keeps the given graph parameters and reports its measured recall."""
    import faiss

    params = {"m": 16, "ef_construction": 100, "ef_search": 40}
    _, path = publish(
        load_bundle(saved_run(tiny_trained, tmp_path, {})),
        tmp_path / "registry",
        index_kind="hnsw",
        index_params=params,
    )
    index = json.loads((path / "manifest.json").read_text())["index"]
    assert (index["type"], index["M"], index["efSearch"]) == ("IndexHNSWFlat", 16, 40)
    assert 0 < index["recall"] <= 1 and "tuning" not in index
    stored: Any = faiss.read_index(str(path / "items.faiss"))
    assert stored.hnsw.efSearch == 40


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--run", str(tmp_path)]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["--run", str(tmp_path), "--hnsw-m", "0"]) == 2
    assert "--hnsw-m" in capsys.readouterr().err


def test_gate_scorer_uses_external_ids(tiny_trained: TrainResult, version: Path) -> None:
    """The retrainer's Scorer: ids in, head in ranker order, unknown candidates -inf."""
    from services.trainer.model.onnx_version import scorer

    data = tiny_trained.data
    served = scorer(version)
    candidates = [f"i{i}" for i in range(data.n_items)] + ["never-seen"]
    history = [f"i{i}" for i in data.history(0)[:3]]
    scores = served.score(["u0", "new-user"], [history, []], candidates)
    assert scores.shape == (2, data.n_items + 1)
    assert np.isneginf(scores[:, -1]).all() and np.isfinite(scores[:, :-1]).all()
    model = ScoringModel(tiny_trained)
    ref = model.score(
        np.array([0]), data.user_attrs[:1], [data.history(0)[:3]], np.arange(data.n_items)
    )
    head = np.flatnonzero(ref[0] > -1000)
    np.testing.assert_allclose(scores[0, head], ref[0, head], atol=1e-4)


def test_items_jsonl_carries_texts_and_the_attributes_filters_read(
    tiny_trained: TrainResult, tmp_path: Path
) -> None:
    from services.fusion.recsys_version import RecsysModelVersion

    texts = [f"Title {i} | subtitle {i} | genre" for i in range(tiny_trained.data.n_items)]
    bundle = load_bundle(saved_run(tiny_trained, tmp_path, {}, item_texts=texts))
    assert bundle.item_texts == texts
    _, path = publish(bundle, tmp_path / "registry")
    records = [json.loads(line) for line in (path / "items.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == texts
    decoded = bundle.spec.item_vocab.decode(bundle.tables["item_attrs"])
    assert [(r["attributes"], tuple(r["tags"])) for r in records] == decoded
    served = RecsysModelVersion.load(path)
    meta = served.index.meta(3)
    assert (meta.item_id, meta.title, meta.text) == ("i3", "Title 3", texts[3])
    assert dict(meta.attributes) == decoded[3][0]


def test_a_bundle_without_texts_exports_empty_ones(
    tiny_trained: TrainResult, tmp_path: Path
) -> None:
    folder = saved_run(tiny_trained, tmp_path, {})
    ids = json.loads((folder / "ids.json").read_text())
    del ids["item_texts"]  # a bundle saved before item texts
    (folder / "ids.json").write_text(json.dumps(ids))
    _, path = publish(load_bundle(folder), tmp_path / "registry")
    records = [json.loads(line) for line in (path / "items.jsonl").read_text().splitlines()]
    assert len(records) == tiny_trained.data.n_items
    assert {r["text"] for r in records} == {""}
