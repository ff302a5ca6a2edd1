"""Hyper-parameters of the cold-start model (towers + ranker) and its training run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

LOSSES = ("softmax", "bpr")
# Experiment options (bool) the fusion service cannot serve: the harness only.
HARNESS_ONLY = ("rated_history", "unliked_pool")


@dataclass(frozen=True)
class ModelConfig:
    # Towers
    dim: int = 64
    hidden: int = 128
    temperature: float = 0.1
    item_id_dropout: float = 0.5
    user_id_dropout: float = 0.5
    interest_dropout: float = 0.3
    use_content: bool = True
    # Project content onto this many top singular directions (0: the full vector),
    # and drop an item's whole content vector with this probability in training.
    # 32 (was 8): better item cold-start on both catalogs (docs/experiments/model-runs.md, run 4).
    content_dims: int = 32
    content_dropout: float = 0.5
    # The item tower's cold branch (towers.ItemTower): an MLP over the content projected
    # onto this many directions (0: the full vector) added to items without an id
    # code only. < 0: no cold branch. cold_joint: train it inside the one tower loss
    # (the id-dropped items' vectors include it) instead of with a loss of its own
    # against the detached towers (train.TowerLoss).
    cold_content_dims: int = -1
    cold_joint: bool = False
    # DropoutNet's placements (docs/experiments/model-runs.md, run 5; all off by default):
    # item_id_inside: the item-id embedding is added to the item MLP's first layer
    # (hidden-wide, before the non-linearity) instead of to its output.
    # user_history: "pooled" = the user tower reads the mean of the history's item-tower
    # outputs (what serving pools from the ANN index rows); "raw" = the mean of the
    # history's raw content vectors and an item-id embedding of its own (training and
    # the harness only: export refuses it).
    # align_weight: an extra loss pulling each candidate's content-only vector (no id)
    # toward its (detached) vector with its id, for the candidates that kept their id.
    item_id_inside: bool = False
    user_history: str = "pooled"
    # rated_history: the towers train on, and pool, every rated item (liked or rated below
    # the positive threshold) instead of the liked ones; an experiment (docs/experiments/model-runs.md, run
    # 9): the harness only, export refuses it.
    rated_history: bool = False
    # unliked_pool: the user tower also reads the mean item vector of the items the user
    # rated below the positive threshold (a second pooled input; training samples draw a
    # random subset of them, as they do of the history). An experiment (docs/MODEL.md,
    # run 10): the harness only (the ranker's queries see none), export refuses it.
    unliked_pool: bool = False
    align_weight: float = 0.0
    # Choose among option sets on an inner item-cold holdout inside training
    # (select.auto_select): each entry "key=value,key=value" (values JSON; "" = as
    # configured). An auto_select_holdout share of the items with training positives plays
    # "new" in each of auto_select_folds disjoint folds; the candidate whose towers rank
    # them best (Recall@20) is applied to the run. Empty: off.
    auto_select: tuple[str, ...] = ()
    auto_select_holdout: float = 0.2
    auto_select_folds: int = 1
    # Training-time content augmentation against memorising titles: with probability
    # content_swap an item's content vector is replaced by one of its content_swap_k
    # nearest neighbours' (cosine), then Gaussian noise of total norm ~content_noise is
    # added and the vector re-normalised. 0 = off (serving never augments).
    content_swap: float = 0.0
    content_swap_k: int = 10
    content_noise: float = 0.0
    # Add the release-year band read off the item text to the item attributes.
    derive_year: bool = True
    max_history: int = 50
    # Loss: "softmax" = in-batch (global batch) candidates plus n_negatives shared
    # uniform negatives, logQ-corrected; "bpr" = pairwise against the same candidates.
    loss: str = "softmax"
    # 1.0 is the unbiased logQ correction; 2.0 leaves a log-popularity prior in the
    # scores (measured, docs/MODEL.md: better warm, item-cold and k=0 rankings).
    logq_weight: float = 2.0
    n_negatives: int = 0
    # Training samples: one per training positive. "set": the history is a random
    # subset (size uniform in 0..max_history) of the user's other positives; "prefix":
    # the positives before it, cut short (to 0..short_history_max) with this
    # probability. Both show the towers the 0/1/3/5-item histories of cold users.
    history_mode: str = "set"
    short_history_prob: float = 0.5
    short_history_max: int = 8
    batch_size: int = 512  # global: split evenly over the workers
    epochs: int = 12
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # or "constant"
    weight_decay: float = 0.0
    # Ranker
    use_ranker: bool = True
    ranker_candidates: int = 100
    ranker_hidden: int = 64
    ranker_cross_layers: int = 2
    ranker_queries_per_user: int = 6
    ranker_cold_item_share: float = 0.25
    ranker_batch_size: int = 128
    ranker_epochs: int = 8
    ranker_lr: float = 1e-3
    # The ranker re-scores a user's head only with at least this much history and
    # fewer new items than this share in the head (recsys_features.ranker_applies).
    ranker_min_history: int = 1
    ranker_max_new_share: float = 0.5
    ranker_max_history: int = -1  # < 0: no upper bound
    # A head of new items (recsys_features.new_item_head; the ranker leaves those alone)
    # is re-scored as standardised tower score + new_item_content_weight x standardised
    # content-knn score (recsys_features.blend_new_items). 0: the tower order stands.
    # 0.7 (with recsys_features.CONTENT_NEIGHBORS 200) won item cold-start on both
    # catalogs' validation halves (docs/experiments/model-runs.md, run 6).
    new_item_content_weight: float = 0.7
    # ... + new_item_map_weight x standardised score against the item's content_map
    # vector (recsys_features.content_map: a ridge map from the whole text vector to the
    # warm items' tower vectors). 0: off. Run 8 (docs/experiments/model-runs.md) chose it with the map's
    # penalty on both catalogs' item-cold validation halves.
    new_item_map_weight: float = 0.7
    # ... + new_item_unliked_weight x standardised content-knn score against the items the
    # user rated below the positive threshold (chosen, not liked: what a user picks says
    # something about a new item too). 0: off. 0.2 won every seed on both catalogs'
    # item-cold validation halves (docs/experiments/model-runs.md, run 9).
    new_item_unliked_weight: float = 0.2
    # A user with at most prior_max_history items (-1: off) gets their head re-scored as
    # standardised model score + prior_weight x standardised segment
    # popularity (recsys_features.segment_prior over recsys_features.prior_fields). The
    # towers and ranker underweight what users like them watch when the history says
    # little (docs/experiments/model-runs.md, run 7: chosen on user-cold seeds 142-147).
    prior_weight: float = 1.0
    prior_max_history: int = 1
    # Pick ranker_min_history / ranker_max_history after training: the history-length
    # bands (0, 1..8, 9+) where the ranker beats the tower order on the ranker queries
    # of a held-out share of users (those users' queries are not trained on).
    ranker_auto_gate: bool = True
    ranker_holdout: float = 0.15
    # How clear the held-out gain must be (paired t statistic over the band's queries).
    ranker_gate_min_t: float = 2.0
    ranker_loss: str = "bce"  # or "softmax" (measured: bce gives the better NDCG)
    # The ranker's new-user queries scored by towers that never saw the user: with K >= 2
    # the users fall into K seeded folds, the towers are fitted once more per fold
    # without it, and a user's new-user queries take that fold's towers (0: the main
    # towers, which trained on every user's positives). A new user at serving time is
    # one the towers never saw; see docs/experiments/model-runs.md, run 11.
    ranker_fresh_folds: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.auto_select, tuple):  # JSON gives a list
            object.__setattr__(self, "auto_select", tuple(self.auto_select))
        if self.auto_select:
            from services.trainer.model.select import parse_candidate

            known = {f.name for f in fields(self)}
            for text in self.auto_select:
                keys = set(parse_candidate(text))
                bad = sorted(k for k in keys if k not in known or k.startswith("auto_select"))
                if bad:
                    raise ValueError(f"auto_select: {text!r}: unknown option(s) {', '.join(bad)}")
        if not 0.0 < self.auto_select_holdout < 0.5:
            raise ValueError("auto_select_holdout: must be in (0, 0.5)")
        if self.auto_select_folds < 1 or self.auto_select_folds * self.auto_select_holdout > 1:
            raise ValueError("auto_select_folds: must be >= 1, with folds x holdout <= 1")
        if self.user_history not in ("pooled", "raw"):
            raise ValueError(f"user_history: {self.user_history!r} is not pooled or raw")
        if self.new_item_content_weight < 0:
            raise ValueError("new_item_content_weight: must be >= 0")
        if self.new_item_map_weight < 0:
            raise ValueError("new_item_map_weight: must be >= 0")
        if self.new_item_unliked_weight < 0:
            raise ValueError("new_item_unliked_weight: must be >= 0")
        if self.prior_weight < 0:
            raise ValueError("prior_weight: must be >= 0")
        if self.align_weight < 0:
            raise ValueError("align_weight: must be >= 0")
        if self.history_mode not in ("prefix", "set"):
            raise ValueError(f"history_mode: {self.history_mode!r} is not prefix or set")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule: {self.lr_schedule!r} is not cosine or constant")
        if self.ranker_loss not in ("softmax", "bce"):
            raise ValueError(f"ranker_loss: {self.ranker_loss!r} is not softmax or bce")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        for name in (
            "item_id_dropout",
            "user_id_dropout",
            "interest_dropout",
            "content_dropout",
            "content_swap",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: {value} is not in [0, 1]")
        if not 0.0 <= self.ranker_holdout < 1.0:
            raise ValueError("ranker_holdout: must be in [0, 1)")
        if self.ranker_gate_min_t < 0:
            raise ValueError("ranker_gate_min_t: must be >= 0")
        if self.ranker_fresh_folds < 0 or self.ranker_fresh_folds == 1:
            raise ValueError("ranker_fresh_folds: must be 0 (off) or at least 2")
        if self.content_noise < 0:
            raise ValueError("content_noise: must be >= 0")
        for name in (
            "dim",
            "hidden",
            "batch_size",
            "epochs",
            "max_history",
            "ranker_candidates",
            "content_swap_k",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.temperature <= 0:
            raise ValueError("temperature: must be positive")

    def harness_only(self) -> list[str]:
        """The experiment options switched on here that only the harness can score (no
        serving path reads them: export and ``coldstart train`` refuse them)."""
        return [name for name in HARNESS_ONLY if getattr(self, name)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model option(s): {', '.join(unknown)}")
        return cls(**data)

    def with_options(self, **options: Any) -> ModelConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown model option(s): {', '.join(unknown)}")
        return replace(self, **options)
