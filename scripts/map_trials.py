"""Item cold-start: does a content map trained to rank (distillation) beat the ridge map?

    OUT=DIR python scripts/map_trials.py DATA PART SEED [SEED ...]

The blend's map term is ``u . (x W)``, W a ridge fit of the warm items' tower vectors on
their text vectors (mean squared error over every dimension alike). What the blend uses is
the *ranking* ``u . (x W)`` makes over items, so here W (and a residual MLP beside it) is
trained from the ridge solution with the towers' own scores as the teacher: for a batch of
training users, the softmax over every warm item of ``u . v_i`` against that of
``u . g(x_i)`` (KL), plus ``MSE_WEIGHT`` x the squared error of ``g(x_i)`` to ``v_i``
(ALDI's rating and ranking distillation, Huang et al., SIGIR 2023, without its
identification part). Per seed the towers (``coldstart-no-ranker``) are fitted once; every
variant's map term replaces the default's in the default blend; one JSON line per seed with
the variants' Recall@20 after 25 / 100 / 300 steps.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fold_blend_trials import DEFAULT, item_cold_queries, recall, terms
from trial_common import append_result, fit_towers, open_data

from services.common.recsys_features import content_map
from services.trainer.model.train import item_vectors, user_vectors

OUT = Path(os.environ.get("OUT", ".run/trials/map"))
STEPS = (25, 100, 300)
MSE_WEIGHT = float(os.environ.get("MSE_WEIGHT", "1.0"))


class Mapper(torch.nn.Module):
    """x -> x W (+ MLP(x) when ``hidden``), W starting at the ridge solution and the MLP's
    output layer at zero, so step 0 is the ridge map."""

    def __init__(self, ridge: np.ndarray, hidden: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.from_numpy(ridge.astype(np.float32)))
        self.mlp: torch.nn.Module | None = None
        if hidden:
            last = torch.nn.Linear(hidden, ridge.shape[1])
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(ridge.shape[0], hidden), torch.nn.ReLU(), last
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.w
        return out if self.mlp is None else out + self.mlp(x)


def distil(
    content: np.ndarray,
    ivecs: np.ndarray,
    warm: np.ndarray,
    uvecs: np.ndarray,
    ridge: np.ndarray,
    hidden: int,
    lr: float,
    decay: float,
    seed: int,
) -> dict[int, np.ndarray]:
    """The mapped vectors of every item after each of ``STEPS`` steps."""
    torch.manual_seed(seed)
    g = Mapper(ridge, hidden)
    opt = torch.optim.Adam(g.parameters(), lr=lr, weight_decay=decay)
    x_all = torch.from_numpy(content.astype(np.float32))
    x = x_all[torch.from_numpy(warm)]
    v = torch.from_numpy(ivecs[warm].astype(np.float32))
    u_all = torch.from_numpy(uvecs.astype(np.float32))
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for step in range(1, max(STEPS) + 1):
        g.train()
        u = u_all[torch.from_numpy(rng.choice(len(u_all), size=min(256, len(u_all))))]
        pred = g(x)
        teacher = torch.log_softmax(u @ v.T, dim=1)
        student = torch.log_softmax(u @ pred.T, dim=1)
        kl = (teacher.exp() * (teacher - student)).sum(dim=1).mean()
        loss = kl + MSE_WEIGHT * ((pred - v) ** 2).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in STEPS:
            g.eval()
            with torch.no_grad():
                out[step] = g(x_all).numpy()
    return out


VARIANTS = {
    # name: (hidden, lr, weight decay)
    "lin": (0, 1e-3, 0.0),
    "lin-slow": (0, 1e-4, 0.0),
    "mlp256": (256, 1e-3, 0.0),
    "mlp256-wd": (256, 1e-3, 1e-4),
}


def main() -> None:
    d, part = sys.argv[1:3]
    ds, vecs = open_data(d, OUT)
    for seed in map(int, sys.argv[3:]):
        t0 = time.time()
        data, task, users, hists, unl = item_cold_queries(ds, vecs, seed, part)
        sm = fit_towers(data, seed)
        md = sm.data
        content = np.asarray(md.content, dtype=np.float32)
        rec = terms(sm.result.towers, md, content, np.asarray(sm.thresholds), users, hists,
                    unl, list(task.targets), np.asarray(task.candidates, dtype=np.int64))  # fmt: skip
        towers = sm.result.towers
        ivecs = item_vectors(towers, md)
        warm = np.asarray(md.pop > 0)
        train_users = np.array([u for u in range(md.n_users) if len(md.history(u))])
        t_uvecs = user_vectors(
            towers, md, md.user_attrs[train_users],
            md.user_codes[train_users].astype(np.int64),
            [md.history(int(u)).astype(np.int64) for u in train_users], ivecs,
            md.interest[train_users],
        )  # fmt: skip
        q_uvecs = user_vectors(
            towers, md, md.user_attrs[users], md.user_codes[users].astype(np.int64),
            hists, ivecs, md.interest[users], unl,
        )  # fmt: skip
        ridge = content_map(content, ivecs, warm)
        line: dict[str, Any] = {"data": d, "part": part, "seed": seed,
                                "default": recall(rec, DEFAULT)}  # fmt: skip
        base_map = rec["map"].copy()
        for name, (hidden, lr, decay) in VARIANTS.items():
            mapped = distil(content, ivecs, warm, t_uvecs, ridge, hidden, lr, decay, seed)
            for step, vecs_m in mapped.items():
                rec["map"] = np.einsum("rd,rcd->rc", q_uvecs, vecs_m[rec["items"]])
                line[f"{name}@{step}"] = recall(rec, DEFAULT)
                line[f"{name}@{step}:map1.5"] = recall(rec, (0.7, 1.5, 0.2, 0.0))
        rec["map"] = base_map
        line["ridge:map1.5"] = recall(rec, (0.7, 1.5, 0.2, 0.0))
        line["secs"] = round(time.time() - t0, 1)
        append_result(OUT, line)


def summary(path: str) -> None:
    with open(path) as f:
        lines = [json.loads(x) for x in f]
    for d in sorted({x["data"] for x in lines}):
        rows = [x for x in lines if x["data"] == d]
        keys = [k for k in rows[0] if k not in ("data", "part", "seed", "secs", "default")]
        print(f"{d}: default {np.mean([x['default'] for x in rows]):.4f} ({len(rows)} seeds)")
        for k in keys:
            g = np.array([x[k] - x["default"] for x in rows])
            se = g.std(ddof=1) / np.sqrt(len(g)) if len(g) > 1 else 0.0
            print(f"  {k:24s} {g.mean():+.4f} +- {se:.4f} ({(g > 0).sum()}/{len(g)})")


if __name__ == "__main__":
    if sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        main()
