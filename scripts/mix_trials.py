"""Score mixing trials: the towers' score plus alpha times content-knn's, per-row standardised.

    OUT=DIR python scripts/mix_trials.py DATA SPLIT PART SEED [SEED ...]

Fits ``coldstart-no-ranker`` and ``content-knn`` once per seed and evaluates
``z(tower) + alpha * z(knn)`` for a grid of alphas on the split's ``PART`` tasks.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from trial_common import create, evaluate_task, make_split, open_data, train_data, z

ALPHAS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 1e6]
RAW_ALPHAS = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
OUT = Path(os.environ.get("OUT", ".run/trials/mix"))


class ContentSim:
    """cmean / cmax: mean / max cosine of each candidate's text vector to the history's."""

    def __init__(self, vecs: np.ndarray, kind: str) -> None:
        self.vecs, self.kind = vecs, kind

    def score(self, req: Any) -> np.ndarray:
        cand = self.vecs[np.asarray(req.candidates)]
        out = np.zeros((len(req.history), len(cand)))
        for r, h in enumerate(req.history):
            if len(h):
                sims = cand @ self.vecs[np.asarray(h)].T
                out[r] = sims.mean(axis=1) if self.kind == "cmean" else sims.max(axis=1)
        return out


class NoHistory:
    """A model's scores with every history emptied (the user's attributes alone)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def score(self, req: Any) -> np.ndarray:
        from dataclasses import replace

        empty = [np.zeros(0, dtype=np.int64) for _ in req.history]
        return np.asarray(self.model.score(replace(req, history=empty)))


class HeadMix:
    """z(tower) + alpha z(other) over each user's top ``head`` by tower (history excluded),
    the rest kept below in tower order: what a serving re-rank of the head can do."""

    def __init__(self, a: Any, b: Any, alpha: float, head: int = 100) -> None:
        self.a, self.b, self.alpha, self.head, self.name = a, b, alpha, head, "mix"

    def score(self, req: Any) -> np.ndarray:
        tower = np.asarray(self.a.score(req), dtype=np.float64)
        other = np.asarray(self.b.score(req), dtype=np.float64)
        cands = np.asarray(req.candidates)
        out = tower - 1e4
        for r, h in enumerate(req.history):
            t = tower[r].copy()
            t[np.isin(cands, h)] = -np.inf
            k = min(self.head, len(cands))
            top = np.argsort(-t, kind="stable")[:k]
            out[r, top] = z(tower[r, top][None])[0] + self.alpha * z(other[r, top][None])[0]
        return out


class Mix:
    def __init__(self, a: Any, b: Any, alpha: float, norm: bool = True) -> None:
        self.a, self.b, self.alpha, self.norm, self.name = a, b, alpha, norm, "mix"

    def score(self, req: Any) -> np.ndarray:
        def f(x: Any) -> np.ndarray:
            return z(x) if self.norm else np.asarray(x, dtype=np.float64)

        if self.alpha >= 1e5:
            return f(self.b.score(req))
        return f(self.a.score(req)) + self.alpha * f(self.b.score(req))


def main() -> None:
    d, split_name, part = sys.argv[1:4]
    opts = json.loads(os.environ.get("OPTS", "{}"))
    knn_opts = json.loads(os.environ.get("KNN_OPTS", "{}"))
    ds, vecs = open_data(d, OUT)
    for seed in map(int, sys.argv[4:]):
        t0 = time.time()
        split = make_split(split_name, ds, seed)
        data = train_data(ds, split, vecs)
        tower = create("coldstart-no-ranker", seed, dict(opts))
        tower.fit(data)
        knn = create("content-knn", seed, dict(knn_opts))
        knn.fit(data)
        rows = []
        other = {
            "knn": knn,
            "cmean": ContentSim(vecs, "cmean"),
            "cmax": ContentSim(vecs, "cmax"),
            "k0": NoHistory(tower),
        }
        for mode in os.environ.get("MODES", "knn_z").split(","):
            kind, norm = mode.split("_")
            for alpha in ALPHAS if norm != "raw" else RAW_ALPHAS:
                for task in split.tasks_for(part):
                    if norm == "zh":
                        mix: Any = HeadMix(tower, other[kind], alpha)
                    else:
                        mix = Mix(tower, other[kind], alpha, norm == "z")
                    r = evaluate_task(mix, ds, task, seed)
                    rows.append(
                        {
                            "mode": mode,
                            "alpha": alpha,
                            "task": task.key,
                            "r20": r["recall@20"],
                            "n20": r["ndcg@20"],
                        }
                    )
        rec = {
            "data": d,
            "split": split_name,
            "part": part,
            "seed": seed,
            "opts": opts,
            "knn_opts": knn_opts,
            "secs": round(time.time() - t0, 1),
            "rows": rows,
        }
        with open(OUT / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            d,
            seed,
            rec["secs"],
            [(x["mode"], x["alpha"], round(x["r20"], 4)) for x in rows],
            flush=True,
        )


if __name__ == "__main__":
    main()
