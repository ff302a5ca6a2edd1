"""A small, deterministic model version in the serving format, for tests and
benchmarks (never used by the service itself).

The graphs are built with ``onnx.helper`` (no torch): both towers project
content with the same matrix, so a user whose history or stated interest is
close to an item's content gets that item near the top, which lets tests see
that an event changed a recommendation. Content vectors come from a mixture of
clusters, the way text-embedding catalogs look (uniform random vectors would
make every ANN look worse than it is on real data).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.common import ann
from services.common.registry import ModelRegistry
from services.fusion.model_version import FORMAT

USER_VOCAB = {"age_band": ["18-24", "25-34", "35-49", "50+"], "region": ["eu", "na", "asia"]}
ITEM_VOCAB = {"category": [f"c{i}" for i in range(8)]}
RANKER_FEATURES = ["dot", "interest_sim", "history_sim", "log_popularity", "history_count"]
RANKER_WEIGHTS = [1.0, 0.5, 0.5, 0.05, 0.0]
OPSET = 17
# Tower candidates the synthetic ranker declares (as the trainer's default).
CANDIDATES = 100


def clustered_vectors(
    n: int, dim: int, *, clusters: int = 64, spread: float = 0.35, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised vectors around random centres: (vectors, cluster of each row)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, size=n)
    out = np.empty((n, dim), dtype=np.float32)
    step = 100_000  # bounded temporary memory for 1M-row catalogs
    for start in range(0, n, step):
        part = labels[start : start + step]
        noise = rng.standard_normal((len(part), dim)).astype(np.float32) * (spread / np.sqrt(dim))
        block = centres[part] + noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + step] = block
    return out, labels


def sample_user_vectors(
    item_vectors: np.ndarray, *, users: int = 500, max_history: int = 5, seed: int = 0
) -> np.ndarray:
    """Query vectors like the users of a synthetic version: each the normalised mean
    of 1..``max_history`` random items' vectors (the synthetic user tower projects
    its history's mean content as the item tower projects an item's, so this is its
    output up to the small attribute term). Used to tune the version's ANN index."""
    rng = np.random.default_rng(seed + 1)
    n = len(item_vectors)
    out = np.empty((users, item_vectors.shape[1]), dtype=np.float32)
    for u in range(users):
        out[u] = item_vectors[rng.integers(n, size=int(rng.integers(1, max_history + 1)))].mean(0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.opset_import[0].version = OPSET
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _tower(
    name: str,
    inputs: Mapping[str, int],
    weights: Mapping[str, np.ndarray],
    bias: np.ndarray,
    output: str,
    dim: int,
) -> onnx.ModelProto:
    """output = L2normalise(sum_i input_i @ W_i + bias)."""
    nodes: list[onnx.NodeProto] = []
    initializers = [numpy_helper.from_array(bias.astype(np.float32), f"{name}_bias")]
    total = f"{name}_bias"
    for i, (input_name, _width) in enumerate(inputs.items()):
        w = f"{name}_w{i}"
        initializers.append(numpy_helper.from_array(weights[input_name].astype(np.float32), w))
        nodes.append(helper.make_node("MatMul", [input_name, w], [f"{name}_p{i}"]))
        nodes.append(helper.make_node("Add", [total, f"{name}_p{i}"], [f"{name}_s{i}"]))
        total = f"{name}_s{i}"
    nodes.append(helper.make_node("LpNormalization", [total], [output], axis=-1, p=2))
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(k, TensorProto.FLOAT, ["batch", v])
            for k, v in inputs.items()
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", dim])],
        initializers,
    )
    return helper.make_model(graph, producer_name="coldstart-synthetic")


def _ranker(weights: list[float]) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.asarray(weights, dtype=np.float32).reshape(-1, 1), "w")
    shape = numpy_helper.from_array(np.asarray([-1], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["features", "w"], ["raw"]),
        helper.make_node("Reshape", ["raw", "shape"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ranker",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", len(weights)])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])],
        [w, shape],
    )
    return helper.make_model(graph, producer_name="coldstart-synthetic")


def write_version_files(
    folder: Path,
    *,
    n_items: int = 2_000,
    dimension: int = 16,
    content_dimension: int = 16,
    seed: int = 0,
    with_index: bool = True,
) -> dict[str, Any]:
    """Fill ``folder`` with a complete version; return its manifest (not yet written)."""
    rng = np.random.default_rng(seed)
    content, labels = clustered_vectors(n_items, content_dimension, seed=seed)
    projection = rng.standard_normal((content_dimension, dimension)).astype(np.float32)
    projection /= np.sqrt(content_dimension)
    user_width = sum(len(v) for v in USER_VOCAB.values())
    item_width = sum(len(v) for v in ITEM_VOCAB.values())
    small = 0.05
    # A faint bias keeps an empty user's vector defined (normalising zero is NaN).
    user_bias = rng.standard_normal(dimension).astype(np.float32) * 1e-3
    user = _tower(
        "user",
        {
            "user_attributes": user_width,
            "interest": content_dimension,
            "history": content_dimension,
        },
        {
            "user_attributes": rng.standard_normal((user_width, dimension)) * small,
            "interest": projection,
            "history": projection,
        },
        user_bias,
        "user_vector",
        dimension,
    )
    item = _tower(
        "item",
        {"content": content_dimension, "item_attributes": item_width},
        {
            "content": projection,
            "item_attributes": rng.standard_normal((item_width, dimension)) * small,
        },
        np.zeros(dimension, dtype=np.float32),
        "item_vector",
        dimension,
    )
    _save(user, folder / "user_tower.onnx")
    _save(item, folder / "item_tower.onnx")
    _save(_ranker(RANKER_WEIGHTS), folder / "ranker.onnx")

    ids = [f"item-{i}" for i in range(n_items)]
    categories = [ITEM_VOCAB["category"][int(c) % 8] for c in labels]
    # Item vectors exactly as the item tower computes them (numpy mirror of the graph).
    attr = np.zeros((n_items, item_width), dtype=np.float32)
    attr[np.arange(n_items), labels % 8] = 1.0
    item_w = numpy_helper.to_array(item.graph.initializer[-1])  # item_w1 (attributes)
    raw = content @ projection + attr @ item_w
    vectors = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    popularity = np.floor(1000.0 / (1 + rng.permutation(n_items))).astype(np.float32)
    (folder / "item_ids.json").write_text(json.dumps(ids))
    np.save(folder / "item_vectors.npy", vectors)
    np.save(folder / "content_vectors.npy", content)
    np.save(folder / "popularity.npy", popularity)
    with (folder / "items.jsonl").open("w") as handle:
        for i in range(n_items):
            record = {
                "text": f"Item {i} ({categories[i]})",
                "attributes": {"category": categories[i]},
                "tags": [f"t{i % 5}"],
            }
            handle.write(json.dumps(record) + "\n")
    index_desc: dict[str, Any] = {}
    if with_index:
        import faiss

        index, index_desc = ann.tune(vectors, sample_user_vectors(vectors, seed=seed), CANDIDATES)
        faiss.write_index(index, str(folder / "items.faiss"))
    return {
        "format": FORMAT,
        "dimension": dimension,
        "content_dimension": content_dimension,
        "user_attributes": USER_VOCAB,
        "item_attributes": ITEM_VOCAB,
        # As the trainer declares its ranker's training candidates (ModelConfig.ranker_candidates).
        "ranker": {
            "input": "features",
            "output": "score",
            "features": RANKER_FEATURES,
            "candidates": CANDIDATES,
        },
        **({"index": index_desc} if index_desc else {}),
        "encoder_model": "synthetic",
        "metrics": {"recall@20": 0.0},
        "item_count": n_items,
    }


def publish_version(
    registry: ModelRegistry, *, make_current: bool = True, tag: str = "synthetic", **kwargs: Any
) -> str:
    """Write a synthetic version into ``registry``; return its name."""
    manifest: dict[str, Any] = {}
    with registry.stage(manifest, tag=tag) as folder:
        manifest.update(write_version_files(folder, **kwargs))
    version = str(manifest["version"])
    if make_current:
        registry.set_current(version)
    return version
