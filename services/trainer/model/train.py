"""Training: the towers, then the ranker on the towers' retrieval candidates.

One code path for one worker or many (DDP, gloo on CPU, NCCL on CUDA): a
*global* batch is a pure function of (seed, epoch, step) and worker r takes
slice r of it. Every worker computes the item tower on the whole global
batch's candidate set (item ids of all workers' targets are known to every
worker, so no collective is needed for them), and its loss is the mean over
its own queries; DDP's gradient average then equals the gradient of the mean
over the global batch. Hence: two workers with batch B each take exactly the
steps one worker takes with batch 2B (tests/integration/test_ddp_parity.py).
Nothing random happens outside those seeded functions (no nn.Dropout; id
dropout masks are drawn per (epoch, step, item)), which is also what makes a
resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from services.common.recsys_features import (
    RankerTables,
    pool_history,
    ranker_features,
)
from services.trainer.model.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from services.trainer.model.config import ModelConfig
from services.trainer.model.dataset import ModelData
from services.trainer.model.distributed import DistContext, all_reduce_mean
from services.trainer.model.ranker import Ranker
from services.trainer.model.towers import TwoTower

log = logging.getLogger("coldstart.trainer.model")

Batch = dict[str, np.ndarray]


class Batcher(Protocol):
    steps_per_epoch: int

    def batch(self, epoch: int, step: int) -> Batch: ...


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


def global_batch_size(requested: int, n: int, world: int) -> int:
    """The largest multiple of ``world`` that is <= min(requested, n) (at least world)."""
    size = min(requested, n)
    return max(world, size - size % world)


# --------------------------------------------------------------------------- towers


# Rows of the epoch's (samples x max_history) history draws generated at a time: the
# stream is the same as one (n, max_history) draw, but a worker keeps only its rows.
DRAW_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class EpochPlan:
    """One epoch as one worker sees it: its own samples, step by step (the local
    batch of step s is rows s*local_batch .. (s+1)*local_batch), their draws, and the
    target item of every sample of every global batch (the shared candidate set).

    The random streams are those of the whole epoch (every sample's draws in sample
    order, as a single worker makes them); a worker keeps the values of its own
    samples only, so its memory for the plan is about 1/W of the epoch's."""

    samples: np.ndarray  # global sample ids (see ModelData.sample_user_pos)
    users: np.ndarray
    pos: np.ndarray  # position of the sample in its user's time-ordered list
    length: np.ndarray  # history length
    keep_uid: np.ndarray
    keep_interest: np.ndarray
    draws: np.ndarray  # ("set") uniform draws per history slot; (0, max_history) otherwise
    batch_targets: np.ndarray  # steps * global_batch target items, global batch after batch


class TowerBatcher:
    """Samples: one per training positive (user, position in the user's time-ordered list)."""

    def __init__(self, data: ModelData, cfg: ModelConfig, rank: int, world: int) -> None:
        self.data, self.cfg, self.rank, self.world = data, cfg, rank, world
        n = data.n_samples
        if n == 0:
            raise ValueError("no training positives")
        self.n_samples = n
        self.global_batch = global_batch_size(cfg.batch_size, n, world)
        self.local_batch = self.global_batch // world
        self.steps_per_epoch = max(1, n // self.global_batch)
        self.targets = data.user_items  # sample s's target is user_items[s]
        self.neg_pool = np.flatnonzero(data.pop > 0)
        # logQ: log of the expected number of times an item is in a step's candidate
        # set (as a target of the global batch, or as one of the uniform negatives).
        q = data.pop / n
        expected = 1.0 - np.power(1.0 - q, self.global_batch)
        expected += cfg.n_negatives / max(1, len(self.neg_pool))
        self.logq = np.log(np.maximum(expected, 1e-12)).astype(np.float32)
        self.neighbors = (
            content_neighbors(data.content, cfg.content_swap_k) if cfg.content_swap > 0 else None
        )
        self._plan_epoch = -1
        self._plan: EpochPlan | None = None

    def own_positions(self) -> np.ndarray:
        """Positions in the epoch's sample order that this worker trains on, step by step."""
        g, b = self.global_batch, self.local_batch
        steps = np.arange(self.steps_per_epoch, dtype=np.int64)
        positions = (steps[:, None] * g + self.rank * b + np.arange(b)[None, :]).ravel()
        return positions[positions < self.n_samples]

    def plan(self, epoch: int) -> EpochPlan:
        """This worker's share of the epoch: the sample order, history lengths, user id
        and interest kept, for its own samples.

        "prefix": the history is the user's positives before the target, cut short
        (to 0..short_history_max) with probability short_history_prob.
        "set": a random subset of the user's *other* positives, its size uniform in
        0..min(others, max_history): short histories as common as long ones.
        """
        if self._plan is None or self._plan_epoch != epoch:
            self._plan = None  # the previous epoch's plan goes before this one is built
            cfg, data = self.cfg, self.data
            rng = _rng(cfg.seed, epoch, 1)
            n = self.n_samples
            order = rng.permutation(n)
            mine = order[self.own_positions()]
            batch_targets = self.targets[order[: self.steps_per_epoch * self.global_batch]]
            del order
            users = np.searchsorted(data.user_offsets, mine, side="right") - 1
            pos = mine - data.user_offsets[users]
            draws = np.zeros((0, cfg.max_history))
            if cfg.history_mode == "prefix":
                short = rng.random(n)[mine] < cfg.short_history_prob
                cut_short = np.floor(
                    rng.random(n)[mine] * (np.minimum(pos, cfg.short_history_max) + 1)
                ).astype(np.int64)
                length = np.where(short, cut_short, pos)
            else:
                others = np.diff(data.user_offsets)[users] - 1
                cap = np.minimum(others, cfg.max_history)
                length = np.floor(rng.random(n)[mine] * (cap + 1)).astype(np.int64)
                draws = self._own_rows(rng, n, cfg.max_history, mine)
            keep_uid = rng.random(n)[mine] >= cfg.user_id_dropout
            keep_interest = rng.random(n)[mine] >= cfg.interest_dropout
            self._plan = EpochPlan(
                mine, users, pos, length, keep_uid, keep_interest, draws, batch_targets
            )
            self._plan_epoch = epoch
        return self._plan

    @staticmethod
    def _own_rows(rng: np.random.Generator, n: int, width: int, mine: np.ndarray) -> np.ndarray:
        """Rows ``mine`` of ``rng.random((n, width))``, drawn DRAW_CHUNK_ROWS rows at a
        time (the same stream: a generator's doubles do not depend on how they are asked
        for), so that only this worker's rows are kept."""
        out = np.empty((len(mine), width))
        sorter = np.argsort(mine, kind="stable")
        ordered = mine[sorter]
        for start in range(0, n, DRAW_CHUNK_ROWS):
            stop = min(n, start + DRAW_CHUNK_ROWS)
            block = rng.random((stop - start, width))
            lo, hi = np.searchsorted(ordered, [start, stop])
            out[sorter[lo:hi]] = block[ordered[lo:hi] - start]
        return out

    def history_positions(
        self, local: np.ndarray | slice, plan: EpochPlan
    ) -> tuple[np.ndarray, ...]:
        """(positions in the user's list (b, width), mask, pooled length) of the plan's
        rows ``local``."""
        cfg = self.cfg
        lens = plan.length[local]
        if cfg.history_mode == "prefix":
            lo = np.maximum(0, lens - cfg.max_history)
            pooled = lens - lo
            width = max(1, int(pooled.max()))
            positions = lo[:, None] + np.arange(width)[None, :]
        else:
            pooled = lens
            width = max(1, int(pooled.max()))
            others = np.diff(self.data.user_offsets)[plan.users[local]] - 1
            draw = np.floor(plan.draws[local, :width] * np.maximum(others, 1)[:, None])
            positions = draw.astype(np.int64)
            positions += positions >= plan.pos[local][:, None]  # skip the target itself
        mask = np.arange(width)[None, :] < pooled[:, None]
        return positions, mask, pooled

    def batch(self, epoch: int, step: int) -> Batch:
        cfg, data = self.cfg, self.data
        plan = self.plan(epoch)
        local = slice(step * self.local_batch, (step + 1) * self.local_batch)
        step_rng = _rng(cfg.seed, epoch, step, 2)
        negatives = step_rng.choice(self.neg_pool, size=cfg.n_negatives, replace=True)
        g_targets = plan.batch_targets[step * self.global_batch : (step + 1) * self.global_batch]
        candidates = np.unique(np.concatenate([g_targets, negatives]))

        users = plan.users[local]
        n_local = len(users)
        starts = data.user_offsets[users]
        positions, hist_mask, hist_lens = self.history_positions(local, plan)
        hist_items = data.user_items[np.where(hist_mask, starts[:, None] + positions, 0)]

        unliked = self.unliked_draw(users, step_rng) if cfg.unliked_pool else []
        items = np.unique(np.concatenate([candidates, hist_items[hist_mask], *unliked]))
        # History pooling as a (local batch x items) averaging matrix: one matmul
        # forward and backward instead of a gather + scatter over (batch, history).
        pool = np.zeros((n_local, len(items)), dtype=np.float32)
        rows = np.repeat(np.arange(n_local), hist_lens)
        cols = np.searchsorted(items, hist_items[hist_mask])
        np.add.at(pool, (rows, cols), 1.0)
        pool /= np.maximum(hist_lens, 1)[:, None].astype(np.float32)
        drop_item = step_rng.random(data.n_items) < cfg.item_id_dropout
        item_ids = np.where(drop_item[items], 0, data.item_codes[items])
        keep_content = step_rng.random(data.n_items) >= cfg.content_dropout
        target_items = self.targets[plan.samples[local]]
        target = np.searchsorted(candidates, target_items)
        # A user's other training positives are not negatives for them.
        sub = data.positives[users][:, candidates].toarray() > 0
        sub[np.arange(n_local), target] = False
        interest = data.interest[users] * plan.keep_interest[local][:, None]
        content = self.augmented_content(items, step_rng) * keep_content[items, None]
        extra: Batch = {}
        if cfg.unliked_pool:
            extra["unliked_pool"] = self.pool_matrix(unliked, items)
            extra["unliked_len"] = np.array([[len(u)] for u in unliked], dtype=np.float32)
        if cfg.user_history == "raw":
            # History rows read every item's own text and id (no dropout, as serving).
            extra = {
                **extra,
                "hist_content": data.content[items].astype(np.float32),
                "hist_item_id": data.item_codes[items].astype(np.int64),
            }
        return {
            **extra,
            "item_rows": items,  # not a model input; lets tests map the batch back
            "item_content": content,
            "item_attrs": data.item_attrs[items],
            "item_id": item_ids.astype(np.int64),
            "cand_index": np.searchsorted(items, candidates).astype(np.int64),
            "logq": self.logq[candidates],
            "hist_pool": pool,
            "hist_len": plan.length[local].astype(np.float32)[:, None],
            "user_attrs": data.user_attrs[users],
            "user_id": np.where(plan.keep_uid[local], data.user_codes[users], 0).astype(np.int64),
            "interest": interest.astype(np.float32),
            "has_interest": (np.abs(interest).sum(axis=1, keepdims=True) > 0).astype(np.float32),
            "target": target.astype(np.int64),
            "exclude": sub,
        }

    def unliked_draw(self, users: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Per sample, a random subset of the user's unliked items whose size is uniform in
        0..min(count, max_history), as the history is drawn ("set")."""
        out = []
        for u in users:
            own = self.data.unliked(int(u))
            k = int(rng.integers(0, min(len(own), self.cfg.max_history) + 1))
            out.append(rng.choice(own, size=k, replace=False) if k else own[:0])
        return out

    @staticmethod
    def pool_matrix(rows: list[np.ndarray], items: np.ndarray) -> np.ndarray:
        """(len(rows), len(items)) averaging matrix: row r averages the items of rows[r]."""
        pool = np.zeros((len(rows), len(items)), dtype=np.float32)
        for r, own in enumerate(rows):
            if len(own):
                np.add.at(pool[r], np.searchsorted(items, own), 1.0 / len(own))
        return pool

    def augmented_content(self, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The items' content vectors with the training-time augmentation (swap, noise)."""
        cfg, data = self.cfg, self.data
        content = data.content[items]
        if self.neighbors is not None:
            swap = rng.random(len(items)) < cfg.content_swap
            pick = rng.integers(0, self.neighbors.shape[1], size=len(items))
            content = np.where(swap[:, None], data.content[self.neighbors[items, pick]], content)
        if cfg.content_noise > 0:
            noise = rng.standard_normal(content.shape).astype(np.float32)
            noisy = content + noise * (cfg.content_noise / math.sqrt(content.shape[1]))
            norm = np.linalg.norm(noisy, axis=1, keepdims=True)
            has_text = np.abs(content).sum(axis=1, keepdims=True) > 0
            content = np.where(has_text, noisy / np.maximum(norm, 1e-12), content)
        return np.ascontiguousarray(content, dtype=np.float32)


def content_neighbors(content: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """(n, k) rows of each item's k most cosine-similar other items (an item without
    text, a zero row, gets only itself)."""
    n = content.shape[0]
    k = max(1, min(k, n - 1))
    out = np.zeros((n, k), dtype=np.int64)
    for start in range(0, n, block):
        sims = content[start : start + block] @ content.T
        idx = np.arange(sims.shape[0])
        sims[idx, start + idx] = -np.inf
        out[start : start + len(idx)] = _topk(sims, k)
    empty = np.abs(content).sum(axis=1) == 0
    out[empty] = np.arange(n)[empty, None]
    return out


class TowerLoss(nn.Module):
    """The towers' loss over a batch (in-batch softmax with logQ, or BPR).

    With a cold branch in the item tower (and ``cold_joint`` off) the towers train as
    without it (the id-dropped items use the branch-free vectors), and the branch gets
    a loss of its own: the same one over the step's candidates, every candidate scored
    from content alone (no id, the branch added; the branch-free part detached) against
    the detached user vectors, i.e. the ranking among new items that item cold-start is.
    ``cold_joint``: the branch is part of the id-dropped items' vectors in the one loss.
    ``align_weight`` > 0: plus that weight times the mean squared distance between each
    candidate's content-only vector (id code 0; direction unscaled, and the bias) and its
    detached vector with its id, over the candidates that kept both id and content."""

    def __init__(
        self,
        towers: TwoTower,
        loss: str,
        logq_weight: float,
        cold_joint: bool = False,
        align_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.towers = towers
        self.loss = loss
        self.logq_weight = logq_weight
        self.cold_joint = cold_joint
        self.align_weight = align_weight

    def _loss(self, logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = logits.masked_fill(b["exclude"], float("-inf"))
        target = b["target"]
        if self.loss == "softmax":
            corrected = logits - self.logq_weight * b["logq"].unsqueeze(0)
            return F.cross_entropy(corrected, target)
        # BPR against every other candidate of the step (in-batch + uniform negatives).
        pos = logits.gather(1, target.unsqueeze(1))
        cols = torch.arange(logits.shape[1], device=logits.device)
        valid = torch.isfinite(logits) & (cols.unsqueeze(0) != target.unsqueeze(1))
        pair = F.softplus(torch.where(valid, logits - pos, torch.zeros_like(logits)))
        return (pair * valid).sum() / valid.sum().clamp(min=1)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        item = self.towers.item
        separate = item.cold_mlp is not None and not self.cold_joint
        content, attrs, ids = b["item_content"], b["item_attrs"], b["item_id"]
        if separate:
            item_vecs = item.finish(item.base(content, attrs, ids))
        else:
            item_vecs = item(content, attrs, ids)
        # The mean over the last max_history items, as recsys_features.pool_history does.
        if self.towers.hist_id_emb is not None:
            hist = b["hist_pool"] @ self.towers.history_rows(
                b["hist_content"], b["hist_item_id"], item_vecs
            )
        else:
            hist = b["hist_pool"] @ item_vecs
        unliked = {}
        if "unliked_pool" in b:
            unliked = {
                "unliked_vec": b["unliked_pool"] @ item_vecs,
                "unliked_len": b["unliked_len"],
            }
        user_vecs = self.towers.user(
            b["user_attrs"],
            b["user_id"],
            b["interest"],
            b["has_interest"],
            hist,
            b["hist_len"],
            **unliked,
        )
        cand = b["cand_index"]
        loss = self._loss(user_vecs @ item_vecs[cand].T, b)  # (B, C) logits
        if separate:
            c, a = content[cand], attrs[cand]
            no_id = torch.zeros_like(ids[cand])
            cold_vecs = item.finish(item.base(c, a, no_id).detach() + item.cold(c, a))
            loss = loss + self._loss(user_vecs.detach() @ cold_vecs.T, b)
        if self.align_weight > 0:
            loss = loss + self.align_weight * self._align(item_vecs[cand], b)
        return loss

    def _align(self, warm: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        item = self.towers.item
        cand = b["cand_index"]
        content, ids = b["item_content"][cand], b["item_id"][cand]
        keep = (ids > 0) & (content.abs().sum(dim=1) > 0)
        if not bool(keep.any()):
            return warm.sum() * 0.0
        c, a = content[keep], b["item_attrs"][cand][keep]
        cold = item(c, a, torch.zeros_like(ids[keep]))
        diff = cold - warm[keep].detach()
        d = item.dim
        # Directions are unit vectors times 1/temperature: compare them at unit scale.
        sq = (diff[:, :d] / item.scale).pow(2).sum(dim=1) + diff[:, d:].pow(2).sum(dim=1)
        return sq.mean()


# --------------------------------------------------------------------------- ranker


@dataclass
class RankerQueries:
    """Ranker training queries, built once from the trained towers (same on every worker)."""

    users: np.ndarray  # (Q,)
    histories: list[np.ndarray]
    candidates: np.ndarray  # (Q, N)
    tower_scores: np.ndarray  # (Q, N)
    labels: np.ndarray  # (Q, N) float32
    new_items: np.ndarray  # (Q, N) bool
    exclude_self: np.ndarray  # (Q, N) float32

    def __len__(self) -> int:
        return len(self.users)

    def take(self, rows: np.ndarray) -> RankerQueries:
        return RankerQueries(
            users=self.users[rows],
            histories=[self.histories[r] for r in rows],
            candidates=self.candidates[rows],
            tower_scores=self.tower_scores[rows],
            labels=self.labels[rows],
            new_items=self.new_items[rows],
            exclude_self=self.exclude_self[rows],
        )


# History-length bands the ranker gate is chosen over: no history, a new user's
# first few items (the cold-user training queries reveal up to 8), longer ones.
GATE_BANDS: tuple[tuple[int, int], ...] = ((0, 0), (1, 8), (9, -1))
NEVER = 2**31 - 1  # ranker_min_history that no history reaches: the ranker never applies


def split_ranker_queries(
    queries: RankerQueries, cfg: ModelConfig
) -> tuple[RankerQueries, RankerQueries]:
    """(training, held-out) queries: a ``ranker_holdout`` share of the users, all their
    queries held out (none of them trained on), for choosing the gate."""
    if not cfg.ranker_auto_gate or cfg.ranker_holdout <= 0:
        return queries, queries.take(np.zeros(0, dtype=np.int64))
    users = np.unique(queries.users)
    rng = _rng(cfg.seed, 98)
    held = users[rng.random(len(users)) < cfg.ranker_holdout]
    is_held = np.isin(queries.users, held)
    if is_held.all() or not is_held.any():
        return queries, queries.take(np.zeros(0, dtype=np.int64))
    return queries.take(np.flatnonzero(~is_held)), queries.take(np.flatnonzero(is_held))


def ndcg_at(scores: np.ndarray, labels: np.ndarray, k: int = 20) -> np.ndarray:
    """(Q,) binary NDCG@k of each row's ranking by ``scores``."""
    k = min(k, scores.shape[1])
    order = _topk(scores, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (np.take_along_axis(labels, order, axis=1) * discount).sum(axis=1)
    n_pos = np.minimum((labels > 0).sum(axis=1), k)
    ideal = np.cumsum(discount)[np.maximum(n_pos, 1) - 1]
    out: np.ndarray = np.where(n_pos > 0, dcg / ideal, 0.0)
    return out


def choose_gate(diffs: dict[tuple[int, int], np.ndarray], min_t: float = 2.0) -> tuple[int, int]:
    """(min_history, max_history) of the contiguous run of GATE_BANDS where the ranker's
    per-query NDCG gains over the towers (``diffs``) sum highest, if that gain is clear
    (paired t statistic >= ``min_t``); (NEVER, -1): the ranker never applies."""
    best, best_gain = (NEVER, -1), 0.0
    for i in range(len(GATE_BANDS)):
        for j in range(i, len(GATE_BANDS)):
            parts = [diffs[b] for b in GATE_BANDS[i : j + 1] if b in diffs]
            d = np.concatenate(parts) if parts else np.zeros(0)
            if len(d) < 2 or d.sum() <= best_gain:
                continue
            t = d.mean() / max(d.std(ddof=1) / np.sqrt(len(d)), 1e-12)
            if t >= min_t:
                best, best_gain = (GATE_BANDS[i][0], GATE_BANDS[j][1]), float(d.sum())
    return best


@torch.no_grad()
def gate_check(
    ranker: Ranker, batcher: RankerBatcher, held: RankerQueries
) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Per history band: (tower, ranker) NDCG@20 of each held-out query.

    New-item queries are left out (the new-item share of the gate handles them)."""
    ranker.eval()
    lengths = np.array([len(h) for h in held.histories])
    usable = ~held.new_items.any(axis=1)
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for lo, hi in GATE_BANDS:
        rows = np.flatnonzero(usable & (lengths >= lo) & ((hi < 0) | (lengths <= hi)))
        if len(rows) == 0:
            continue
        feats = batcher.features_of(held, rows)
        q, n, f = feats.shape
        scores = ranker(torch.from_numpy(feats.reshape(q * n, f))).numpy().reshape(q, n)
        labels = held.labels[rows]
        out[(lo, hi)] = (ndcg_at(held.tower_scores[rows], labels), ndcg_at(scores, labels))
    return out


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


@torch.no_grad()
def item_vectors(towers: TwoTower, data: ModelData, codes: np.ndarray | None = None) -> np.ndarray:
    towers.eval()
    out = towers.item(
        torch.from_numpy(data.content),
        torch.from_numpy(data.item_attrs),
        torch.from_numpy(data.item_codes if codes is None else codes),
    )
    return out.numpy().astype(np.float32)


@torch.no_grad()
def history_table(towers: TwoTower, data: ModelData, item_vecs: np.ndarray) -> np.ndarray:
    """The rows the user tower pools over a history: ``item_vecs`` (the item-tower
    outputs), or with user_history "raw" each item's raw content and history id embedding."""
    if towers.hist_id_emb is None:
        return item_vecs
    towers.eval()
    out = towers.history_rows(
        torch.from_numpy(np.asarray(data.content, dtype=np.float32)),
        torch.from_numpy(data.item_codes.astype(np.int64)),
        torch.from_numpy(item_vecs),
    )
    return out.numpy().astype(np.float32)


@torch.no_grad()
def user_vectors(
    towers: TwoTower,
    data: ModelData,
    user_attrs: np.ndarray,
    user_codes: np.ndarray,
    histories: list[np.ndarray],
    item_vecs: np.ndarray,
    interest: np.ndarray | None = None,
    unliked: list[np.ndarray] | None = None,
) -> np.ndarray:
    """``unliked``: each user's items rated below the threshold, read only by towers
    trained with ``unliked_pool`` (None: none)."""
    from services.common.recsys_features import pool_history, user_tower_inputs

    towers.eval()
    table = history_table(towers, data, item_vecs)
    inputs = user_tower_inputs(data.spec, user_attrs, user_codes, histories, table, interest)
    if towers.user.unliked_pool:
        none = np.zeros(0, dtype=np.int64)
        rows = [none] * len(histories) if unliked is None else unliked
        inputs["unliked_vec"], inputs["unliked_len"] = pool_history(
            rows, item_vecs, data.spec.max_history
        )
    out = towers.user(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return out.numpy().astype(np.float32)


def build_ranker_queries(
    towers: TwoTower,
    data: ModelData,
    cfg: ModelConfig,
    fresh: list[tuple[np.ndarray, TwoTower, ModelData]] | None = None,
) -> RankerQueries:
    """Queries that look like the three situations the ranker must handle.

    - a cold user: the first 0..8 positives revealed (0 most often), no user id; with
      ``fresh`` ((users, towers, data) per fold, ``fresh_fold_towers``) scored by the
      towers fitted without the user's fold, as a real new user is;
    - a warm user: the first 80% of positives revealed, with the user id;
    - new items: a random 20% of items play "new" (content-only vectors, no counts);
      the user's other positives are the history, candidates come only from the new ones.
    Labels: the user's remaining training positives among the candidates.
    """
    rng = _rng(cfg.seed, 99)
    full = item_vectors(towers, data)
    content_only = item_vectors(towers, data, np.zeros(data.n_items, dtype=np.int64))
    lengths = np.diff(data.user_offsets)
    eligible = np.flatnonzero(lengths >= 2)
    warm_items = np.flatnonzero(data.pop > 0)
    n_pseudo = max(2, round(0.2 * len(warm_items)))
    # Every query gets the same number of candidates (they are stacked).
    n_cand = min(cfg.ranker_candidates, n_pseudo)
    rows: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    # (user, history, candidates, scores, labels, new)
    kinds = rng.random((len(eligible), cfg.ranker_queries_per_user))
    # k = 0 (attributes only) is where popularity is hardest to beat: give it weight.
    cold_cut_choices = np.array([0, 0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 8])
    # Which towers score a query: 0 the main ones, f + 1 those fitted without fold f.
    scorers = [(towers, data)] + [(t, d) for _, t, d in fresh or []]
    fold_of = np.full(data.n_users, -1, dtype=np.int64)
    for f, (fold_users, _, _) in enumerate(fresh or []):
        fold_of[fold_users] = f
    # (user, history, pseudo-new items or None, keep the user id, scorer)
    pending: list[tuple[int, np.ndarray, np.ndarray | None, bool, int]] = []
    for qi, user in enumerate(eligible.tolist()):
        items = data.history(user)
        for kind in kinds[qi]:
            if kind < cfg.ranker_cold_item_share:
                pseudo = np.sort(rng.choice(warm_items, size=n_pseudo, replace=False))
                is_new = np.isin(items, pseudo)
                if not is_new.any() or is_new.all():
                    continue
                pending.append((user, items[~is_new], pseudo, True, 0))
            elif kind < cfg.ranker_cold_item_share + (1 - cfg.ranker_cold_item_share) / 2:
                cut = int(min(rng.choice(cold_cut_choices), len(items) - 1))
                pending.append((user, items[:cut], None, False, int(fold_of[user]) + 1))
            else:
                cut = len(items) - max(1, round(0.2 * len(items)))
                pending.append((user, items[:cut], None, True, 0))
    # Vectorised in chunks: user vectors for all pending queries, scorer by scorer.
    chunk = 256
    for s_index, (s_towers, s_data) in enumerate(scorers):
        mine = [p for p in pending if p[4] == s_index]
        s_full = full if s_index == 0 else item_vectors(s_towers, s_data)
        for start in range(0, len(mine), chunk):
            part = mine[start : start + chunk]
            rows += _score_queries(part, s_towers, s_data, s_full, content_only, n_cand, data)
    if not rows:
        raise ValueError("no ranker training queries (too little data)")
    cands = np.stack([r[2] for r in rows])
    users_a = np.array([r[0] for r in rows])
    own = data.positives[users_a].toarray() > 0
    return RankerQueries(
        users=users_a,
        histories=[r[1] for r in rows],
        candidates=cands,
        tower_scores=np.stack([r[3] for r in rows]).astype(np.float32),
        labels=np.stack([r[4] for r in rows]).astype(np.float32),
        new_items=np.stack([r[5] for r in rows]),
        exclude_self=np.take_along_axis(own, cands, axis=1).astype(np.float32),
    )


def _score_queries(
    part: list[tuple[int, np.ndarray, np.ndarray | None, bool, int]],
    towers: TwoTower,
    scorer_data: ModelData,
    full: np.ndarray,
    content_only: np.ndarray,
    n_cand: int,
    data: ModelData,
) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(user, history, candidates, tower scores, labels, new) of each pending query with a
    label among its candidates: the towers' top ``n_cand`` (of the pseudo-new items,
    scored content-only, for a new-item query). ``towers``/``scorer_data``/``full`` score
    the users; labels come from ``data``, the full training data."""
    users = np.array([p[0] for p in part])
    hists = [p[1] for p in part]
    codes = np.array([scorer_data.user_codes[p[0]] if p[3] else 0 for p in part], dtype=np.int64)
    uvecs = user_vectors(towers, scorer_data, data.user_attrs[users], codes, hists, full)
    rows = []
    for j, (u, hist, new_set, _, _) in enumerate(part):
        if new_set is not None:
            scores = content_only[new_set] @ uvecs[j]
            top = new_set[_topk(scores[None], n_cand)[0]]
            top_scores = content_only[top] @ uvecs[j]
            new = np.ones(len(top), dtype=bool)
        else:
            scores = full @ uvecs[j]
            scores[hist] = -np.inf
            top = _topk(scores[None], n_cand)[0]
            top_scores = scores[top]
            new = np.zeros(len(top), dtype=bool)
        future = np.setdiff1d(data.history(u), hist)
        labels = np.isin(top, future)
        if not labels.any() or len(top) < n_cand:
            continue
        rows.append((u, hist, top, top_scores, labels, new))
    return rows


def fresh_fold_towers(
    data: ModelData, cfg: ModelConfig
) -> list[tuple[np.ndarray, TwoTower, ModelData]]:
    """(fold users, towers fitted without them, the data they were fitted on) for each of
    ``ranker_fresh_folds`` seeded user folds; [] when off. In-process on one CPU worker
    (like ``select.auto_select``): the same on every worker of a distributed run."""
    from services.trainer.model.select import user_folds, without_users

    if cfg.ranker_fresh_folds < 2:
        return []
    fold_cfg = cfg.with_options(use_ranker=False, ranker_fresh_folds=0, auto_select=())
    out = []
    for users in user_folds(data, cfg.ranker_fresh_folds, cfg.seed):
        sub = without_users(data, users)
        out.append((users, train(sub, fold_cfg, DistContext.single()).towers, sub))
    return out


def ranker_tables(data: ModelData, use_content: bool = True) -> RankerTables:
    """The ranker's tables; without content (the no-content ablation) its content
    similarities are all 0, as the towers' content inputs are."""
    return RankerTables(
        content=data.content if use_content else np.zeros_like(data.content),
        item_attrs=data.item_attrs,
        pop=data.pop,
        seg_counts=data.seg_counts,
        seg_sizes=data.seg_sizes,
        n_users=data.n_pos_users,
    )


class RankerBatcher:
    """Ranker batches. The features of every query are built once (they depend only on
    the frozen towers and the data), so ranker epochs cost only the network."""

    def __init__(
        self, data: ModelData, queries: RankerQueries, cfg: ModelConfig, rank: int, world: int
    ) -> None:
        self.data, self.q, self.cfg, self.rank, self.world = data, queries, cfg, rank, world
        self.tables = ranker_tables(data, cfg.use_content)
        self.global_batch = global_batch_size(cfg.ranker_batch_size, len(queries), world)
        self.local_batch = self.global_batch // world
        self.steps_per_epoch = max(1, len(queries) // self.global_batch)
        chunk = 256
        self.all_features = np.concatenate(
            [
                self.features(np.arange(s, min(s + chunk, len(queries))))
                for s in range(0, len(queries), chunk)
            ]
        )

    def features(self, rows: np.ndarray) -> np.ndarray:
        return self.features_of(self.q, rows)

    def features_of(self, q: RankerQueries, rows: np.ndarray) -> np.ndarray:
        users = q.users[rows]
        return ranker_features(
            self.data.spec,
            self.tables,
            q.tower_scores[rows],
            self.data.user_attrs[users],
            [q.histories[r] for r in rows],
            q.candidates[rows],
            interest=self.data.interest[users],
            new_items=q.new_items[rows],
            exclude_self=q.exclude_self[rows],
        )

    def batch(self, epoch: int, step: int) -> Batch:
        order = _rng(self.cfg.seed, epoch, 3).permutation(len(self.q))
        g = order[step * self.global_batch : (step + 1) * self.global_batch]
        local = g[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        return {"features": self.all_features[local], "labels": self.q.labels[local]}


class RankerLoss(nn.Module):
    """ "softmax": listwise over each query's candidates, averaged over its positives;
    "bce": pointwise logistic, so the score estimates P(relevant), which ordered is
    the best expected DCG (probability ranking principle)."""

    def __init__(self, ranker: Ranker, kind: str = "softmax") -> None:
        super().__init__()
        self.ranker = ranker
        self.kind = kind

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = b["features"]
        q, n, f = feats.shape
        scores = self.ranker(feats.reshape(q * n, f)).reshape(q, n)
        labels = b["labels"]
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(scores, labels)
        logp = F.log_softmax(scores, dim=1)
        return (-(logp * labels).sum(1) / labels.sum(1).clamp(min=1.0)).mean()


# --------------------------------------------------------------------------- loop


@dataclass
class RunOptions:
    """Where and how a run reports; none of it changes the result."""

    run_dir: Path | None = None
    resume: bool = False
    progress: bool = False
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    stop_after_steps: int | None = None  # tower steps; for tests and benchmarks
    skip_ranker: bool = False
    on_step: Callable[[str, int, float], None] | None = None


@dataclass
class StageState:
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    losses: list[float] = field(default_factory=list)


def _to_tensors(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def run_stage(
    *,
    name: str,
    loss_module: nn.Module,
    batcher: Batcher,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    state: StageState,
    opts: RunOptions,
    save: Callable[[StageState], None],
    stop_after_steps: int | None = None,
    lr_at: Callable[[int, int], float] | None = None,
) -> StageState:
    """Run ``epochs`` over ``batcher`` from ``state`` (which a checkpoint may have restored)."""
    model: nn.Module = loss_module
    if ctx.distributed:
        model = DistributedDataParallel(loss_module)
    model.train()
    total = epochs * batcher.steps_per_epoch
    if stop_after_steps is not None:
        total = min(total, stop_after_steps)
    bar = None
    if opts.progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=state.global_step, desc=name, unit="step")
    try:
        while state.epoch < epochs and state.global_step < total:
            while state.step < batcher.steps_per_epoch and state.global_step < total:
                if lr_at is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(state.global_step, epochs * batcher.steps_per_epoch)
                batch = _to_tensors(batcher.batch(state.epoch, state.step), ctx.device)
                optimizer.zero_grad(set_to_none=True)
                loss = model(batch)
                loss.backward()
                optimizer.step()
                value = all_reduce_mean(ctx, float(loss.detach()))
                state.losses.append(value)
                state.step += 1
                state.global_step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=state.epoch, loss=f"{value:.4f}")
                if opts.on_step is not None:
                    opts.on_step(name, state.global_step, value)
                if opts.checkpoint_every and state.global_step % opts.checkpoint_every == 0:
                    save(state)
            if state.step >= batcher.steps_per_epoch:
                state.epoch += 1
                state.step = 0
                save(state)
        if state.global_step >= total:
            save(state)
    finally:
        if bar is not None:
            bar.close()
    return state


@dataclass
class TrainResult:
    config: ModelConfig
    data: ModelData
    towers: TwoTower
    ranker: Ranker | None
    losses: dict[str, list[float]]
    seconds: dict[str, float]
    samples: dict[str, int]
    # Held-out check behind the chosen gate: "band lo..hi" -> queries, tower, ranker NDCG.
    gate: dict[str, dict[str, float]] = field(default_factory=dict)
    # auto_select: candidate -> summed inner-holdout item-cold Recall@20 (empty: off).
    selection: dict[str, float] = field(default_factory=dict)


def make_towers(data: ModelData, cfg: ModelConfig) -> TwoTower:
    torch.manual_seed(cfg.seed)
    towers = TwoTower(
        text_dim=data.spec.text_dim,
        n_item_attrs=data.item_attrs.shape[1],
        n_user_attrs=data.user_attrs.shape[1],
        n_items=data.n_items,
        n_users=data.n_users,
        dim=cfg.dim,
        hidden=cfg.hidden,
        temperature=cfg.temperature,
        use_content=cfg.use_content,
        content_dims=cfg.content_dims,
        cold_content_dims=cfg.cold_content_dims,
        item_id_inside=cfg.item_id_inside,
        user_history=cfg.user_history,
        unliked_pool=cfg.unliked_pool,
    )
    towers.item.set_content_projection(torch.from_numpy(np.asarray(data.content)))
    return towers


def make_ranker(data: ModelData, cfg: ModelConfig) -> Ranker:
    torch.manual_seed(cfg.seed + 1)
    n_features = len(data.spec.ranker_feature_names())
    return Ranker(n_features, hidden=cfg.ranker_hidden, cross_layers=cfg.ranker_cross_layers)


def cosine_lr(base: float) -> Callable[[int, int], float]:
    """Linear warm-up over the first 10% of steps, then cosine decay to zero.

    A pure function of the step, so a resumed run sets the same rates."""

    def lr_at(step: int, total: int) -> float:
        warmup = max(1, total // 10)
        if step < warmup:
            return base * (step + 1) / warmup
        return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return lr_at


def _optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)


def train(
    data: ModelData, cfg: ModelConfig, ctx: DistContext, opts: RunOptions | None = None
) -> TrainResult:
    """Train towers then ranker; checkpoints and the loss plot go to ``opts.run_dir``."""
    opts = opts or RunOptions()
    selection: dict[str, float] = {}
    if cfg.auto_select:
        from services.trainer.model.select import auto_select

        # Before anything else, so a resumed run re-derives (deterministically) the
        # config its checkpoint was written with.
        cfg, selection = auto_select(data, cfg)
    # Adam's second moments of rarely-hit embedding rows decay into denormals, which
    # are ~50x slower on x86 CPUs; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    ckpt_path = opts.run_dir / CHECKPOINT if opts.run_dir else None
    towers = make_towers(data, cfg).to(ctx.device)
    ranker = make_ranker(data, cfg).to(ctx.device) if cfg.use_ranker else None
    tower_loss = TowerLoss(towers, cfg.loss, cfg.logq_weight, cfg.cold_joint, cfg.align_weight)
    tower_opt = _optimizer(towers, cfg.lr, cfg.weight_decay)
    tower_state, ranker_state = StageState(), StageState()
    ranker_opt_state: dict[str, Any] | None = None
    stage = "towers"
    if opts.resume and ckpt_path is not None and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck["config"] != cfg.to_dict():
            raise ValueError(f"{ckpt_path}: checkpoint was written with a different config")
        towers.load_state_dict(ck["towers"])
        tower_opt.load_state_dict(ck["tower_optimizer"])
        tower_state = StageState(**ck["tower_state"])
        stage = ck["stage"]
        if ck.get("ranker") is not None and ranker is not None:
            ranker.load_state_dict(ck["ranker"])
            ranker_opt_state = ck["ranker_optimizer"]
            ranker_state = StageState(**ck["ranker_state"])
        if ctx.is_main:
            log.info(
                "resumed %s at %s epoch %d step %d",
                ckpt_path,
                stage,
                tower_state.epoch,
                tower_state.step,
            )

    ranker_opt: torch.optim.Optimizer | None = None

    def save(_: StageState) -> None:
        if ckpt_path is None or not ctx.is_main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "stage": stage,
                "config": cfg.to_dict(),
                "towers": towers.state_dict(),
                "tower_optimizer": tower_opt.state_dict(),
                "tower_state": tower_state.__dict__,
                "ranker": ranker.state_dict() if ranker is not None and stage == "ranker" else None,
                "ranker_optimizer": ranker_opt.state_dict() if ranker_opt is not None else None,
                "ranker_state": ranker_state.__dict__,
            },
        )

    seconds: dict[str, float] = {}
    samples: dict[str, int] = {}
    if stage == "towers":
        batcher = TowerBatcher(data, cfg, ctx.rank, ctx.world_size)
        t0 = time.perf_counter()
        start_steps = tower_state.global_step
        run_stage(
            name="towers",
            loss_module=tower_loss,
            batcher=batcher,
            epochs=cfg.epochs,
            optimizer=tower_opt,
            ctx=ctx,
            state=tower_state,
            opts=opts,
            save=save,
            stop_after_steps=opts.stop_after_steps,
            lr_at=cosine_lr(cfg.lr) if cfg.lr_schedule == "cosine" else None,
        )
        seconds["towers"] = time.perf_counter() - t0
        samples["towers"] = (tower_state.global_step - start_steps) * batcher.global_batch
        samples["tower_steps_per_epoch"] = batcher.steps_per_epoch
        samples["tower_global_batch"] = batcher.global_batch
        finished = tower_state.epoch >= cfg.epochs
        if ranker is not None and finished and not opts.skip_ranker:
            stage = "ranker"
            save(tower_state)
    towers_cpu = towers.to("cpu").eval()
    rbatcher: RankerBatcher | None = None
    held: RankerQueries | None = None
    if ranker is not None and stage == "ranker":
        t0 = time.perf_counter()
        fresh = fresh_fold_towers(data, cfg)
        queries, held = split_ranker_queries(
            build_ranker_queries(towers_cpu, data, cfg, fresh), cfg
        )
        towers.to(ctx.device)
        rbatcher = RankerBatcher(data, queries, cfg, ctx.rank, ctx.world_size)
        if ranker_state.global_step == 0:
            probe = rbatcher.all_features[: min(len(queries), 512)]
            flat = torch.from_numpy(probe.reshape(-1, probe.shape[2]))
            ranker.set_normalisation(flat.mean(0).to(ctx.device), flat.std(0).to(ctx.device))
        ranker_opt = _optimizer(ranker, cfg.ranker_lr, 0.0)
        if ranker_opt_state is not None:
            ranker_opt.load_state_dict(ranker_opt_state)
        run_stage(
            name="ranker",
            loss_module=RankerLoss(ranker, cfg.ranker_loss),
            batcher=rbatcher,
            epochs=cfg.ranker_epochs,
            optimizer=ranker_opt,
            ctx=ctx,
            state=ranker_state,
            opts=opts,
            save=save,
        )
        seconds["ranker"] = time.perf_counter() - t0
        samples["ranker_queries"] = len(queries)
        samples["ranker_held_out_queries"] = len(held)
    towers = towers.to("cpu").eval()
    ranker_out = ranker.to("cpu").eval() if ranker is not None and stage == "ranker" else None
    gate: dict[str, dict[str, float]] = {}
    result_cfg = cfg
    if ranker_out is not None and rbatcher is not None and held is not None and len(held):
        check = gate_check(ranker_out, rbatcher, held)
        lo, hi = choose_gate({band: r - t for band, (t, r) in check.items()}, cfg.ranker_gate_min_t)
        result_cfg = cfg.with_options(ranker_min_history=lo, ranker_max_history=hi)
        gate = {
            f"{b[0]}..{b[1] if b[1] >= 0 else ''}": {
                "queries": float(len(t)),
                "tower": float(t.mean()),
                "ranker": float(r.mean()),
            }
            for b, (t, r) in check.items()
        }
        if ctx.is_main:
            log.info("ranker gate: history %d..%s (%s)", lo, hi if hi >= 0 else "", gate)
    losses = {"towers": tower_state.losses, "ranker": ranker_state.losses}
    if opts.run_dir is not None and ctx.is_main:
        write_run_report(opts.run_dir, result_cfg, losses, seconds, samples)
    return TrainResult(
        result_cfg, data, towers, ranker_out, losses, seconds, samples, gate, selection
    )


def write_run_report(
    run_dir: Path,
    cfg: ModelConfig,
    losses: dict[str, list[float]],
    seconds: dict[str, float],
    samples: dict[str, int],
) -> None:
    """losses.json and loss_curve.png (one panel per stage) in the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "losses.json").write_text(
        json.dumps(
            {"config": cfg.to_dict(), "losses": losses, "seconds": seconds, "samples": samples},
            indent=1,
        )
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("towers", "ranker") if losses.get(s)]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.5))
    axes_list = list(np.atleast_1d(axes))
    for ax, stage in zip(axes_list, stages, strict=False):
        values = np.asarray(losses[stage])
        ax.plot(values, lw=0.6, alpha=0.4, label="step")
        window = max(1, len(values) // 50)
        if len(values) >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(window - 1, len(values)), smooth, lw=1.5, label=f"mean of {window}")
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curve.png", dpi=100)
    plt.close(fig)


def pooled_history(data: ModelData, histories: list[np.ndarray], vecs: np.ndarray) -> np.ndarray:
    """Exposed for tests: the serving-side pooling the training graph mirrors."""
    pooled, _ = pool_history(histories, vecs, data.spec.max_history)
    return pooled


def steps_for(n_samples: int, batch: int, world: int, epochs: int) -> int:
    g = global_batch_size(batch, n_samples, world)
    return epochs * max(1, math.floor(n_samples / g))
