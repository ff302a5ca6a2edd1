"""New-item fusion trials: which extra terms lift the blend on item cold-start.

    OUT=DIR python scripts/fusion_trials.py DATA PART SEED [SEED ...]

Per seed, on the item-cold split's ``PART`` tasks, fits two tower models
(``coldstart-no-ranker`` at seeds s and s + 1000, for a two-fit ensemble) and
content-knn (200 neighbours), records every component's scores once, then
replays the batches for a grid of mixes over each user's top-``head`` by the
tower term (the rest below in tower order, as serving re-ranks its head):

    z(T) + a z(knn) + b z(npop_K)

T is the first tower or the sum of both towers' z-scores; ``npop_K`` is a
candidate's "neighbour popularity": log(1 + mean training count of its K
nearest *warm* items by text vector), a popularity guess for an item with none.
One JSON line per seed goes to OUT/results.jsonl.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from trial_common import create, evaluate_task, make_split, open_data, train_data, z

OUT = Path(os.environ.get("OUT", ".run/trials/fusion"))
HEADS = [100, 100000]
A = [0.0, 0.5, 0.7, 1.0]
B = [0.0, 0.1, 0.2, 0.3, 0.5]
NPOP_K = [10, 50]


def neighbour_popularity(vecs: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    warm = np.flatnonzero(counts > 0)
    out = np.zeros(len(vecs))
    for start in range(0, len(vecs), 1024):
        sims = vecs[start : start + 1024] @ vecs[warm].T
        top = np.argpartition(-sims, k, axis=1)[:, : k + 1]
        # Drop the item itself where it is warm (its own count is what a new item lacks).
        own = warm[top] == np.arange(start, start + len(sims))[:, None]
        c = np.where(own, np.nan, counts[warm[top]])
        out[start : start + len(sims)] = np.log1p(np.nanmean(c[:, :], axis=1))
    return out


class Recorder:
    name = "recorder"

    def __init__(self, parts: dict[str, Any]) -> None:
        self.parts, self.batches = parts, []  # type: ignore[var-annotated]

    def score(self, req: Any) -> np.ndarray:
        got = {k: np.asarray(m.score(req), dtype=np.float64) for k, m in self.parts.items()}
        got["hist"] = req.history  # type: ignore[assignment]
        got["cands"] = np.asarray(req.candidates)
        self.batches.append(got)
        return got["t"]


class Replay:
    name = "replay"

    def __init__(
        self, batches: list[dict[str, Any]], npop: dict[int, np.ndarray], mix: dict[str, Any]
    ) -> None:
        self.batches, self.npop, self.mix, self.i = batches, npop, mix, 0

    def score(self, req: Any) -> np.ndarray:
        b = self.batches[self.i]
        self.i += 1
        m = self.mix
        tower = z(b["t"]) + (z(b["t2"]) if m["ens"] else 0.0)
        cands = b["cands"]
        pop = self.npop[m["k"]][cands] if m["b"] else None
        out = tower - 1e4
        for r, h in enumerate(b["hist"]):
            t = tower[r].copy()
            t[np.isin(cands, h)] = -np.inf
            top = np.argsort(-t, kind="stable")[: min(m["head"], len(cands))]
            s = z(tower[r, top]) + m["a"] * z(b["knn"][r, top])
            if pop is not None:
                s = s + m["b"] * z(pop[top])
            out[r, top] = s
        return out


def main() -> None:
    d, part = sys.argv[1:3]
    ds, vecs = open_data(d, OUT)
    mixes = [
        {"head": h, "ens": e, "a": a, "b": b, "k": k}
        for h in HEADS
        for e in (False, True)
        for a in A
        for b in B
        for k in (NPOP_K if b else NPOP_K[:1])
    ]
    for seed in map(int, sys.argv[3:]):
        t0 = time.time()
        split = make_split("item-cold", ds, seed)
        data = train_data(ds, split, vecs)
        parts: dict[str, Any] = {}
        for key, s in (("t", seed), ("t2", seed + 1000)):
            parts[key] = create("coldstart-no-ranker", s, {})
            parts[key].fit(data)
        parts["knn"] = create("content-knn", seed, {"neighbors": 200})
        parts["knn"].fit(data)
        counts = np.asarray(data.positives.sum(axis=0)).ravel()
        npop = {k: neighbour_popularity(vecs, counts, k) for k in NPOP_K}
        fit_s = time.time() - t0
        rows = []
        for task in split.tasks_for(part):
            rec = Recorder(parts)
            evaluate_task(rec, ds, task, seed)
            for mix in mixes:
                r = evaluate_task(Replay(rec.batches, npop, mix), ds, task, seed)
                rows.append({**mix, "task": task.key, "r20": r["recall@20"], "n20": r["ndcg@20"]})
        line = {"data": d, "part": part, "seed": seed, "fit_s": round(fit_s, 1),
                "secs": round(time.time() - t0, 1), "rows": rows}  # fmt: skip
        with open(OUT / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        base = [
            x for x in rows if x["head"] == 100 and not x["ens"] and x["a"] == 0.7 and not x["b"]
        ]
        print(
            d,
            seed,
            line["secs"],
            "default blend r20",
            [round(x["r20"], 4) for x in base],
            flush=True,
        )


if __name__ == "__main__":
    main()
