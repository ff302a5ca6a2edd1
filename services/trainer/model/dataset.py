"""Training arrays of the cold-start model, built once from the harness's TrainData
(or any catalog + positives given as plain arrays).

Everything here is numpy and deterministic: every worker of a distributed run
builds the same arrays, and a batch is a pure function of (seed, epoch, step),
so resuming from a checkpoint or changing the number of workers replays the
exact same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from services.common.recsys_features import (
    DERIVED_YEAR_FIELD,
    AttributeVocab,
    FeatureSpec,
    derived_item_attributes,
    segment_tables,
)

if TYPE_CHECKING:
    from services.trainer.data.vectors import EmbedderSpec


@dataclass(frozen=True)
class ModelData:
    spec: FeatureSpec
    content: np.ndarray  # (n_items, D) float32, L2-normalised text vectors
    item_attrs: np.ndarray  # (n_items, A_i) multi-hot, column 0 always on
    user_attrs: np.ndarray  # (n_users, A_u)
    interest: np.ndarray  # (n_users, D), zero rows = no stated interest
    item_codes: np.ndarray  # (n_items,) row + 1 where the item has training positives, else 0
    user_codes: np.ndarray  # (n_users,)
    user_items: np.ndarray  # every user's training positives, oldest first, concatenated
    user_offsets: np.ndarray  # (n_users + 1,) into user_items
    positives: sp.csr_matrix  # (n_users, n_items) binary
    pop: np.ndarray  # (n_items,) training positives per item
    seg_counts: np.ndarray
    seg_sizes: np.ndarray
    n_pos_users: int
    # The items each user rated below the positive threshold, oldest first
    # (ModelConfig.unliked_pool); None when not built.
    unliked_items: np.ndarray | None = None
    unliked_offsets: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        return int(self.user_attrs.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.content.shape[0])

    @property
    def n_samples(self) -> int:
        return len(self.user_items)

    def history(self, user: int) -> np.ndarray:
        return self.user_items[self.user_offsets[user] : self.user_offsets[user + 1]]

    def unliked(self, user: int) -> np.ndarray:
        if self.unliked_items is None or self.unliked_offsets is None:
            return np.zeros(0, dtype=np.int64)
        return self.unliked_items[self.unliked_offsets[user] : self.unliked_offsets[user + 1]]

    def sample_user_pos(self) -> tuple[np.ndarray, np.ndarray]:
        """(user, position in that user's list) of every training sample."""
        lengths = np.diff(self.user_offsets)
        users = np.repeat(np.arange(self.n_users), lengths)
        pos = np.arange(len(users)) - np.repeat(self.user_offsets[:-1], lengths)
        return users, pos


def vocab_from_fields(fields: dict[str, tuple[str, ...]]) -> AttributeVocab:
    return AttributeVocab(tuple((name, tuple(values)) for name, values in fields.items()))


def build_model_data(
    *,
    content: np.ndarray,
    item_vocab: AttributeVocab,
    item_attrs: np.ndarray,
    user_vocab: AttributeVocab,
    user_attrs: np.ndarray,
    pos_users: np.ndarray,
    pos_items: np.ndarray,
    pos_times: np.ndarray,
    item_vec_dim: int,
    max_history: int,
    interest: np.ndarray | None = None,
) -> ModelData:
    """Arrays from a catalog (content, attributes) and training positives (user, item, time)."""
    n_items, text_dim = content.shape
    n_users = user_attrs.shape[0]
    # Duplicate (user, item) positives would count twice in popularity; keep the first.
    order = np.lexsort((pos_times, pos_users))
    users, items = pos_users[order], pos_items[order]
    _, first = np.unique(users.astype(np.int64) * n_items + items, return_index=True)
    keep = np.sort(first)
    users, items = users[keep].astype(np.int64), items[keep].astype(np.int64)
    counts = np.bincount(users, minlength=n_users)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    pop = np.bincount(items, minlength=n_items).astype(np.float32)
    positives = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, n_items)
    )
    seg_counts, seg_sizes = segment_tables(user_attrs, users, items, n_items)
    spec = FeatureSpec(
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        text_dim=int(text_dim),
        item_vec_dim=item_vec_dim,
        max_history=max_history,
        segment_fields=tuple(name for name, _ in user_vocab.fields),
    )
    item_codes = np.where(pop > 0, np.arange(n_items) + 1, 0).astype(np.int64)
    user_codes = np.where(counts > 0, np.arange(n_users) + 1, 0).astype(np.int64)
    return ModelData(
        spec=spec,
        content=np.ascontiguousarray(content, dtype=np.float32),
        item_attrs=np.ascontiguousarray(item_attrs, dtype=np.float32),
        user_attrs=np.ascontiguousarray(user_attrs, dtype=np.float32),
        interest=(
            np.zeros((n_users, text_dim), dtype=np.float32)
            if interest is None
            else np.ascontiguousarray(interest, dtype=np.float32)
        ),
        item_codes=item_codes,
        user_codes=user_codes,
        user_items=items,
        user_offsets=offsets,
        positives=positives,
        pop=pop,
        seg_counts=seg_counts,
        seg_sizes=seg_sizes,
        n_pos_users=int((counts > 0).sum()),
    )


def item_attributes(items: Any, derive_year: bool) -> tuple[AttributeVocab, np.ndarray]:
    """The catalog's categorical item fields, plus the year band read off the text."""
    fields = {n: c.vocab for n, c in items.categorical.items()}
    blocks: dict[str, Any] = {n: c.matrix for n, c in items.categorical.items()}
    if derive_year and items.text:
        derived = [derived_item_attributes(t).get(DERIVED_YEAR_FIELD) for t in items.text]
        values = tuple(sorted({v for v in derived if v is not None}))
        if values:
            index = {v: j for j, v in enumerate(values)}
            block = np.zeros((len(derived), len(values)), dtype=np.float32)
            for r, v in enumerate(derived):
                if v is not None:
                    block[r, index[v]] = 1.0
            fields[DERIVED_YEAR_FIELD] = values
            blocks[DERIVED_YEAR_FIELD] = block
    vocab = vocab_from_fields(fields)
    return vocab, vocab.from_blocks(len(items), blocks)


def from_train_data(
    train: object,
    item_vec_dim: int,
    max_history: int,
    derive_year: bool = True,
    rated: bool = False,
) -> ModelData:
    """ModelData from the evaluation harness's ``TrainData`` (training positives only, or
    with ``rated`` every training interaction)."""
    from services.trainer.baselines.base import TrainData

    if not isinstance(train, TrainData):
        raise TypeError(f"expected TrainData, got {type(train).__name__}")
    ds = train.dataset
    item_vocab, item_attrs = item_attributes(ds.items, derive_year)
    user_vocab = vocab_from_fields({n: c.vocab for n, c in ds.users.categorical.items()})
    user_attrs = user_vocab.from_blocks(
        ds.n_users, {n: c.matrix for n, c in ds.users.categorical.items()}
    )
    pos = np.ones(len(train.train), dtype=bool) if rated else ds.positive_mask(train.train)
    interest = user_interest_vectors(list(ds.users.text)) if ds.users.has_text() else None
    data = build_model_data(
        content=np.asarray(train.item_vectors, dtype=np.float32),
        item_vocab=item_vocab,
        item_attrs=item_attrs,
        user_vocab=user_vocab,
        user_attrs=user_attrs,
        pos_users=train.train.user[pos],
        pos_items=train.train.item[pos],
        pos_times=train.train.timestamp[pos],
        item_vec_dim=item_vec_dim,
        max_history=max_history,
        interest=interest,
    )
    if rated:
        return data
    tr = train.train
    low = np.flatnonzero(~pos)
    low = low[np.argsort(tr.timestamp[low], kind="stable")]
    return with_unliked(data, tr.user[low], tr.item[low])


def with_unliked(data: ModelData, users: np.ndarray, items: np.ndarray) -> ModelData:
    """``data`` with its below-threshold (user, item) pairs (``ModelData.unliked``): each
    user's in the order given (oldest first)."""
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users, minlength=data.n_users)
    return replace(
        data,
        unliked_items=np.asarray(items, dtype=np.int64)[order],
        unliked_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    )


def user_interest_vectors(texts: list[str], embedder: EmbedderSpec | None = None) -> np.ndarray:
    """Stated-interest text -> vectors with the cached ``embedder`` (MiniLM by default; the
    one that encoded the item text, so both live in one space); "" -> zero row."""
    from services.trainer.data.vectors import MINILM, cached_vectors

    vectors = cached_vectors([t or "-" for t in texts], embedder or MINILM)
    empty = np.array([not t for t in texts])
    vectors = vectors.copy()
    vectors[empty] = 0.0
    return vectors
