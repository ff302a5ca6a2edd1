"""A DropoutNet-style two-tower model in torch.

Item tower: text vector + attribute multi-hot + item id embedding.
User tower: attribute multi-hot + user id embedding + the mean of the user's
history items (their text vectors and id embeddings).
Id dropout (after DropoutNet, Volkovs et al. 2017): during training each id
embedding is zeroed with probability ``id_dropout``, and the history is cut to
a random short prefix, so the towers learn to work from content and
attributes alone; at scoring time an entity without training interactions
simply has no id. Loss: sampled softmax over the batch (in-batch negatives)
with the logQ correction for in-batch sampling, plus a learned item bias, so
the model can still express popularity.

One torch thread by default: with small batches on a shared 2-core machine,
a second OpenMP thread mostly spins waiting (measured: 5x slower fits).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from services.trainer.baselines.base import ScoreRequest, TrainData
from services.trainer.baselines.common import user_attribute_rows


def _to_dense(m: sp.csr_matrix) -> np.ndarray:
    return np.asarray(m.todense(), dtype=np.float32)


class _AdamW:
    """AdamW in a few lines.

    torch.optim imports torch._dynamo on first use, which costs 10+ s on a
    loaded 2-core machine: more than this model's whole fit on small data.
    """

    def __init__(self, params: list[Any], weight_decay: float) -> None:
        import torch

        self.params = params
        self.weight_decay = weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.steps += 1
        b1, b2 = betas
        c1, c2 = 1 - b1**self.steps, 1 - b2**self.steps
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                if p.grad is None:
                    continue
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.mul_(1 - lr * self.weight_decay)
                p.addcdiv_(m / c1, (v / c2).sqrt_().add_(eps), value=-lr)


class DropoutNet:
    name = "dropoutnet"

    def __init__(
        self,
        seed: int = 0,
        dim: int = 64,
        hidden: int = 256,
        epochs: int = 20,
        batch_size: int = 512,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-5,
        id_dropout: float = 0.5,
        max_history: int = 30,
        temperature: float = 0.1,
        logq: float = 1.0,
        threads: int = 1,
    ) -> None:
        self.seed = seed
        self.dim = int(dim)
        self.hidden = int(hidden)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.id_dropout = float(id_dropout)
        self.max_history = int(max_history)
        self.temperature = float(temperature)
        self.logq = float(logq)
        self.threads = int(threads)
        self.net: Any = None
        self.user_fields: list[str] = []
        self.item_emb = np.zeros((0, 0), dtype=np.float32)
        self.item_bias = np.zeros(0, dtype=np.float32)
        self.known_users = np.zeros(0, dtype=bool)
        self.n_users = 0
        self.item_emb_rows = 0

    def fit(self, train: TrainData) -> None:
        import torch
        from torch import nn

        torch.set_num_threads(self.threads)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        ds = train.dataset
        self.user_fields = list(ds.users.categorical)
        self.n_users = train.n_users
        item_seen = train.item_train_counts() > 0
        self.known_users = train.user_train_counts() > 0
        content = torch.from_numpy(train.item_vectors.astype(np.float32))
        item_attr = torch.from_numpy(_to_dense(ds.items.feature_matrix()))
        user_attr = torch.from_numpy(_to_dense(ds.users.feature_matrix(self.user_fields)))
        n_items, d_content = content.shape
        self.item_emb_rows = n_items
        dim, hidden = self.dim, self.hidden

        def mlp(d_in: int) -> nn.Module:
            return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, dim))

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.item_id = nn.Embedding(n_items, hidden)
                self.user_id = nn.Embedding(train.n_users, hidden)
                nn.init.normal_(self.item_id.weight, std=0.01)
                nn.init.normal_(self.user_id.weight, std=0.01)
                self.item_in = nn.Linear(d_content + item_attr.shape[1], hidden)
                self.user_in = nn.Linear(user_attr.shape[1] + d_content, hidden)
                self.item_out = mlp(hidden)
                self.user_out = mlp(hidden)
                self.bias_out = nn.Linear(hidden, 1)

            def items(
                self, idx: torch.Tensor, keep_id: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                h = self.item_in(torch.cat([content[idx], item_attr[idx]], dim=1))
                h = h + self.item_id(idx) * keep_id[:, None]
                h = torch.nn.functional.gelu(h)
                return nn.functional.normalize(self.item_out(h), dim=1), self.bias_out(h)[:, 0]

            def users(
                self,
                idx: torch.Tensor,
                attrs: torch.Tensor,
                pool: torch.Tensor,
                keep_id: torch.Tensor,
            ) -> torch.Tensor:
                # pool: sparse (users x items), each row averages that user's history.
                hist_content = torch.sparse.mm(pool, content)
                hist_ids = torch.sparse.mm(pool, self.item_id.weight)
                h = self.user_in(torch.cat([attrs, hist_content], dim=1)) + hist_ids
                h = h + self.user_id(idx) * keep_id[:, None]
                h = torch.nn.functional.gelu(h)
                return nn.functional.normalize(self.user_out(h), dim=1)

        net = Net()
        opt = _AdamW(list(net.parameters()), self.weight_decay)
        pos = train.positives.tocsr()
        coo = pos.tocoo()
        pair_u, pair_i = coo.row.astype(np.int64), coo.col.astype(np.int64)
        # Histories by time would be nicer, but any subset of the other positives
        # is a valid "what the user revealed"; the target itself is never in it.
        # Position of each pair inside its user's row, so sampling can skip the target.
        pair_pos = np.arange(len(pair_u)) - pos.indptr[pair_u]
        freq = np.asarray(pos.sum(axis=0)).ravel() + 1.0
        log_q = torch.from_numpy(np.log(freq / freq.sum()).astype(np.float32))
        item_seen_t = torch.from_numpy(item_seen.astype(np.float32))
        steps_per_epoch = max(1, len(pair_u) // self.batch_size)
        total = self.epochs * steps_per_epoch
        warmup = max(1, total // 10)
        net.train()
        for _ in range(self.epochs):
            order = rng.permutation(len(pair_u))
            for step in range(steps_per_epoch):
                b = order[step * self.batch_size : (step + 1) * self.batch_size]
                u, i = pair_u[b], pair_i[b]
                pool = self._sample_history(pos, u, pair_pos[b], rng)
                keep_u = torch.from_numpy(
                    (rng.random(len(b)) >= self.id_dropout).astype(np.float32)
                )
                keep_i = torch.from_numpy(
                    (rng.random(len(b)) >= self.id_dropout).astype(np.float32)
                )
                ut = torch.from_numpy(u)
                it = torch.from_numpy(i)
                uv = net.users(ut, user_attr[ut], pool, keep_u)
                iv, ib = net.items(it, keep_i * item_seen_t[it])
                logits = uv @ iv.T / self.temperature + ib[None, :] - self.logq * log_q[it][None, :]
                # The same item twice in a batch is a positive, not a negative, for both rows.
                same = torch.from_numpy(i[:, None] == i[None, :]) & ~torch.eye(
                    len(b), dtype=torch.bool
                )
                logits = logits.masked_fill(same, float("-inf"))
                loss = nn.functional.cross_entropy(logits, torch.arange(len(b)))
                done = opt.steps
                # Linear warm-up, then cosine decay to zero.
                lr = self.learning_rate * (
                    (done + 1) / warmup
                    if done < warmup
                    else 0.5 * (1 + np.cos(np.pi * (done - warmup) / max(1, total - warmup)))
                )
                opt.zero_grad()
                loss.backward()
                opt.step(lr)
        net.eval()
        with torch.no_grad():
            all_items = torch.arange(n_items)
            emb, bias = net.items(all_items, item_seen_t)
        self.item_emb = emb.numpy()
        self.item_bias = bias.numpy()
        self.net = net

    def _sample_history(
        self,
        pos: sp.csr_matrix,
        users: np.ndarray,
        target_pos: np.ndarray,
        rng: np.random.Generator,
    ) -> Any:
        """A mean-pooling matrix over a random subset of each user's other positives.

        Lengths are uniform in 0..min(others, max_history): short histories are as
        common as long ones, because cold users reveal 0-5 items. Items are drawn
        with replacement (a repeat just weighs double), which keeps this vectorised.
        """
        import torch

        n_others = pos.indptr[users + 1] - pos.indptr[users] - 1
        cap = np.minimum(n_others, self.max_history)
        lengths = np.floor(rng.random(len(users)) * (cap + 1)).astype(np.int64)
        rows = np.repeat(np.arange(len(users)), lengths)
        draw = np.floor(rng.random(len(rows)) * n_others[rows]).astype(np.int64)
        draw += draw >= target_pos[rows]  # skip the target's own slot
        cols = pos.indices[pos.indptr[users[rows]] + draw]
        return self._pool(rows, cols, lengths, len(users), torch)

    def _pool(
        self, rows: np.ndarray, cols: np.ndarray, lengths: np.ndarray, n: int, torch: Any
    ) -> Any:
        weights = 1.0 / np.maximum(lengths[rows], 1)
        return torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols]).astype(np.int64)),
            torch.from_numpy(weights.astype(np.float32)),
            size=(n, self.item_emb_rows),
            check_invariants=False,
        ).coalesce()

    def score(self, request: ScoreRequest) -> np.ndarray:
        import torch

        n = len(request)
        users = np.asarray(request.users, dtype=np.int64)
        recent = [np.asarray(h, dtype=np.int64)[-self.max_history :] for h in request.history]
        lengths = np.asarray([len(h) for h in recent], dtype=np.int64)
        rows = np.repeat(np.arange(n), lengths)
        cols = np.concatenate(recent) if len(rows) else np.zeros(0, dtype=np.int64)
        pool = self._pool(rows, cols, lengths, n, torch)
        known = (users < self.n_users) & self.known_users[np.minimum(users, self.n_users - 1)]
        attrs = _to_dense(user_attribute_rows(request.user_attributes, self.user_fields, n))
        with torch.no_grad():
            uv = self.net.users(
                torch.from_numpy(np.minimum(users, self.n_users - 1)),
                torch.from_numpy(attrs),
                pool,
                torch.from_numpy(known.astype(np.float32)),
            ).numpy()
        cand = request.candidates
        return uv @ self.item_emb[cand].T / self.temperature + self.item_bias[cand][None, :]
