"""Ensemble trials on item cold-start: the model's head re-scored with a second model.

    OUT=DIR python scripts/ensemble_trials.py DATA PART SEED [SEED ...]

Per seed, on the item-cold split's ``PART`` tasks, fits ``coldstart`` (the default
model) and ``OTHER`` (env, default ``dropoutnet``), records both models' scores once,
then replays ``z(coldstart) + w z(OTHER)`` over each user's top 100 by ``coldstart``
(the rest below in its order) for a grid of w. One JSON line per seed goes to
OUT/results.jsonl; ``python scripts/neighbour_trials.py summary OUT/results.jsonl``
summarises it (the first row, w = 0, is the yardstick).
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

OUT = Path(os.environ.get("OUT", ".run/trials/ensemble"))
OTHER = os.environ.get("OTHER", "dropoutnet")
WEIGHTS = [0.0, 0.2, 0.35, 0.5, 0.7, 1.0]


class Replay:
    def __init__(self, batches: list[dict[str, Any]], weight: float) -> None:
        self.batches, self.weight, self.i = batches, weight, 0

    def score(self, req: Any) -> np.ndarray:
        b = self.batches[self.i]
        self.i += 1
        return head_mix(b["t"], [(b["other"], self.weight)], b["hist"], b["cands"])


def main() -> None:
    d, part = sys.argv[1:3]
    ds, vecs = open_data(d, OUT)
    for seed in map(int, sys.argv[3:]):
        t0 = time.time()
        split = make_split("item-cold", ds, seed)
        data = train_data(ds, split, vecs)
        parts = {"t": create("coldstart", seed, {}), "other": create(OTHER, seed, {})}
        for model in parts.values():
            model.fit(data)
        rows = []
        for task in split.tasks_for(part):
            rec = Recorder(parts)
            evaluate_task(rec, ds, task, seed)
            for w in WEIGHTS:
                r = evaluate_task(Replay(rec.batches, w), ds, task, seed)
                rows.append({"extra": f"{OTHER}:{w:g}", "w": 0.0, "r20": r["recall@20"],
                             "n20": r["ndcg@20"]})  # fmt: skip
        line = {"data": d, "part": part, "seed": seed, "secs": round(time.time() - t0, 1),
                "rows": rows}  # fmt: skip
        with open(OUT / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        print(d, seed, line["secs"], [(x["extra"], round(x["r20"], 4)) for x in rows], flush=True)


if __name__ == "__main__":
    main()
