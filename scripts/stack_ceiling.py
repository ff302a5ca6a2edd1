"""Item cold-start: could every lead measured so far, stacked, reach the 1.15x target?

    OUT=DIR python scripts/stack_ceiling.py DATA PART SEED [SEED ...]
    python scripts/stack_ceiling.py summary OUT/results.jsonl
    python scripts/stack_ceiling.py replay OUT DATA PART knn=0.7 map=0.7 uknn=0.2 [cf=0.5 ...]

Per seed, on the item-cold split's ``PART`` users, this records over the default model's
head (the towers' top 100; ``fold_blend_trials.terms``) the default blend's terms and
every lead docs/MODEL.md lists as open, each scored on the same head items (saved as
OUT/DATA-PART-SEED.npz for other mixes):

- ``cf``: ALS user factors . (text x W), W a ridge map (penalty 3) to ALS item factors
  (CB2CF, run 8);
- ``dnet``: DropoutNet's score (the second opinion, run 8);
- ``title``: the knn term over the title alone (run 10);
- ``ens``: z of two more tower fits' scores (seeds + 1000, + 2000) added to the tower
  term; ``ensavg`` the same with the three fits' terms averaged, so the towers keep their
  share of the blend (a three-fit ensemble, runs 5/7/10).

It then scores the default blend, each lead at the weight its run measured best, all
leads together at those weights, and the best weights for all terms found by coordinate
ascent *on ``PART`` itself* (in-sample, so optimistic: a ceiling for stacking these terms
linearly, not a result). One JSON line per seed.
"""

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fold_blend_trials import item_cold_queries, terms
from trial_common import append_result, create, fit_towers, open_data, z

from services.common.recsys_features import content_knn_scores, content_thresholds
from services.trainer.baselines.base import ScoreRequest
from services.trainer.data.vectors import MINILM, cached_vectors
from services.trainer.model.train import item_vectors, user_vectors

OUT = Path(os.environ.get("OUT", ".run/trials/stack"))
# The default blend, then each lead at its measured weight.
DEFAULT = {"knn": 0.7, "map": 0.7, "uknn": 0.2}
LEADS = {"cf": 0.5, "dnet": 0.35, "title": 0.5, "ensavg": 1.0}
GRID = (0.0, 0.2, 0.35, 0.5, 0.7, 1.0, 1.5, 2.0)


def recall(rec: dict[str, np.ndarray], weights: dict[str, float]) -> float:
    """Mean Recall@20 of z(tower) + sum of w x z(term) over the head (``ens`` adds the
    other fits' standardised tower scores); users without history keep the tower order."""
    s = z(rec["t"])
    for name, w in weights.items():
        if w:
            s = s + w * rec[f"z_{name}"]
    s = np.where(rec["has_hist"][:, None], s, rec["t"])
    top = np.argsort(-s, axis=1, kind="stable")[:, :20]
    hits = np.take_along_axis(rec["hit"], top, axis=1).sum(axis=1)
    return float(np.mean(hits / rec["n_targets"]))


def coordinate_ascent(rec: dict[str, np.ndarray], start: dict[str, float]) -> dict[str, Any]:
    w = dict(start)
    best = recall(rec, w)
    for _ in range(3):
        moved = False
        for name in w:
            for v in GRID:
                trial = {**w, name: v}
                r = recall(rec, trial)
                if r > best + 1e-12:
                    best, w, moved = r, trial, True
        if not moved:
            break
    return {"weights": w, "recall": best}


def main() -> None:
    d, part = sys.argv[1:3]
    ds, vecs = open_data(d, OUT)
    titles = [re.sub(r"\s*\(\d{4}\)\s*$", "", t) for t in ds.items.text_fields["title"]]
    title_vecs = np.asarray(cached_vectors(titles, MINILM), dtype=np.float32)
    title_vecs /= np.maximum(np.linalg.norm(title_vecs, axis=1, keepdims=True), 1e-9)
    title_th = content_thresholds(title_vecs)
    for seed in map(int, sys.argv[3:]):
        t0 = time.time()
        data, task, users, hists, unl = item_cold_queries(ds, vecs, seed, part)
        cands = np.asarray(task.candidates, dtype=np.int64)
        fits = []
        for s in (seed, seed + 1000, seed + 2000):
            fits.append(fit_towers(data, s))
        sm = fits[0]
        md = sm.data
        content = np.asarray(md.content, dtype=np.float32)
        rec = terms(sm.result.towers, md, content, np.asarray(sm.thresholds), users, hists,
                    unl, list(task.targets), cands)  # fmt: skip
        items = rec["items"]  # (users, head) item ids
        for name in ("knn", "map", "uknn"):
            rec[f"z_{name}"] = z(rec[name])

        ens = np.zeros(items.shape)
        for other in fits[1:]:
            iv = item_vectors(other.result.towers, other.data)
            uv = user_vectors(other.result.towers, other.data, other.data.user_attrs[users],
                              other.data.user_codes[users].astype(np.int64), hists, iv,
                              other.data.interest[users], unl)  # fmt: skip
            ens += z(np.einsum("rd,rcd->rc", uv, iv[items]))
        rec["z_ens"] = ens
        rec["z_ensavg"] = (z(rec["t"]) + ens) / 3.0 - z(rec["t"])

        als = create("als", seed, {})
        als.fit(data)
        af = np.asarray(als.item_factors, dtype=np.float64)
        warm = np.flatnonzero(data.item_train_counts() > 0)
        x = np.asarray(content, dtype=np.float64)
        w = np.linalg.solve(x[warm].T @ x[warm] + 3.0 * np.eye(x.shape[1]), x[warm].T @ af[warm])
        au = np.stack([als.user_factors[u] if als.known_users[u] else als.fold_in(h)
                       for u, h in zip(users, hists, strict=True)])  # fmt: skip
        rec["z_cf"] = z(np.einsum("rd,rcd->rc", au, (x @ w)[items]))

        dnet = create("dropoutnet", seed, {})
        dnet.fit(data)
        column = np.full(ds.n_items, -1, dtype=np.int64)
        column[cands] = np.arange(len(cands))
        cat = ds.users.categorical
        dn = np.zeros(items.shape)
        for start in range(0, len(users), 256):
            b = users[start : start + 256]
            req = ScoreRequest(users=b, user_attributes={f: c.matrix[b] for f, c in cat.items()},
                               history=hists[start : start + 256], candidates=cands,
                               user_text=None)  # fmt: skip
            sc = np.asarray(dnet.score(req), dtype=np.float64)
            dn[start : start + len(b)] = np.take_along_axis(
                sc, column[items[start : start + len(b)]], axis=1
            )
        rec["z_dnet"] = z(dn)

        rec["z_title"] = z(np.stack([
            content_knn_scores(title_vecs, h, items[r], title_th[items[r]])
            for r, h in enumerate(hists)
        ]))  # fmt: skip

        keep = ("t", "hit", "n_targets", "has_hist")
        np.savez(OUT / f"{d}-{part}-{seed}.npz",
                 **{k: v for k, v in rec.items() if k in keep or k.startswith("z_")})  # fmt: skip
        line: dict[str, Any] = {"data": d, "part": part, "seed": seed,
                                "default": recall(rec, DEFAULT)}  # fmt: skip
        line["+ens"] = recall(rec, {**DEFAULT, "ens": 1.0})
        for lead, weight in LEADS.items():
            line[f"+{lead}"] = recall(rec, {**DEFAULT, lead: weight})
        line["+all leads"] = recall(rec, {**DEFAULT, **LEADS})
        line["in-sample best"] = coordinate_ascent(rec, {**DEFAULT, **LEADS})
        line["in-sample best, default terms"] = coordinate_ascent(rec, DEFAULT)
        line["secs"] = round(time.time() - t0, 1)
        append_result(OUT, line)


def summary(path: str) -> None:
    with open(path) as f:
        lines = [json.loads(x) for x in f]
    for d in sorted({x["data"] for x in lines}):
        rows = [x for x in lines if x["data"] == d]
        print(f"{d} ({rows[0]['part']}, seeds {[x['seed'] for x in rows]}):")
        for k in rows[0]:
            if k in ("data", "part", "seed", "secs"):
                continue
            vals = [x[k]["recall"] if isinstance(x[k], dict) else x[k] for x in rows]
            print(f"  {k:32s} {np.mean(vals):.4f}  per seed {[round(v, 4) for v in vals]}")


def replay(folder: str, d: str, part: str, weights: list[str]) -> None:
    """Recall@20 per saved seed of one mix of the recorded terms, without refitting."""
    w = {k: float(v) for k, v in (x.split("=") for x in weights)}
    vals = []
    for path in sorted(Path(folder).glob(f"{d}-{part}-*.npz")):
        rec = dict(np.load(path))
        vals.append(recall(rec, w))
        print(f"{path.name}: {vals[-1]:.4f}")
    print(f"mean {np.mean(vals):.4f} over {len(vals)} seeds, weights {w}")


if __name__ == "__main__":
    if sys.argv[1] == "summary":
        summary(sys.argv[2])
    elif sys.argv[1] == "replay":
        replay(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        main()
