"""Item cold-start trials: collaborative signal borrowed through a new item's text neighbours.

    [ROUND=2] OUT=DIR python scripts/neighbour_trials.py DATA PART SEED [SEED ...]
    python scripts/neighbour_trials.py summary OUT/results.jsonl

A new item has no id vector and no counts, but its nearest *warm* items by text
(the full 384-d vector) have both. Per seed, on the item-cold split's ``PART``
tasks, this fits the towers (``coldstart-no-ranker``), content-knn (200
neighbours) and ALS once, records every component's scores, then replays the
default blend ``z(T) + 0.7 z(knn)`` over the towers' top 100 plus ``c z(X)``:

- ``ntow_K``: the user's tower vector against the mean tower vector (ids
  included) of the item's K nearest warm items: servable as one extra vector
  per new item, computed at upsert;
- ``nals_K``: the same with ALS factors;
- ``cf_L``: ALS user factors against a ridge map (penalty L) from the text
  vector to ALS item factors, fitted on warm items (CB2CF);
- ``tcf_L``: the same map to the towers' warm item vectors, scored with the
  user's tower vector (servable: one linear map per version; the run-8 default at
  L = 3, weight 0.7);
- ``tcfaS_L``: tcf with the item's attribute columns (scaled by S) beside the text;
- ``tcfw_3``: tcf weighted by log(1 + count); ``tcfr_3``: tcf to the id part of the
  vector only (full minus content-only), scored like tcf.

One JSON line per seed goes to OUT/results.jsonl.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fusion_trials import Recorder
from trial_common import create, evaluate_task, head_mix, make_split, open_data, train_data

OUT = Path(os.environ.get("OUT", ".run/trials/neighbour"))
KS = [5, 20, 50]
RIDGE = [0.3, 3.0, 30.0, 300.0]
WEIGHTS = [0.0, 0.2, 0.35, 0.5, 0.7, 1.0, 1.5, 2.0]
ATTR_SCALES = [0.1, 0.3]


def nearest_warm(vecs: np.ndarray, items: np.ndarray, warm: np.ndarray, k: int) -> np.ndarray:
    """(len(items), k) indices of each item's k nearest warm items by cosine, nearest first."""
    sims = vecs[items] @ vecs[warm].T
    sims[warm[None, :] == items[:, None]] = -np.inf
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
    return warm[np.take_along_axis(top, order, axis=1)]


class Component:
    """Scores users against per-item vectors: ``user_fn(req) @ item_vecs[candidates].T``."""

    def __init__(self, user_fn: Any, item_vecs: np.ndarray) -> None:
        self.user_fn, self.item_vecs = user_fn, item_vecs

    def score(self, req: Any) -> np.ndarray:
        out: np.ndarray = self.user_fn(req) @ self.item_vecs[np.asarray(req.candidates)].T
        return out


class Replay:
    """``z(T) + knn_weight z(knn) + sum of weight z(term)`` over the towers' top 100."""

    def __init__(
        self, batches: list[dict[str, Any]], terms: dict[str, float], knn_weight: float = 0.7
    ) -> None:
        self.batches, self.terms, self.knn_weight, self.i = batches, terms, knn_weight, 0

    def score(self, req: Any) -> np.ndarray:
        b = self.batches[self.i]
        self.i += 1
        terms = [(b["knn"], self.knn_weight)] + [(b[t], w) for t, w in self.terms.items()]
        return head_mix(b["t"], terms, b["hist"], b["cands"])


Mix = tuple[str | None, float, dict[str, float]]


def mixes(extras: list[str]) -> list[Mix]:
    """(label, knn weight, {term: weight}), the first being the yardstick. ROUND 1: the
    run-6 blend alone, then each term at each weight; ROUND 2: the run-8 default (the map
    term tcf_3 at 0.7), then joint grids around it; ROUND 3: the default, then tcfw / tcfr."""
    out: list[Mix]
    if os.environ.get("ROUND", "1") == "3":
        out = [("tcf_3:0.7", 0.7, {"tcf_3": 0.7})]
        for c in (0.35, 0.5, 0.7, 1.0):
            out += [(f"{t}:{c:g}", 0.7, {t: c}) for t in ("tcfw_3", "tcfr_3")]
            out.append((f"tcf_3:0.7+tcfr_3:{c:g}", 0.7, {"tcf_3": 0.7, "tcfr_3": c}))
        return out
    if os.environ.get("ROUND", "1") == "1":
        out = [(None, 0.7, {})]
        for extra in extras:
            out += [(f"{extra}:{w:g}", 0.7, {extra: w}) for w in [*WEIGHTS[1:], 1e3]]
        return out
    out = [("tcf_3:0.7", 0.7, {"tcf_3": 0.7})]
    for a in (0.3, 0.5, 0.7, 1.0):
        for c in (0.5, 0.7, 1.0, 1.5):
            out.append((f"tcf_3:{c:g}", a, {"tcf_3": c}))
            for extra in extras:
                if extra.startswith("tcfa"):
                    out.append((f"{extra}:{c:g}", a, {extra: c}))
            for e in (0.3, 0.5):
                out.append((f"tcf_3:{c:g}+cf_3:{e:g}", a, {"tcf_3": c, "cf_3": e}))
    return out


def summary(path: str) -> None:
    """Per mix (terms:weights, knn weight): mean Recall@20 change over the yardstick (a
    results line's first row), its s.e. and the seeds won."""
    diffs: dict[tuple[str, float], list[float]] = {}
    bases = []
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        rows = json.loads(line)["rows"]
        base = rows[0]["r20"]
        bases.append(base)
        for r in rows[1:]:
            diffs.setdefault((r["extra"], r["w"]), []).append(r["r20"] - base)
    print(f"yardstick {np.mean(bases):.4f} over {len(bases)} seeds")
    ranked = sorted(diffs.items(), key=lambda kv: -float(np.mean(kv[1])))
    for (extra, w), d in ranked[:15]:
        se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        won = sum(x > 0 for x in d)
        print(f"{extra:>28} knn {w:<4g} {np.mean(d):+.4f} +- {se:.4f} ({won}/{len(d)})")


def main() -> None:
    if sys.argv[1] == "summary":
        summary(sys.argv[2])
        return
    d, part = sys.argv[1:3]
    ds, vecs = open_data(d, OUT)
    vecs = np.asarray(vecs, dtype=np.float64)
    for seed in map(int, sys.argv[3:]):
        t0 = time.time()
        split = make_split("item-cold", ds, seed)
        data = train_data(ds, split, vecs.astype(np.float32))
        tower = create("coldstart-no-ranker", seed, {})
        tower.fit(data)
        knn = create("content-knn", seed, {"neighbors": 200})
        knn.fit(data)
        als = create("als", seed, {})
        als.fit(data)
        sm = tower._model
        spec = sm.data.spec

        def tower_users(req: Any, sm: Any = sm, spec: Any = spec) -> np.ndarray:
            attrs = spec.user_vocab.from_blocks(len(req), req.user_attributes)
            hist = [np.asarray(h, dtype=np.int64) for h in req.history]
            return np.asarray(sm.user_vecs(np.asarray(req.users), attrs, hist), np.float64)

        def als_users(req: Any, als: Any = als) -> np.ndarray:
            return np.stack(
                [
                    als.user_factors[u] if als.known_users[u] else als.fold_in(np.asarray(h))
                    for u, h in zip(req.users, req.history, strict=True)
                ]
            )

        counts = data.item_train_counts()
        warm = np.flatnonzero(counts > 0)
        items = np.arange(ds.n_items)
        near = nearest_warm(vecs, items, warm, max(KS))
        tvec = np.asarray(sm.item_vecs, dtype=np.float64)
        parts: dict[str, Any] = {"t": tower, "knn": knn}
        for k in KS:
            parts[f"ntow_{k}"] = Component(tower_users, tvec[near[:, :k]].mean(axis=1))
            parts[f"nals_{k}"] = Component(als_users, als.item_factors[near[:, :k]].mean(axis=1))
        x, y = vecs[warm], als.item_factors[warm]
        for lam in RIDGE:
            w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
            parts[f"cf_{lam:g}"] = Component(als_users, vecs @ w)
            w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ tvec[warm])
            parts[f"tcf_{lam:g}"] = Component(tower_users, vecs @ w)
        # Round 3: the map weighted by log(1 + count) (a rarely seen item's vector is mostly
        # its content guess), and the map to the id part only (full minus content-only vector).
        from services.trainer.model.train import item_vectors

        own = item_vectors(sm.result.towers, sm.data, np.zeros(ds.n_items, dtype=np.int64))
        resid = tvec - np.asarray(own, dtype=np.float64)
        sw = np.log1p(counts[warm])[:, None]
        eye = np.eye(x.shape[1])
        w = np.linalg.solve(x.T @ (sw * x) + 3.0 * eye, x.T @ (sw * tvec[warm]))
        parts["tcfw_3"] = Component(tower_users, vecs @ w)
        w = np.linalg.solve(x.T @ x + 3.0 * eye, x.T @ resid[warm])
        parts["tcfr_3"] = Component(tower_users, vecs @ w)
        for scale in ATTR_SCALES:
            xa = np.hstack([vecs, scale * np.asarray(sm.data.item_attrs, dtype=np.float64)])
            for lam in RIDGE[:2]:
                eye = np.eye(xa.shape[1])
                w = np.linalg.solve(xa[warm].T @ xa[warm] + lam * eye, xa[warm].T @ tvec[warm])
                parts[f"tcfa{scale:g}_{lam:g}"] = Component(tower_users, xa @ w)
        fit_s = time.time() - t0
        rows = []
        extras = [k for k in parts if k not in ("t", "knn")]
        for task in split.tasks_for(part):
            rec = Recorder(parts)
            evaluate_task(rec, ds, task, seed)
            for label, knn_weight, terms in mixes(extras):
                r = evaluate_task(Replay(rec.batches, terms, knn_weight), ds, task, seed)
                rows.append({"extra": label, "w": knn_weight, "r20": r["recall@20"],
                             "n20": r["ndcg@20"]})  # fmt: skip
        line = {"data": d, "part": part, "seed": seed, "fit_s": round(fit_s, 1),
                "secs": round(time.time() - t0, 1), "rows": rows}  # fmt: skip
        with open(OUT / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        best = sorted(rows, key=lambda x: -x["r20"])[:5]
        print(d, seed, line["secs"], "base", round(rows[0]["r20"], 4), "best", best, flush=True)


if __name__ == "__main__":
    main()
