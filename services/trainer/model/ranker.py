"""The ranker ("model fusion"): one small network over the ranker features.

A DCN-v2 cross network (explicit feature crosses: user attribute x item
attribute, history length x popularity, ...) beside an MLP, then a linear head.
Feature standardisation is a buffer inside the module, so the exported ONNX
graph takes the raw features of ``services.common.recsys_features``.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x0 * self.linear(x) + x
        return out


class Ranker(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int, hidden: int = 64, cross_layers: int = 2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.cross = nn.ModuleList(CrossLayer(n_features) for _ in range(cross_layers))
        self.mlp = nn.Sequential(
            nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.head = nn.Linear(n_features + hidden, 1)
        # The tower score alone is a good ranking: start the head on it (column 0), so
        # training begins at "trust the towers" and learns corrections from there.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight[0, 0] = 1.0

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        # A floor of 0.1: a rare 0/1 attribute column has a std of ~0.01, and dividing by
        # it blows that column up 100x, which the cross layers square (measured: logits
        # of -350, where float32 rounding alone breaks the 1e-4 ONNX parity bound).
        with torch.no_grad():
            self.mean.copy_(mean)
            self.std.copy_(torch.clamp(std, min=0.1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) raw features -> (N,) scores."""
        x0 = (features - self.mean) / self.std
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        out: torch.Tensor = self.head(torch.cat([x, self.mlp(x0)], dim=1)).squeeze(1)
        return out
