"""``coldstart export model``: a trained model -> a new registry version.

    coldstart export model --run .run/train/<run> [--registry DIR] [--index hnsw|ivf]
                           [--no-set-current]

Writes the user tower, item tower and ranker as ONNX (dynamic batch; parity
with torch checked, max abs difference <= 1e-4, or the export fails), the item
vectors and a faiss index over them, every table the feature builder needs,
and manifest.json (format ``coldstart.recommender/2``, see docs/MODEL.md).
The version is staged and published atomically by ``ModelRegistry``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from services.common import ann
from services.common.recsys_features import (
    CONTENT_MAP_PENALTY,
    CONTENT_NEIGHBORS,
    content_map,
    content_thresholds,
    item_tower_inputs,
    prior_fields,
    ranker_features,
    user_tower_inputs,
)
from services.trainer.model.bundle import MODEL_DIR, Bundle, load_bundle
from services.trainer.model.onnx_version import FORMAT

PARITY_TOLERANCE = 1e-4
OPSET = 17
# Where a bundle does not say (bundles saved before the field): MovieLens's threshold,
# the one every embedded dataset uses.
DEFAULT_POSITIVE_THRESHOLD = 4.0

FILES = {
    "user_tower": "user_tower.onnx",
    "item_tower": "item_tower.onnx",
    "ranker": "ranker.onnx",
    "item_ids": "item_ids.json",
    "user_codes": "user_codes.json",
    "user_ids": "user_ids.json",
    "user_attributes": "user_attributes.npy",
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
USER_INPUTS = ("user_attrs", "user_id", "interest", "has_interest", "hist_vec", "hist_len")
ITEM_INPUTS = ("content", "item_attrs", "item_id")


class ExportError(RuntimeError):
    pass


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    names: Sequence[str],
    output: str,
    path: Path,
) -> None:
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    axes[output] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: small MLP graphs, no need for torch.export.
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(names),
            output_names=[output],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _io(session: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": i.name,
                "shape": [d if isinstance(d, int) else "batch" for d in i.shape],
                "dtype": i.type.replace("tensor(", "").rstrip(")"),
            }
            for i in session.get_inputs()
        ],
        "outputs": [
            {
                "name": o.name,
                "shape": [d if isinstance(d, int) else "batch" for d in o.shape],
                "dtype": o.type.replace("tensor(", "").rstrip(")"),
            }
            for o in session.get_outputs()
        ],
    }


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, np.float64))))


def _sample_users(bundle: Bundle, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Realistic user inputs: random users with 0..60 history items, some without id."""
    t = bundle.tables
    n_users = t["user_attrs"].shape[0]
    users = rng.integers(0, n_users, size=n)
    warm = np.flatnonzero(t["item_codes"] > 0)
    lengths = rng.choice([0, 1, 3, 5, 20, 60], size=n)
    histories = [rng.choice(warm, size=int(k), replace=True) for k in lengths]
    codes = t["user_codes"][users] * (rng.random(n) < 0.5)
    interest = (
        t["content"][rng.integers(0, len(t["content"]), size=n)] * (rng.random(n) < 0.3)[:, None]
    )
    return {
        "users": users,
        "user_attrs": t["user_attrs"][users],
        "codes": codes.astype(np.int64),
        "histories": histories,
        "interest": interest.astype(np.float32),
    }


def export_onnx(bundle: Bundle, folder: Path, seed: int = 0) -> dict[str, Any]:
    """Write the three graphs and check them against torch; returns the parity report."""
    import onnxruntime as ort

    experiments = bundle.config.harness_only()
    if experiments:
        raise ExportError(f"{'=true, '.join(experiments)}=true: harness experiments, not servable")
    if bundle.config.user_history != "pooled":
        # Serving pools the ANN index rows (item-tower outputs) into the user tower.
        raise ExportError(
            f"user_history={bundle.config.user_history!r}: only 'pooled' can be served"
        )

    t = bundle.tables
    towers = bundle.towers.eval()
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {"tolerance": PARITY_TOLERANCE}

    item_in = item_tower_inputs(t["content"], t["item_attrs"], t["item_codes"])
    item_args = tuple(torch.from_numpy(item_in[n]) for n in ITEM_INPUTS)
    _export(towers.item, item_args, ITEM_INPUTS, "item_vec", folder / FILES["item_tower"])
    with torch.no_grad():
        item_vecs = towers.item(*item_args).numpy()
    sess_item = ort.InferenceSession(
        str(folder / FILES["item_tower"]), providers=["CPUExecutionProvider"]
    )
    onnx_items = sess_item.run(None, item_in)[0]
    report["item_tower"] = _max_diff(item_vecs, onnx_items)

    sample = _sample_users(bundle, 64, rng)
    user_in = user_tower_inputs(
        bundle.spec,
        sample["user_attrs"],
        sample["codes"],
        sample["histories"],
        item_vecs,
        sample["interest"],
    )
    user_args = tuple(torch.from_numpy(user_in[n]) for n in USER_INPUTS)
    _export(towers.user, user_args, USER_INPUTS, "user_vec", folder / FILES["user_tower"])
    with torch.no_grad():
        user_vecs = towers.user(*user_args).numpy()
    sess_user = ort.InferenceSession(
        str(folder / FILES["user_tower"]), providers=["CPUExecutionProvider"]
    )
    report["user_tower"] = _max_diff(user_vecs, sess_user.run(None, user_in)[0])
    io = {"item_tower": _io(sess_item), "user_tower": _io(sess_user)}

    if bundle.ranker is not None:
        scores = user_vecs @ item_vecs.T
        head = np.argsort(-scores, axis=1)[:, : bundle.config.ranker_candidates]
        feats = ranker_features(
            bundle.spec,
            bundle.ranker_tables(),
            np.take_along_axis(scores, head, axis=1),
            sample["user_attrs"],
            sample["histories"],
            head,
            interest=sample["interest"],
        )
        flat = torch.from_numpy(feats.reshape(-1, feats.shape[2]))
        _export(bundle.ranker.eval(), (flat,), ("features",), "score", folder / FILES["ranker"])
        with torch.no_grad():
            ref = bundle.ranker(flat).numpy()
        sess_rank = ort.InferenceSession(
            str(folder / FILES["ranker"]), providers=["CPUExecutionProvider"]
        )
        report["ranker"] = _max_diff(ref, sess_rank.run(None, {"features": flat.numpy()})[0])
        io["ranker"] = _io(sess_rank)
    worst = max(v for k, v in report.items() if k != "tolerance")
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"ONNX parity failed: {report}")
    report["io"] = io
    report["item_vectors"] = onnx_items
    return report


def build_index(
    vectors: np.ndarray, kind: str, params: dict[str, int]
) -> tuple[Any, dict[str, Any]]:
    """An inner-product faiss index of ``kind`` (hnsw, ivf, flat) with the given
    parameters, and its description."""
    index = ann.build(
        vectors,
        kind,
        m=params["m"],
        ef_construction=params["ef_construction"],
        nlist=min(params["nlist"], max(1, len(vectors) // 39)),
    )
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif kind == "ivf":
        index.nprobe = min(int(index.nlist), params["nprobe"])
    return index, ann.describe(index)


def write_item_records(path: Path, bundle: Bundle) -> None:
    """items.jsonl: per item (row order) its text and the attributes and tags that
    filters and display fields read, decoded from the rows the model was trained on."""
    decoded = bundle.spec.item_vocab.decode(bundle.tables["item_attrs"])
    texts = bundle.item_texts or [""] * len(bundle.item_ids)
    with path.open("w") as handle:
        for text, (attributes, tags) in zip(texts, decoded, strict=True):
            record = {"text": text, "attributes": attributes, "tags": list(tags)}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_version(
    bundle: Bundle,
    folder: Path,
    *,
    index_kind: str = "auto",
    index_params: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Fill ``folder`` with every file of a version; returns the manifest (not written)."""
    import faiss

    t = bundle.tables
    params = {"m": 32, "ef_construction": 200, "ef_search": 128, "nlist": 64, "nprobe": 16}
    params.update(index_params or {})
    parity = export_onnx(bundle, folder)
    item_vecs = parity.pop("item_vectors")
    io = parity.pop("io")
    np.save(folder / FILES["item_vectors"], item_vecs.astype(np.float32))
    np.save(folder / FILES["content_vectors"], t["content"].astype(np.float32))
    np.save(folder / FILES["content_thresholds"], content_thresholds(t["content"]))
    np.save(folder / FILES["content_map"], content_map(t["content"], item_vecs, t["pop"] > 0))
    np.save(folder / FILES["item_attributes"], t["item_attrs"].astype(np.float32))
    np.save(folder / FILES["item_codes"], t["item_codes"].astype(np.int64))
    np.save(folder / FILES["popularity"], t["pop"].astype(np.float32))
    np.save(folder / FILES["segment_counts"], t["seg_counts"].astype(np.float32))
    np.save(folder / FILES["segment_sizes"], t["seg_sizes"].astype(np.float32))
    (folder / FILES["item_ids"]).write_text(json.dumps(bundle.item_ids))
    write_item_records(folder / FILES["items"], bundle)
    user_codes = {u: int(c) for u, c in zip(bundle.user_ids, t["user_codes"], strict=True) if c}
    (folder / FILES["user_codes"]).write_text(json.dumps(user_codes))
    # Attributes of the users known at training time, for the gate's scorer (serving
    # takes attributes from its online state instead).
    (folder / FILES["user_ids"]).write_text(json.dumps(bundle.user_ids))
    np.save(folder / FILES["user_attributes"], t["user_attrs"].astype(np.float32))

    sample = _sample_users(bundle, 200, np.random.default_rng(1))
    queries = (
        bundle.towers.user(
            **{
                k: torch.from_numpy(v)
                for k, v in user_tower_inputs(
                    bundle.spec,
                    sample["user_attrs"],
                    sample["codes"],
                    sample["histories"],
                    item_vecs,
                    sample["interest"],
                ).items()
            }
        )
        .detach()
        .numpy()
    )
    # The index is searched for the ranker's candidates, so its recall is measured
    # (and, for "auto", its kind and breadth chosen) at that fetch, on these users.
    fetch = bundle.config.ranker_candidates
    if index_kind == "auto":
        index, index_desc = ann.tune(item_vecs, queries, fetch)
    else:
        index, index_desc = build_index(item_vecs, index_kind, params)
        truth = ann.exact_top(item_vecs, queries, fetch)
        width = ann.breadth(index, truth.shape[1])
        index_desc["recall"] = round(ann.recall(index, queries, truth, width), 4)
    index_desc["recall_k"] = min(fetch, len(item_vecs))
    faiss.write_index(index, str(folder / FILES["index"]))

    spec = bundle.spec
    files = dict(FILES)
    if bundle.ranker is None:
        files.pop("ranker")
    cfg = bundle.config
    return {
        "format": FORMAT,
        "model": "coldstart two-tower + ranker",
        "scorer": "services.trainer.model.onnx_version:scorer",
        "dimension": int(item_vecs.shape[1]),
        "content_dimension": spec.text_dim,
        "n_items": len(bundle.item_ids),
        "files": files,
        "feature_spec": spec.to_json(),
        "attribute_columns": {
            "user": spec.user_vocab.index(),
            "item": spec.item_vocab.index(),
            "note": "column 0 of every attribute vector is a constant 1",
        },
        "id_codes": "user_id / item_id inputs: the code from user_codes.json / item_codes.npy "
        "(row + 1), 0 for a user or item without one (new); never any other value",
        "score": "user_vec . item_vec (inner product); the ranker re-scores each user's top "
        "ranker.candidates by that score (history excluded) and its score orders them",
        "towers": {
            "item": {
                "file": FILES["item_tower"],
                **io["item_tower"],
                "builder": "services.common.recsys_features.item_tower_inputs",
            },
            "user": {
                "file": FILES["user_tower"],
                **io["user_tower"],
                "builder": "services.common.recsys_features.user_tower_inputs",
                "history": f"mean of item_vectors rows of the last {spec.max_history} items",
            },
        },
        "ranker": {
            "enabled": bundle.ranker is not None,
            "file": FILES["ranker"] if bundle.ranker is not None else None,
            "input": "features",
            "output": "score",
            "features": spec.ranker_feature_names(),
            "candidates": cfg.ranker_candidates,
            "gate": {
                "min_history": cfg.ranker_min_history,
                "max_history": cfg.ranker_max_history,
                "max_new_share": cfg.ranker_max_new_share,
                "rule": "services.common.recsys_features.ranker_applies: otherwise keep "
                "the tower order",
            },
            "new_items": {
                "content_weight": cfg.new_item_content_weight if cfg.use_content else 0.0,
                "neighbors": CONTENT_NEIGHBORS,
                "map_weight": cfg.new_item_map_weight if cfg.use_content else 0.0,
                "map_penalty": CONTENT_MAP_PENALTY,
                "unliked_weight": cfg.new_item_unliked_weight if cfg.use_content else 0.0,
                "rule": "services.common.recsys_features.blend_new_items of the tower, "
                "content_knn_scores and the user vector against content_vectors @ "
                "content_map, on a head where new_item_head holds",
            },
            "short_history": {
                "prior_weight": cfg.prior_weight,
                "max_history": cfg.prior_max_history,
                "fields": list(prior_fields(spec)),
                "rule": "services.common.recsys_features.blend_standardised of the head's "
                "scores and segment_prior over these fields where short_history_prior_applies",
            },
            "popularity_users": bundle.n_pos_users,
            "builder": "services.common.recsys_features.ranker_features",
            **({"io": io["ranker"]} if "ranker" in io else {}),
        },
        "index": {"file": FILES["index"], **index_desc},
        "parity_max_abs_diff": parity,
        "training": {"config": cfg.to_dict(), **bundle.meta.get("training", {})},
        "metrics": bundle.meta.get("metrics", {}),
        "data": bundle.meta.get("data", {}),
        "user_history": {
            "positive_threshold": float(
                bundle.meta.get("data", {}).get("positive_threshold", DEFAULT_POSITIVE_THRESHOLD)
            ),
            "rule": "an interaction of kind 'rating' with a value below positive_threshold is "
            "unliked: never recommended again, left out of the towers', ranker's and prior's "
            "history, read by the new-item blend's unliked term; every other kind is liked",
        },
    }


def publish(
    bundle: Bundle,
    registry_root: Path,
    *,
    index_kind: str = "auto",
    index_params: dict[str, int] | None = None,
    set_current: bool = True,
    tag: str = "",
) -> tuple[str, Path]:
    from services.common.registry import ModelRegistry

    registry = ModelRegistry(registry_root)
    registry.clean_staging()
    manifest: dict[str, Any] = {}
    with registry.stage(manifest, tag=tag) as folder:
        manifest.update(
            write_version(bundle, folder, index_kind=index_kind, index_params=index_params)
        )
    version = str(manifest["version"])
    if set_current:
        registry.set_current(version)
    return version, registry.path(version)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="coldstart export model", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a training run folder (or its model/)")
    p.add_argument(
        "--registry", type=Path, help="registry root (default .run/registry/recommender)"
    )
    p.add_argument(
        "--index",
        default="auto",
        choices=("auto", *ann.KINDS),
        help="auto (default): the fastest kind and breadth reaching recall@candidates "
        f">= {ann.DEFAULT_RECALL_TARGET} on sampled users; the other options fix the kind",
    )
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--nlist", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument(
        "--no-set-current", action="store_true", help="publish without making it current"
    )
    p.add_argument("--tag", default="", help="suffix of the version name")
    return p


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        for name in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe"):
            if getattr(args, name) < 1:
                raise _UsageError(f"--{name.replace('_', '-')}: must be >= 1")
        folder = args.run if (args.run / "model.pt").is_file() else args.run / MODEL_DIR
        if not (folder / "model.pt").is_file():
            raise _UsageError(f"--run: {args.run} holds no trained model (model.pt)")
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from services.common.paths import run_dir

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    bundle = load_bundle(folder)
    root = args.registry or run_dir() / "registry" / "recommender"
    params = {
        "m": args.hnsw_m,
        "ef_construction": args.ef_construction,
        "ef_search": args.ef_search,
        "nlist": args.nlist,
        "nprobe": args.nprobe,
    }
    try:
        version, path = publish(
            bundle,
            root,
            index_kind=args.index,
            index_params=params,
            set_current=not args.no_set_current,
            tag=args.tag,
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((path / "manifest.json").read_text())
    print(
        f"published {version} -> {path} ({time.perf_counter() - t0:.1f}s); parity "
        + ", ".join(
            f"{k} {v:.2e}" for k, v in manifest["parity_max_abs_diff"].items() if k != "tolerance"
        )
        + f"; index {manifest['index']['type']} recall@100 {manifest['index']['recall@100_vs_exact']}"
    )
    return 0
