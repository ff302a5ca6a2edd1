"""A trained model on disk (``<run>/model/``): what export and later evaluation read.

model.pt      config, FeatureSpec (JSON), tower and ranker state dicts
tables.npz    content, item/user attribute rows, id codes, popularity, segment counts
ids.json      item and user ids in row order, and the items' texts (display titles)
meta.json     dataset, training interactions, data offsets, metrics (free-form)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.recsys_features import FeatureSpec, RankerTables
from services.trainer.model.config import ModelConfig
from services.trainer.model.ranker import Ranker
from services.trainer.model.towers import TwoTower
from services.trainer.model.train import TrainResult, make_ranker, make_towers

MODEL_DIR = "model"


@dataclass
class Bundle:
    config: ModelConfig
    spec: FeatureSpec
    towers: TwoTower
    ranker: Ranker | None
    tables: dict[str, np.ndarray]
    item_ids: list[str]
    user_ids: list[str]
    meta: dict[str, Any]
    # The dataset's text of each item (row order): what a person reads; "" where none.
    item_texts: list[str] = field(default_factory=list)

    @property
    def n_pos_users(self) -> int:
        return int(self.tables["n_pos_users"])

    def ranker_tables(self) -> RankerTables:
        t = self.tables
        return RankerTables(
            content=t["content"],
            item_attrs=t["item_attrs"],
            pop=t["pop"],
            seg_counts=t["seg_counts"],
            seg_sizes=t["seg_sizes"],
            n_users=self.n_pos_users,
        )


def save_bundle(
    folder: Path,
    result: TrainResult,
    item_ids: list[str],
    user_ids: list[str],
    meta: dict[str, Any],
    item_texts: list[str] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = result.data
    torch.save(
        {
            "config": result.config.to_dict(),
            "spec": data.spec.to_json(),
            "towers": result.towers.state_dict(),
            "ranker": result.ranker.state_dict() if result.ranker is not None else None,
        },
        folder / "model.pt",
    )
    np.savez(
        folder / "tables.npz",
        content=data.content,
        item_attrs=data.item_attrs,
        user_attrs=data.user_attrs,
        interest=data.interest,
        item_codes=data.item_codes,
        user_codes=data.user_codes,
        pop=data.pop,
        seg_counts=data.seg_counts,
        seg_sizes=data.seg_sizes,
        n_pos_users=np.array(data.n_pos_users),
    )
    texts = list(item_texts) if item_texts is not None else [""] * len(item_ids)
    if len(texts) != len(item_ids):
        raise ValueError(f"item_texts: {len(texts)} texts for {len(item_ids)} items")
    (folder / "ids.json").write_text(
        json.dumps({"items": item_ids, "users": user_ids, "item_texts": texts})
    )
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return folder


def load_bundle(folder: Path) -> Bundle:
    folder = Path(folder)
    if not (folder / "model.pt").is_file():
        raise FileNotFoundError(f"{folder}: no model.pt (not a trained model folder)")
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)
    cfg = ModelConfig.from_dict(state["config"])
    spec = FeatureSpec.from_json(state["spec"])
    with np.load(folder / "tables.npz") as npz:
        tables = {k: npz[k] for k in npz.files}
    ids = json.loads((folder / "ids.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())

    class _Shape:
        """Just the sizes make_towers / make_ranker read."""

        def __init__(self) -> None:
            self.spec = spec
            self.item_attrs = tables["item_attrs"]
            self.content = tables["content"]
            self.user_attrs = tables["user_attrs"]
            self.n_items = int(tables["content"].shape[0])
            self.n_users = int(tables["user_attrs"].shape[0])

    shape: Any = _Shape()
    towers = make_towers(shape, cfg)
    towers.load_state_dict(state["towers"])
    towers.eval()
    ranker = None
    if state["ranker"] is not None:
        ranker = make_ranker(shape, cfg)
        ranker.load_state_dict(state["ranker"])
        ranker.eval()
    texts = ids.get("item_texts") or [""] * len(ids["items"])  # bundles from before titles
    return Bundle(cfg, spec, towers, ranker, tables, ids["items"], ids["users"], meta, texts)
