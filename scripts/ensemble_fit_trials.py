"""Item cold-start: how much do tower fits vary on one split, and what do K of them give?

    OUT=DIR python scripts/ensemble_fit_trials.py DATA PART SPLIT_SEED [SPLIT_SEED ...]

Per split seed, fits the towers (``coldstart-no-ranker``) with model seeds s, s+1000, ...
(``FITS``, default 4) on the same item-cold split and scores ``PART``: each fit alone
(towers, default blend) and the K-fit ensemble (z-scored tower and map scores averaged over
the fits, the blend over the ensemble's top 100). One JSON line per split seed.

SOUP=1: every fit starts from the same initial weights (those of model seed s; only the
batch order and dropout masks differ), and the fits' averaged weights ("soup": one model,
served as one) are scored beside them.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from fold_blend_trials import item_cold_queries
from trial_common import create, open_data, z

from services.common.recsys_features import content_knn_scores, content_map
from services.trainer.model.train import item_vectors, user_vectors

OUT = Path(os.environ.get("OUT", ".run/trials/ensemble-fits"))
SOUP = os.environ.get("SOUP") == "1"
FITS = int(os.environ.get("FITS", "4"))
WEIGHTS = (0.7, 0.7, 0.2)  # knn, map, unliked knn: the default blend


def recall_at_20(scores: np.ndarray, targets: list[np.ndarray], cands: np.ndarray) -> float:
    top = cands[np.argsort(-scores, axis=1, kind="stable")[:, :20]]
    return float(np.mean([np.isin(t, top[r]).sum() / len(t) for r, t in enumerate(targets)]))


def blend(
    tz: np.ndarray, mz: np.ndarray, knn: np.ndarray, uknn: np.ndarray, has: np.ndarray
) -> np.ndarray:
    """The default blend over each user's top 100 by ``tz`` (z-scores over all candidates
    in, re-standardised over the head), the rest below."""
    out = tz - 1e4
    a, b, c = WEIGHTS
    for r in range(len(tz)):
        if not has[r]:
            out[r] = tz[r]
            continue
        head = np.argsort(-tz[r], kind="stable")[:100]
        out[r, head] = (
            z(tz[r, head]) + a * z(knn[r, head]) + b * z(mz[r, head]) + c * z(uknn[r, head])
        )
    return out


def same_init(seed: int) -> None:
    """Every tower fit from now on starts from the initial weights of model seed ``seed``."""
    import services.trainer.model.train as train_mod

    make = train_mod.make_towers

    def make_towers(data, cfg):  # type: ignore[no-untyped-def]
        return make(data, cfg.with_options(seed=seed))

    train_mod.make_towers = make_towers  # type: ignore[assignment]


def soup_of(results: list) -> object:  # type: ignore[type-arg]
    """A ScoringModel over the first result with every fit's tower weights averaged."""
    import copy
    import dataclasses

    import torch

    from services.trainer.model.recommender import ScoringModel

    towers = copy.deepcopy(results[0].towers)
    states = [r.towers.state_dict() for r in results]
    avg = {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
        for k, v in states[0].items()
    }
    towers.load_state_dict(avg)
    return ScoringModel(dataclasses.replace(results[0], towers=towers))


def main() -> None:
    d, part = sys.argv[1:3]
    ds, vecs = open_data(d, OUT)
    for split_seed in map(int, sys.argv[3:]):
        t0 = time.time()
        data, task, users, hists, unl = item_cold_queries(ds, vecs, split_seed, part)
        cands = np.asarray(task.candidates, dtype=np.int64)
        targets = list(task.targets)
        has = np.array([len(h) > 0 for h in hists])
        knn = uknn = None
        tzs, mzs, rows, results = [], [], [], []
        if SOUP:
            same_init(split_seed)
        for f in range(FITS + (1 if SOUP else 0)):
            if f < FITS:
                model = create("coldstart-no-ranker", split_seed + 1000 * f, {})
                model.fit(data)
                sm = model._model
                results.append(sm.result)
            else:
                sm = soup_of(results)
            md = sm.data
            if knn is None:
                th = np.asarray(sm.thresholds)[cands]
                knn = np.stack([content_knn_scores(md.content, h, cands, th) for h in hists])
                uknn = np.stack(
                    [
                        content_knn_scores(md.content, u, cands, th)
                        if len(u)
                        else np.zeros(len(cands))
                        for u in unl
                    ]
                )
            iv = item_vectors(sm.result.towers, md)
            uv = user_vectors(
                sm.result.towers,
                md,
                md.user_attrs[users],
                md.user_codes[users].astype(np.int64),
                hists,
                iv,
                md.interest[users],
            )
            cmap = content_map(md.content, iv, md.pop > 0)
            tz, mz = z(uv @ iv[cands].T), z(uv @ (md.content[cands] @ cmap).T)
            if f < FITS:
                tzs.append(tz)
                mzs.append(mz)
            rows.append({"towers": recall_at_20(tz, targets, cands),
                         "blend": recall_at_20(blend(tz, mz, knn, uknn, has), targets, cands)})  # fmt: skip
        ens = {}
        for k in range(2, FITS + 1):
            tz, mz = np.mean(tzs[:k], axis=0), np.mean(mzs[:k], axis=0)
            ens[k] = {"towers": recall_at_20(tz, targets, cands),
                      "blend": recall_at_20(blend(tz, mz, knn, uknn, has), targets, cands)}  # fmt: skip
        line = {"data": d, "part": part, "split_seed": split_seed, "fits": rows, "ensembles": ens,
                "secs": round(time.time() - t0, 1)}  # fmt: skip
        OUT.mkdir(parents=True, exist_ok=True)
        with open(OUT / "results.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
