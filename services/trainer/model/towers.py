"""The two towers. Their forward signatures are the ONNX graphs' inputs.

Score of (user, item) = <user_vec, item_vec> with
``item_vec = [normalize(v) / temperature, b]`` and ``user_vec = [normalize(u), 1]``:
a temperature-scaled cosine plus an item bias predicted from the item's
content and attributes (and its id when it has one). Folding the bias into one
extra dimension keeps the score a plain inner product, so a flat inner-product
ANN index serves it unchanged. The bias matters for item cold-start: it is
how the item tower predicts that a new item will be popular.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


class ItemTower(nn.Module):
    """content (N, D) + attributes (N, A) + id code (N,) -> item vector (N, dim + 1).

    With ``content_dims`` > 0 the content vector first goes through a fixed
    projection onto the catalog's top singular directions (set by
    ``set_content_projection``). Measured on ML-100K item cold-start: an MLP on
    the raw 384-d text vector memorises the training items (it maps each title to
    its collaborative vector) and ranks new items worse than attributes alone; a
    few dozen directions keep what generalises (kind of film, era, language).

    With ``cold_content_dims`` >= 0 a second MLP (the *cold branch*) reads the
    content projected onto that many directions (0: the full vector) plus the
    attributes, and its output is added to the vectors of items without an id code
    (``item_id == 0``) only: new items. Items with an id keep exactly the vector of the
    small projection. Training (``train.TowerLoss``) fits the cold branch with its own
    loss against the (detached) user vectors, so the rest of the towers train exactly as
    without it; only a new item is placed from all of its text (measured, docs/MODEL.md).

    ``id_inside`` (DropoutNet's placement): the id embedding is hidden-wide and added to
    the MLP's first layer before the non-linearity, instead of to the output.
    """

    content_proj: torch.Tensor
    cold_proj: torch.Tensor

    def __init__(
        self,
        text_dim: int,
        n_attrs: int,
        n_ids: int,
        dim: int,
        hidden: int,
        temperature: float,
        use_content: bool = True,
        content_dims: int = 0,
        cold_content_dims: int = -1,
        id_inside: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.scale = 1.0 / temperature
        self.id_inside = id_inside
        # The "no content vector" ablation multiplies content by 0 instead of changing
        # the graph, so the exported inputs stay the same for every variant.
        self.content_gate = 1.0 if use_content else 0.0
        k = content_dims if 0 < content_dims < text_dim else text_dim
        self.register_buffer("content_proj", torch.eye(text_dim)[:, :k].clone())
        self.mlp = _mlp(k + n_attrs, hidden, dim + 1)
        # Row 0 is "no id" and stays zero; ids start as zero so a fresh id means "content only".
        self.id_emb = nn.Embedding(n_ids + 1, hidden if id_inside else dim + 1, padding_idx=0)
        nn.init.zeros_(self.id_emb.weight)
        self.text_dim, self.n_attrs, self.hidden = text_dim, n_attrs, hidden
        self.cold_mlp: nn.Sequential | None = None
        if cold_content_dims >= 0:
            self.add_cold_branch(cold_content_dims)

    def add_cold_branch(self, cold_content_dims: int) -> None:
        """Adds the cold branch (TwoTower adds it last, so the other layers start from
        the same random weights as without it)."""
        text_dim = self.text_dim
        kc = cold_content_dims if 0 < cold_content_dims < text_dim else text_dim
        self.register_buffer("cold_proj", torch.eye(text_dim)[:, :kc].clone())
        self.cold_mlp = _mlp(kc + self.n_attrs, self.hidden, self.dim + 1)
        # Starts as "no correction": a fresh cold branch leaves the vectors as they are.
        last = self.cold_mlp[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def set_content_projection(self, content: torch.Tensor) -> None:
        """Top right-singular vectors of the (uncentred) content matrix: zero content
        (an item without text) still projects to zero."""
        k = self.content_proj.shape[1]
        kc = self.cold_proj.shape[1] if self.cold_mlp is not None else content.shape[1]
        if k == content.shape[1] and kc == content.shape[1]:
            return
        _, _, vh = torch.linalg.svd(content.double(), full_matrices=False)
        with torch.no_grad():
            if k < content.shape[1]:
                self.content_proj.copy_(vh[:k].T.float())
            if kc < content.shape[1]:
                self.cold_proj.copy_(vh[:kc].T.float())

    def base(
        self, content: torch.Tensor, item_attrs: torch.Tensor, item_id: torch.Tensor
    ) -> torch.Tensor:
        """The pre-normalisation output without the cold branch."""
        x = torch.cat([(content * self.content_gate) @ self.content_proj, item_attrs], dim=1)
        if self.id_inside:
            first, act, last = self.mlp
            inner: torch.Tensor = last(act(first(x) + self.id_emb(item_id)))
            return inner
        out: torch.Tensor = self.mlp(x) + self.id_emb(item_id)
        return out

    def cold(self, content: torch.Tensor, item_attrs: torch.Tensor) -> torch.Tensor:
        """The cold branch's correction (zeros without a branch)."""
        if self.cold_mlp is None:
            return content.new_zeros(content.shape[0], self.dim + 1)
        x = torch.cat([(content * self.content_gate) @ self.cold_proj, item_attrs], dim=1)
        out: torch.Tensor = self.cold_mlp(x)
        return out

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        vec = F.normalize(h[:, : self.dim], dim=1) * self.scale
        return torch.cat([vec, h[:, self.dim :]], dim=1)

    def forward(
        self, content: torch.Tensor, item_attrs: torch.Tensor, item_id: torch.Tensor
    ) -> torch.Tensor:
        h = self.base(content, item_attrs, item_id)
        if self.cold_mlp is not None:
            no_id = (item_id == 0).to(h.dtype).unsqueeze(1)
            h = h + no_id * self.cold(content, item_attrs)
        return self.finish(h)


class UserTower(nn.Module):
    """attributes, id, interest text vector, pooled history item vectors -> user vector."""

    def __init__(
        self,
        n_attrs: int,
        text_dim: int,
        item_vec_dim: int,
        n_ids: int,
        dim: int,
        hidden: int,
        temperature: float,
        use_content: bool = True,
        hist_scale: float | None = None,
        unliked_pool: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.unliked_pool = unliked_pool
        self.temperature = temperature
        # What the pooled history is multiplied by: the temperature for item-tower
        # outputs (they carry the 1/temperature scale), 1 for raw history rows.
        self.hist_scale = temperature if hist_scale is None else hist_scale
        self.content_gate = 1.0 if use_content else 0.0
        n_in = n_attrs + text_dim + 1 + item_vec_dim + 2
        if unliked_pool:
            n_in += item_vec_dim + 2
        self.mlp = nn.Sequential(
            nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.out = nn.Linear(hidden, dim)
        self.id_emb = nn.Embedding(n_ids + 1, dim, padding_idx=0)
        nn.init.zeros_(self.id_emb.weight)

    def forward(
        self,
        user_attrs: torch.Tensor,
        user_id: torch.Tensor,
        interest: torch.Tensor,
        has_interest: torch.Tensor,
        hist_vec: torch.Tensor,
        hist_len: torch.Tensor,
        unliked_vec: torch.Tensor | None = None,
        unliked_len: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Item vectors carry the 1/temperature scale; undo it so inputs are O(1).
        pooled = hist_vec * self.hist_scale
        parts = [
            user_attrs,
            interest * self.content_gate,
            has_interest,
            pooled,
            torch.log1p(hist_len),
            (hist_len == 0).to(hist_vec.dtype),
        ]
        if self.unliked_pool:
            if unliked_vec is None or unliked_len is None:
                raise ValueError("unliked_pool: the user tower needs unliked_vec and unliked_len")
            parts += [
                unliked_vec * self.hist_scale,
                torch.log1p(unliked_len),
                (unliked_len == 0).to(hist_vec.dtype),
            ]
        x = torch.cat(parts, dim=1)
        u = self.out(self.mlp(x)) + self.id_emb(user_id)
        u = F.normalize(u, dim=1)
        return torch.cat([u, torch.ones_like(u[:, :1])], dim=1)


class TwoTower(nn.Module):
    """Both towers in one module: DDP wraps one thing and syncs all parameters."""

    def __init__(
        self,
        *,
        text_dim: int,
        n_item_attrs: int,
        n_user_attrs: int,
        n_items: int,
        n_users: int,
        dim: int,
        hidden: int,
        temperature: float,
        use_content: bool = True,
        content_dims: int = 0,
        cold_content_dims: int = -1,
        item_id_inside: bool = False,
        user_history: str = "pooled",
        unliked_pool: bool = False,
    ) -> None:
        super().__init__()
        self.item = ItemTower(
            text_dim,
            n_item_attrs,
            n_items,
            dim,
            hidden,
            temperature,
            use_content,
            content_dims,
            id_inside=item_id_inside,
        )
        raw = user_history == "raw"
        self.user = UserTower(
            n_user_attrs,
            text_dim,
            text_dim + dim + 1 if raw else dim + 1,
            n_users,
            dim,
            hidden,
            temperature,
            use_content,
            hist_scale=1.0 if raw else None,
            unliked_pool=unliked_pool,
        )
        if cold_content_dims >= 0:
            self.item.add_cold_branch(cold_content_dims)
        # user_history "raw": the user tower pools [raw content, this id embedding] of the
        # history items (DropoutNet's user tower) instead of their item-tower outputs.
        self.hist_id_emb: nn.Embedding | None = None
        if raw:
            self.hist_id_emb = nn.Embedding(n_items + 1, dim + 1, padding_idx=0)
            nn.init.zeros_(self.hist_id_emb.weight)
            self.hist_content_gate = 1.0 if use_content else 0.0

    def history_rows(
        self, content: torch.Tensor, item_id: torch.Tensor, item_vecs: torch.Tensor
    ) -> torch.Tensor:
        """The per-item rows the user tower pools over a history: the item vectors, or
        with user_history "raw" the raw content and the history id embedding."""
        if self.hist_id_emb is None:
            return item_vecs
        return torch.cat([content * self.hist_content_gate, self.hist_id_emb(item_id)], dim=1)
