"""Training: the towers learn, checkpoints resume exactly, new users need no retraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.recsys_features import ranker_applies
from services.trainer.model.checkpoint import CHECKPOINT
from services.trainer.model.config import ModelConfig
from services.trainer.model.dataset import ModelData
from services.trainer.model.distributed import DistContext
from services.trainer.model.recommender import ScoringModel
from services.trainer.model.synthetic import small_config
from services.trainer.model.towers import ItemTower
from services.trainer.model.train import (
    GATE_BANDS,
    NEVER,
    RunOptions,
    TowerBatcher,
    TrainResult,
    choose_gate,
    content_neighbors,
    item_vectors,
    ndcg_at,
    train,
)


def _params(result: TrainResult) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.towers.state_dict().items()}


def test_tower_loss_falls(tiny_trained: TrainResult) -> None:
    losses = np.asarray(tiny_trained.losses["towers"])
    assert losses[-10:].mean() < losses[:10].mean() - 0.2


def test_bpr_loss_trains_too(tiny_data: ModelData) -> None:
    result = train(
        tiny_data,
        small_config(loss="bpr", epochs=3, use_ranker=False),
        DistContext.single(),
        RunOptions(),
    )
    losses = np.asarray(result.losses["towers"])
    assert losses[-10:].mean() < losses[:10].mean()


def test_resume_from_checkpoint_is_exact(tiny_data: ModelData, tmp_path: Path) -> None:
    cfg = small_config(epochs=3, use_ranker=False)
    straight = train(
        tiny_data,
        cfg,
        DistContext.single(),
        RunOptions(run_dir=tmp_path / "a", stop_after_steps=30),
    )
    # Stop mid-epoch (14 steps per epoch), then continue from the checkpoint.
    train(
        tiny_data,
        cfg,
        DistContext.single(),
        RunOptions(run_dir=tmp_path / "b", stop_after_steps=17),
    )
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    resumed = train(
        tiny_data,
        cfg,
        DistContext.single(),
        RunOptions(run_dir=tmp_path / "b", resume=True, stop_after_steps=30),
    )
    for name, value in _params(straight).items():
        assert torch.equal(value, resumed.towers.state_dict()[name]), name
    assert straight.losses["towers"] == resumed.losses["towers"]


def test_resume_refuses_another_config(tiny_data: ModelData, tmp_path: Path) -> None:
    cfg = small_config(epochs=1, use_ranker=False)
    train(tiny_data, cfg, DistContext.single(), RunOptions(run_dir=tmp_path, stop_after_steps=2))
    with pytest.raises(ValueError, match="different config"):
        train(
            tiny_data,
            cfg.with_options(lr=0.1),
            DistContext.single(),
            RunOptions(run_dir=tmp_path, resume=True),
        )


def test_run_folder_has_loss_curve_and_losses(tiny_data: ModelData, tmp_path: Path) -> None:
    train(
        tiny_data,
        small_config(epochs=1, use_ranker=False),
        DistContext.single(),
        RunOptions(run_dir=tmp_path),
    )
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    report = json.loads((tmp_path / "losses.json").read_text())
    assert len(report["losses"]["towers"]) == report["samples"]["tower_steps_per_epoch"]


def test_first_events_change_a_new_users_vector(tiny_trained: TrainResult) -> None:
    """No id, no retraining: a revealed item moves the user towards items like it."""
    model = ScoringModel(tiny_trained)
    data = tiny_trained.data
    gaps = []
    for user in range(20):
        liked = data.history(user)[:3]
        attrs = np.repeat(data.user_attrs[user : user + 1], 3, axis=0)
        vecs = model.user_vecs(None, attrs, [liked[:0], liked[:1], liked[:3]])
        assert not np.allclose(vecs[0], vecs[1]) and not np.allclose(vecs[1], vecs[2])
        genre = 1 + data.item_attrs[liked[0], 1:].argmax()  # column 0 is the constant
        same = data.item_attrs[:, genre] > 0
        scores = vecs @ model.item_vecs.T
        gaps.append(scores[:, same].mean(axis=1) - scores[:, ~same].mean(axis=1))
    # On average, items of the revealed item's genre gain on the others.
    mean_gap = np.mean(gaps, axis=0)
    assert mean_gap[1] > mean_gap[0] + 0.05


def test_cold_items_are_scored_from_content(tiny_trained: TrainResult) -> None:
    """With id 0 an item's vector comes from content + attributes alone, and differs per item."""
    data = tiny_trained.data
    cold = item_vectors(tiny_trained.towers, data, np.zeros(data.n_items, dtype=np.int64))
    assert np.isfinite(cold).all()
    assert np.linalg.matrix_rank(cold[:, :-1]) > 4


def test_ranker_reorders_only_the_head(tiny_trained: TrainResult) -> None:
    model = ScoringModel(tiny_trained)
    data = tiny_trained.data
    users = np.arange(8)
    hists = [data.history(int(u)) for u in users]
    scores = model.score(users, data.user_attrs[users], hists, np.arange(data.n_items))
    assert np.isfinite(scores).all()
    head = scores > -1000
    assert (head.sum(axis=1) == tiny_trained.config.ranker_candidates).all()
    for r, h in enumerate(hists):
        assert not head[r, h].any()  # history never takes a head slot


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="loss"):
        ModelConfig(loss="hinge")
    with pytest.raises(ValueError, match="item_id_dropout"):
        ModelConfig(item_id_dropout=1.5)
    with pytest.raises(ValueError, match="unknown model option"):
        ModelConfig().with_options(colour="blue")
    with pytest.raises(ValueError, match="ranker_fresh_folds"):
        ModelConfig(ranker_fresh_folds=1)
    with pytest.raises(ValueError, match="ranker_gate_min_t"):
        ModelConfig(ranker_gate_min_t=-1.0)
    with pytest.raises(ValueError, match="ranker_holdout"):
        ModelConfig(ranker_holdout=1.0)


def test_ranker_gate_keeps_tower_order_without_history_or_among_new_items(
    tiny_trained: TrainResult,
) -> None:
    model = ScoringModel(tiny_trained)
    data = tiny_trained.data
    users = np.arange(3)
    candidates = np.arange(data.n_items)
    empty = [np.array([], dtype=np.int64)] * 3
    tower = model.score(users, data.user_attrs[users], empty, candidates, use_ranker=False)
    # No history: no ranker (only the short-history prior, test_model_short_history_prior.py).
    no_prior = ScoringModel(
        TrainResult(
            **{
                **tiny_trained.__dict__,
                "config": tiny_trained.config.with_options(prior_weight=0.0),
            }
        )
    )
    np.testing.assert_array_equal(
        no_prior.score(users, data.user_attrs[users], empty, candidates), tower
    )
    # With history the ranker re-scores the head...
    hists = [data.history(int(u)) for u in users]
    ranked = model.score(users, data.user_attrs[users], hists, candidates)
    assert (ranked < -1000).any()
    # ...but not when the candidates are new items (no interactions yet): those get the
    # new-item blend (test_model_new_item_blend.py), and without it (both its weights 0)
    # the tower order.
    no_blend = ScoringModel(
        TrainResult(
            **{
                **tiny_trained.__dict__,
                "config": tiny_trained.config.with_options(
                    new_item_content_weight=0.0, new_item_map_weight=0.0
                ),
            }
        )
    )
    saved = data.pop.copy()
    try:
        data.pop[:] = 0
        new = no_blend.score(users, data.user_attrs[users], hists, candidates)
        plain = model.score(users, data.user_attrs[users], hists, candidates, use_ranker=False)
        np.testing.assert_array_equal(new, plain)
    finally:
        data.pop[:] = saved


def test_ranker_applies_history_range() -> None:
    pop = np.ones(4, dtype=np.float32)
    assert not ranker_applies(0, pop, 1, 0.5)
    assert ranker_applies(50, pop, 1, 0.5)  # max_history -1: no upper bound
    assert ranker_applies(8, pop, 1, 0.5, 8) and not ranker_applies(9, pop, 1, 0.5, 8)
    assert ranker_applies(0, pop, 0, 0.5, 0) and not ranker_applies(1, pop, 0, 0.5, 0)
    assert not ranker_applies(3, np.zeros(4, dtype=np.float32), 1, 0.5)  # all new items


def test_ndcg_at_and_choose_gate() -> None:
    labels = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    np.testing.assert_allclose(ndcg_at(scores, labels, 2), [1.0, 0.0, 0.0])
    # The contiguous run of bands with the largest summed gain, if clearly positive.
    up, down = np.array([0.1, 0.12, 0.09, 0.11]), np.array([-0.1, -0.12, -0.09, -0.11])
    flat = np.array([0.3, -0.3, 0.2, -0.19])
    assert choose_gate({(0, 0): down, (1, 8): up, (9, -1): up / 4}) == (1, -1)
    assert choose_gate({(0, 0): down, (1, 8): up, (9, -1): down * 3}) == (1, 8)
    assert choose_gate({(0, 0): up, (1, 8): down / 2, (9, -1): down}) == (0, 0)
    assert choose_gate({(0, 0): flat, (1, 8): down}) == (NEVER, -1)  # gain, but not clear
    weak = np.array([0.1, -0.03, 0.12, 0.0])  # paired t about 1.3
    assert choose_gate({(0, 0): down, (1, 8): weak}) == (NEVER, -1)
    assert choose_gate({(0, 0): down, (1, 8): weak}, min_t=1.0) == (1, 8)


def test_auto_gate_is_chosen_on_held_out_users(tiny_data: ModelData) -> None:
    torch.set_num_threads(1)
    cfg = small_config(epochs=1, ranker_auto_gate=True, ranker_holdout=0.3)
    result = train(tiny_data, cfg, DistContext.single(), RunOptions())
    assert result.gate and result.samples["ranker_held_out_queries"] > 0
    assert all(r["queries"] > 0 for r in result.gate.values())
    lo, hi = result.config.ranker_min_history, result.config.ranker_max_history
    assert (lo, hi) == (NEVER, -1) or (lo, hi) in {
        (a[0], b[1]) for a in GATE_BANDS for b in GATE_BANDS if a[0] <= b[0]
    }


def test_cold_branch_changes_only_items_without_an_id() -> None:
    """The cold branch is added to id-less items only; a fresh one changes nothing."""
    torch.manual_seed(0)
    plain = ItemTower(32, 3, 10, 8, 16, 0.1, content_dims=4)
    tower = ItemTower(32, 3, 10, 8, 16, 0.1, content_dims=4, cold_content_dims=0)
    assert tower.cold_proj.shape == (32, 32)
    assert "cold_proj" not in plain.state_dict()
    tower.load_state_dict(plain.state_dict(), strict=False)
    content = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
    attrs = torch.ones(6, 3)
    ids = torch.tensor([0, 0, 0, 1, 2, 3])
    with torch.no_grad():
        before = tower(content, attrs, ids)
        torch.testing.assert_close(before, plain(content, attrs, ids))
        for p in tower.cold_mlp.parameters():  # type: ignore[union-attr]
            p.add_(torch.randn_like(p))
        after = tower(content, attrs, ids)
    assert torch.equal(before[3:], after[3:])
    assert not torch.allclose(before[:3], after[:3])


def test_cold_branch_trains_and_scores_new_items(tiny_data: ModelData) -> None:
    result = train(
        tiny_data,
        small_config(epochs=2, use_ranker=False, cold_content_dims=0),
        DistContext.single(),
        RunOptions(),
    )
    branch = result.towers.item.cold_mlp
    assert branch is not None
    last = branch[2]
    assert isinstance(last, torch.nn.Linear) and last.weight.abs().sum() > 0
    data = result.data
    cold = item_vectors(result.towers, data, np.zeros(data.n_items, dtype=np.int64))
    warm = item_vectors(result.towers, data)
    assert np.isfinite(cold).all() and np.linalg.matrix_rank(cold[:, :-1]) > 4
    assert not np.allclose(cold, warm)


@pytest.mark.parametrize("joint", [False, True])
def test_cold_branch_leaves_the_other_weights_alone(tiny_data: ModelData, joint: bool) -> None:
    """With its own loss the branch changes no other weight (same init, same steps);
    trained jointly it does."""
    runs = [
        train(
            tiny_data,
            small_config(epochs=1, use_ranker=False, cold_content_dims=dims, cold_joint=joint),
            DistContext.single(),
            RunOptions(),
        )
        for dims in (-1, 0)
    ]
    plain, branched = (r.towers.state_dict() for r in runs)
    assert set(branched) - set(plain) == {
        "item.cold_proj",
        "item.cold_mlp.0.weight",
        "item.cold_mlp.0.bias",
        "item.cold_mlp.2.weight",
        "item.cold_mlp.2.bias",
    }
    same = [torch.equal(plain[k], branched[k]) for k in plain]
    assert all(same) != joint


def test_content_augmentation(tiny_data: ModelData) -> None:
    """content_swap replaces a vector with one of its nearest neighbours'; content_noise
    perturbs it and keeps unit norm; neither is on by default."""
    content = tiny_data.content
    nb = content_neighbors(content, 3)
    sims = content @ content.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_array_equal(np.sort(nb, axis=1), np.sort(np.argsort(-sims)[:, :3], axis=1))
    rng = np.random.default_rng(0)
    items = np.arange(tiny_data.n_items)
    plain = TowerBatcher(tiny_data, small_config(), 0, 1)
    assert plain.neighbors is None
    np.testing.assert_array_equal(plain.augmented_content(items, rng), content)
    swapped = TowerBatcher(tiny_data, small_config(content_swap=1.0, content_swap_k=3), 0, 1)
    out = swapped.augmented_content(items, rng)
    for i in items:
        assert any(np.array_equal(out[i], content[j]) for j in nb[i])
    noisy = TowerBatcher(tiny_data, small_config(content_noise=0.5), 0, 1)
    out = noisy.augmented_content(items, rng)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(out, content)
    cos = (out * content).sum(axis=1)
    assert cos.min() > 0.7
    with pytest.raises(ValueError, match="content_swap"):
        ModelConfig(content_swap=1.5)
    with pytest.raises(ValueError, match="content_noise"):
        ModelConfig(content_noise=-1.0)


def test_fresh_folds_score_new_user_queries_with_towers_that_never_saw_them(
    tiny_trained: TrainResult,
) -> None:
    """With ranker_fresh_folds, a new-user query's tower scores come from the towers fitted
    without the user's fold (the main towers trained on the user); warm and new-item
    queries keep the main towers."""
    from services.trainer.model.train import build_ranker_queries, fresh_fold_towers

    torch.set_num_threads(1)
    data, towers = tiny_trained.data, tiny_trained.towers
    cfg = tiny_trained.config.with_options(ranker_fresh_folds=2)
    fresh = fresh_fold_towers(data, cfg.with_options(epochs=1))
    assert len(fresh) == 2
    for users, _, sub in fresh:
        assert (sub.user_codes[users] == 0).all() and sub.n_samples < data.n_samples
    main_q = build_ranker_queries(towers, data, cfg)
    fresh_q = build_ranker_queries(towers, data, cfg, fresh)
    assert len(fresh_q) > 0 and len(main_q) > 0

    def rows(q: object) -> dict[tuple[int, tuple[int, ...], bool], np.ndarray]:
        out = {}
        for r in range(len(q.users)):  # type: ignore[attr-defined]
            key = (int(q.users[r]), tuple(q.histories[r].tolist()), bool(q.new_items[r].any()))  # type: ignore[attr-defined]
            out[key] = q.tower_scores[r]  # type: ignore[attr-defined]
        return out

    a, b = rows(main_q), rows(fresh_q)
    same = changed = 0
    for key in set(a) & set(b):
        if np.allclose(a[key], b[key]):
            same += 1
        else:
            changed += 1
    # Warm (long-history) and new-item queries are shared and score the same; new-user
    # (short-history) ones differ.
    assert same > 0 and changed > 0
    fold_of = {int(u): f for f, (us, _, _) in enumerate(fresh) for u in us}
    user, hist, new = next(k for k in set(a) & set(b) if not np.allclose(a[k], b[k]))
    assert not new and len(hist) <= 8 and user in fold_of


@pytest.mark.parametrize("mode", ["set", "prefix"])
def test_a_worker_plans_only_its_share_of_the_single_workers_epoch(
    tiny_data: ModelData, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker r of W keeps the single worker's draws for its own samples (slice r of
    every global batch) and nothing else: the memory of an epoch's plan is ~1/W."""
    import services.trainer.model.train as train_module

    monkeypatch.setattr(train_module, "DRAW_CHUNK_ROWS", 37)  # the draws cross chunks
    cfg = small_config(history_mode=mode, batch_size=60)
    one = TowerBatcher(tiny_data, cfg, 0, 1).plan(1)
    world = 3
    for rank in range(world):
        batcher = TowerBatcher(tiny_data, cfg, rank, world)
        part = batcher.plan(1)
        steps, local = batcher.steps_per_epoch, batcher.local_batch
        rows = np.arange(steps * world * local).reshape(steps, world, local)[:, rank].ravel()
        assert len(part.samples) == len(rows) < len(one.samples)
        for name in ("samples", "users", "pos", "length", "keep_uid", "keep_interest"):
            np.testing.assert_array_equal(getattr(part, name), getattr(one, name)[rows], name)
        if mode == "set":
            np.testing.assert_array_equal(part.draws, one.draws[rows])
        np.testing.assert_array_equal(part.batch_targets, one.batch_targets)
    # The single worker's draws are the whole (samples x max_history) stream, in order.
    whole = np.random.default_rng([cfg.seed, 1, 1])
    whole.permutation(tiny_data.n_samples)
    whole.random(tiny_data.n_samples)
    expected = whole.random((tiny_data.n_samples, cfg.max_history))
    if mode == "set":
        np.testing.assert_array_equal(one.draws, expected[one.samples])
