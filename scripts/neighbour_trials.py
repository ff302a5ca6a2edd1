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
  vector only (full minus content-only), scored like tcf;
- ``lpop_L`` / ``lpopt_L`` (ROUND 5): the item's log popularity predicted by a ridge
  (penalty L) from text and attributes / text alone, fitted on warm items;
- ``tmean`` / ``tmeanw`` (ROUND 6): the mean training user's tower vector (plain /
  weighted by each user's positives) against the item's: a non-personal popularity guess
  in the towers' own space (servable: one vector per version);
- ``knnall`` / ``knnneg`` / ``tall`` / ``tcfall`` (ROUND 7): the user's non-positive
  training items (rated below the threshold) as history too: knn over all rated items
  (instead of the liked-only knn), knn over the unliked ones alone (beside it: the run-9
  default at 0.2), the tower and map terms with the user vector pooled over all rated items;
- ``tneg`` / ``cneg`` (ROUND 8, on top of the run-9 default): the mean tower / text vector
  of the user's unliked items against the candidate's;
- ``knntop`` / ``knnmid`` / ``knnlow`` (ROUND 9): knn over the user's training items rated at
  the scale's top / one step below the threshold (3-3.5) / lower;
- ``knnW`` / ``knnnegW`` (ROUND 10): the liked and unliked knn terms over the user's last W
  training interactions only (serving's window), W in 50, 100, 200.

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


POP_RIDGE = [1.0, 10.0, 30.0]


def popularity_guess(feats: np.ndarray, counts: np.ndarray, penalty: float) -> np.ndarray:
    """(n_items, 1): log(1 + training positives) predicted from ``feats`` by a ridge fitted
    on the warm items (centred, so the intercept is not penalised)."""
    warm = counts > 0
    mu = feats[warm].mean(axis=0)
    x, y = feats[warm] - mu, np.log1p(counts[warm])
    w = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ (y - y.mean()))
    out: np.ndarray = ((feats - mu) @ w)[:, None]
    return out


class WithUnliked:
    """A component scored with each request user's history extended (``mode`` "extend") or
    replaced (``mode`` "replace") by the items ``extra_items`` holds for them (their
    non-positive training items; in ROUND 9-10 a rating band or a window)."""

    def __init__(self, inner: Any, extra_items: dict[int, np.ndarray], mode: str) -> None:
        self.inner, self.extra_items, self.mode = inner, extra_items, mode

    def score(self, req: Any) -> np.ndarray:
        import dataclasses

        empty = np.zeros(0, dtype=np.int64)
        extra = [self.extra_items.get(int(u), empty) for u in req.users]
        if self.mode == "extend":
            hist = [
                np.concatenate([np.asarray(h, np.int64), e])
                for h, e in zip(req.history, extra, strict=True)
            ]
        else:
            hist = extra
        out: np.ndarray = self.inner.score(dataclasses.replace(req, history=hist))
        return out


def unliked_parts(
    data: Any, knn: Any, tower_users: Any, vecs: np.ndarray, warm: np.ndarray, tvec: np.ndarray
) -> dict[str, Any]:
    """ROUND 7's terms: knn over all rated items / over the unliked ones only, and the
    tower and map terms with the user vector pooled over all rated items."""
    tr = data.train
    neg = tr.value < data.dataset.positive_threshold
    order = np.argsort(tr.user[neg], kind="stable")
    users, items = tr.user[neg][order], tr.item[neg][order]
    cuts = np.flatnonzero(np.diff(users)) + 1
    unliked = {
        int(g[0]): i
        for g, i in zip(np.split(users, cuts), np.split(items, cuts), strict=True)
        if len(g)
    }
    x = vecs[warm]
    w = np.linalg.solve(x.T @ x + 3.0 * np.eye(x.shape[1]), x.T @ tvec[warm])
    all_users = WithUnliked(Component(tower_users, tvec), unliked, "extend")
    all_map = WithUnliked(Component(tower_users, vecs @ w), unliked, "extend")

    def centroid(table: np.ndarray) -> Any:
        def users(req: Any) -> np.ndarray:
            rows = [unliked.get(int(u), np.zeros(0, np.int64)) for u in req.users]
            return np.stack(
                [table[r].mean(0) if len(r) else np.zeros(table.shape[1]) for r in rows]
            )

        return users

    return {
        "tneg": Component(centroid(tvec), tvec),
        "cneg": Component(centroid(vecs), vecs),
        "knnall": WithUnliked(knn, unliked, "extend"),
        "knnneg": WithUnliked(knn, unliked, "replace"),
        "tall": all_users,
        "tcfall": all_map,
    }


WINDOWS = [50, 100, 200]


def window_parts(data: Any, knn: Any) -> dict[str, Any]:
    """ROUND 10: the liked and unliked knn terms over each user's last W training
    interactions only (the fusion service keeps the last ``history_length`` of both
    kinds together; 50 by default)."""
    tr = data.train
    order = np.lexsort((tr.timestamp, tr.user))
    users, items = tr.user[order], tr.item[order].astype(np.int64)
    liked = tr.value[order] >= data.dataset.positive_threshold
    cuts = np.flatnonzero(np.diff(users)) + 1
    out: dict[str, Any] = {}
    for w in WINDOWS:
        keep_liked: dict[int, np.ndarray] = {}
        keep_low: dict[int, np.ndarray] = {}
        for u, i, ok in zip(
            np.split(users, cuts), np.split(items, cuts), np.split(liked, cuts), strict=True
        ):
            if len(u):
                keep_liked[int(u[0])], keep_low[int(u[0])] = i[-w:][ok[-w:]], i[-w:][~ok[-w:]]
        out[f"knn{w}"] = WithUnliked(knn, keep_liked, "replace")
        out[f"knnneg{w}"] = WithUnliked(knn, keep_low, "replace")
    return out


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
        self,
        batches: list[dict[str, Any]],
        terms: dict[str, float],
        knn_weight: float = 0.7,
        head: int = 100,
    ) -> None:
        self.batches, self.terms, self.knn_weight, self.i = batches, terms, knn_weight, 0
        self.head = head

    def score(self, req: Any) -> np.ndarray:
        b = self.batches[self.i]
        self.i += 1
        terms = [(b["knn"], self.knn_weight)] + [(b[t], w) for t, w in self.terms.items()]
        return head_mix(b["t"], terms, b["hist"], b["cands"], self.head)


Mix = tuple[str | None, float, dict[str, float]]
HEADS = [100, 150, 200, 300, 500, 10**9]


def head_of(label: str | None) -> int:
    """ROUND 4 labels end in "@HEAD" (the re-scored head's size); the others use 100."""
    return int(label.rsplit("@", 1)[1]) if label and "@" in label else 100


def mixes(extras: list[str]) -> list[Mix]:
    """(label, knn weight, {term: weight}), the first being the yardstick. ROUND 1: the
    run-6 blend alone, then each term at each weight; ROUND 2: the run-8 default (the map
    term tcf_3 at 0.7), then joint grids around it; ROUND 3: the default, then tcfw / tcfr;
    ROUND 4: the default, then the same blend (and heavier weights) over larger heads;
    ROUND 5: the default, then the default plus a predicted-popularity term; ROUND 6:
    the default, then the default plus the mean user's score; ROUND 7: the default, then
    the user's non-positive training items used as history too (beside or instead of the
    positive-only terms)."""
    out: list[Mix]
    if os.environ.get("ROUND", "1") == "10":
        out = [("knnneg:0.2", 0.7, {"tcf_3": 0.7, "knnneg": 0.2})]
        for w in WINDOWS:
            terms = {"tcf_3": 0.7, f"knn{w}": 0.7, f"knnneg{w}": 0.2}
            out.append((f"window{w}", 0.0, terms))
        return out
    if os.environ.get("ROUND", "1") == "9":
        base = {"tcf_3": 0.7, "knnneg": 0.2}
        out = [("knnneg:0.2", 0.7, base)]
        for extra in ("knntop", "knnmid", "knnlow"):
            out += [(f"{extra}:{w:g}", 0.7, {**base, extra: w}) for w in WEIGHTS[1:6]]
        for w in WEIGHTS[1:5]:  # the unliked term split by rating band instead
            out.append((f"mid0.2+low:{w:g}", 0.7, {"tcf_3": 0.7, "knnmid": 0.2, "knnlow": w}))
        return out
    if os.environ.get("ROUND", "1") == "8":
        base = {"tcf_3": 0.7, "knnneg": 0.2}
        out = [("knnneg:0.2", 0.7, base)]
        for extra in ("tneg", "cneg"):
            out += [(f"{extra}:{w:g}", 0.7, {**base, extra: w}) for w in WEIGHTS[1:6]]
        return out
    if os.environ.get("ROUND", "1") == "7":
        out = [("tcf_3:0.7", 0.7, {"tcf_3": 0.7})]
        for c in WEIGHTS[1:7]:
            out.append((f"knnall:{c:g}", 0.0, {"tcf_3": 0.7, "knnall": c}))
            out.append((f"knn+knnneg:{c:g}", 0.7, {"tcf_3": 0.7, "knnneg": c}))
            out.append((f"tall:{c:g}", 0.7, {"tcf_3": 0.7, "tall": c}))
            out.append((f"tcfall:{c:g}", 0.7, {"tcfall": c}))
        return out
    if os.environ.get("ROUND", "1") in ("5", "6"):  # one extra term on top of the default
        prefix, weights = (
            ("lpop", WEIGHTS[1:6]) if os.environ["ROUND"] == "5" else ("tmean", WEIGHTS[1:7])
        )
        out = [("tcf_3:0.7", 0.7, {"tcf_3": 0.7})]
        for extra in extras:
            if extra.startswith(prefix):
                out += [(f"{extra}:{w:g}", 0.7, {"tcf_3": 0.7, extra: w}) for w in weights]
        return out
    if os.environ.get("ROUND", "1") == "4":
        out = [("tcf_3:0.7", 0.7, {"tcf_3": 0.7})]
        for head in HEADS[1:]:
            for a, c in ((0.7, 0.7), (1.0, 1.0), (1.0, 1.5), (0.5, 0.5)):
                out.append((f"tcf_3:{c:g}@{head}", a, {"tcf_3": c}))
        return out
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
        if os.environ.get("ROUND", "1") == "4":  # head sizes only: record just the default's terms
            parts = {k: parts[k] for k in ("t", "knn", "tcf_3")}
        if os.environ.get("ROUND", "1") == "5":  # a new item's predicted popularity
            parts = {k: parts[k] for k in ("t", "knn", "tcf_3")}
            xa = np.hstack([vecs, np.asarray(sm.data.item_attrs, dtype=np.float64)])
            for name, feats in (("lpop", xa), ("lpopt", vecs)):
                for lam in POP_RIDGE:
                    parts[f"{name}_{lam:g}"] = Component(
                        lambda req: np.ones((len(req), 1)), popularity_guess(feats, counts, lam)
                    )
        if os.environ.get("ROUND", "1") == "6":  # the mean training user's tower score
            parts = {k: parts[k] for k in ("t", "knn", "tcf_3")}
            md = sm.data
            active = np.flatnonzero(np.diff(md.user_offsets) > 0)
            hist = [md.history(u).astype(np.int64) for u in active]
            uvec = np.asarray(sm.user_vecs(active, md.user_attrs[active], hist), np.float64)
            n_pos = np.diff(md.user_offsets)[active].astype(np.float64)
            for name, wts in (("tmean", np.ones_like(n_pos)), ("tmeanw", n_pos)):
                mean_user = (wts[:, None] * uvec).sum(axis=0) / wts.sum()
                parts[name] = Component(lambda req, m=mean_user: np.tile(m, (len(req), 1)), tvec)
        if os.environ.get("ROUND", "1") in ("7", "8", "9", "10"):  # the non-positive ratings too
            parts = {k: parts[k] for k in ("t", "knn", "tcf_3")}
            parts.update(unliked_parts(data, knn, tower_users, vecs, warm, tvec))
        if os.environ.get("ROUND", "1") == "10":  # serving's window: the last W interactions
            parts.update(window_parts(data, knn))
        if os.environ.get("ROUND", "1") == "9":  # history by rating band
            tr, top = data.train, float(data.train.value.max())
            thr = data.dataset.positive_threshold
            for name, lo, hi in (
                ("knntop", top, np.inf),
                ("knnmid", thr - 1, thr),
                ("knnlow", -np.inf, thr - 1),
            ):
                band = (tr.value >= lo) & (tr.value < hi)
                by_user: dict[int, np.ndarray] = {}
                for u in np.unique(tr.user[band]):
                    by_user[int(u)] = tr.item[band & (tr.user == u)].astype(np.int64)
                parts[name] = WithUnliked(knn, by_user, "replace")
        fit_s = time.time() - t0
        rows = []
        extras = [k for k in parts if k not in ("t", "knn")]
        for task in split.tasks_for(part):
            rec = Recorder(parts)
            evaluate_task(rec, ds, task, seed)
            for label, knn_weight, terms in mixes(extras):
                replay = Replay(rec.batches, terms, knn_weight, head_of(label))
                r = evaluate_task(replay, ds, task, seed)
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
