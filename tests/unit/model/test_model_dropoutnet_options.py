"""Run 5's options (DropoutNet's placements and the alignment loss): off by default, each
does what it says, and export refuses what serving cannot compute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.trainer.model.bundle import load_bundle
from services.trainer.model.config import ModelConfig
from services.trainer.model.dataset import ModelData
from services.trainer.model.distributed import DistContext
from services.trainer.model.export import PARITY_TOLERANCE, ExportError, publish
from services.trainer.model.recommender import ScoringModel
from services.trainer.model.synthetic import small_config
from services.trainer.model.towers import ItemTower
from services.trainer.model.train import (
    RunOptions,
    TowerBatcher,
    TowerLoss,
    TrainResult,
    history_table,
    item_vectors,
    make_towers,
    train,
)
from tests.unit.model.test_export_parity import saved_run

META = {"metrics": {"recall@20": 0.5}, "data": {"offsets": {"0": 12}}}


def _train(data: ModelData, **opts: object) -> TrainResult:
    return train(data, small_config(epochs=1, **opts), DistContext.single(), RunOptions())


def test_defaults_are_off_and_bad_values_refused(tiny_data: ModelData) -> None:
    cfg = ModelConfig()
    assert (cfg.item_id_inside, cfg.user_history, cfg.align_weight) == (False, "pooled", 0.0)
    towers = make_towers(tiny_data, small_config())
    assert towers.hist_id_emb is None
    assert towers.item.id_emb.weight.shape[1] == small_config().dim + 1
    assert not any(k.startswith("hist_id_emb") for k in towers.state_dict())
    batch = TowerBatcher(tiny_data, small_config(), 0, 1).batch(0, 0)
    assert "hist_content" not in batch and "hist_item_id" not in batch
    with pytest.raises(ValueError, match="user_history"):
        ModelConfig(user_history="mean")
    with pytest.raises(ValueError, match="align_weight"):
        ModelConfig(align_weight=-0.1)


def test_id_inside_goes_before_the_non_linearity() -> None:
    torch.manual_seed(0)
    plain = ItemTower(32, 3, 10, 8, 16, 0.1, content_dims=4)
    inside = ItemTower(32, 3, 10, 8, 16, 0.1, content_dims=4, id_inside=True)
    assert inside.id_emb.weight.shape == (11, 16)
    state = {k: v for k, v in plain.state_dict().items() if k != "id_emb.weight"}
    inside.load_state_dict(state, strict=False)
    content = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    attrs = torch.ones(6, 3)
    ids = torch.tensor([0, 0, 0, 1, 2, 3])
    with torch.no_grad():
        # Zero id embeddings (the start): the same vectors as the plain tower's.
        torch.testing.assert_close(inside(content, attrs, ids), plain(content, attrs, ids))
        inside.id_emb.weight[1:].normal_()
        after = inside(content, attrs, ids)
        torch.testing.assert_close(after[:3], plain(content, attrs, ids)[:3])
        assert not torch.allclose(after[3:], plain(content, attrs, ids)[3:])
        first, act, last = inside.mlp
        x = torch.cat([content @ inside.content_proj, attrs], dim=1)
        want = inside.finish(last(act(first(x) + inside.id_emb(ids))))
        torch.testing.assert_close(after, want)


def test_id_inside_trains_and_exports(tiny_data: ModelData, tmp_path: Path) -> None:
    result = _train(tiny_data, item_id_inside=True)
    assert result.towers.item.id_emb.weight[1:].abs().sum() > 0
    data = result.data
    warm = item_vectors(result.towers, data)
    cold = item_vectors(result.towers, data, np.zeros(data.n_items, dtype=np.int64))
    assert np.isfinite(warm).all() and not np.allclose(warm, cold)
    _, path = publish(load_bundle(saved_run(result, tmp_path, META)), tmp_path / "registry")
    parity = json.loads((path / "manifest.json").read_text())["parity_max_abs_diff"]
    assert parity["item_tower"] <= PARITY_TOLERANCE


def test_raw_history_pools_content_and_its_own_ids(tiny_data: ModelData, tmp_path: Path) -> None:
    cfg = small_config(user_history="raw")
    batch = TowerBatcher(tiny_data, cfg, 0, 1).batch(0, 0)
    items = batch["item_rows"]
    # No dropout on the history rows: every item's own text and id code.
    np.testing.assert_array_equal(batch["hist_content"], tiny_data.content[items])
    np.testing.assert_array_equal(batch["hist_item_id"], tiny_data.item_codes[items])
    result = _train(tiny_data, user_history="raw", use_ranker=False)
    towers, data = result.towers, result.data
    assert towers.hist_id_emb is not None and towers.hist_id_emb.weight[1:].abs().sum() > 0
    item_vecs = item_vectors(towers, data)
    table = history_table(towers, data, item_vecs)
    assert table.shape == (data.n_items, data.spec.text_dim + item_vecs.shape[1])
    np.testing.assert_allclose(table[:, : data.spec.text_dim], data.content, rtol=1e-6)
    model = ScoringModel(result)
    users = np.arange(4)
    hists = [data.history(int(u)) for u in users]
    with_hist = model.user_vecs(users, data.user_attrs[users], hists)
    without = model.user_vecs(users, data.user_attrs[users], [h[:0] for h in hists])
    assert np.isfinite(with_hist).all() and not np.allclose(with_hist, without)
    with pytest.raises(ExportError, match="user_history"):
        publish(load_bundle(saved_run(result, tmp_path, META)), tmp_path / "registry")


def test_align_loss_is_zero_at_the_start_and_pulls_content_only_vectors(
    tiny_data: ModelData,
) -> None:
    cfg = small_config(align_weight=1.0)
    towers = make_towers(tiny_data, cfg)
    batch = TowerBatcher(tiny_data, cfg, 0, 1).batch(0, 0)
    b = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    plain = TowerLoss(towers, cfg.loss, cfg.logq_weight)
    aligned = TowerLoss(towers, cfg.loss, cfg.logq_weight, align_weight=1.0)
    with torch.no_grad():
        # Fresh id embeddings are zero: an item's vector is its content-only vector.
        torch.testing.assert_close(aligned(b), plain(b))
        towers.item.id_emb.weight[1:].normal_()
        gap = float(aligned(b) - plain(b))
    assert gap > 0
    result = _train(tiny_data, align_weight=1.0, use_ranker=False)
    assert np.isfinite(result.losses["towers"]).all()
